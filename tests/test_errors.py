"""oml.core.errors: how a script ends on bad input, an interrupt, or a reader that stops early."""

import shlex
import subprocess
import sys

from conftest import REPO


def test_a_reader_that_stops_early_ends_the_output_without_a_traceback():
    """`python -m oml.lab.persistence_report ... | head -1`: the script stops quietly (141, like a Unix tool), no traceback."""
    code = "from oml.core.errors import run_cli\nrun_cli(lambda: [print('row', i, flush=True) for i in range(100000)])"
    shell = f"{sys.executable} -c {shlex.quote(code)} | head -1; echo status ${{PIPESTATUS[0]}}"
    out = subprocess.run(["bash", "-c", shell], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.splitlines() == ["row 0", "status 141"], out.stdout
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr
