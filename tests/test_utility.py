"""The utility suites: the local one through lm-eval on a tiny random Llama, paired deltas, the base cache."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from oml.core.errors import UserError
from oml.core.model_registry import EMBEDDED, load_tokenizer
from oml.measure import likelihood_benchmarks as utility
from oml.measure.likelihood_benchmarks import (
    LOCAL_TASKS,
    base_utility_cached,
    evaluate_utility,
    local_task_config,
    local_task_data,
    paired_delta,
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(EMBEDDED)


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    return tiny_llama(tokenizer)


SMALL = dict(limit=5, tasks=["arc_easy", "winogrande", "mmlu"])


@pytest.fixture(scope="module")
def small_result(tiny_model, tokenizer):
    return evaluate_utility(tiny_model, tokenizer, **SMALL)


def test_local_suite_structure_and_scores(small_result):
    r = small_result
    assert "not tinyBenchmarks" in r["benchmark"]
    assert list(r["tasks"]) == SMALL["tasks"] == list(r["per_item"])
    for task, row in r["tasks"].items():
        items = r["per_item"][task]
        assert row["metric"] == LOCAL_TASKS[task]["metric"]
        assert row["n"] == len(items) == 5
        assert set(items) <= {0.0, 1.0}
        assert 0.0 <= row["score"] <= 1.0
        assert row["score"] == pytest.approx(sum(items) / len(items))
        mean = sum(items) / 5
        sample_sd = math.sqrt(sum((x - mean) ** 2 for x in items) / 4)
        assert row["stderr"] == pytest.approx(sample_sd / math.sqrt(5))
    assert r["mean"] == pytest.approx(sum(t["score"] for t in r["tasks"].values()) / 3)
    assert r["settings"] == {"benchmark": "local", "limit": 5, "num_fewshot": 0, "seed": 1234, "tasks": SMALL["tasks"]}
    json.dumps(r)  # what the caller stores must be plain JSON


def test_same_items_same_results_on_a_second_call(small_result, tiny_model, tokenizer):
    again = evaluate_utility(tiny_model, tokenizer, **SMALL)
    assert again["per_item"] == small_result["per_item"]
    assert again["tasks"] == small_result["tasks"]


def test_seeded_subset_is_reproducible_and_a_prefix():
    first = local_task_data("arc_challenge", limit=8, seed=7)["test"]
    second = local_task_data("arc_challenge", limit=8, seed=7)["test"]
    assert first["id"] == second["id"]
    assert local_task_data("arc_challenge", limit=3, seed=7)["test"]["id"] == first["id"][:3]
    assert local_task_data("arc_challenge", limit=8, seed=8)["test"]["id"] != first["id"]
    assert len(set(first["id"])) == 8


def test_few_shot_pool_never_holds_an_evaluated_item():
    data = local_task_data("arc_easy", limit=50, seed=1234)
    assert not set(data["test"]["id"]) & set(data["train"]["id"])


def test_mmlu_sample_spans_subjects():
    subjects = local_task_data("mmlu", limit=100, seed=1234)["test"]["subject"]
    assert len(set(subjects)) > 20


@pytest.mark.parametrize("task", list(LOCAL_TASKS))
def test_every_local_task_builds_a_valid_lm_eval_task(task):
    from lm_eval.tasks import TaskManager

    config = local_task_config(task, limit=4, num_fewshot=2, seed=1234)
    built = TaskManager(include_defaults=False).load([config])["tasks"][f"local_{task}"]
    docs = list(built.test_docs())
    assert len(docs) == 4
    for doc in docs:
        choices = built.doc_to_choice(doc)
        assert len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)
        gold = built.doc_to_text(doc) if task == "winogrande" else built.doc_to_target(doc)
        assert isinstance(gold, int) and 0 <= gold < len(choices)
    prompt = built.fewshot_context(docs[0], num_fewshot=2)
    if task in ("arc_challenge", "arc_easy", "piqa"):
        assert prompt.count("Answer:") == 3 and prompt.startswith("Question: ")
    if task == "mmlu":
        assert prompt.startswith("The following are multiple choice questions (with answers) about ")
        assert prompt.count("\nAnswer:") == 3 and "_" not in prompt.splitlines()[0]


def test_paired_delta_known_answer():
    model = {"a": [1, 1, 0, 1], "b": [1, 0, 1]}
    base = {"a": [1, 0, 0, 0], "b": [1, 1, 1]}
    delta, stderr = paired_delta(model, base)
    # task a: d = [0, 1, 0, 1], mean 1/2, sample variance 1/3; task b: d = [0, -1, 0], mean -1/3, variance 1/3
    assert delta == pytest.approx((1 / 2 - 1 / 3) / 2)
    assert stderr == pytest.approx(math.sqrt((1 / 3) / 4 + (1 / 3) / 3) / 2)


def test_paired_delta_identical_results_is_zero():
    per_item = {"a": [1, 0, 1, 1], "b": [0, 0, 1]}
    assert paired_delta(per_item, per_item) == (0.0, 0.0)


def test_paired_delta_rejects_different_items():
    with pytest.raises(ValueError):
        paired_delta({"a": [1, 0]}, {"a": [1, 0, 1]})
    with pytest.raises(ValueError):
        paired_delta({"a": [1]}, {"b": [1]})


def test_tinybenchmarks_offline_is_one_clear_line(tiny_model, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("datasets.load_dataset", lambda *a, **k: pytest.fail("tried the network"))
    with pytest.raises(UserError) as e:
        evaluate_utility(tiny_model, tokenizer, benchmark="tinyBenchmarks")
    assert "\n" not in str(e.value)
    assert "HF_HUB_OFFLINE" in str(e.value) and "--utility_benchmark local" in str(e.value)


def go_online(monkeypatch, tiny_benchmarks_installed):
    """As on a machine with the hub: offline flags unset, the tinyBenchmarks package present or not."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    real_find_spec = utility.importlib.util.find_spec

    def find_spec(name):
        return (object() if tiny_benchmarks_installed else None) if name == "tinyBenchmarks" else real_find_spec(name)

    monkeypatch.setattr(utility.importlib.util, "find_spec", find_spec)


def test_tinybenchmarks_without_its_package_is_one_clear_line(tiny_model, tokenizer, monkeypatch):
    go_online(monkeypatch, tiny_benchmarks_installed=False)
    monkeypatch.setattr("datasets.load_dataset", lambda *a, **k: pytest.fail("tried the network"))
    with pytest.raises(UserError) as e:
        evaluate_utility(tiny_model, tokenizer, benchmark="tinyBenchmarks")
    assert "\n" not in str(e.value) and "tinyBenchmarks package" in str(e.value)


def test_tinybenchmarks_hub_failure_is_one_clear_line(tiny_model, tokenizer, monkeypatch):
    go_online(monkeypatch, tiny_benchmarks_installed=True)

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'tinyBenchmarks/tinyAI2_arc' on the Hub\n(details)")

    monkeypatch.setattr("datasets.load_dataset", unreachable)
    with pytest.raises(UserError) as e:
        evaluate_utility(tiny_model, tokenizer, benchmark="tinyBenchmarks")
    assert "\n" not in str(e.value) and "Couldn't reach" in str(e.value)


def tiny_task_yaml(task):
    """lm-eval's own config of a tinyBenchmarks task (its `include`s followed), with !function tags kept as text."""
    import yaml
    from lm_eval import tasks

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    folder = Path(tasks.__file__).parent / "tinyBenchmarks"
    for path in folder.glob("*.yaml"):
        config = yaml.load(path.read_text(), Loader=Loader)
        if config.get("task") == task:
            while "include" in config:
                config = {**yaml.load((folder / config.pop("include")).read_text(), Loader=Loader), **config}
            return config
    raise AssertionError(f"lm-eval has no task {task}")


def tiny_task_yaml_group():
    import yaml
    from lm_eval import tasks

    return yaml.safe_load((Path(tasks.__file__).parent / "tinyBenchmarks" / "tinyBenchmarks.yaml").read_text())["task"]


def test_tiny_metrics_and_datasets_match_lm_evals_task_configs():
    group = [t["task"] for t in tiny_task_yaml_group()]
    assert sorted(group) == sorted(utility.TINY_METRICS)
    datasets = set()
    for task, (metric, filter_name) in utility.TINY_METRICS.items():
        config = tiny_task_yaml(task)
        assert metric in [m["metric"] for m in config["metric_list"]], task
        filters = [f["name"] for f in config.get("filter_list", [])] or ["none"]
        assert filter_name in filters, task
        datasets.add((config["dataset_path"], config.get("dataset_name")))
    assert datasets == set(utility.TINY_DATASETS)


def test_tinybenchmarks_online_path_reports_the_six_estimates(tiny_model, tokenizer, monkeypatch):
    """The online path with the hub and the harness replaced: what it fetches, runs and reports."""
    go_online(monkeypatch, tiny_benchmarks_installed=True)
    fetched, ran = [], []
    monkeypatch.setattr("datasets.load_dataset", lambda path, name=None: fetched.append((path, name)))

    class FakeTaskManager:
        def load(self, names):
            return {"groups": {"tinyBenchmarks": ("group", tuple(names))}}

    monkeypatch.setattr("lm_eval.tasks.TaskManager", FakeTaskManager)
    estimates = dict(zip(utility.TINY_METRICS, [0.61, 0.12, 0.55, 0.70, 0.66, 0.40], strict=True))

    def harness(model, tok, tasks, task_manager, batch_size, seed):
        ran.append(tasks)
        results, samples = {}, {}
        for task, (metric, filter_name) in utility.TINY_METRICS.items():
            results[task] = {f"{metric},{filter_name}": estimates[task], f"{metric}_stderr,{filter_name}": "N/A"}
            rows = [{"doc_id": i, "filter": filter_name, metric: float(i % 2)} for i in (2, 0, 1)]
            if task == "tinyGSM8k":  # the other filter's samples must not be counted
                rows += [{"doc_id": i, "filter": "flexible-extract", metric: 1.0} for i in range(3)]
            samples[task] = rows
        return {"results": results, "samples": samples}

    monkeypatch.setattr(utility, "_run_harness", harness)
    result = evaluate_utility(tiny_model, tokenizer, benchmark="tinyBenchmarks")
    assert fetched == utility.TINY_DATASETS
    assert ran == [[("group", ("tinyBenchmarks",))]]
    assert result["benchmark"] == utility.TINY_NAME and result["settings"] == {"benchmark": "tinyBenchmarks"}
    assert {t: r["score"] for t, r in result["tasks"].items()} == estimates
    assert result["mean"] == pytest.approx(sum(estimates.values()) / 6)
    assert all(r["stderr"] is None and r["n"] == 3 for r in result["tasks"].values())
    assert result["per_item"]["tinyGSM8k"] == [0.0, 1.0, 0.0]  # doc order, strict-match only


def test_none_and_unknown_benchmarks(tiny_model, tokenizer, tmp_path):
    assert evaluate_utility(tiny_model, tokenizer, benchmark="none") is None
    assert base_utility_cached("m", lambda: pytest.fail("loaded"), tmp_path, benchmark="none") is None
    with pytest.raises(UserError):
        evaluate_utility(tiny_model, tokenizer, benchmark="tinybench")
    with pytest.raises(UserError):
        evaluate_utility(tiny_model, tokenizer, tasks=["arc_hard"])


def test_base_utility_is_computed_once_then_read_from_the_cache(tiny_model, tokenizer, tmp_path):
    loads = []

    def load():
        loads.append(1)
        return tiny_model, tokenizer

    settings = dict(limit=2, tasks=["arc_easy"])
    first = base_utility_cached("tiny-random", load, tmp_path, **settings)
    assert len(loads) == 1 and first["tasks"]["arc_easy"]["n"] == 2
    assert [p.suffix for p in tmp_path.glob("*.json")] == [".json"]

    second = base_utility_cached(
        "tiny-random", lambda: pytest.fail("a cache hit loaded the model"), tmp_path, **settings
    )
    assert second == first
    # batch size changes speed, not results: still a hit
    base_utility_cached("tiny-random", lambda: pytest.fail("loaded"), tmp_path, batch_size=4, **settings)

    base_utility_cached("tiny-random", load, tmp_path, limit=3, tasks=["arc_easy"])  # other settings: computed
    base_utility_cached("other-model", load, tmp_path, **settings)  # other model: computed
    assert len(loads) == 3 and len(list(tmp_path.glob("*.json"))) == 3


def test_base_utility_of_a_local_folder_is_computed_again_after_it_changes(tiny_model, tokenizer, tmp_path):
    folder, cache = tmp_path / "base", tmp_path / "cache"
    folder.mkdir()
    (folder / "model.safetensors").write_text("weights v1")
    loads = []

    def load():
        loads.append(1)
        return tiny_model, tokenizer

    settings = dict(limit=1, tasks=["arc_easy"])
    base_utility_cached(str(folder), load, cache, **settings)
    base_utility_cached(str(folder), load, cache, **settings)
    assert len(loads) == 1
    (folder / "model.safetensors").write_text("weights v2, rewritten in place")
    base_utility_cached(str(folder), load, cache, **settings)
    assert len(loads) == 2


def _continuation_logprob(model, tokenizer, context, continuation):
    # As lm-eval does for causal models: encode the whole text, the continuation is what follows the context.
    context_ids = tokenizer.encode(context)
    whole_ids = tokenizer.encode(context + continuation)
    ids = torch.tensor([whole_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    targets = whole_ids[len(context_ids) :]
    positions = range(len(context_ids) - 1, len(whole_ids) - 1)
    return sum(logprobs[p, t].item() for p, t in zip(positions, targets, strict=True))


@pytest.mark.slow
def test_embedded_model_arc_easy_matches_a_direct_computation():
    from oml.core.model_registry import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(EMBEDDED, device="cpu")
    result = evaluate_utility(model, tokenizer, limit=10, tasks=["arc_easy"])
    row, items = result["tasks"]["arc_easy"], result["per_item"]["arc_easy"]
    assert row["n"] == 10 and row["metric"] == "acc_norm"

    # The same 10 items, scored by hand: acc_norm picks the choice with the best log-likelihood per character.
    direct = []
    for doc in local_task_data("arc_easy", limit=10, seed=1234)["test"]:
        context = f"Question: {doc['question']}\nAnswer:"
        choices = doc["choices"]["text"]
        scores = [_continuation_logprob(model, tokenizer, context, " " + c) / len(c) for c in choices]
        gold = doc["choices"]["label"].index(doc["answerKey"])
        direct.append(float(max(range(len(choices)), key=scores.__getitem__) == gold))
    assert items == direct
    assert model.training is False


def test_utility_settings_default_in_one_place():
    from oml.measure.evaluation import EVAL_ARGS, MEASURES

    (limit_default,) = [kw["default"] for flags, kw in EVAL_ARGS if flags == ["--utility_limit"]]
    assert limit_default is None  # from --measure: full is the suite's own default, quick a smaller look
    assert MEASURES["full"]["utility_limit"] == utility.SUITE_DEFAULTS["limit"]
    assert MEASURES["quick"]["utility_limit"] < MEASURES["full"]["utility_limit"]
    with pytest.raises(TypeError):
        evaluate_utility(None, None, limt=5)  # a misspelt setting is refused, not ignored
    assert utility.suite_key("m") == utility.suite_key("m", limit=100, batch_size=8)
    assert utility.suite_key("m") != utility.suite_key("m", num_fewshot=5)
    with pytest.raises(TypeError):
        utility.suite_key("m", limt=5)
