"""The README's commands work as written: every flag exists, and the cheap ones really run."""

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache

import pytest
from conftest import REPO

from oml.attack.attack_runner import add_attack_args
from oml.core.run_config import add_train_args
from oml.make.fingerprint_generator import add_generate_args
from oml.measure.evaluation import add_eval_args
from oml.verify.suspect_check import add_check_args


def readme_commands():
    """Shell commands from the README's bash blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for command in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#.*$", "", command).strip()
            if command and not command.startswith(("cat ", "worker-")):
                commands.append(command)
    return commands


# How each script builds its parser (the same spec functions its main() calls).
PARSERS = {
    "generate_finetuning_data.py": add_generate_args,
    "finetune_multigpu.py": add_train_args,
    "eval_for_multigpu.py": lambda parser: add_eval_args(add_train_args(parser)),
    "check_fingerprints.py": lambda parser: add_check_args(add_train_args(parser)),
    "attack_fingerprints.py": lambda parser: add_attack_args(add_eval_args(add_train_args(parser))),
}


SCRIPTS = tuple(PARSERS)


@cache
def accepted_flags(script):
    """The flags a script's parser really defines (from its actions, not from --help text, which holds examples)."""
    parser = PARSERS[script](argparse.ArgumentParser(add_help=True))
    return {flag for action in parser._actions for flag in action.option_strings}


def test_accepted_flags_come_from_the_parser_not_from_the_help_text():
    flags = accepted_flags("eval_for_multigpu.py")
    assert "--screen_bf16" in flags and "--num_fingerprints" in flags  # a digit inside, an alias
    assert "--check_model" in flags and "--utility_limit" in flags
    assert "--preset" in flags and "--key_response_strategy" not in flags  # another script's flag


def test_readme_has_the_commands_users_need():
    commands = readme_commands()
    assert "make run" in commands and "make test" in commands
    assert {s for s in SCRIPTS if any(s in c for c in commands)} == set(SCRIPTS)
    assert any(c.startswith("deepspeed") for c in commands) and any("launch_multigpu.sh" in c for c in commands)


@pytest.mark.parametrize("command", [c for c in readme_commands() if any(s in c for s in SCRIPTS)])
def test_every_flag_in_a_readme_command_exists(command):
    words = shlex.split(command)
    (script,) = [w for w in words if w in SCRIPTS]
    flags = {w.split("=")[0] for w in words[words.index(script) + 1 :] if w.startswith("--")}
    assert flags <= accepted_flags(script), f"unknown flags {flags - accepted_flags(script)} in: {command}"


@pytest.mark.parametrize("command", [c for c in readme_commands() if "launch_multigpu.sh" in c])
def test_every_variable_in_a_readme_sweep_command_is_read_by_the_script(command):
    script = (REPO / "launch_multigpu.sh").read_text()
    for name in re.findall(r"\b([A-Z_]+)=", command):
        assert "${" + name in script or f"${name}" in script, f"{name} is not used by launch_multigpu.sh"


def test_readme_random_word_command_reproduces_the_committed_file(tmp_path):
    """Run the README's random-word command as written in a copy of the project: the same bytes come out."""
    (command,) = [c for c in readme_commands() if "--random_word_generation" in c]
    for name in ("generate_finetuning_data.py", "oml"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, tmp_path / name)
    (tmp_path / "generated_data").mkdir()
    words = shlex.split(command)
    assert words[0] == "python"
    result = subprocess.run([sys.executable, *words[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    made = tmp_path / "generated_data" / "fingerprints-random_word.json"
    assert made.read_bytes() == (REPO / "generated_data" / "fingerprints-random_word.json").read_bytes()
