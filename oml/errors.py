"""One exception for bad input, and the wrapper that turns it into a one-line error."""

import sys


class UserError(Exception):
    """Bad input or a state the user must fix: reported as one line, exit status 2."""


def run_cli(main):
    """Run a script's main(); a UserError becomes `error: <message>` and exit 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
