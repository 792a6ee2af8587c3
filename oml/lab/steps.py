"""What the experiment drivers that keep a row per step share (oml.lab.host_study, oml.lab.recipe_persistence): one
repository script run as a subprocess with its output in a log file of its own, timestamped progress lines, a row
written into the record as soon as it is measured, where an attack's results are, and the table of rows."""

import argparse
import subprocess
import sys
import time

from oml.core.files import atomic_write_json
from oml.lab.records import REPO, code_state


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


def record_row(path, record, section, name, row, started):
    """Put row, with the seconds since started, under record[section][name], stamp the code and write the record
    (atomically): a driver killed midway keeps every row measured before."""
    row["seconds"] = round(time.time() - started, 1)
    record[section][name] = row
    record["code"] = code_state()
    atomic_write_json(path, record)


def format_table(rows, markdown=False):
    """rows (a header, then rows of strings) as aligned text or as a markdown table."""
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def attack_folder(argv):
    """results/<hash>/attacks/<id>/ of the attack these attack_fingerprints.py words make (its own naming rule)."""
    from oml.attack.attack_runner import AttackSettings, add_attack_args, attack_id
    from oml.core.run_config import add_train_args
    from oml.core.run_store import find_run
    from oml.embed.run_setup import prepare_run
    from oml.measure.evaluation import add_eval_args

    parser = add_attack_args(add_eval_args(add_train_args(argparse.ArgumentParser())))  # attack_fingerprints.py's
    settings = AttackSettings.from_args(prepare_run(parser.parse_args(list(map(str, argv)))))
    return find_run(settings.run) / "attacks" / attack_id(settings)
