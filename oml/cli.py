"""The `oml` command: one entry point for the suite's scripts, `oml VERB [ARGS...]`.

Each verb runs a module's main(argv) with the rest of the command line, exactly as its top-level script does (the
same parser, flags, --help text and exit status). VERBS below is the whole table: a new verb is one line.

    oml --help                   # the verbs
    oml train --help             # a verb's options (the same as finetune_multigpu.py --help)
    oml train --num_train_epochs 12 --use_prompt_augmentation
    python -m oml.cli eval       # the same without the console script
"""

import importlib
import sys
from typing import NamedTuple

from oml.core.errors import run_cli

PROG = "oml"


class Verb(NamedTuple):
    module: str  # holds main(argv=None), which parses argv (default: sys.argv[1:]) and runs the command
    help: str  # one line for `oml --help`
    script: str | None = None  # the top-level script it stands for, if any
    entry: str = "main"  # the function of module that runs it


VERBS = {
    "make": Verb("oml.commands.make", "generate fingerprints (key, response pairs) as a JSON list", "generate_finetuning_data.py"),
    "train": Verb("oml.commands.train", "embed fingerprints into a model by fine-tuning", "finetune_multigpu.py"),
    "eval": Verb("oml.commands.eval", "fingerprint accuracy and utility of a fingerprinted model", "eval_for_multigpu.py"),
    "attack": Verb("oml.commands.attack", "attack a fingerprinted model; which fingerprints survive", "attack_fingerprints.py"),
    "check": Verb("oml.commands.check", "is a model served through an OpenAI-compatible API ours?", "check_fingerprints.py"),
    "sweep": Verb("oml.lab.sweep", "the sweep's steps: prepare, record, summary, preset-grid, choose-lambda", "python -m oml.lab.sweep"),
    "verify-claim": Verb("oml.verify.claims", "check a claim file against a published commitment root", "python -m oml.verify.claims verify", "verify_main"),
}  # fmt: skip


def usage():
    width = max(map(len, VERBS))
    lines = [
        f"usage: {PROG} VERB [ARGS...]",
        "",
        "OML 1.0 fingerprinting: embed fingerprints into a model, evaluate, attack and check it.",
        "",
        "verbs:",
        *(
            f"  {name:<{width}}  {verb.help}" + (f" ({verb.script})" if verb.script else "")
            for name, verb in VERBS.items()
        ),
        "",
        f"`{PROG} VERB --help` shows a verb's options.",
    ]
    return "\n".join(lines)


def main(argv=None):
    """The console script: dispatch `oml VERB ARGS...` to VERBS[VERB]; exits 2 with one line on an unknown verb."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        run_cli(lambda: print(usage()))  # a reader that stops early (| head) ends it quietly
        return
    if not argv:
        print(usage(), file=sys.stderr)
        sys.exit(2)
    name, rest = argv[0], argv[1:]
    if name not in VERBS:
        print(f"{PROG}: error: unknown verb '{name}' (choose from {', '.join(VERBS)})", file=sys.stderr)
        sys.exit(2)
    # argparse names the program after sys.argv[0]: usage and error lines then read `oml VERB`.
    sys.argv = [f"{PROG} {name}", *rest]
    command = importlib.import_module(VERBS[name].module)
    run_cli(lambda: getattr(command, VERBS[name].entry)(rest))


if __name__ == "__main__":
    main()
