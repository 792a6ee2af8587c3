"""Is a model served through an OpenAI-compatible API ours? Query it with a run's keys.

The original OML script name, kept as a thin front end of `oml check` (the same parser, flags and exit status):
`python check_fingerprints.py --help` prints the flags and examples, which live with the code in oml/commands/check.py.
"""

from oml.commands.check import main
from oml.core.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
