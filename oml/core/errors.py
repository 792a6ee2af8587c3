"""One exception for bad input, and the wrapper that turns it into a one-line error."""

import sys


class UserError(Exception):
    """Bad input or a state the user must fix: reported as one line, exit status 2."""


def run_cli(main):
    """Run a script's main(); a UserError becomes `error: <message>` and exit 2. A reader that stops early (`| head`)
    ends the output quietly, as for any Unix tool, instead of a traceback."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python would complain again at exit
        sys.exit(141)
