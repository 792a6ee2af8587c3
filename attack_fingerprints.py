"""Attack a fingerprinted run as a deployer would, and measure what survives.

The original OML script name, kept as a thin front end of `oml attack` (the same parser, flags and exit status):
`python attack_fingerprints.py --help` prints the flags and examples, which live with the code in oml/commands/attack.py.
"""

from oml.commands.attack import main
from oml.core.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
