"""Whether a recipe's fingerprints survive deployment: issue 28's persistence attacks on one recorded point, as data.

For a point of the recipe search (its record, experiments/records/recipe_search/<hash>.json), each attack in ATTACKS
that is asked for, in order, resuming from what is already measured:

    the run          results/recipe_search/<hash>/ (--result_path), retrained from the record when it is missing
                     (oml.lab.records.retrain: the same flags, the hash checked)
    the attack       attack_fingerprints.py RUN_FLAGS --attack ...: the attacked copy under results/<hash>/attacks/<id>/,
                     fingerprints checked only (the plain key and [chat]; a GGUF file in llama.cpp with the plain key),
                     no utility
    the row          plain, raw-prompt and [chat] accuracy with standard errors over keys (oml.lab.records), the goal
                     and whether it is met, the seconds

The rows go to experiments/records/recipe_persistence/<hash>.json (committed; written after every attack, so a run
killed midway keeps what it measured). A failed attack is recorded with its error and run again next time.

    python -m oml.lab.recipe_persistence run p256-l0-b25-kl4-lr3e-5            # a point's name, a hash or a record file
    python -m oml.lab.recipe_persistence run 52f42afb633bb63d --attacks q4_k_m,merge0.7
    python -m oml.lab.recipe_persistence table [--markdown]
"""

import argparse
import json
import time
from pathlib import Path
from typing import NamedTuple

from oml.core.errors import UserError, run_cli
from oml.core.run_store import EVAL_RESULTS, FINAL_MODEL, read_json
from oml.lab.records import RECORDS_DIR, REPO, fingerprint_metrics, read_record, record_argv, retrain
from oml.lab.steps import attack_folder, format_table, log, python, record_row

EXPERIMENT = "recipe_persistence"
SOURCE = "recipe_search"  # the experiment whose points are attacked
# The goals are on the plain key; [chat] is kept as a second look. Every template (the raw prompts, each system
# message) took an HF evaluation of 1024 keys from minutes to most of an hour on one core.
FINGERPRINTS_ONLY = ("--utility_benchmark", "none", "--generation_benchmark", "none", "--chat_drift_limit", "none",
                     "--skip_base_model", "--eval_templates", "plain,chat")  # fmt: skip


class Attack(NamedTuple):
    name: str
    flags: tuple  # attack_fingerprints.py's attack flags
    goal: float  # issue 28's goal: the plain key's accuracy after the attack
    why: str


ATTACKS = [
    Attack("q4_k_m", ("--attack", "quantize", "--quantization", "q4_k_m", "--gguf_templates", "plain"), 0.95,
           "GGUF Q4_K_M, checked inside llama.cpp: what most deployers of a small model serve"),
    Attack("merge0.7", ("--attack", "merge", "--merge_weight", "0.7"), 0.90,
           "a 0.7 merge with the base model (the fingerprinted weights at 0.7)"),
    Attack("sft", ("--attack", "sft", "--attack_examples", "2000", "--attack_lr", "1e-5", "--attack_epochs", "2"), 0.95,
           "full fine-tuning on 2000 offline QA chats, 2 epochs at lr 1e-5"),
]  # fmt: skip
ATTACK_SECONDS = 4 * 3600


def source_record(spec, records_dir):
    """The recipe search's record named by spec: a record file, a run hash, or a point name (its latest record)."""
    path = Path(spec)
    if path.suffix == ".json":
        return path, read_record(path)
    folder = Path(records_dir) / SOURCE
    if (folder / f"{spec}.json").is_file():
        return folder / f"{spec}.json", read_record(folder / f"{spec}.json")
    named = [(p, r) for p in sorted(folder.glob("*.json")) if (r := read_record(p)).get("point") == spec]
    if not named:
        raise UserError(f"{spec}: no record of {SOURCE} has this hash or point name (in {folder})")
    return max(named, key=lambda pr: (pr[1].get("code") or {}).get("date", ""))


def attack_row(results, attack):
    """A record row from an attacked copy's eval_results.json: accuracies with errors, the goal and the verdict."""
    metrics = fingerprint_metrics(results)
    row = {"why": attack.why, "flags": list(attack.flags), "keys": metrics["n"]}
    for name in ("plain", "raw_prompts", "chat"):
        if metrics.get(name):
            row[name] = {k: metrics[name][k] for k in ("value", "stderr")}
    row["goal"] = attack.goal
    row["met"] = bool(row.get("plain") and row["plain"]["value"] >= attack.goal)
    return row


def measure(args):
    path, source = source_record(args.point, args.records)
    if source.get("status") != "ok":
        raise UserError(f"{path}: status {source.get('status')!r}; only a finished point is attacked")
    result_path = Path(args.result_path or REPO / "results" / SOURCE)
    run = result_path / source["hash"]
    if not (run / FINAL_MODEL).is_dir():
        log(f"{source['hash']}: no trained run in {result_path}, retraining it from {path}")
        run = retrain(path, result_path)
    run_flags = [*record_argv(source), "--result_path", str(result_path)]
    out = Path(args.records) / EXPERIMENT / f"{source['hash']}.json"
    record = json.loads(out.read_text()) if out.is_file() else {
        "format": 1, "experiment": EXPERIMENT, "hash": source["hash"], "point": source.get("point"),
        "fingerprints": source.get("metrics", {}).get("fingerprints", {}).get("plain"), "attacks": {}}  # fmt: skip
    logs = run / "attacks" / "persistence_logs"
    logs.mkdir(parents=True, exist_ok=True)
    for attack in [a for a in ATTACKS if a.name in args.attacks]:
        done = record["attacks"].get(attack.name)
        if done and "error" not in done and not args.again:
            log(f"{attack.name}: recorded")
            continue
        argv = [*run_flags, *attack.flags, *FINGERPRINTS_ONLY]
        log(f"{attack.name}: attack_fingerprints.py {' '.join(attack.flags)}")
        t0 = time.time()
        code = python("attack_fingerprints.py", *argv, log_path=logs / f"{attack.name}.log", timeout=ATTACK_SECONDS)
        results = read_json(attack_folder(argv) / EVAL_RESULTS) if code == 0 else None
        if results is None:
            row = {"why": attack.why, "flags": list(attack.flags), "error": f"attack exited {code}; see {logs}"}
        else:
            row = attack_row(results, attack)
        record_row(out, record, "attacks", attack.name, row, t0)
        log(f"{attack.name}: {row_summary(row)}")
    return record


def row_summary(row):
    if "error" in row:
        return f"failed: {row['error']}"
    plain = row["plain"]
    return f"plain {plain['value']:.1%} ± {plain['stderr']:.1%} (goal ≥ {row['goal']:.0%}: {'met' if row['met'] else 'missed'})"


def table(records_dir, markdown=False):
    """A row per attacked point, a column per attack: the plain key's accuracy after it, and the goal's verdict."""
    header = ["point", "hash", "plain before", *[f"{a.name} (≥ {a.goal:.0%})" for a in ATTACKS]]
    lines = []
    for path in sorted((Path(records_dir) / EXPERIMENT).glob("*.json")):
        record = json.loads(path.read_text())
        before = record.get("fingerprints") or {}
        cells = [record.get("point") or "", record["hash"],
                 f"{before['value']:.1%}" if before.get("value") is not None else "—"]  # fmt: skip
        for attack in ATTACKS:
            row = record["attacks"].get(attack.name)
            if not row:
                cells.append("—")
            elif "error" in row:
                cells.append("failed")
            else:
                cells.append(f"{row['plain']['value']:.1%} ± {row['plain']['stderr']:.1%} {'✓' if row['met'] else '✗'}")
        lines.append(cells)
    return format_table([header, *lines], markdown)


def make_parser():
    parser = argparse.ArgumentParser(prog="python -m oml.lab.recipe_persistence", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="run|table")
    run = sub.add_parser("run", help="attack one recorded point of the recipe search")
    run.add_argument("point", help="the point: a record file, a run hash or a point name")
    run.add_argument("--attacks", type=lambda s: [a for a in s.split(",") if a], default=[a.name for a in ATTACKS],
                     help=f"comma-separated, of {', '.join(a.name for a in ATTACKS)} (default: all)")  # fmt: skip
    run.add_argument("--result_path", default=None, help="where the point's run lives (default results/recipe_search)")
    run.add_argument("--again", action="store_true", help="measure recorded attacks again")
    show = sub.add_parser("table", help="every attacked point, a column per attack")
    show.add_argument("--markdown", action="store_true")
    for p in (run, show):
        p.add_argument("--records", default=str(RECORDS_DIR), help="records folder (default experiments/records)")
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    if args.command == "run":
        unknown = set(args.attacks) - {a.name for a in ATTACKS}
        if unknown or not args.attacks:
            raise UserError(f"--attacks: unknown {', '.join(sorted(unknown)) or '(none given)'} "
                            f"(known: {', '.join(a.name for a in ATTACKS)})")  # fmt: skip
        measure(args)
    elif args.command == "table":
        print(table(args.records, args.markdown))
    else:
        raise UserError("give a command: run or table")


if __name__ == "__main__":
    run_cli(main)
