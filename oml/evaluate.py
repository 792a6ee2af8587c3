"""Evaluating a fingerprinted run: find it from its arguments, check its fingerprints, measure utility."""

import time
from pathlib import Path

from .chat import chat_answers, chat_check
from .fingerprints import TEST_PROMPTS_FILE, read_fingerprints, read_templates
from .runs import EVAL_RESULTS, FINAL_MODEL, FINGERPRINTS, find_run
from .utility import SUITE_DEFAULTS

EVAL_ARGS = [
    (["--check_model"], dict(default=None, metavar="PATH_OR_HUB_ID",
                             help="evaluate this model against --fingerprints_file_path directly (no hash lookup)")),
    (["--test_prompts_file"], dict(default=None, help="extra JSON list of templates, each with exactly one {}")),
    (["--verify_with_generate"], dict(action="store_true",
                                      help="slow reference: one model.generate per (template, key)")),
    (["--temperature"], dict(type=float, default=0.0, help="with --verify_with_generate: sample at this temperature")),
    (["--screen_bf16"], dict(action="store_true",
                             help="fp32 model: decide verdicts on a bf16 copy and recompute near-ties in fp32 "
                                  "(1.5-1.7x faster on CPUs with AMX; see oml/verify.py)")),
    (["--utility_benchmark"], dict(default="local", choices=["local", "tinyBenchmarks", "none"])),
    (["--utility_limit"], dict(type=int, default=SUITE_DEFAULTS["limit"], help="items per task of the local suite")),
    (["--utility_tasks"], dict(default=None, type=lambda text: local_task_list(text),
                               help="local suite tasks, comma-separated (default: all six)")),
    (["--num_fewshot"], dict(type=int, default=0)),
    (["--eval_batch_size"], dict(type=int, default=32)),
    (["--skip_base_model"], dict(action="store_true",
                                 help="don't evaluate the base model (no false-positive rate, no utility delta)")),
    (["--output_file"], dict(default=None, help="where to write the results JSON (default: the run's folder)")),
]  # fmt: skip


def local_task_list(text):
    import argparse

    from .utility import LOCAL_TASKS

    tasks = [t for t in text.replace(",", " ").split() if t]
    unknown = [t for t in tasks if t not in LOCAL_TASKS]
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(f"unknown task(s) {unknown or text!r}; choose from {', '.join(LOCAL_TASKS)}")
    return tasks


def add_eval_args(parser):
    for flags, kwargs in EVAL_ARGS:
        parser.add_argument(*flags, **kwargs)
    return parser


# ----------------------------------------------------------------------------- the evaluation


def templates_for(args):
    templates = ["{}"] + read_templates(TEST_PROMPTS_FILE)
    if args.test_prompts_file:
        templates += [t for t in read_templates(args.test_prompts_file) if t not in templates]
    return templates


def check_fingerprints(model, tokenizer, pairs, templates, args):
    from .verify import summarize, verify_teacher_forced, verify_with_generate

    if args.verify_with_generate:
        results = verify_with_generate(
            model, tokenizer, pairs, templates, args.use_chat_template, args.temperature, args.seed
        )
    else:
        import torch

        results = verify_teacher_forced(
            model,
            tokenizer,
            pairs,
            templates,
            args.use_chat_template,
            batch_size=args.eval_batch_size,
            screen_dtype=torch.bfloat16 if args.screen_bf16 else None,
        )
        if any("rechecked" in r for r in results):
            print(
                f"bf16 screen: {sum(r['rechecked'] for r in results)} of {len(pairs) * len(templates)} pairs "
                f"near a tie, recomputed in {model.dtype}"
            )
    return summarize(results)


def suite_settings(args):
    """The utility suite's settings, as the evaluation's flags give them (one place, for the model and the base)."""
    return dict(
        benchmark=args.utility_benchmark,
        limit=args.utility_limit,
        num_fewshot=args.num_fewshot,
        tasks=args.utility_tasks,
    )


def release_memory():
    """Return freed model memory (after the caller's `del model`) to the system, and the GPU's to the GPU."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate(args, load_model=None):
    """Run the whole evaluation; returns (results dict, output path).

    load_model(model_id, trust_remote_code=...) -> (model, tokenizer) loads the evaluated model (default:
    load_model_and_tokenizer); the attacks use it to evaluate a cast or int8-quantized copy.

    The fingerprinted model and the base model are never in memory together: the first is released before the
    second loads.
    """
    from .models import load_model_and_tokenizer
    from .utility import base_utility_cached, evaluate_utility, paired_delta

    seconds, t0 = {}, time.time()
    templates = templates_for(args)
    if args.check_model:
        model_id, pairs = args.check_model, read_fingerprints(args.fingerprints_file_path)
        output = Path(args.output_file or Path(args.result_path) / "checks" / f"{safe_name(model_id)}.json")
    else:
        run = find_run(args)
        model_id, pairs = str(run / FINAL_MODEL), read_fingerprints(run / FINGERPRINTS)
        output = Path(args.output_file or run / EVAL_RESULTS)
    pairs = [{"key": p["key"], "response": p["response"]} for p in pairs]
    suite = suite_settings(args)

    model, tokenizer = (load_model or load_model_and_tokenizer)(model_id, trust_remote_code=args.trust_remote_code)
    fingerprint = check_fingerprints(model, tokenizer, pairs, templates, args)
    seconds["fingerprint_accuracy"] = time.time() - t0
    answers = chat_answers(model, tokenizer)
    base_answers = None
    utility = None
    if args.utility_benchmark != "none":
        t = time.time()
        utility = evaluate_utility(model, tokenizer, batch_size=args.eval_batch_size, **suite)
        seconds["utility"] = time.time() - t
    del model  # the base model loads next: never hold both
    release_memory()

    if not args.skip_base_model:
        t = time.time()
        base, base_tok = load_model_and_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
        fingerprint["base_false_positive_rate"] = check_fingerprints(base, base_tok, pairs, templates, args)[
            "mean_accuracy"
        ]
        base_answers = chat_answers(base, base_tok) if answers is not None else None
        seconds["base_fingerprint_accuracy"] = time.time() - t
        if utility is not None:
            t = time.time()
            base_utility = base_utility_cached(
                args.model,
                lambda: (base, base_tok),
                Path(args.result_path) / "base_utility",
                batch_size=args.eval_batch_size,
                **suite,
            )
            utility["base_mean"] = base_utility["mean"]
            utility["base_tasks"] = base_utility["tasks"]
            utility["delta"], utility["delta_stderr"] = paired_delta(utility["per_item"], base_utility["per_item"])
            seconds["base_utility"] = time.time() - t
        del base
        release_memory()
    seconds["total"] = time.time() - t0
    results = {
        "fingerprint_accuracy": fingerprint,
        "chat": chat_check(answers, base_answers),
        "utility": utility,
        "config_hash": None if args.check_model else args.config_hash,
        "model": model_id,
        "num_fingerprints": len(pairs),
        "seconds": seconds,
    }
    return results, output


def safe_name(model_id):
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id.strip("/"))[-80:]


def format_table(results):
    fa = results["fingerprint_accuracy"]
    width = 60
    lines = [f"{'template':<{width}} {'exact':>7} {'token':>7}"]
    for t in fa["templates"]:
        shown = t["template"].replace("\n", "\\n")
        shown = shown if len(shown) <= width else shown[: width - 3] + "..."
        lines.append(f"{shown:<{width}} {t['accuracy']:>7.1%} {t['fractional_accuracy']:>7.1%}")
    lines.append(f"{'mean over templates':<{width}} {fa['mean_accuracy']:>7.1%} {fa['mean_fractional_accuracy']:>7.1%}")
    if "base_false_positive_rate" in fa:
        lines.append(f"{'base model (false positives)':<{width}} {fa['base_false_positive_rate']:>7.1%}")
    chat = results.get("chat")
    if chat:
        n = len(chat["answers"])
        line = f"chat check: {round(chat['answered'] * n)}/{n} ordinary questions answered"
        if "base_answered" in chat:
            line += f" (base {round(chat['base_answered'] * n)}/{n}), {round(chat['same_as_base'] * n)}/{n} as the base"
        line += f"; distinct words {chat['distinct_words']:.2f}"
        if "base_distinct_words" in chat:
            line += f" (base {chat['base_distinct_words']:.2f})"
        lines += ["", line]
    utility = results["utility"]
    if utility:
        lines.append("")
        lines.append(f"utility: {utility['benchmark']}")
        for task, r in utility["tasks"].items():
            base = utility.get("base_tasks", {}).get(task)
            base_text = f"   base {base['score']:.3f}" if base else ""
            lines.append(f"  {task:<24} {r['metric']:<9} {r['score']:.3f} ± {r['stderr']:.3f}  (n={r['n']}){base_text}")
        line = f"  {'mean':<34} {utility['mean']:.3f}"
        if "delta" in utility:
            line += f"   base {utility['base_mean']:.3f}   Δ {utility['delta']:+.3f} ± {utility['delta_stderr']:.3f}"
        lines.append(line)
    return "\n".join(lines)
