"""An experiment driver's steps: one repository script run as a subprocess with its output in a log file of its own,
and the driver's timestamped progress lines (oml.lab.host_study, oml.lab.recipe_persistence)."""

import subprocess
import sys
import time

from oml.lab.records import REPO


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def python(*argv, log_path, timeout):
    """Run `python ARGV` from the repository root; its output goes to log_path; returns the exit status (or, past
    timeout seconds, a line saying so)."""
    with open(log_path, "w") as out:
        try:
            return subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout} s"
