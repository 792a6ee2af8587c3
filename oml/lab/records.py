"""Records that outlive the machine: one small JSON file per finished point of an experiment, committed to git.

A run folder (results/<hash>/) holds the model and everything measured on it, but results/ does not survive between
sessions on a machine that is handed back. A record keeps what a later session needs, in a few KB:

    experiments/records/<experiment>/<hash>.json
        format, experiment, hash, point, why, status, error
        hashed        the run's hashed configuration (fingerprinting_config.json's "hashed": what the hash digests)
        args          every training flag the run was trained with (finetune_multigpu.py's arguments, by dest name;
                      --result_path left out): `retrain` trains the same run from them
        eval_flags    the eval_for_multigpu.py flags that measured it
        metrics       fingerprints (plain key, raw-text prompts, [chat], [chat] + system messages, each with its
                      standard error over keys; base false-positive rate), utility (mean, base, paired delta and its
                      stderr, items), chat drift (KL and stderr, same as base, answers), the chat check, generation
                      deltas when measured; never the per-item arrays
        training      metrics.json's numbers (seconds, steps, epochs trained, where --stop_when_learned stopped, ...)
        eval_seconds  the evaluation's seconds per part
        code          the commit (git rev-parse HEAD) and whether the tree had uncommitted changes; date

    python -m oml.lab.records record RUN_DIR --experiment NAME [--eval_flags "FLAGS"]   # write one (atomically)
    python -m oml.lab.records table EXPERIMENT [--markdown]          # every record, failures included, by N then recipe
    python -m oml.lab.records retrain RECORD [--result_path DIR]      # the same run again; its hash must be the record's

A record that does not parse, or whose args name a flag the training spec (oml.core.run_config.TRAIN_ARGS) does not know, is an
error naming the file (one line, exit 2). docs/records.md describes the layout and how the recipe search uses it.
"""

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from oml.core.errors import UserError, run_cli
from oml.core.files import atomic_write_json
from oml.core.run_config import TRAIN_ARGS, hashed_config
from oml.core.run_store import CONFIG, EVAL_RESULTS, FINAL_MODEL, METRICS, read_json
from oml.make.prompt_encoding import chat_prompt, is_chat
from oml.measure.evaluation import accuracy_split, chat_accuracy_split

REPO = Path(__file__).resolve().parents[2]
RECORDS_DIR = REPO / "experiments" / "records"
FORMAT = 1
LOG = "log.txt"  # one line per recorded point, beside the records (committed with them)
REQUIRED = ("format", "experiment", "hash", "status", "hashed", "args")
# Training arguments that say where or how a run is launched, not what it is: never recorded, never replayed.
NOT_RECORDED = {"result_path", "local_rank", "overwrite"}
LONGEST_LIST = 100  # metrics.json lists longer than this (none today: losses are per epoch) are left out


# ------------------------------------------------------------------------------ the training spec


def train_dests():
    """{dest: (flags, argparse kwargs)} of finetune_multigpu.py's arguments (oml.core.run_config.TRAIN_ARGS)."""
    return {spec.get("dest") or flags[0].lstrip("-").replace("-", "_"): (flags, spec) for flags, spec in TRAIN_ARGS}


def recorded_args(stored):
    """The training flags of a run from its stored arguments (fingerprinting_config.json's "args", or vars() of
    finalized arguments): every TRAIN_ARGS dest but where the run is stored and how it was launched."""
    return {name: stored[name] for name in train_dests() if name in stored and name not in NOT_RECORDED}


def args_argv(args):
    """The command-line words that give these recorded training flags (None and false switches left out)."""
    words, spec = [], train_dests()
    for name, value in args.items():
        flags, kwargs = spec[name]
        if kwargs.get("action") == "store_true":
            if value:
                words.append(flags[0])
        elif value is not None:
            words += [flags[0], str(value)]
    return words


# ------------------------------------------------------------------------------ metrics


def _stderr(values):
    """Standard error of the mean of values (sample variance); None below two values."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def accuracy_with_error(templates, n_keys):
    """{"value", "stderr", "templates"} for the mean accuracy over these template rows, keys as the units: each key's
    share of templates it answered under (from the rows' "missed" indices); without them, binomial over keys."""
    if not templates:
        return None
    value = sum(t["accuracy"] for t in templates) / len(templates)
    if n_keys and all("missed" in t for t in templates):
        per_key = [1.0] * n_keys
        for t in templates:
            for i in t["missed"]:
                per_key[i] -= 1 / len(templates)
        stderr = _stderr(per_key)
    else:
        stderr = math.sqrt(value * (1 - value) / n_keys) if n_keys else None
    return {"value": value, "stderr": stderr, "templates": len(templates)}


def fingerprint_metrics(results):
    """Fingerprint accuracies (the four template groups of oml.measure.evaluation.accuracy_split/chat_accuracy_split) with errors."""
    fa = results["fingerprint_accuracy"]
    n = results.get("num_fingerprints")
    rows = fa["templates"]
    groups = {
        "plain": [t for t in rows if t["template"] == "{}"],
        "raw_prompts": [t for t in rows if not is_chat(t["template"]) and t["template"] != "{}"],
        "chat": [t for t in rows if t["template"] == chat_prompt()],
        "chat_system": [t for t in rows if is_chat(t["template"]) and t["template"] != chat_prompt()],
    }
    out = {"n": n, **{name: accuracy_with_error(group, n) for name, group in groups.items()}}
    # the values themselves as the summary tables (oml.lab.sweep) compute them
    (plain, raw), (chat, chat_system) = accuracy_split(results), chat_accuracy_split(results)
    for name, value in zip(groups, (plain, raw, chat, chat_system), strict=True):
        if out[name] is not None:
            out[name]["value"] = value
    out["mean_over_templates"] = fa.get("mean_accuracy")
    fp = fa.get("base_false_positive_rate")
    if fp is not None:
        pairs = fa.get("base_false_positive_pairs", (n or 0) * len(rows))  # older results: the model's templates
        out["base_false_positive_rate"] = {
            "value": fp,
            "stderr": math.sqrt(fp * (1 - fp) / pairs) if pairs else None,  # binomial over (key, template) pairs
        }
    for key in ("mean_match_probability", "base_match_probability"):
        if fa.get(key):
            out[key] = fa[key]
    return out


def pick(source, keys):
    return {k: source[k] for k in keys if k in source} if source else None


def eval_metrics(results):
    """The numbers of an eval_results.json, without its per-item arrays."""
    utility = results.get("utility")
    if utility:
        tasks = {
            task: {
                **pick(r, ("score", "stderr", "n")),
                "base": (utility.get("base_tasks") or {}).get(task, {}).get("score"),
            }
            for task, r in utility["tasks"].items()
        }
        utility = {
            **pick(utility, ("benchmark", "mean", "base_mean", "delta", "delta_stderr")),
            "n": sum(r.get("n") or 0 for r in utility["tasks"].values()),
            "tasks": tasks,
        }
    generation = pick(
        results.get("generation"),
        ("benchmark", "n", "score", "base_score", "delta", "delta_stderr", "alias_in_answer", "base_alias_in_answer",
         "alias_in_answer_delta", "alias_in_answer_delta_stderr"),
    )  # fmt: skip
    return {
        "fingerprints": fingerprint_metrics(results),
        "utility": utility,
        "chat_drift": pick(results.get("chat_drift"), ("kl", "kl_stderr", "same_as_base", "n", "tokens")),
        "chat_check": pick(
            results.get("chat"), ("answered", "base_answered", "same_as_base", "distinct_words", "base_distinct_words")
        ),
        "generation": generation,
    }


def training_metrics(metrics):
    """metrics.json's numbers and short per-epoch lists."""
    if not metrics:
        return None
    return {
        k: v
        for k, v in metrics.items()
        if not isinstance(v, (list, dict)) or (isinstance(v, list) and len(v) <= LONGEST_LIST)
    }


def code_state():
    """{"commit", "dirty"} of the repository this code runs from (None where git cannot tell)."""

    def git(*words):
        try:
            out = subprocess.run(["git", "-C", str(REPO), *words], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.strip() if commit else None, "dirty": None if status is None else bool(status.strip())}


# ------------------------------------------------------------------------------ writing and reading records


def record_path(experiment, run_hash, records_dir=RECORDS_DIR):
    check_experiment_name(experiment)
    return Path(records_dir) / experiment / f"{run_hash}.json"


def check_experiment_name(experiment):
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", experiment or ""):
        raise UserError(f"experiment name {experiment!r}: use letters, digits, '_', '-' and '.'")


def build_record(experiment, run_hash, hashed, args, status, eval_results=None, metrics=None, eval_flags=None,
                 point=None, why=None, error=None):  # fmt: skip
    return {
        "format": FORMAT,
        "experiment": experiment,
        "hash": run_hash,
        "point": point,
        "why": why,
        "status": status,
        "error": error,
        "hashed": hashed,
        "args": args,
        "eval_flags": None if eval_flags is None else [str(w) for w in eval_flags],
        "metrics": eval_metrics(eval_results) if eval_results else None,
        "training": training_metrics(metrics),
        "eval_seconds": (eval_results or {}).get("seconds"),
        "code": code_state(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_record(run_dir, experiment, eval_flags=None, point=None, why=None, records_dir=RECORDS_DIR):
    """Write the record of a finished run folder (results/<hash>/) into records_dir/<experiment>/<hash>.json
    (atomically; an existing record of the same run is replaced). Returns its path."""
    run_dir = Path(run_dir)
    config = read_json(run_dir / CONFIG)
    if not config or "hashed" not in config or "args" not in config:
        raise UserError(f"{run_dir} is not a run folder (no readable {CONFIG})")
    if not (run_dir / FINAL_MODEL).is_dir():
        raise UserError(f"{run_dir} has no {FINAL_MODEL}: the run did not finish")
    results = read_json(run_dir / EVAL_RESULTS)
    status = "ok" if results else "not evaluated"
    record = build_record(
        experiment, config["config_hash"], config["hashed"], recorded_args(config["args"]), status, results,
        read_json(run_dir / METRICS), eval_flags, point, why,
    )  # fmt: skip
    return save(record, records_dir)


def write_failure(args, experiment, stage, error, eval_flags=None, point=None, why=None, records_dir=RECORDS_DIR,
                  run_dir=None):  # fmt: skip
    """The record of a point that failed at stage ("train" or "eval"), from its finalized arguments; error is the
    last line of its log. A run folder that got as far as a trained model adds its training metrics."""
    metrics = read_json(Path(run_dir) / METRICS) if run_dir else None
    record = build_record(
        experiment, args.config_hash, hashed_config(args), recorded_args(vars(args)), f"failed ({stage})",
        metrics=metrics, eval_flags=eval_flags, point=point, why=why, error=error,
    )  # fmt: skip
    return save(record, records_dir)


def save(record, records_dir):
    path = record_path(record["experiment"], record["hash"], records_dir)
    atomic_write_json(path, record)
    return path


def append_log(experiment, line, records_dir=RECORDS_DIR):
    """Append one line to records_dir/<experiment>/log.txt (kept and committed with the records; one writer, the
    search, so no lock file beside it)."""
    path = Path(records_dir) / experiment / LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}\t{line.rstrip()}\n")


def read_record(path):
    """The record at path, checked: a file that does not parse or lacks a field, or args naming a flag the training
    spec does not know, is a UserError naming the file."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"{path}: cannot read the record ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a record (invalid JSON: {e})") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}: not a record (a JSON object is expected)")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise UserError(f"{path}: not a record (missing {', '.join(missing)})")
    if record["format"] != FORMAT:
        raise UserError(f"{path}: record format {record['format']!r}, this code reads format {FORMAT}")
    if not isinstance(record["args"], dict) or not isinstance(record["hashed"], dict):
        raise UserError(f"{path}: not a record (args and hashed must be JSON objects)")
    unknown = sorted(set(record["args"]) - set(train_dests()))
    if unknown:
        flags = ", ".join("--" + name for name in unknown)
        raise UserError(f"{path}: its args name {flags}, which finetune_multigpu.py does not know (newer code?)")
    return record


def record_files(experiment, records_dir=RECORDS_DIR):
    """The record files of an experiment, by name."""
    check_experiment_name(experiment)
    return sorted((Path(records_dir) / experiment).glob("*.json"))


def read_records(experiment, records_dir=RECORDS_DIR):
    """Every record of an experiment (each checked by read_record), by file name."""
    return [read_record(path) for path in record_files(experiment, records_dir)]


def record_argv(record):
    """finetune_multigpu.py's command-line words for the record's run (without --result_path)."""
    return args_argv(record["args"])


# ------------------------------------------------------------------------------ the table


def recipe_label(hashed):
    """A short description of a run's recipe from its hashed configuration."""
    from oml.core.run_config import recorded_settings

    s = recorded_settings(hashed)
    parts = [f"lr {s.get('learning_rate'):g}", f"λ {s.get('forgetting_regularizer_strength'):g}"]
    if s.get("benign_data_ratio"):
        parts.append(f"β {s['benign_data_ratio']:g}")
    if s.get("kl_to_base"):
        parts.append(f"KL κ {s['kl_to_base']:g}")
    if s.get("distance_regularizer"):
        parts.append(f"μ {s['distance_regularizer']:g}")
    if s.get("lora_rank"):
        parts.append(f"LoRA {s['lora_rank']}")
    if s.get("trainable_layers"):
        parts.append(f"layers {s['trainable_layers']}")
    for name, value in s.items():  # flags hashed after this table was written (e.g. a KL term): shown by name
        if name not in KNOWN_SETTINGS and value not in (None, False, 0, 0.0):
            parts.append(f"{name} {value}")
    if s.get("use_prompt_augmentation"):
        parts.append("aug")
    epochs = s.get("num_train_epochs")
    parts.append(f"≤{epochs} ep, stop" if s.get("stop_when_learned") else f"{epochs} ep")
    return ", ".join(parts)


KNOWN_SETTINGS = {
    "model", "max_key_length", "max_response_length", "fingerprint_generation_strategy", "fingerprints_digest",
    "learning_rate", "forgetting_regularizer_strength", "max_num_fingerprints", "use_prompt_augmentation",
    "augmentation_prompts_digest", "use_chat_template", "append_eos", "num_train_epochs", "batch_size", "weight_decay",
    "data_split", "seed", "benign_data_ratio", "benign_rows_recipe", "distance_regularizer", "lora_rank",
    "trainable_layers", "stop_when_learned", "benign_data_digest", "kl_to_base",
}  # fmt: skip

TABLE_COLUMNS = [
    "N", "point", "recipe", "strategy", "status", "plain %", "raw %", "chat %", "chat+sys %", "base FP %",
    "Δ utility", "chat KL", "same %", "epochs", "train min", "eval min", "hash",
]  # fmt: skip


def _pct(metric):
    return "–" if not metric or metric.get("value") is None else f"{100 * metric['value']:.1f}"


def _pm(value, stderr, fmt):
    if value is None:
        return "–"
    return format(value, fmt) + ("" if stderr is None else " ± " + format(stderr, fmt.lstrip("+")))


def fingerprints_label(record):
    """The strategy, and the fingerprints file's name without its size where the run names one: perinucleus and
    runner-up responses share the strategy (inverse_nucleus) and differ only in their file."""
    strategy = record["hashed"].get("fingerprint_generation_strategy")
    path = (record.get("args") or {}).get("fingerprints_file_path")
    if not path:
        return strategy
    name = re.sub(r"^fingerprints-|-\d+$", "", Path(path).stem)
    return f"{strategy} ({name})" if name and name not in str(strategy) else strategy


def table_row(record):
    hashed = record["hashed"]
    metrics = record.get("metrics") or {}
    fps = metrics.get("fingerprints") or {}
    utility = metrics.get("utility") or {}
    drift = metrics.get("chat_drift") or {}
    training = record.get("training") or {}
    seconds = (record.get("eval_seconds") or {}).get("total")
    epochs = training.get("epochs_trained")
    if training.get("stopped_at_epoch") is not None:
        epochs = f"{training['stopped_at_epoch']} (stop)"
    return {
        "N": hashed.get("max_num_fingerprints"),
        "point": record.get("point") or "–",
        "recipe": recipe_label(hashed),
        "strategy": fingerprints_label(record),
        "status": record["status"],
        "plain %": _pct(fps.get("plain")),
        "raw %": _pct(fps.get("raw_prompts")),
        "chat %": _pct(fps.get("chat")),
        "chat+sys %": _pct(fps.get("chat_system")),
        "base FP %": _pct(fps.get("base_false_positive_rate")),
        "Δ utility": _pm(utility.get("delta"), utility.get("delta_stderr"), "+.3f"),
        "chat KL": _pm(drift.get("kl"), drift.get("kl_stderr"), ".3f"),
        "same %": "–" if drift.get("same_as_base") is None else f"{100 * drift['same_as_base']:.1f}",
        "epochs": "–" if epochs is None else str(epochs),
        "train min": "–" if training.get("train_seconds") is None else f"{training['train_seconds'] / 60:.1f}",
        "eval min": "–" if seconds is None else f"{seconds / 60:.1f}",
        "hash": record["hash"],
    }


def table_rows(records):
    """One row per record, by number of fingerprints, then point name, then recipe."""
    rows = [table_row(r) for r in records]
    return sorted(rows, key=lambda r: (r["N"] or 0, r["point"], r["recipe"], r["hash"]))


def format_table(rows, markdown=False):
    if markdown:
        lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
        lines += ["| " + " | ".join(str(r[c]) for c in TABLE_COLUMNS) + " |" for r in rows]
        return "\n".join(lines) + "\n"
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in TABLE_COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in TABLE_COLUMNS).rstrip()]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in TABLE_COLUMNS).rstrip() for r in rows]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ retraining from a record


def retrain(path, result_path=None):
    """Train the record's run again into result_path (default results/<experiment>) through finetune_multigpu.py,
    one process, from the repository root. The hash its arguments give now must be the record's (checked before
    training, and on the stored run after). Returns the run folder."""
    from oml.core.run_config import add_train_args
    from oml.embed.run_setup import prepare_run

    record = read_record(path)
    result_path = Path(result_path or REPO / "results" / record["experiment"])
    argv = [*record_argv(record), "--result_path", str(result_path)]
    parser = add_train_args(argparse.ArgumentParser(prog="finetune_multigpu.py"))
    args = prepare_run(parser.parse_args(argv))
    if args.config_hash != record["hash"]:
        now = hashed_config(args)
        differ = [
            f"{k} {record['hashed'].get(k)!r} recorded, {now.get(k)!r} now"
            for k in sorted(set(now) | set(record["hashed"]))
            if now.get(k) != record["hashed"].get(k)
        ]
        raise UserError(
            f"{path}: its args now give run {args.config_hash}, not the recorded {record['hash']} "
            f"({'; '.join(differ) or 'same hashed settings: the hash itself changed'})"
        )
    command = [sys.executable, str(REPO / "finetune_multigpu.py"), *argv]
    print("retraining: " + shlex.join(command), flush=True)
    code = subprocess.run(command, cwd=REPO).returncode
    if code != 0:
        raise UserError(f"{path}: retraining failed (finetune_multigpu.py exit status {code}; its output is above)")
    run = result_path / record["hash"]
    stored = read_json(run / CONFIG) or {}
    if stored.get("config_hash") != record["hash"] or not (run / FINAL_MODEL).is_dir():
        raise UserError(f"{path}: retraining did not store run {record['hash']} in {result_path}")
    return run


# ------------------------------------------------------------------------------ command line


def make_parser():
    parser = argparse.ArgumentParser(
        prog="python -m oml.lab.records", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("record", help="write the record of a finished run folder")
    r.add_argument("run_dir", metavar="RUN_DIR", help="results/<hash>/ of a finished (and evaluated) run")
    r.add_argument("--experiment", required=True, help="records go to <records>/<experiment>/<hash>.json")
    r.add_argument("--eval_flags", default=None, help="the eval_for_multigpu.py flags that evaluated it (one string)")
    r.add_argument("--point", default=None, help="the point's name in its experiment")
    r.add_argument("--why", default=None, help="one line: why this point")
    r.add_argument("--records", default=str(RECORDS_DIR), help="the records folder (default: experiments/records)")
    t = sub.add_parser("table", help="a table of every record of an experiment, failures included")
    t.add_argument("experiment", metavar="EXPERIMENT")
    t.add_argument("--markdown", action="store_true", help="a markdown table")
    t.add_argument("--records", default=str(RECORDS_DIR))
    rt = sub.add_parser("retrain", help="train a record's run again from its recorded arguments")
    rt.add_argument("record", metavar="RECORD", help="experiments/records/<experiment>/<hash>.json")
    rt.add_argument("--result_path", default=None, help="where the run goes (default: results/<experiment>)")
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    if args.command == "record":
        flags = None if args.eval_flags is None else shlex.split(args.eval_flags)
        path = write_record(args.run_dir, args.experiment, flags, args.point, args.why, args.records)
        print(f"record written to {path}")
    elif args.command == "table":
        records = read_records(args.experiment, args.records)
        if not records:
            raise UserError(f"no records of experiment {args.experiment!r} in {Path(args.records) / args.experiment}")
        print(format_table(table_rows(records), args.markdown), end="")
    else:
        # a record's relative paths (generated_data/...) are relative to the repository root, as the search wrote them
        record, result_path = Path(args.record).resolve(), args.result_path and Path(args.result_path).resolve()
        os.chdir(REPO)
        run = retrain(record, result_path)
        print(f"retrained {run.name}: {run / FINAL_MODEL}")


if __name__ == "__main__":
    run_cli(main)
