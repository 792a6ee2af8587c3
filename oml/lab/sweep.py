"""The logic behind launch_multigpu.sh: fingerprint data for a grid point, its run hash, and the summary table.

The bash script keeps the grid and the launch commands in view; everything else happens here:

    python -m oml.lab.sweep prepare -- ARGS...      # make the default fingerprints file if missing, print the run hash
    python -m oml.lab.sweep record --manifest M --name N --hash H --train done --eval failed --log L -- ARGS...
    python -m oml.lab.sweep summary --manifest M    # one row per recorded point -> results/sweep_summary.{csv,md}
    python -m oml.lab.sweep summary --results results/   # every evaluated run found there
    python -m oml.lab.sweep preset-grid --preset seed    # the grid's default values, as bash assignments
    python -m oml.lab.sweep experiments-env              # experiments/common.sh's settings, as bash assignments
    python -m oml.lab.sweep choose-lambda --strategy english --num_fingerprints 64 --num_train_epochs 16   # λ* of a search

`summary` exits with status 1 when a point failed, so the sweep's own exit status says so too.
"""

import argparse
import contextlib
import csv
import io
import json
import shlex
import sys
import time
from pathlib import Path

from oml.core.data_files import DEFAULT_FINGERPRINT_FILES, canonical_strategy
from oml.core.errors import UserError, run_cli
from oml.core.files import atomic_write_text
from oml.core.recipes import EVALUATIONS, EXPERIMENT_EVAL, EXPERIMENTS, SWEEPS, flag_words, shell_value
from oml.core.run_config import PRESETS, add_train_args, apply_preset, recorded_settings
from oml.core.run_store import find_runs, read_run, short_model
from oml.embed.run_setup import prepare_run
from oml.measure.chat_sample import distinct_words
from oml.measure.evaluation import accuracy_split, chat_accuracy_split

# How many fingerprints a missing default file gets: what the committed files hold, or more if a point needs it.
GENERATED_COUNT = {"english": 512, "random_word": 4096}

SETTING_COLUMNS = [
    "model", "strategy", "num_fingerprints", "max_key_length", "max_response_length", "learning_rate",
    "forgetting_regularizer_strength", "use_prompt_augmentation", "num_train_epochs", "batch_size",
    "benign_data_ratio", "distance_regularizer", "lora_rank", "trainable_layers", "stop_when_learned",
]  # fmt: skip
RESULT_COLUMNS = [
    "fp_accuracy_plain", "fp_accuracy_test_prompts", "fp_accuracy_chat", "fp_accuracy_chat_system",
    "base_false_positive_rate", "utility", "utility_base",
    "utility_delta", "utility_delta_stderr", "match_probability_t0.7", "match_probability_t1.0", "generation",
    "generation_base", "generation_delta", "generation_delta_stderr", "alias_in_answer", "alias_in_answer_delta",
    "alias_in_answer_delta_stderr", "chat_kl", "chat_kl_stderr", "chat_same_as_base",
    "chat_answered", "chat_distinct_words", "train_seconds", "epochs_trained", "eval_seconds",
]  # fmt: skip
COLUMNS = ["point", "status", "hash", *SETTING_COLUMNS, *RESULT_COLUMNS, "train", "eval", "log"]


# ------------------------------------------------------------------------------ one grid point


def train_parser():
    from oml.measure.evaluation import add_eval_args

    parser = argparse.ArgumentParser(prog="launch_multigpu.sh point", add_help=False, exit_on_error=False)
    return add_eval_args(add_train_args(parser))


def parse_point(argv):
    """The arguments of a grid point as finetune_multigpu.py/eval_for_multigpu.py will read them (not finalized)."""
    return apply_preset(train_parser().parse_known_args(argv)[0])


def generate_command(strategy, needed, max_response_length):
    """generate_finetuning_data.py arguments that write the default fingerprints file of a strategy."""
    if strategy in ("english", "english_random_responses"):
        count = max(GENERATED_COUNT["english"], needed)
        return ["--num_backdoors", count, "--batch_size", 128, "--use_chat_template"]
    if strategy == "random_word":
        return ["--random_word_generation", "--num_backdoors", max(GENERATED_COUNT["random_word"], needed)]
    return [
        "--key_response_strategy", "perinucleus", "--response_length", max_response_length,
        "--keys_file", DEFAULT_FINGERPRINT_FILES["english"],
    ]  # fmt: skip


def ensure_fingerprints(args):
    """Generate the strategy's default fingerprints file when the point uses it and it is missing."""
    if args.fingerprints_file_path is not None:
        return
    strategy = canonical_strategy(args.fingerprint_generation_strategy)
    needed = args.max_num_fingerprints * (args.data_split + 1)
    if strategy == "inverse_nucleus":  # its keys come from the English file
        ensure_file(DEFAULT_FINGERPRINT_FILES["english"], generate_command("english", needed, 1))
    ensure_file(DEFAULT_FINGERPRINT_FILES[strategy], generate_command(strategy, needed, args.max_response_length))


def ensure_file(path, generate_args):
    if path.is_file():
        return
    from oml.make.fingerprint_generator import generate, parse_generate_args

    argv = [*map(str, generate_args), "--output_file_path", str(path)]
    print(f"{path} is missing: generating it with generate_finetuning_data.py {' '.join(argv)}", file=sys.stderr)
    generate(parse_generate_args(argv))  # its output goes to stderr: `sweep prepare` keeps stdout for the hash


def prepare(argv):
    """Make sure the point's data exists; returns its run hash (the folder under --result_path)."""
    # Parsed strictly, as finetune_multigpu.py will: a typo fails here, before anything is launched.
    args = apply_preset(add_train_args(argparse.ArgumentParser(prog="finetune_multigpu.py")).parse_args(argv))
    ensure_fingerprints(args)
    return prepare_run(args).config_hash


def record(manifest, name, run_hash, train, evaluation, log, argv):
    """Append one point's outcome to the sweep's manifest (a JSON line per point)."""
    entry = {
        "point": name,
        "hash": run_hash or None,
        "train": train,
        "eval": evaluation,
        "log": log,
        "args": list(argv),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(manifest).parent.mkdir(parents=True, exist_ok=True)
    with open(manifest, "a") as f:  # one sweep, one writer: no lock needed
        f.write(json.dumps(entry) + "\n")


# ------------------------------------------------------------------------------ reading runs


# Summary column -> the argument it shows (names as in fingerprinting_config.json's "hashed").
SETTING_SOURCES = {
    "model": "model",
    "strategy": "fingerprint_generation_strategy",
    "num_fingerprints": "max_num_fingerprints",
    "max_key_length": "max_key_length",
    "max_response_length": "max_response_length",
    "learning_rate": "learning_rate",
    "forgetting_regularizer_strength": "forgetting_regularizer_strength",
    "use_prompt_augmentation": "use_prompt_augmentation",
    "num_train_epochs": "num_train_epochs",
    "batch_size": "batch_size",
    "benign_data_ratio": "benign_data_ratio",
    "distance_regularizer": "distance_regularizer",
    "lora_rank": "lora_rank",
    "trainable_layers": "trainable_layers",
    "stop_when_learned": "stop_when_learned",
}


def run_settings(run):
    """The run's key arguments, from its fingerprinting_config.json."""
    settings = recorded_settings(run["config"]["hashed"])
    return {column: settings.get(name) for column, name in SETTING_SOURCES.items()}


def point_settings(argv):
    """Key arguments of a point that has no run folder (it failed early), read from its command line."""
    from oml.core.model_registry import resolve_model

    try:
        args = vars(parse_point(argv))
    except (argparse.ArgumentError, SystemExit):  # a value the scripts reject: show what we can
        return dict.fromkeys(SETTING_SOURCES, None) | {"model": "?"}
    try:
        args["model"] = resolve_model(args["model_family"], args["model_size"], args["model_path"])
    except UserError:
        args["model"] = f"{args['model_family']}/{args['model_size']}"
    return {column: args.get(name) for column, name in SETTING_SOURCES.items()}


def result_columns(run):
    """Accuracy, utility and timing columns of a run (None where not measured)."""
    out = dict.fromkeys(RESULT_COLUMNS)
    if run is None:
        return out
    if run["metrics"]:
        out["train_seconds"] = run["metrics"].get("train_seconds")
        out["epochs_trained"] = run["metrics"].get("epochs_trained")
    results = run["eval"]
    if not results:
        return out
    out["fp_accuracy_plain"], out["fp_accuracy_test_prompts"] = accuracy_split(results)
    out["fp_accuracy_chat"], out["fp_accuracy_chat_system"] = chat_accuracy_split(results)
    out["base_false_positive_rate"] = results["fingerprint_accuracy"].get("base_false_positive_rate")
    utility = results.get("utility")
    if utility:
        out["utility"] = utility.get("mean")
        out["utility_base"] = utility.get("base_mean")
        out["utility_delta"] = utility.get("delta")
        out["utility_delta_stderr"] = utility.get("delta_stderr")
    for temperature, p in (results["fingerprint_accuracy"].get("mean_match_probability") or {}).items():
        if f"match_probability_t{temperature}" in out:
            out[f"match_probability_t{temperature}"] = p
    generation = results.get("generation") or {}
    out["generation"], out["generation_base"] = generation.get("score"), generation.get("base_score")
    out["generation_delta"], out["generation_delta_stderr"] = generation.get("delta"), generation.get("delta_stderr")
    # the share of answers that contain an answer alias: on a small chat model, which answers in sentences, the
    # generative number that moves when exact match sits at the floor
    out["alias_in_answer"] = generation.get("alias_in_answer")
    out["alias_in_answer_delta"] = generation.get("alias_in_answer_delta")
    out["alias_in_answer_delta_stderr"] = generation.get("alias_in_answer_delta_stderr")
    drift = results.get("chat_drift") or {}
    out["chat_kl"], out["chat_kl_stderr"] = drift.get("kl"), drift.get("kl_stderr")
    out["chat_same_as_base"] = drift.get("same_as_base")
    chat = results.get("chat") or {}
    out["chat_answered"] = chat.get("answered")
    if chat.get("answers") is not None:  # computed from the stored answers, so older evaluations have it too
        out["chat_distinct_words"] = distinct_words(chat["answers"])
    out["eval_seconds"] = (results.get("seconds") or {}).get("total")
    return out


# ------------------------------------------------------------------------------ the summary table


def point_status(train, evaluation):
    """ok when the point has a trained model and its evaluation; else the stage that failed."""
    if train == "not run":
        return "failed (prepare)"  # bad arguments or no fingerprint data: see the point's log
    if train == "failed":
        return "failed (train)"
    if evaluation == "failed":
        return "failed (eval)"
    return "ok" if evaluation in ("done", "reused") else "not evaluated"


def summary_rows(result_path, manifest=None):
    """One row per point of the manifest (in sweep order), or per trained run in result_path without one."""
    rows = []
    if manifest is None:
        for run in find_runs(result_path):
            if run["config"] is None:
                continue
            status = "ok" if run["eval"] else "not evaluated"
            row = {"point": run["hash"], "status": status, "hash": run["hash"], **run_settings(run)}
            rows.append({**row, **result_columns(run), "train": "done", "eval": "done" if run["eval"] else "-"})
        return rows
    for entry in read_manifest(manifest).values():
        run = read_run(Path(result_path) / entry["hash"]) if entry["hash"] else None
        settings = run_settings(run) if run and run["config"] else point_settings(entry["args"])
        results = result_columns(run)
        rows.append(
            {
                "point": entry["point"],
                "status": point_status(entry["train"], entry["eval"]),
                "hash": entry["hash"] or "",
                **settings,
                **results,
                "train": entry["train"],
                "eval": entry["eval"],
                "log": entry["log"],
            }
        )
    return rows


def read_manifest(path):
    """The manifest's entries by point name; a point recorded twice (a rerun) keeps its last entry."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep manifest {path} does not exist")
    entries = {}
    for line in path.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            entries[entry["point"]] = entry
    return entries


def csv_text(rows):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in COLUMNS})
    return buffer.getvalue()


def percent(x):
    return "–" if x is None else f"{100 * x:.1f}"


def number(x, fmt=".3f"):
    return "–" if x is None else format(x, fmt)


def yes_no(x):
    return "–" if x is None else ("yes" if x else "no")


def markdown_text(rows):
    header = [
        "hash", "model", "strategy", "N", "lr", "λ", "aug", "epochs", "acc plain %", "acc test prompts %", "acc chat %",
        "acc chat + system %",         "base FP %", "p match T=0.7 %", "p match T=1 %", "utility", "Δ utility", "chat answered %",
        "chat distinct words", "generation EM", "Δ generation", "alias in answer %", "Δ alias in answer", "chat KL", "chat same %", "status",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        delta = gen_delta = alias_delta = "–"
        if r.get("utility_delta") is not None:
            delta = f"{r['utility_delta']:+.3f} ± {number(r.get('utility_delta_stderr'))}"
        if r.get("generation_delta") is not None:
            gen_delta = f"{r['generation_delta']:+.3f} ± {number(r.get('generation_delta_stderr'))}"
        if r.get("alias_in_answer_delta") is not None:
            alias_delta = f"{r['alias_in_answer_delta']:+.3f} ± {number(r.get('alias_in_answer_delta_stderr'))}"
        cells = [
            r["hash"] or "–", short_model(str(r["model"])), r["strategy"] or "–", number(r["num_fingerprints"], "d"),
            number(r["learning_rate"], "g"), number(r["forgetting_regularizer_strength"], "g"),
            yes_no(r["use_prompt_augmentation"]), number(r["num_train_epochs"], "d"),
            percent(r.get("fp_accuracy_plain")), percent(r.get("fp_accuracy_test_prompts")),
            percent(r.get("fp_accuracy_chat")), percent(r.get("fp_accuracy_chat_system")),
            percent(r.get("base_false_positive_rate")), percent(r.get("match_probability_t0.7")),
            percent(r.get("match_probability_t1.0")), number(r.get("utility")), delta, percent(r.get("chat_answered")),
            number(r.get("chat_distinct_words"), ".2f"), number(r.get("generation")), gen_delta,
            percent(r.get("alias_in_answer")), alias_delta,
            number(r.get("chat_kl"), ".4f"), percent(r.get("chat_same_as_base")), r["status"],
        ]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def write_summary(rows, out_dir):
    """Write sweep_summary.csv and sweep_summary.md into out_dir; returns their paths."""
    csv_path, md_path = Path(out_dir) / "sweep_summary.csv", Path(out_dir) / "sweep_summary.md"
    atomic_write_text(csv_path, csv_text(rows))
    atomic_write_text(md_path, markdown_text(rows))
    return csv_path, md_path


# ------------------------------------------------------------------------------ choosing λ


def choose_lambda(result_path, min_accuracy=0.95, **setting):
    """λ* from a search: the largest λ > 0 whose plain-key accuracy is ≥ min_accuracy, else the smallest λ > 0.

    More averaging keeps the model closer to its base, so among the λ that still carry the fingerprints
    the largest one is preferred. `setting` names summary columns the runs must match (e.g. strategy).
    Returns (λ*, {λ: plain-key accuracy}).
    """
    accuracy = {}
    for run in find_runs(result_path):
        if not (run["config"] and run["eval"]):
            continue
        settings = run_settings(run)
        if settings["use_prompt_augmentation"] or any(settings[k] != v for k, v in setting.items()):
            continue
        accuracy[settings["forgetting_regularizer_strength"]] = accuracy_split(run["eval"])[0]
    tried = sorted(lam for lam in accuracy if lam > 0)
    if not tried:
        raise UserError(f"no evaluated run with λ > 0 matches {setting} in {result_path}")
    carrying = [lam for lam in tried if accuracy[lam] >= min_accuracy]
    return (max(carrying) if carrying else tried[0]), accuracy


# ------------------------------------------------------------------------------ the grid's defaults

# launch_multigpu.sh's grid variables and the argument each one sweeps.
GRID_VARIABLES = {
    "model_families": "model_family",
    "model_sizes": "model_size",
    "max_key_lengths": "max_key_length",
    "max_response_lengths": "max_response_length",
    "fingerprint_generation_strategies": "fingerprint_generation_strategy",
    "learning_rates": "learning_rate",
    "forgetting_regularizer_strengths": "forgetting_regularizer_strength",
    "max_num_fingerprints": "max_num_fingerprints",
    "epochs": "num_train_epochs",
    "benign_data_ratios": "benign_data_ratio",
    "distance_regularizers": "distance_regularizer",
}


def preset_args(preset):
    return apply_preset(add_train_args(argparse.ArgumentParser()).parse_args(["--preset", preset]))


def preset_grid(preset):
    """Bash assignments giving each grid variable the preset's value, the augmentation values and the evaluation
    flags of its sweep, so the values live only in oml/core/recipes.py."""
    if preset not in PRESETS:
        raise UserError(f"PRESET must be one of {', '.join(PRESETS)}, got '{preset}'")
    args, sweep = preset_args(preset), SWEEPS[preset].settings
    lines = [f"{var}=({shell_value(getattr(args, name))})" for var, name in GRID_VARIABLES.items()]
    augment = " ".join("true" if a else "false" for a in sweep["use_prompt_augmentation"])
    evaluation = EVALUATIONS[sweep["evaluation"]].settings if sweep["evaluation"] else {}
    return "\n".join([
        *lines,
        f"batch_size={args.batch_size}",
        f"use_prompt_augmentation=({augment})",
        f"eval_args={shlex.quote(' '.join(flag_words(evaluation)))}",
    ])  # fmt: skip


# Evaluation settings of the experiments a driver's environment may change: setting -> variable.
EXPERIMENT_EVAL_KNOBS = {"utility_limit": "UTILITY_LIMIT", "utility_tasks": "UTILITY_TASKS"}


def experiments_env():
    """experiments/common.sh's settings as bash: the experiments' point (oml.core.recipes.EXPERIMENTS: PRESET and the
    grid's single values; BATCH_SIZE may be set) and EVAL_ARGS, the resolving evaluation (UTILITY_LIMIT and
    UTILITY_TASKS may be set)."""
    point = EXPERIMENTS.settings
    args = preset_args(point["preset"])
    lines = [
        f"export PRESET={point['preset']} MODEL_FAMILIES={args.model_family} MODEL_SIZES={args.model_size} "
        f"MAX_KEY_LENGTHS={point['max_key_length']} MAX_RESPONSE_LENGTHS={point['max_response_length']}",
        f"export BATCH_SIZE=${{BATCH_SIZE:-{point['batch_size']}}}",
    ]
    evaluation = dict(EVALUATIONS[EXPERIMENT_EVAL].settings)
    for name, var in EXPERIMENT_EVAL_KNOBS.items():
        (default,) = flag_words({name: evaluation[name]})[1:]
        lines.append(f"{var}=${{{var}:-{default}}}")
        evaluation[name] = f"${var}"
    lines.append(f'export EVAL_ARGS="{" ".join(flag_words(evaluation))}"')
    return "\n".join(lines)


# ------------------------------------------------------------------------------ command line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="make the point's fingerprints file if missing; print its run hash")
    r = sub.add_parser("record", help="append a point's outcome to the sweep manifest")
    r.add_argument("--manifest", required=True)
    r.add_argument("--name", required=True)
    r.add_argument("--hash", default="")
    r.add_argument("--train", required=True, choices=["done", "reused", "failed", "not run"])
    r.add_argument("--eval", required=True, choices=["done", "reused", "failed", "not run"])
    r.add_argument("--log", default="")
    s = sub.add_parser("summary", help="write sweep_summary.csv/.md and print the table")
    s.add_argument("--results", default="results/", help="the sweep's --result_path")
    s.add_argument("--manifest", default=None, help="the sweep's manifest (default: every run in --results)")
    s.add_argument("--out", default=None, help="where the summary files go (default: --results)")
    g = sub.add_parser("preset-grid", help="print the grid's default values for a preset as bash assignments")
    g.add_argument("--preset", required=True, help=" | ".join(PRESETS))
    sub.add_parser("experiments-env", help="print experiments/common.sh's settings as bash assignments")
    c = sub.add_parser("choose-lambda", help="print λ* from an evaluated λ search (see choose_lambda)")
    c.add_argument("--results", default="results/")
    c.add_argument("--strategy", required=True)
    c.add_argument("--num_fingerprints", type=int, required=True)
    c.add_argument("--num_train_epochs", type=int, required=True)
    c.add_argument("--min_accuracy", type=float, default=0.95)
    # The point's own arguments come after "--", untouched by this parser.
    argv = sys.argv[1:] if argv is None else list(argv)
    point_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.command == "prepare":
        # stdout carries the hash alone (launch_multigpu.sh reads it): the generator's output, and a library's notice
        # while the model is first converted (DeepSpeed's accelerator line), go to stderr
        with contextlib.redirect_stdout(sys.stderr):
            run_hash = prepare(point_args)
        print(run_hash)
    elif args.command == "preset-grid":
        print(preset_grid(args.preset))
    elif args.command == "experiments-env":
        print(experiments_env())
    elif args.command == "choose-lambda":
        best, accuracy = choose_lambda(
            args.results,
            args.min_accuracy,
            strategy=args.strategy,
            num_fingerprints=args.num_fingerprints,
            num_train_epochs=args.num_train_epochs,
        )
        for lam, acc in sorted(accuracy.items()):
            print(f"λ = {lam}: plain-key accuracy {acc:.1%}", file=sys.stderr)
        print(best)
    elif args.command == "record":
        record(args.manifest, args.name, args.hash, args.train, args.eval, args.log, point_args)
    else:
        rows = summary_rows(args.results, args.manifest)
        if not rows:
            raise UserError(f"nothing to summarise in {args.manifest or args.results}")
        csv_path, md_path = write_summary(rows, args.out or args.results)
        print(markdown_text(rows), end="")
        failed = [r["point"] for r in rows if r["status"] != "ok"]
        print(f"summary written to {csv_path} and {md_path}")
        if failed:
            print(f"{len(failed)} of {len(rows)} points did not finish: {', '.join(failed)}", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
