"""A new user's first minutes, timed on a clean clone: `make run`, its rerun, a first fingerprints-only evaluation in a
fresh results folder (the base model's caches cold), and optionally `make test`.

The clone is of the committed HEAD (uncommitted changes are not in it); it uses this checkout's .venv (so the times are
"after `make venv`", as the README states them) and a cache folder of its own (OML_CACHE_DIR), as a fresh machine has:
the embedded model is converted and the base model's benign rows are made inside the timed `make run`. Run it on an
idle machine: every number is wall time.

    python bench/bench_first_minutes.py                 # make run, rerun, first evaluation
    python bench/bench_first_minutes.py --test          # and make test
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(cmd, cwd, log, env=None):
    start = time.time()
    with open(log, "w") as out:
        code = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.time() - start
    if code != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {code}); see {log}")
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test", action="store_true", help="also time make test")
    parser.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    args = parser.parse_args()
    if not (REPO / ".venv" / ".installed").is_file():
        sys.exit("run `make venv` first: the times are measured after it")
    clone = Path(tempfile.mkdtemp(prefix="oml-first-minutes-"))
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone / "repo")], check=True)
    repo = clone / "repo"
    (repo / ".venv").symlink_to(REPO / ".venv")
    os.utime(REPO / ".venv" / ".installed")  # the clone's Makefile is newer than the stamp: the venv is current
    print(f"clean clone of {subprocess.getoutput(f'git -C {repo} rev-parse --short HEAD')} in {repo}; {os.cpu_count()} "
          f"CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip

    # a fresh machine's cache: the converted embedded model, the base model's benign rows and cached results
    env = {**os.environ, "OML_CACHE_DIR": str(clone / "cache")}
    rows = [("make run (fresh clone, after make venv)", timed(["make", "run"], repo, clone / "run.log", env))]
    print(f"{rows[-1][0]:<50} {rows[-1][1]:7.0f} s", flush=True)
    rows.append(("make run again (every point stored)", timed(["make", "run"], repo, clone / "rerun.log", env)))
    print(f"{rows[-1][0]:<50} {rows[-1][1]:7.0f} s", flush=True)

    # a first evaluation: one of the demo's 32-fingerprint runs copied into a fresh results folder (base caches cold)
    runs = sorted(p.parent for p in (repo / "results").glob("*/final_model"))
    run = next(r for r in runs if not json.loads((r / "fingerprinting_config.json").read_text())["args"].get(
        "use_prompt_augmentation"))  # fmt: skip
    fresh = clone / "fresh-results"
    shutil.copytree(run, fresh / run.name)
    config = json.loads((run / "fingerprinting_config.json").read_text())["args"]
    flags = ["--result_path", str(fresh), "--utility_benchmark", "none"]
    for name in ("max_num_fingerprints", "num_train_epochs", "learning_rate", "forgetting_regularizer_strength"):
        flags += [f"--{name}", str(config[name])]
    cmd = [str(repo / ".venv" / "bin" / "python"), "eval_for_multigpu.py", *flags]
    rows.append(
        (
            f"first eval --utility_benchmark none ({config['max_num_fingerprints']} fp)",
            timed(cmd, repo, clone / "e.log", env),
        )
    )
    print(f"{rows[-1][0]:<50} {rows[-1][1]:7.0f} s", flush=True)
    if args.test:
        rows.append(("make test", timed(["make", "test"], repo, clone / "test.log", env)))
        print(f"{rows[-1][0]:<50} {rows[-1][1]:7.0f} s", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}; logs in {clone}")
    if not args.keep:
        shutil.rmtree(repo, ignore_errors=True)


if __name__ == "__main__":
    main()
