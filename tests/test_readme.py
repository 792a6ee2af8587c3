"""The README's and docs/'s commands work as written: every flag exists, every link resolves, the cheap ones really run.

Every shell command shown in README.md or docs/**/*.md (bash blocks, and inline code that runs one of the suite's
programs) is parsed: a top-level script or `oml VERB` against the verb's own parser (oml/cli.py's VERBS table and
the module's make_parser(), the parser its main() uses), `python -m oml.MODULE` against the module's make_parser()
(or, for a module without one, the flags its source defines); subcommands are followed into their sub-parsers.
"""

import argparse
import importlib
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
from conftest import REPO

from oml.cli import VERBS

README = REPO / "README.md"
DOCS = REPO / "docs"


def pages():
    """README.md and every page under docs/, as paths relative to the repository."""
    return [README.relative_to(REPO), *sorted(p.relative_to(REPO) for p in DOCS.rglob("*.md"))]


FENCE = re.compile(r"```(\w*)\n(.*?)```", flags=re.S)


def shell_lines(text):
    """Shell commands of a block: continuation lines joined, comments dropped, a hostfile's lines left out."""
    commands = []
    for command in text.replace("\\\n", " ").splitlines():
        command = re.sub(r"(^|\s+)#.*$", "", command).strip()
        if command and not command.startswith(("cat ", "worker-")):
            commands.append(command)
    return commands


@cache
def page_commands(page):
    """(commands of the page's bash blocks, commands in its inline code that name one of the suite's programs)."""
    text = (REPO / page).read_text()
    blocks = [c for lang, body in FENCE.findall(text) if lang == "bash" for c in shell_lines(body)]
    prose = FENCE.sub("", text)
    inline = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
    inline = [c for c in inline if program(shlex_words(c)) is not None]
    return blocks, inline


def readme_commands():
    return page_commands(README.relative_to(REPO))[0]


def all_commands():
    """(page, command) for every command shown in README.md and docs/."""
    return [(str(page), c) for page in pages() for kind in page_commands(page) for c in kind]


def shlex_words(command):
    try:
        return shlex.split(command)
    except ValueError:  # an inline span with an unmatched quote is prose, not a command
        return []


# ----------------------------------------------------------------------------- which program a command runs

SCRIPT_VERB = {verb.script: name for name, verb in VERBS.items() if verb.script and verb.script.endswith(".py")}
SCRIPTS = tuple(SCRIPT_VERB)
# `python -m oml.attack.gguf_models serve ARGS` hands its arguments to llama_cpp.server: not the suite's flags to check.
FOREIGN = {("oml.attack.gguf_models", "serve")}


def program(words):
    """(what the command runs, the index of its first argument), or None for a command that is not the suite's."""
    for i, word in enumerate(words):
        if word in SCRIPT_VERB:
            return ("verb", SCRIPT_VERB[word]), i + 1
        if word == "oml" and (i == 0 or words[i - 1] in (";", "&&", "do")):
            if i + 1 < len(words) and words[i + 1] in VERBS:
                return ("verb", words[i + 1]), i + 2
            return ("oml", None), i + 1
        if word == "-m" and i + 1 < len(words) and words[i + 1].startswith("oml"):
            module = words[i + 1]
            if module == "oml.cli":
                return (("verb", words[i + 2]), i + 3) if i + 2 < len(words) else (("oml", None), i + 2)
            if (module, next(iter(words[i + 2 : i + 3]), None)) in FOREIGN:
                return None
            return ("module", module), i + 2
    return None


@cache
def parser_of(kind, name):
    """The argparse parser a program uses, or None for a module without make_parser() (then its source is read)."""
    if kind == "oml":
        return argparse.ArgumentParser()  # `oml --help`: only -h/--help
    if kind == "verb":
        verb = VERBS[name]
        module = importlib.import_module(verb.module)
        make = "make_parser" if verb.entry == "main" else f"make_{verb.entry.removesuffix('_main')}_parser"
        return getattr(module, make)() if hasattr(module, make) else None
    module = importlib.import_module(name)
    return module.make_parser() if hasattr(module, "make_parser") else None


def accepted_flags(script):
    """Every flag a top-level script (e.g. "eval_for_multigpu.py") accepts: its verb's parser."""
    return flags_of(parser_of("verb", SCRIPT_VERB[script]), [])


def flags_of(parser, args):
    """The flags a parser accepts for these arguments: its own and those of the subcommand the arguments name."""
    flags = {flag for action in parser._actions for flag in action.option_strings}
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    positional = [w for w in args if not w.startswith("-")]
    if subs and positional and positional[0] in subs[0].choices:
        rest = args[args.index(positional[0]) + 1 :]
        return flags | flags_of(subs[0].choices[positional[0]], rest)
    return flags


def module_source(kind, name):
    module = VERBS[name].module if kind == "verb" else name
    return Path(importlib.import_module(module).__file__).read_text()


def shown_flags(args):
    """The words that are flags (a quoted value such as "--measure quick" is not one)."""
    return {w.strip("[]").split("=")[0] for w in args if re.fullmatch(r"--?[A-Za-z][\w-]*(=.*)?", w.strip("[]"))}


def unknown_flags(command):
    words = shlex_words(command)
    (kind, name), start = program(words)
    args = words[start:]
    parser = parser_of(kind, name)
    if parser is None:  # no make_parser(): the flags must be defined in the module's source
        source = module_source(kind, name)
        return {f for f in shown_flags(args) if f'"{f}"' not in source and f"'{f}'" not in source}
    return shown_flags(args) - flags_of(parser, args)


SUITE_COMMANDS = [(page, c) for page, c in all_commands() if program(shlex_words(c)) is not None]


def test_flags_come_from_the_parsers_not_from_the_help_text():
    flags = flags_of(parser_of("verb", "eval"), [])
    assert "--screen_bf16" in flags and "--num_fingerprints" in flags  # a digit inside, an alias
    assert "--check_model" in flags and "--utility_limit" in flags and "--measure" in flags
    assert "--preset" in flags and "--key_response_strategy" not in flags  # another script's flag
    assert "--root" in flags_of(parser_of("module", "oml.verify.claims"), ["verify", "claim.json"])
    assert "--root" not in flags_of(parser_of("module", "oml.verify.claims"), ["commit"])
    assert unknown_flags("oml attack --attack sft --no_such_flag") == {"--no_such_flag"}
    assert unknown_flags("oml sweep summary --results results/") == set()  # from the module's source
    assert unknown_flags("python -m oml.lab.sweep summary --no_such_flag") == {"--no_such_flag"}


def test_readme_has_the_commands_users_need():
    commands = readme_commands()
    assert {"make run", "make test", "make test-long"} <= set(commands)
    assert {s for s in SCRIPTS if any(s in c for c in commands)} == set(SCRIPTS)  # the life cycle, every step
    assert any(c.startswith("oml verify-claim") for c in commands)
    assert any(c.startswith("deepspeed") for c in commands) and any("launch_multigpu.sh" in c for c in commands)


def test_every_page_shows_commands_that_are_checked():
    """The checks below see the pages' commands (a change to how commands are found cannot silently empty them)."""
    shown = {page for page, _ in SUITE_COMMANDS}
    usage = ["generate.md", "train.md", "evaluate.md", "attack.md", "check.md", "sweeps.md", "usage.md"]
    assert {"README.md", *(f"docs/{name}" for name in usage)} <= shown
    assert len(SUITE_COMMANDS) > 60


@pytest.mark.parametrize(("page", "command"), SUITE_COMMANDS)
def test_every_flag_in_a_shown_command_exists(page, command):
    unknown = unknown_flags(command)
    assert not unknown, f"{page}: unknown flags {unknown} in: {command}"


@pytest.mark.parametrize(("page", "command"), [(p, c) for p, c in all_commands() if "launch_multigpu.sh" in c])
def test_every_variable_in_a_shown_sweep_command_is_read_by_the_script(page, command):
    script = (REPO / "launch_multigpu.sh").read_text()
    for name in re.findall(r"\b([A-Z_]+)=", command):
        assert "${" + name in script or f"${name}" in script, f"{page}: {name} is not used by launch_multigpu.sh"


# ----------------------------------------------------------------------------- links


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped (letters, digits, _ and - kept), spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


@cache
def anchors(path):
    path = path.resolve()
    names, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", path.read_text()), flags=re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        names.add(base if count == 0 else f"{base}-{count}")
    return names


def links(page):
    """Relative link targets of a page (markdown links and images, <img src>), outside code."""
    prose = re.sub(r"`[^`\n]*`", "", FENCE.sub("", (REPO / page).read_text()))
    targets = re.findall(r"\]\(([^)\s]+)\)", prose) + re.findall(r"<img [^>]*src=\"([^\"]+)\"", prose)
    return [t for t in targets if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", [str(p) for p in pages()])
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        resolved = (REPO / page).parent / path if path else REPO / page
        missing_anchor = resolved.is_file() and resolved.suffix == ".md" and anchor and anchor not in anchors(resolved)
        if not resolved.exists() or missing_anchor:
            broken.append(target)
    assert not broken, f"{page}: links that resolve to nothing: {broken}"


def test_the_docs_index_lists_every_page():
    listed = {((DOCS / t).resolve()) for t in links("docs/README.md")}
    unlisted = [str(p.relative_to(REPO)) for p in DOCS.rglob("*.md") if p != DOCS / "README.md" and p not in listed]
    assert not unlisted, f"docs/README.md does not list {unlisted}"


# ----------------------------------------------------------------------------- a command that really runs


def test_random_word_command_reproduces_the_committed_file(tmp_path):
    """Run docs/generate.md's random-word command as written in a copy of the project: the same bytes come out."""
    (command,) = [c for c in page_commands("docs/generate.md")[0] if "--random_word_generation" in c]
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


def test_the_recipe_table_in_the_docs_is_the_recipes():
    """docs/train.md's recipe table is what oml/core/recipes.py holds (python -m oml.core.recipes prints it)."""
    from oml.core.recipes import table

    page = (DOCS / "train.md").read_text()
    (shown,) = re.findall(r"<!-- recipes: python -m oml.core.recipes -->\n(.*?)\n<!-- /recipes -->", page, re.S)
    assert shown == table(), "run python -m oml.core.recipes and paste its table into docs/train.md"
