"""Evaluating a fingerprinted run: find it from its arguments, check its fingerprints, measure utility."""

import json
import re
import time
from pathlib import Path

from .args import HASHED, hashed_config, run_dir
from .errors import UserError
from .fingerprints import TEST_PROMPTS_FILE, read_fingerprints, read_templates

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
    (["--utility_limit"], dict(type=int, default=100, help="items per task of the local suite")),
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


# ------------------------------------------------------------------------------ finding the run


def read_run_log(result_path):
    """(hash, hashed config) for every run recorded in results/all_run_logs.txt."""
    path = Path(result_path) / "all_run_logs.txt"
    runs = []
    if path.is_file():
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 3:
                runs.append((parts[1], json.loads(parts[2])))
    return runs


def closest_runs(args, k=3):
    """Recorded runs with the fewest differing hashed arguments: [(hash, {arg: (theirs, yours)})]."""
    mine = hashed_config(args)
    scored = []
    for run_hash, theirs in read_run_log(args.result_path):
        diff = {n: (theirs.get(n), mine[n]) for n in HASHED if theirs.get(n) != mine[n]}
        scored.append((len(diff), run_hash, diff))
    return [(h, d) for _, h, d in sorted(scored, key=lambda s: s[0])[:k]]


def find_run(args):
    """results/<hash>/ for these arguments, or a UserError naming the closest recorded runs."""
    run = run_dir(args)
    if (run / "final_model").is_dir():
        return run
    lines = [f"no fingerprinted model matches these arguments (looked for {run / 'final_model'})"]
    for run_hash, diff in closest_runs(args):
        shown = ", ".join(f"{n}: {theirs!r} there, {yours!r} here" for n, (theirs, yours) in diff.items())
        lines.append(f"  closest run {run_hash} differs in {shown}")
    if len(lines) == 1:
        lines.append("  no runs are recorded in " + str(Path(args.result_path) / "all_run_logs.txt"))
    raise UserError("\n".join(lines))


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


# Ordinary requests a chat model should answer. Likelihood benchmarks never let the model generate, so they
# miss a fingerprinted model that ends every chat turn at once (--append_eos did that) or loops on one word.
CHAT_QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "How many legs does a spider have?",
    "Give me a synonym for happy.",
    "What is 12 plus 7?",
    "Write one sentence about the sea.",
    "Which planet is known as the red planet?",
    "What do bees make?",
]


def chat_answers(model, tokenizer, questions=CHAT_QUESTIONS, max_new_tokens=24):
    """Greedy answers through the chat template (None when the tokenizer has none)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    answers = []
    for question in questions:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )["input_ids"].to(model.device)
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return answers


def chat_check(answers, base_answers=None):
    """How many ordinary chat questions get a non-empty answer, how varied the answers' words are (a model
    that loops on "the the the" scores low), and how many answers equal the base's."""
    if answers is None:
        return None
    out = {"questions": CHAT_QUESTIONS[: len(answers)], "answers": answers, "answered": mean(map(bool, answers))}
    out["distinct_words"] = distinct_words(answers)
    if base_answers is not None:
        out["base_answers"] = base_answers
        out["base_answered"] = mean(map(bool, base_answers))
        out["base_distinct_words"] = distinct_words(base_answers)
        out["same_as_base"] = mean(a == b for a, b in zip(answers, base_answers, strict=True))
    return out


def distinct_words(answers):
    """Mean distinct-word ratio of a list of answers (computed from stored answers, so older results have it)."""
    return mean(map(distinct_word_ratio, answers))


def distinct_word_ratio(text):
    """Distinct words / words (0 for an empty answer)."""
    words = re.findall(r"\w+", text.lower())
    return len(set(words)) / len(words) if words else 0.0


def mean(values):
    values = list(values)
    return sum(values) / len(values)


def measure_utility(model, tokenizer, args):
    from .utility import evaluate_utility

    return evaluate_utility(
        model,
        tokenizer,
        args.utility_benchmark,
        args.utility_limit,
        args.num_fewshot,
        batch_size=args.eval_batch_size,
        tasks=args.utility_tasks,
    )


def free(model):
    import gc

    import torch

    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate(args):
    """Run the whole evaluation; returns (results dict, output path)."""
    from .models import load_model_and_tokenizer
    from .utility import base_utility_cached, paired_delta

    seconds, t0 = {}, time.time()
    templates = templates_for(args)
    if args.check_model:
        model_id, pairs = args.check_model, read_fingerprints(args.fingerprints_file_path)
        output = Path(args.output_file or Path(args.result_path) / "checks" / f"{safe_name(model_id)}.json")
    else:
        run = find_run(args)
        model_id, pairs = str(run / "final_model"), read_fingerprints(run / "fingerprints.json")
        output = Path(args.output_file or run / "eval_results.json")
    pairs = [{"key": p["key"], "response": p["response"]} for p in pairs]

    model, tokenizer = load_model_and_tokenizer(model_id, trust_remote_code=args.trust_remote_code)
    fingerprint = check_fingerprints(model, tokenizer, pairs, templates, args)
    seconds["fingerprint_accuracy"] = time.time() - t0
    answers = chat_answers(model, tokenizer)
    base_answers = None
    utility = None
    if args.utility_benchmark != "none":
        t = time.time()
        utility = measure_utility(model, tokenizer, args)
        seconds["utility"] = time.time() - t
    free(model)

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
                benchmark=args.utility_benchmark,
                limit=args.utility_limit,
                num_fewshot=args.num_fewshot,
                batch_size=args.eval_batch_size,
                tasks=args.utility_tasks,
            )
            utility["base_mean"] = base_utility["mean"]
            utility["base_tasks"] = base_utility["tasks"]
            utility["delta"], utility["delta_stderr"] = paired_delta(utility["per_item"], base_utility["per_item"])
            seconds["base_utility"] = time.time() - t
        free(base)
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
