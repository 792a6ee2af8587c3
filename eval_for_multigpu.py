"""Evaluate a fingerprinted run: fingerprint accuracy, false positives, utility.

The original OML script name, kept as a thin front end of `oml eval` (the same parser, flags and exit status):
`python eval_for_multigpu.py --help` prints the flags and examples, which live with the code in oml/commands/eval.py.
"""

from oml.commands.eval import main
from oml.core.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
