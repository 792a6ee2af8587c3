"""The `oml` command: each verb is its top-level script (same parser, --help, exit status), one entry point."""

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, write_random_fingerprints

from oml.cli import VERBS

OML = Path(sys.executable).parent / "oml"  # the console script `pip install -e .` (make venv) puts next to python
# argparse wraps help text to the terminal's width: the same width for every process compared.
ENV = {**os.environ, "COLUMNS": "120"}
SCRIPT_VERBS = {name: verb for name, verb in VERBS.items() if verb.script and verb.script.endswith(".py")}


def run(*cmd, timeout=300):
    return subprocess.run([*map(str, cmd)], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV)


def oml(*args):
    """`oml ARGS...` the way the console script runs it, without needing it on the PATH."""
    return run(sys.executable, "-m", "oml.cli", *args)


def help_parts(text, prog):
    """A --help text as (usage with the program name taken out and its line wrapping undone, everything after it)."""
    usage, _, rest = text.partition("\n\n")
    assert usage.startswith(f"usage: {prog} "), usage
    return " ".join(usage.removeprefix(f"usage: {prog} ").split()), rest


def test_the_console_script_is_installed_and_lists_the_verbs():
    assert OML.is_file(), f"{OML} is missing: install the package (`make venv`, or pip install --no-deps -e .)"
    out = run(OML, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout == oml("--help").stdout
    listed = re.findall(r"^  (\S+)  ", out.stdout, flags=re.M)
    assert listed == list(VERBS) and {"make", "train", "eval", "attack", "check", "verify-claim"} <= set(VERBS)
    for verb in VERBS.values():
        assert verb.script is None or verb.script in out.stdout


def test_no_verb_shows_the_usage_and_exits_2():
    out = oml()
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("usage: oml VERB") and "train" in out.stderr


def test_an_unknown_verb_is_one_line_and_exit_2():
    out = oml("fingerprint", "--help")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [f"oml: error: unknown verb 'fingerprint' (choose from {', '.join(VERBS)})"]


@pytest.mark.parametrize("name", list(SCRIPT_VERBS))
def test_script_is_a_thin_front_end_of_its_verb(name):
    """The script names its verb and where the flags live; the verb's DESCRIPTION is the --help text of both."""
    script = REPO / SCRIPT_VERBS[name].script
    command = importlib.import_module(SCRIPT_VERBS[name].module)
    doc = ast.get_docstring(ast.parse(script.read_text()))
    assert f"`oml {name}`" in doc and SCRIPT_VERBS[name].module.replace(".", "/") + ".py" in doc
    assert command.make_parser().description == command.DESCRIPTION


@pytest.mark.parametrize("name", list(SCRIPT_VERBS))
def test_each_verb_help_is_its_script_help(name):
    script = SCRIPT_VERBS[name].script
    by_script, by_verb = run(sys.executable, REPO / script, "--help"), oml(name, "--help")
    assert by_script.returncode == by_verb.returncode == 0, by_script.stderr + by_verb.stderr
    assert help_parts(by_verb.stdout, f"oml {name}") == help_parts(by_script.stdout, script)
    assert "options:" in by_verb.stdout and "--help" in by_verb.stdout


def test_sweep_verb_is_python_m_oml_sweep():
    args = ("preset-grid", "--preset", "seed")
    by_module, by_verb = run(sys.executable, "-m", "oml.lab.sweep", *args), oml("sweep", *args)
    assert by_module.returncode == by_verb.returncode == 0, by_module.stderr + by_verb.stderr
    assert by_verb.stdout == by_module.stdout and "batch_size=16" in by_verb.stdout
    module_help = run(sys.executable, "-m", "oml.lab.sweep", "--help").stdout  # its name: sweep.py, or python -m ...
    prog = re.match(r"usage: (.+?) \[-h\]", module_help).group(1)
    assert help_parts(oml("sweep", "--help").stdout, "oml sweep") == help_parts(module_help, prog)


def test_bad_input_to_a_verb_is_one_error_line_and_exit_2():
    out = oml("train", "--learning_rate", "-1")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == ["error: --learning_rate must be positive"]


def test_argparse_errors_name_the_verb():
    out = oml("train", "--no_such_flag")
    assert out.returncode == 2
    assert out.stderr.startswith("usage: oml train ")
    assert out.stderr.splitlines()[-1] == "oml train: error: unrecognized arguments: --no_such_flag"


def test_each_stage_gets_its_settings_built_once_from_the_flags(tiny_model_dir, tmp_path):
    """Below the commands, a stage takes its frozen settings (EvalSettings, AttackSettings, CheckSettings): from_args
    reads the prepared flags without changing them (the --measure profile fills the settings, not the Namespace),
    and the run they name is one RunIdentity."""
    import dataclasses

    from oml.attack.attack_runner import AttackSettings
    from oml.commands.attack import make_parser as attack_parser
    from oml.commands.check import make_parser as check_parser
    from oml.embed.run_setup import prepare_run
    from oml.measure.generation_measures import GENERATION_DEFAULTS
    from oml.verify.suspect_check import CheckSettings

    write_random_fingerprints(tmp_path / "fp.json", 8)
    argv = ["--model_path", str(tiny_model_dir), "--fingerprints_file_path", str(tmp_path / "fp.json"),
            "--fingerprint_generation_strategy", "random_word", "--max_num_fingerprints", "8",
            "--result_path", str(tmp_path / "results")]  # fmt: skip
    args = prepare_run(attack_parser().parse_args([*argv, "--attack", "host_confidence", "--measure", "full"]))
    flags = dict(vars(args))
    settings = AttackSettings.from_args(args)
    assert vars(args) == flags  # nothing written into the flags
    assert (
        args.generation_benchmark is None
        and settings.evaluation.generation_benchmark == GENERATION_DEFAULTS["benchmark"]
    )
    assert settings.host.filter.name == "confidence" and settings.training.learning_rate == args.attack_lr
    assert (
        settings.run.config_hash == args.config_hash and settings.run.folder == tmp_path / "results" / args.config_hash
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.evaluation.utility_limit = 3
    check = CheckSettings.from_args(prepare_run(check_parser().parse_args(argv)))
    assert check.named_run == settings.run and check.run is None
