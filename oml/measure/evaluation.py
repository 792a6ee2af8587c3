"""Evaluating a fingerprinted run: find it from its arguments, check its fingerprints, measure utility and drift.

What each measure costs in time is recorded under "seconds" in the results (bench/bench_eval.py times them).
"""

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from oml.core.data_files import CHAT_SYSTEM_TEST_FILE, TEST_PROMPTS_FILE
from oml.core.run_store import EVAL_RESULTS, FINAL_MODEL, FINGERPRINTS, RunIdentity, find_run
from oml.core.stage_settings import settings_from_args
from oml.make.fingerprint_files import read_fingerprints, read_system_prompts, read_templates
from oml.make.prompt_encoding import chat_prompt, has_chat_template, is_chat, template_label
from oml.measure import evaluation_cost
from oml.measure.chat_sample import chat_answers, chat_check
from oml.measure.generation_measures import CHAT_DRIFT_DEFAULTS, GENERATION_DEFAULTS
from oml.measure.likelihood_benchmarks import SUITE_DEFAULTS

# The quick look's utility tasks: the experiments' four (MMLU is at chance for a 135M model, HellaSwag the slowest task).
QUICK_UTILITY_TASKS = ["arc_challenge", "arc_easy", "winogrande", "piqa"]
# What --measure turns on. quick: what a first look needs, minutes not hours on the embedded model (the fingerprint
# check under every template, the base's false positives, the chat check, 30 items of each quick utility task; the
# base's side is cached after the first evaluation; bench/bench_first_minutes.py times it). full: the resolving
# measures of the experiments too. A measure's own flag, given by name, wins over the profile.
MEASURES = {
    "quick": dict(
        utility_limit=30,
        utility_tasks=QUICK_UTILITY_TASKS,
        generation_benchmark="none",
        chat_drift_limit="none",
        match_temperatures="none",
    ),
    "full": dict(
        utility_limit=SUITE_DEFAULTS["limit"],
        generation_benchmark=GENERATION_DEFAULTS["benchmark"],
        chat_drift_limit=CHAT_DRIFT_DEFAULTS["limit"],
        match_temperatures=None,  # oml.measure.fingerprint_check.MATCH_TEMPERATURES
    ),
}
# --eval_templates: the groups of prompt templates the fingerprint check can be limited to.
TEMPLATE_GROUPS = ("plain", "raw", "chat", "chat_system")

EVAL_ARGS = [
    (["--check_model"], dict(default=None, metavar="PATH_OR_HUB_ID",
                             help="evaluate this model against --fingerprints_file_path directly (no hash lookup)")),
    (["--test_prompts_file"], dict(default=None, help="extra JSON list of templates, each with exactly one {}")),
    (["--chat_system_prompts_file"], dict(default=None,
                                          help="extra JSON list of system messages for the chat rows (key as user turn)")),
    (["--verify_with_generate"], dict(action="store_true",
                                      help="slow reference: one model.generate per (template, key)")),
    (["--temperature"], dict(type=float, default=0.0, help="with --verify_with_generate: sample at this temperature")),
    (["--screen_bf16"], dict(action="store_true",
                             help="fp32 model: decide verdicts on a bf16 copy and recompute near-ties in fp32 "
                                  "(1.5-1.7x faster on CPUs with AMX; see oml/measure/fingerprint_check.py)")),
    (["--measure"], dict(default="quick", choices=list(MEASURES),
                         help="quick (default): fingerprints, false positives, a small utility look (30 items of ARC-C, "
                              "ARC-E, Winogrande, PIQA); full: also the resolving measures (generative benchmark, chat "
                              "drift, match probabilities, 100 utility items per task). A measure's own flag wins")),
    (["--eval_templates"], dict(default="all", type=lambda text: template_groups(text),
                                help="which prompt templates the fingerprint check uses: all, or some of "
                                     f"{','.join(TEMPLATE_GROUPS)} (comma-separated)")),
    (["--utility_benchmark"], dict(default="local", choices=["local", "tinyBenchmarks", "none"])),
    (["--utility_limit"], dict(default=None, help="items per task of the local suite, or 'all' (the experiments: "
                                                   "see the README); default: --measure's")),
    (["--utility_tasks"], dict(default=None, type=lambda text: local_task_list(text),
                               help="local suite tasks, comma-separated (default: --measure quick the four above, full all six)")),
    (["--num_fewshot"], dict(type=int, default=0)),
    (["--generation_benchmark"], dict(default=None, help="generative benchmark: trivia_qa | nq_open | none (see "
                                                          "oml/measure/generation_measures.py); default: --measure's")),
    (["--generation_limit"], dict(type=int, default=GENERATION_DEFAULTS["limit"],
                                  help="questions of the generative benchmark")),
    (["--chat_drift_limit"], dict(default=None, help="questions for chat drift (KL to the base over its answers), "
                                                      "or none; default: --measure's")),
    (["--match_temperatures"], dict(default=None, help="comma-separated sampling temperatures for the match "
                                                        "probability (0.7,1.0 with --measure full), or none")),
    (["--eval_batch_size"], dict(type=int, default=32)),
    (["--skip_base_model"], dict(action="store_true",
                                 help="don't evaluate the base model (no false-positive rate, no utility delta)")),
    (["--output_file"], dict(default=None, help="where to write the results JSON (default: the run's folder)")),
]  # fmt: skip


def local_task_list(text):
    import argparse

    from oml.measure.likelihood_benchmarks import LOCAL_TASKS

    tasks = [t for t in text.replace(",", " ").split() if t]
    unknown = [t for t in tasks if t not in LOCAL_TASKS]
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(f"unknown task(s) {unknown or text!r}; choose from {', '.join(LOCAL_TASKS)}")
    return tasks


def template_groups(text):
    """--eval_templates: 'all', or a comma-separated subset of TEMPLATE_GROUPS (returned as a tuple)."""
    import argparse

    groups = tuple(g for g in str(text).replace(",", " ").split() if g)
    if groups == ("all",):
        return "all"
    unknown = [g for g in groups if g not in TEMPLATE_GROUPS]
    if unknown or not groups:
        raise argparse.ArgumentTypeError(f"unknown template group(s) {unknown or text!r}; choose all or some of "
                                         f"{', '.join(TEMPLATE_GROUPS)}")  # fmt: skip
    return groups


def add_eval_args(parser):
    from oml.core.run_config import add_arguments

    return add_arguments(parser, EVAL_ARGS)


@dataclass(frozen=True)
class EvalSettings:
    """What one evaluation measures and on which model: the evaluation flags, the --measure profile filled in and
    every value checked, with the run they name. Built once from finalized arguments (from_args); never changed
    (an attack evaluates its copy under dataclasses.replace(settings, check_model=...))."""

    run: RunIdentity  # the run the training flags name (its folder, hash and result path)
    base_model: str  # the model the run was fingerprinted from (--model_path, or family and size)
    trust_remote_code: bool
    measure: str  # the --measure profile: quick or full
    check_model: str | None  # a suspect model evaluated against fingerprints_file_path (no run lookup)
    fingerprints_file_path: str
    output_file: str | None
    # the fingerprint check
    test_prompts_file: str | None
    chat_system_prompts_file: str | None
    eval_templates: str | tuple  # "all", or some of TEMPLATE_GROUPS
    use_chat_template: bool
    verify_with_generate: bool
    temperature: float
    seed: int
    screen_bf16: bool
    eval_batch_size: int
    match_temperatures: tuple  # sampling temperatures of the match probability; () for none
    skip_base_model: bool
    # utility, generation, chat drift
    utility_benchmark: str
    utility_limit: int | str  # items per task, or "all"
    utility_tasks: list | None
    num_fewshot: int
    generation_benchmark: str  # "none" for no generative benchmark
    generation_limit: int
    chat_drift_limit: int | None  # None for no chat drift

    @classmethod
    def from_args(cls, args):
        """The settings of finalized arguments (oml.embed.run_setup.prepare_run); flags left unset (None) take the
        --measure profile's values (MEASURES). Bad values stop here, with one line, before anything loads."""
        from oml.core.errors import UserError
        from oml.measure.fingerprint_check import MATCH_TEMPERATURES, check_temperatures
        from oml.measure.generation_measures import check_generation_settings, check_limit
        from oml.measure.likelihood_benchmarks import check_utility_limit

        measure = args.measure or "quick"

        def chosen(name):  # a measure's own flag wins over the profile
            value = getattr(args, name)
            return MEASURES[measure].get(name) if value is None else value

        utility_limit = check_utility_limit(chosen("utility_limit"))
        generation_benchmark = chosen("generation_benchmark")
        check_limit("the generation limit", args.generation_limit)  # checked even where the benchmark is off
        if generation_benchmark != "none":
            check_generation_settings(generation_benchmark, args.generation_limit)
        drift = None
        if str(chosen("chat_drift_limit")) != "none":
            text = str(chosen("chat_drift_limit")).strip()
            drift = check_limit(
                "the chat drift limit (--chat_drift_limit)", int(text) if text.lstrip("-").isdigit() else text
            )
        temperatures = chosen("match_temperatures")
        if temperatures is None:
            temperatures = MATCH_TEMPERATURES
        elif str(temperatures).strip() == "none":
            temperatures = ()
        else:
            try:
                temperatures = tuple(float(t) for t in str(temperatures).replace(",", " ").split())
            except ValueError:
                raise UserError(f"--match_temperatures takes numbers, got {temperatures!r}") from None
            temperatures = check_temperatures(temperatures)
        return settings_from_args(
            cls,
            args,
            run=RunIdentity.from_args(args),
            base_model=args.model,
            match_temperatures=tuple(temperatures),
            utility_limit=utility_limit,
            utility_tasks=chosen("utility_tasks"),
            generation_benchmark=generation_benchmark,
            chat_drift_limit=drift,
        )

    @property
    def suite(self):
        """The utility suite's settings (one place, for the model and the base)."""
        return dict(
            benchmark=self.utility_benchmark,
            limit=self.utility_limit,
            num_fewshot=self.num_fewshot,
            tasks=self.utility_tasks,
        )

    @property
    def generation(self):
        """The generative benchmark's settings, or None where it is off."""
        if self.generation_benchmark == "none":
            return None
        return dict(benchmark=self.generation_benchmark, limit=self.generation_limit)

    @property
    def drift(self):
        """The chat drift's settings, or None where it is off."""
        return None if self.chat_drift_limit is None else dict(limit=self.chat_drift_limit)

    def templates(self):
        """The fingerprint check's templates these settings choose (templates_for; it reads the template files)."""
        return templates_for(self.test_prompts_file, self.chat_system_prompts_file, self.eval_templates)

    @property
    def base_cache_dir(self):
        """Where base-model results are cached (utility, generation, chat reference, the base's fingerprint check)."""
        return Path(self.run.result_path) / "base_utility"


# ----------------------------------------------------------------------------- the evaluation


def templates_for(test_prompts_file=None, chat_system_prompts_file=None, groups="all"):
    """The plain key, the raw-text test prompts, and the chat rows: the key as the chat template's user turn without
    a system message and after each test system message (kept only for a model with a chat template: usable).
    The extra files are --test_prompts_file and --chat_system_prompts_file; groups is --eval_templates."""
    raw = read_templates(TEST_PROMPTS_FILE)
    if test_prompts_file:
        raw += [t for t in read_templates(test_prompts_file) if t not in raw and t != "{}"]
    systems = read_system_prompts(CHAT_SYSTEM_TEST_FILE)
    if chat_system_prompts_file:
        systems += [s for s in read_system_prompts(chat_system_prompts_file) if s not in systems]
    by_group = dict(plain=["{}"], raw=raw, chat=[chat_prompt()], chat_system=[chat_prompt(s) for s in systems])
    return [t for name, group in by_group.items() if groups == "all" or name in groups for t in group]


def usable(templates, tokenizer):
    return templates if has_chat_template(tokenizer) else [t for t in templates if not is_chat(t)]


def check_as_configured(model, tokenizer, pairs, templates, settings, temperatures=()):
    """The fingerprint check the settings ask for: one generate per key (--verify_with_generate), else the check
    through the "hf" backend (its batched teacher-forced verdicts, --screen_bf16 and --eval_batch_size as given)."""
    from oml.measure.fingerprint_check import check_fingerprints, summarize, verify_with_generate

    if settings.verify_with_generate:
        return summarize(
            verify_with_generate(
                model, tokenizer, pairs, templates, settings.use_chat_template, settings.temperature, settings.seed
            )
        )
    import torch

    from oml.measure.transformers_backend import TransformersModel

    screen = torch.bfloat16 if settings.screen_bf16 else None
    backend = TransformersModel(
        model, tokenizer, batch_size=settings.eval_batch_size, screen_dtype=screen, temperatures=temperatures
    )
    return check_fingerprints(backend, pairs, templates, settings.use_chat_template, announce_rechecks=True)


BASE_CHECK_VERSION = 2  # bump when check_as_configured or the chat check change what they return (2: batched chat)
BASE_CHECK_SETTINGS = (
    "use_chat_template",
    "verify_with_generate",
    "temperature",
    "seed",
    "screen_bf16",
    "eval_batch_size",
)


def base_templates_for(settings, templates):
    """The templates the base model's false positives are counted under: all of them with --measure full; with
    --measure quick only the plain key and the bare [chat] turn (where present), which cuts the first evaluation's
    base pass from 22 templates to 2 -- the base was never trained on the keys, so its rate does not hinge on the
    wrapper, and the table names the templates it was counted under."""
    if settings.measure == "full":
        return templates
    quick = [t for t in templates if t in ("{}", chat_prompt())]
    return quick or templates


def base_check_path(settings, pairs, templates, temperatures, with_answers):
    """(cache file, key) of the base model's fingerprint check for these pairs, templates and check settings."""
    from oml.core.files import json_digest, keyed_path
    from oml.core.offline_data import CHAT_QUESTIONS
    from oml.measure.likelihood_benchmarks import model_key

    key = dict(
        version=BASE_CHECK_VERSION,
        **model_key(settings.base_model),
        pairs=json_digest(pairs),
        templates=templates,
        temperatures=list(temperatures),
        chat_questions=CHAT_QUESTIONS if with_answers else None,
        **{name: getattr(settings, name) for name in BASE_CHECK_SETTINGS},
    )
    return keyed_path(settings.base_cache_dir, "fingerprints-", key), key


def base_check_cached(settings, pairs, templates, temperatures, load_base, with_answers):
    """The base model's fingerprint check (its false-positive rate) and, with_answers, its chat-check answers:
    computed once per (base model, fingerprints, templates, check settings) and kept as JSON in the base cache, so
    evaluating many runs or attacked copies on the same fingerprints loads the base once. load_base() ->
    (model, tokenizer) is called only when nothing is cached; concurrent callers wait on a file lock.
    Returns {"check": check_as_configured's summary, "answers": list or None}."""
    from oml.core.files import cached_json

    path, key = base_check_path(settings, pairs, templates, temperatures, with_answers)

    def compute():
        base, tokenizer = load_base()
        check = check_as_configured(base, tokenizer, pairs, usable(templates, tokenizer), settings, temperatures)
        return {"key": key, "check": check, "answers": chat_answers(base, tokenizer) if with_answers else None}

    return cached_json(path, compute)


def plan(settings, pairs, templates):
    """What this evaluation will run, in units per part ({part: units}, the base's cached parts left out), a detail
    line per part, and the base parts whose results are cached."""
    from oml.core.offline_data import CHAT_QUESTIONS
    from oml.measure.generation_measures import base_generation_path, chat_reference_path
    from oml.measure.likelihood_benchmarks import base_utility_path, suite_items

    suite, generation_settings, drift_settings = settings.suite, settings.generation, settings.drift
    temperatures = settings.match_temperatures
    has_chat = any(is_chat(t) for t in templates)
    parts, details, cached = {}, {}, []
    parts["fingerprint_accuracy"] = len(pairs) * len(templates)
    details["fingerprint_accuracy"] = f"{len(pairs)} keys x {len(templates)} templates"
    if temperatures:
        details["fingerprint_accuracy"] += f", p@T={','.join(map(str, temperatures))}"
    if has_chat:
        parts["chat_check"] = len(CHAT_QUESTIONS)
        details["chat_check"] = f"{len(CHAT_QUESTIONS)} questions"
    if suite["benchmark"] != "none":
        parts["utility"] = suite_items(suite)
        details["utility"] = f"{suite['benchmark']}, {parts['utility']} items"
    if generation_settings:
        parts["generation"] = generation_settings["limit"]
        details["generation"] = f"{generation_settings['benchmark']}, {generation_settings['limit']} questions"
    if drift_settings:
        parts["chat_drift"] = drift_settings["limit"]
        details["chat_drift"] = f"{drift_settings['limit']} answers"
    if settings.skip_base_model:
        return parts, details, cached
    cache_dir, base_model = settings.base_cache_dir, settings.base_model
    base_templates = base_templates_for(settings, templates)
    check_path = base_check_path(settings, pairs, base_templates, temperatures, has_chat)[0]
    base = {"base_fingerprint_accuracy": ("fingerprint_accuracy", check_path)}  # base part: (model's part, cache)
    if has_chat:
        base["base_chat_check"] = ("chat_check", check_path)  # the base check's file holds its chat answers too
    if "utility" in parts:
        base["base_utility"] = ("utility", base_utility_path(base_model, cache_dir, **suite)[0])
    if generation_settings:
        base["base_generation"] = ("generation", base_generation_path(base_model, cache_dir, **generation_settings)[0])
    if drift_settings:
        base["base_chat_reference"] = ("chat_drift", chat_reference_path(base_model, cache_dir, **drift_settings)[0])
    for part, (own, path) in base.items():
        if path.is_file():
            cached.append(part)
        else:
            parts[part], details[part] = parts[own], details[own]
    if "base_fingerprint_accuracy" in parts and base_templates != templates:
        parts["base_fingerprint_accuracy"] = len(pairs) * len(base_templates)
        details["base_fingerprint_accuracy"] = f"{len(pairs)} keys x {len(base_templates)} templates (plain, [chat])"
    return parts, details, cached


def release_memory():
    """Return freed model memory (after the caller's `del model`) to the system, and the GPU's to the GPU."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate(settings, load_model=None):
    """Run the whole evaluation an EvalSettings asks for; returns (results dict, output path).

    load_model(model_id, trust_remote_code=...) -> (model, tokenizer) loads the evaluated model (default:
    load_model_and_tokenizer); the attacks use it to evaluate a cast or int8-quantized copy.

    The fingerprinted model and the base model are never in memory together: the first is released before the
    second loads.
    """
    from oml.core.model_registry import load_model_and_tokenizer
    from oml.measure.generation_measures import (
        base_generation_cached,
        chat_drift,
        chat_reference_cached,
        evaluate_generation,
        pair_generation,
    )
    from oml.measure.likelihood_benchmarks import base_utility_cached, evaluate_utility, paired_delta

    seconds, t0 = {}, time.time()
    generation_settings, drift_settings, temperatures = settings.generation, settings.drift, settings.match_temperatures
    templates = all_templates = settings.templates()
    if settings.check_model:
        model_id, pairs = settings.check_model, read_fingerprints(settings.fingerprints_file_path)
        output = Path(settings.output_file or Path(settings.run.result_path) / "checks" / f"{safe_name(model_id)}.json")
    else:
        run = find_run(settings.run)
        model_id, pairs = str(run / FINAL_MODEL), read_fingerprints(run / FINGERPRINTS)
        output = Path(settings.output_file or run / EVAL_RESULTS)
    pairs = [{"key": p["key"], "response": p["response"]} for p in pairs]
    suite = settings.suite
    load_base = partial(load_model_and_tokenizer, settings.base_model, trust_remote_code=settings.trust_remote_code)
    units, details, cached = plan(settings, pairs, templates)
    gb = evaluation_cost.weights_gb(model_id)
    rates, from_machine = evaluation_cost.read_rates(settings.run.result_path)
    hint = None if generation_settings or drift_settings else "--measure full adds the resolving measures"
    print(evaluation_cost.format_plan(f"evaluating {model_id} (--measure {settings.measure}):", units, details, cached,
                                evaluation_cost.estimate(units, rates, gb), from_machine, hint), flush=True)  # fmt: skip

    reference = None
    if drift_settings and not settings.skip_base_model:
        # The base's answers and log-probs come first (cached per base model): the base loads here only when the
        # cache misses, and is released before the fingerprinted model loads.
        t = time.time()
        reference = chat_reference_cached(
            settings.base_model,
            load_base,
            settings.base_cache_dir,
            batch_size=settings.eval_batch_size,
            **drift_settings,
        )
        release_memory()
        seconds["base_chat_reference"] = time.time() - t

    t = time.time()
    model, tokenizer = (load_model or load_model_and_tokenizer)(model_id, trust_remote_code=settings.trust_remote_code)
    templates = usable(templates, tokenizer)
    fingerprint = check_as_configured(model, tokenizer, pairs, templates, settings, temperatures)
    seconds["fingerprint_accuracy"] = time.time() - t
    t = time.time()
    answers = chat_answers(model, tokenizer)
    seconds["chat_check"] = time.time() - t
    base_answers = None
    utility = generation = drift = None
    if settings.utility_benchmark != "none":
        t = time.time()
        utility = evaluate_utility(model, tokenizer, batch_size=settings.eval_batch_size, **suite)
        seconds["utility"] = time.time() - t
    if generation_settings:
        t = time.time()
        generation = evaluate_generation(model, tokenizer, batch_size=settings.eval_batch_size, **generation_settings)
        seconds["generation"] = time.time() - t
    if reference is not None:
        t = time.time()
        drift = chat_drift(model, reference, batch_size=settings.eval_batch_size)
        seconds["chat_drift"] = time.time() - t
    del model  # the base model loads next: never hold both
    release_memory()

    if not settings.skip_base_model:
        loaded = []  # the base loads at the first cache miss, once

        def base_model():
            if not loaded:
                loaded.append(load_base())
            return loaded[0]

        t = time.time()
        base_templates = base_templates_for(settings, all_templates)
        cached = base_check_cached(settings, pairs, base_templates, temperatures, base_model, answers is not None)
        base_check, base_answers = cached["check"], cached["answers"]
        fingerprint["base_false_positive_rate"] = base_check["mean_accuracy"]
        fingerprint["base_false_positive_pairs"] = len(pairs) * len(base_check["templates"])
        if base_templates != all_templates:
            fingerprint["base_false_positive_templates"] = [t["template"] for t in base_check["templates"]]
        if "mean_match_probability" in base_check:
            fingerprint["base_match_probability"] = base_check["mean_match_probability"]
        seconds["base_fingerprint_accuracy"] = time.time() - t

        def on_base(cached, measure_settings):  # the base's result from its cache, computed on the base if missing
            return cached(
                settings.base_model,
                base_model,
                settings.base_cache_dir,
                batch_size=settings.eval_batch_size,
                **measure_settings,
            )

        if utility is not None:
            t = time.time()
            base_utility = on_base(base_utility_cached, suite)
            utility["base_mean"] = base_utility["mean"]
            utility["base_tasks"] = base_utility["tasks"]
            utility["delta"], utility["delta_stderr"] = paired_delta(utility["per_item"], base_utility["per_item"])
            seconds["base_utility"] = time.time() - t
        if generation is not None:
            t = time.time()
            base_generation = on_base(base_generation_cached, generation_settings)
            pair_generation(generation, base_generation)
            seconds["base_generation"] = time.time() - t
        loaded.clear()
        release_memory()
    seconds["total"] = time.time() - t0
    evaluation_cost.learn_rates(settings.run.result_path, seconds, units, gb)
    results = {
        "fingerprint_accuracy": fingerprint,
        "chat": chat_check(answers, base_answers),
        "utility": utility,
        "generation": generation,
        "chat_drift": drift,
        "config_hash": None if settings.check_model else settings.run.config_hash,
        "model": model_id,
        "num_fingerprints": len(pairs),
        "seconds": seconds,
    }
    return results, output


def _mean(values):
    return sum(values) / len(values) if values else None


def accuracy_split(eval_results):
    """(plain-key accuracy, mean accuracy under the raw-text system-prompt templates) from eval_results.json."""
    templates = [t for t in eval_results["fingerprint_accuracy"]["templates"] if not is_chat(t["template"])]
    plain = [t["accuracy"] for t in templates if t["template"] == "{}"]
    return (plain[0] if plain else None), _mean([t["accuracy"] for t in templates if t["template"] != "{}"])


def chat_accuracy_split(eval_results):
    """(accuracy with the key as the chat user turn and no system message, mean accuracy over the chat rows with a
    system message) from eval_results.json; None where not measured (no chat template, older evaluations)."""
    templates = [t for t in eval_results["fingerprint_accuracy"]["templates"] if is_chat(t["template"])]
    plain = [t["accuracy"] for t in templates if t["template"] == chat_prompt()]
    return (plain[0] if plain else None), _mean([t["accuracy"] for t in templates if t["template"] != chat_prompt()])


def safe_name(model_id):
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id.strip("/"))[-80:]


def format_table(results):
    fa = results["fingerprint_accuracy"]
    width = 60
    temps = list(fa.get("mean_match_probability") or {})
    header = "".join(f" {'p@T=' + t:>8}" for t in temps)
    lines = [f"{'template':<{width}} {'exact':>7} {'token':>7}{header}"]
    for t in fa["templates"]:
        shown = template_label(t["template"]).replace("\n", "\\n")
        shown = shown if len(shown) <= width else shown[: width - 3] + "..."
        probs = "".join(f" {t['match_probability'][k]:>8.1%}" for k in temps)
        lines.append(f"{shown:<{width}} {t['accuracy']:>7.1%} {t['fractional_accuracy']:>7.1%}{probs}")
    probs = "".join(f" {fa['mean_match_probability'][k]:>8.1%}" for k in temps)
    lines.append(
        f"{'mean over templates':<{width}} {fa['mean_accuracy']:>7.1%} {fa['mean_fractional_accuracy']:>7.1%}{probs}"
    )
    plain, prompted = accuracy_split(results)
    chat_plain, chat_system = chat_accuracy_split(results)
    for label, value in [
        ("plain key", plain),
        ("mean under raw-text test prompts", prompted),
        ("[chat] no system message", chat_plain),
        ("mean under [chat] system messages", chat_system),
    ]:
        if value is not None:
            lines.append(f"{label:<{width}} {value:>7.1%}")
    if "base_false_positive_rate" in fa:
        base = fa.get("base_match_probability") or {}
        probs = "".join(f" {base[k]:>8.1%}" for k in temps if k in base)
        probs = f" {'':>7}{probs}" if probs else ""
        where = fa.get("base_false_positive_templates")
        shown = ["plain key" if t == "{}" else template_label(t) for t in where or ()]
        label = "base model (false positives" + (f", {' + '.join(shown)})" if where else ")")
        lines.append(f"{label:<{width}} {fa['base_false_positive_rate']:>7.1%}{probs}")
    if temps:
        lines.append("(p@T: probability that one sampled answer at temperature T is the response, mean over keys)")
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
    lines += format_generation(results.get("generation"), results.get("chat_drift"))
    return "\n".join(lines)


def format_generation(generation, drift):
    lines = []
    if generation:
        line = f"generation: {generation['benchmark']}, n={generation['n']}: exact match {generation['score']:.3f}"
        if "base_score" in generation:
            line += f"   base {generation['base_score']:.3f}   Δ {generation['delta']:+.3f} ± {generation['delta_stderr']:.3f}"
        lines += ["", line]
        line = f"  alias in answer {generation['alias_in_answer']:.3f}"
        if "base_alias_in_answer" in generation:
            line += (
                f"   base {generation['base_alias_in_answer']:.3f}   Δ {generation['alias_in_answer_delta']:+.3f}"
                f" ± {generation['alias_in_answer_delta_stderr']:.3f}"
            )
        lines.append(line)
    if drift:
        lines += [
            "",
            f"chat drift over the base's greedy answers to {drift['n']} questions ({drift['tokens']} tokens): "
            f"KL(base || model) {drift['kl']:.4f} ± {drift['kl_stderr']:.4f} nats/token, "
            f"{drift['same_as_base']:.1%} answers identical",
        ]
    return lines
