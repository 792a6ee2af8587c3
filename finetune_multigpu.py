"""Embed fingerprints into a model by fine-tuning, with DeepSpeed where launched by it.

The original OML script name, kept as a thin front end of `oml train` (the same parser, flags and exit status):
`python finetune_multigpu.py --help` prints the flags and examples, which live with the code in oml/commands/train.py.
"""

from oml.commands.train import main
from oml.core.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
