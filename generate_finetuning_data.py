"""Make fingerprints (key, response pairs) as a JSON list.

The original OML script name, kept as a thin front end of `oml make` (the same parser, flags and exit status):
`python generate_finetuning_data.py --help` prints the flags and examples, which live with the code in oml/commands/make.py.
"""

from oml.commands.make import main
from oml.core.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
