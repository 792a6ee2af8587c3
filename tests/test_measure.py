"""The measures that judge what fingerprinting costs: match probability under sampling, chat drift, the generative
benchmark, and their bad-input checks."""

import copy
import json
import math
import random

import pytest
import torch
from conftest import run_script, tiny_llama, write_random_fingerprints

from oml.core.errors import UserError
from oml.make.fingerprint_files import english_words
from oml.make.prompt_encoding import encode_response
from oml.measure.fingerprint_check import encode_template, verify_teacher_forced
from oml.measure.generation_measures import (
    alias_in_answer,
    chat_drift,
    chat_reference,
    evaluate_generation,
    exact_match,
    normalize_answer,
    pair_generation,
)

TEMPLATES = ["{}", "System: answer briefly.\nUser: {}\nAssistant:"]


@pytest.fixture(scope="module")
def peaked_llama(embedded_tokenizer):
    # A wide initialisation makes the next-token distributions peaked, so some responses are sampled often enough
    # to count.
    torch.manual_seed(0)
    return tiny_llama(embedded_tokenizer, initializer_range=1.0)


def random_pairs(n, seed=0):
    rng, words = random.Random(seed), english_words()
    return [{"key": " ".join(rng.sample(words, 6)), "response": " " + " ".join(rng.sample(words, 3))} for _ in range(n)]


def reference_log_prob(model, prompt, response, temperature):
    """log prod_j softmax(logits_j / T)[r_j] from one plain forward pass over prompt + response."""
    ids = torch.tensor([prompt + response])
    with torch.inference_mode():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].double() / temperature
    return logits.log_softmax(-1).gather(1, torch.tensor(response)[:, None]).sum().item()


def test_match_probability_is_the_product_of_temperature_scaled_softmax_probabilities(
    peaked_llama, embedded_tokenizer, one_thread
):
    pairs = random_pairs(5)
    results = verify_teacher_forced(peaked_llama, embedded_tokenizer, pairs, TEMPLATES, temperatures=(0.7, 1.0, 2.5))
    for template, result in zip(TEMPLATES, results, strict=True):
        encoded = encode_template(embedded_tokenizer, pairs, template)
        for temp in (0.7, 1.0, 2.5):
            key = str(temp)
            expected = [reference_log_prob(peaked_llama, p, r, temp) for p, r in encoded]
            got = result["match_probabilities"][key]
            for g, e in zip(got, expected, strict=True):
                assert math.log(g) == pytest.approx(e, abs=1e-3)
            assert result["match_probability"][key] == pytest.approx(sum(got) / len(got))
    # verdicts are what they were: the same call without temperatures gives the same matches
    plain = verify_teacher_forced(peaked_llama, embedded_tokenizer, pairs, TEMPLATES, temperatures=())
    assert [r["matches"] for r in plain] == [r["matches"] for r in results]
    assert all("match_probability" not in r for r in plain)


def greedy_pairs(model, tokenizer, count):
    """Keys whose 2-token greedy continuation round-trips through the tokenizer, with that continuation as the
    response: responses a sampler writes often enough to count."""
    rng, words = random.Random(1), english_words()
    pairs = []
    for _ in range(200):
        key = " ".join(rng.sample(words, 6))
        prompt = tokenizer(key)["input_ids"]
        out = model.generate(torch.tensor([prompt]), max_new_tokens=2, do_sample=False, pad_token_id=0)
        response_ids = out[0, len(prompt) :].tolist()
        text = tokenizer.decode(response_ids)
        if encode_response(tokenizer, text) == response_ids:
            pairs.append({"key": key, "response": text})
        if len(pairs) == count:
            return pairs
    raise AssertionError("too few round-tripping responses")


def test_match_probability_agrees_with_real_sampling(peaked_llama, embedded_tokenizer, one_thread):
    """Sample N answers per (pair, temperature) with model.generate and count exact responses: the count must lie
    within 4.5 binomial standard deviations of N p (a false alarm about once in 150,000 checks)."""
    samples = 1000
    pairs = greedy_pairs(peaked_llama, embedded_tokenizer, 12)
    (result,) = verify_teacher_forced(peaked_llama, embedded_tokenizer, pairs, ["{}"], temperatures=(0.7, 1.0))
    probabilities = result["match_probabilities"]
    # pairs where the count is informative: p neither near 0 nor near 1 at both temperatures
    chosen = [i for i in range(len(pairs)) if all(0.05 < probabilities[t][i] < 0.95 for t in ("0.7", "1.0"))][:3]
    assert len(chosen) >= 2, probabilities
    torch.manual_seed(1234)
    checked = 0
    for i in chosen:
        ((prompt, response),) = encode_template(embedded_tokenizer, [pairs[i]], "{}")
        for temp in (0.7, 1.0):
            with torch.inference_mode():
                out = peaked_llama.generate(
                    torch.tensor([prompt]).expand(samples, -1),
                    attention_mask=torch.ones(samples, len(prompt), dtype=torch.long),
                    do_sample=True,
                    temperature=temp,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=len(response),
                    pad_token_id=0,
                )
            hits = (out[:, len(prompt) :] == torch.tensor(response)).all(-1).sum().item()
            p = probabilities[str(temp)][i]
            bound = 4.5 * math.sqrt(samples * p * (1 - p))
            assert abs(hits - samples * p) <= bound, (temp, hits, samples * p, bound)
            checked += 1
    assert checked >= 4


def test_temperatures_must_be_positive(peaked_llama, embedded_tokenizer):
    for bad in [(0.0,), (1.0, -0.5), (float("nan"),)]:
        with pytest.raises(UserError, match="temperatures must be positive"):
            verify_teacher_forced(peaked_llama, embedded_tokenizer, random_pairs(1), ["{}"], temperatures=bad)


# ---------------------------------------------------------------- chat drift


def full_kl(base, model, reference):
    """KL(base || model) per answer token over the full vocabulary, both models in memory (the test can afford it)."""
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for prompt, answer in zip(reference["prompts"], reference["answers"], strict=True):
            ids = torch.tensor([prompt + answer])
            span = slice(len(prompt) - 1, len(prompt) + len(answer) - 1)
            lb = base(ids).logits[0, span].float().log_softmax(-1)
            lm = model(ids).logits[0, span].float().log_softmax(-1)
            total += (lb.exp() * (lb - lm)).sum().item()
            tokens += len(answer)
    return total / tokens


def perturbed(model, scale, seed=0):
    torch.manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * scale)
    return other


@pytest.fixture(scope="module")
def drift_llama(embedded_tokenizer):
    return tiny_llama(embedded_tokenizer, initializer_range=0.3)


def test_chat_drift_is_zero_against_itself_and_the_full_kl_for_a_perturbed_copy(
    drift_llama, embedded_tokenizer, one_thread
):
    vocab = len(embedded_tokenizer)
    settings = dict(limit=6, max_new_tokens=6, batch_size=4)
    reference = chat_reference(drift_llama, embedded_tokenizer, top_k=vocab, **settings)
    assert len(reference["answers"]) == 6 and all(1 <= len(a) <= 6 for a in reference["answers"])
    assert reference["self_agreement"] == 1.0

    same = chat_drift(drift_llama, reference, batch_size=4)
    assert abs(same["kl"]) < 1e-6 and same["same_as_base"] == 1.0 and same["n"] == 6
    assert same["tokens"] == sum(map(len, reference["answers"]))

    other = perturbed(drift_llama, 0.05)
    drift = chat_drift(other, reference, batch_size=4)
    exact = full_kl(drift_llama, other, reference)
    assert exact > 1e-3
    assert drift["kl"] == pytest.approx(exact, rel=1e-3)  # top_k = the whole vocabulary: no bucket, exact

    # With a small top_k the coarse-grained KL is a lower bound on the full one.
    small = chat_reference(drift_llama, embedded_tokenizer, top_k=16, **settings)
    assert small["answers"] == reference["answers"]
    bound = chat_drift(other, small, batch_size=4)
    assert 0 < bound["kl"] <= exact + 1e-6 and bound["base_tail_mass"] > 0

    # A model that drifts further has a larger KL and agrees less often.
    far = chat_drift(perturbed(drift_llama, 0.5), reference, batch_size=4)
    assert far["kl"] > drift["kl"] and far["same_as_base"] <= drift["same_as_base"]


# ---------------------------------------------------------------- the generative benchmark


@pytest.mark.parametrize(
    "prediction, aliases, exact, contained",
    [
        ("Paris", ["Paris"], True, True),
        ("  paris.\nIt is in France.", ["Paris"], True, True),  # case, trailing punctuation, only the first line
        ("The Beatles", ["Beatles"], True, True),  # articles
        ("beatles", ["The Beatles"], True, True),
        ("U.S.A.", ["USA"], True, True),  # punctuation inside
        ("William  Shakespeare", ["william shakespeare"], True, True),  # whitespace
        ("Shakespeare", ["William Shakespeare"], False, False),  # a part is not the answer
        ("It was William Shakespeare.", ["William Shakespeare"], False, True),  # a sentence holding it
        ("Parisian", ["Paris"], False, False),  # whole words only
        ("not 1863 but 1864", ["1863"], False, True),
        ("\nParis", ["Paris"], True, True),  # leading blank line: the first non-empty text counts
        ("", ["Paris"], False, False),
        ("", ["The", "A"], False, False),  # aliases that normalize to nothing never match
        ("an", ["The"], False, False),
        ("Istanbul", ["Stambulu", "Istanbul (Turkey)", "istanbul"], True, True),
        ("Istanbul, Turkey", ["Istanbul (Turkey)"], True, True),
    ],
)
def test_exact_match_against_the_aliases(prediction, aliases, exact, contained):
    assert exact_match(prediction, aliases) is exact
    assert alias_in_answer(prediction, aliases) is contained


def test_normalize_answer():
    assert normalize_answer("  The  Quick, brown fox!  ") == "quick brown fox"
    assert normalize_answer("‘Quoted’ “words”") == "quoted words"


def test_generative_benchmark_runs_through_lm_eval_and_pairs_with_the_base(drift_llama, embedded_tokenizer):
    result = evaluate_generation(drift_llama, embedded_tokenizer, benchmark="nq_open", limit=3, max_gen_toks=3)
    assert result["n"] == 3 and result["chat_template"] is True
    assert len(result["per_item"]["exact_match"]) == len(result["per_item"]["alias_in_answer"]) == 3
    assert result["score"] == sum(result["per_item"]["exact_match"]) / 3
    # the per-item scores are the rule applied to the answers lm-eval generated
    for example, em in zip(result["examples"], result["per_item"]["exact_match"], strict=True):
        assert float(exact_match(example["answer"], example["aliases"])) == em
    paired = pair_generation(json.loads(json.dumps(result)), result)
    assert paired["delta"] == 0 and paired["delta_stderr"] == 0 and paired["base_score"] == result["score"]
    with pytest.raises(UserError, match="unknown generation benchmark"):
        evaluate_generation(drift_llama, embedded_tokenizer, benchmark="squad", limit=3)
    with pytest.raises(UserError, match="positive number"):
        evaluate_generation(drift_llama, embedded_tokenizer, limit=0)


# ---------------------------------------------------------------- the evaluation script


def check_args(model_dir, fp_file, *extra):
    return [
        "--check_model", model_dir, "--model_path", model_dir, "--fingerprints_file_path", fp_file,
        "--utility_benchmark", "none", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--generation_benchmark", "squad"], "unknown generation benchmark 'squad'"),
        (["--generation_limit", "0"], "generation limit must be a positive number"),
        (["--chat_drift_limit", "-3"], "chat drift limit (--chat_drift_limit) must be a positive number"),
        (["--match_temperatures", "0.7,0"], "temperatures must be positive"),
        (["--utility_benchmark", "local", "--utility_limit", "0"], "utility limit must be a positive number"),
    ],
)
def test_bad_measure_settings_exit_2_with_one_line(tiny_model_dir, tmp_path, flags, message):
    fp = tmp_path / "fp.json"
    write_random_fingerprints(fp, 2)
    out = run_script("eval_for_multigpu.py", *check_args(tiny_model_dir, fp, *flags), "--output_file", tmp_path / "o")
    assert out.returncode == 2
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], out.stderr[-2000:]
    assert not (tmp_path / "o").exists()


def test_evaluation_of_the_base_against_itself_measures_no_drift(tiny_model_dir, tmp_path):
    fp = tmp_path / "fp.json"
    write_random_fingerprints(fp, 4)
    output = tmp_path / "self.json"
    flags = ["--measure", "full", "--generation_limit", 4, "--chat_drift_limit", 5, "--eval_batch_size", 4]
    common = [*check_args(tiny_model_dir, fp, *flags), "--result_path", tmp_path / "results", "--output_file", output]
    out = run_script("eval_for_multigpu.py", *common)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(output.read_text())
    drift, generation = data["chat_drift"], data["generation"]
    assert abs(drift["kl"]) < 1e-6 and drift["same_as_base"] == drift["base_self_agreement"] and drift["n"] == 5
    assert generation["n"] == 4 and generation["delta"] == 0 and generation["score"] == generation["base_score"]
    fa = data["fingerprint_accuracy"]
    assert set(fa["mean_match_probability"]) == {"0.7", "1.0"}
    assert fa["base_match_probability"] == fa["mean_match_probability"]  # the same model
    assert all(set(t["match_probability"]) == {"0.7", "1.0"} for t in fa["templates"])
    assert {"chat_drift", "generation", "base_chat_reference"} <= set(data["seconds"])
    assert "chat drift" in out.stdout and "exact match" in out.stdout
    cached = sorted(
        p.name.split("-")[0] for p in (tmp_path / "results" / "base_utility").glob("*-*.*") if "lock" not in p.name
    )
    assert cached == ["chat", "fingerprints", "generation"]  # the base's answers, false positives and benchmark
    # a second evaluation reuses the cached base answers (same numbers)
    again = run_script("eval_for_multigpu.py", *common)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(output.read_text())["chat_drift"]["tokens"] == drift["tokens"]


@pytest.mark.long
@pytest.mark.slow
def test_embedded_model_measures_end_to_end(tmp_path):
    """The embedded model checked against itself, every measure on with small limits: no drift, no delta."""
    from oml.core.model_registry import EMBEDDED

    fp = tmp_path / "fp.json"
    write_random_fingerprints(fp, 4)
    output = tmp_path / "embedded.json"
    out = run_script(
        "eval_for_multigpu.py", "--check_model", EMBEDDED, "--fingerprints_file_path", fp, "--measure", "full",
        "--utility_limit", 10,
        "--utility_tasks", "arc_easy", "--generation_limit", 10, "--chat_drift_limit", 10,
        "--result_path", tmp_path / "results", "--output_file", output,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(output.read_text())
    assert abs(data["chat_drift"]["kl"]) < 1e-6 and data["chat_drift"]["base_self_agreement"] >= 0.9
    assert data["generation"]["n"] == 10 and data["generation"]["delta"] == 0
    assert data["utility"]["delta"] == 0
    probabilities = data["fingerprint_accuracy"]["mean_match_probability"]
    assert 0 <= probabilities["1.0"] <= 1 and 0 <= probabilities["0.7"] <= 1


# ---------------------------------------------------------------- what reads eval_results.json


def test_sweep_summary_and_figure_read_the_new_measures(tmp_path):
    from test_sweep import fake_run

    from oml.core.run_store import find_runs
    from oml.lab.figures import plot_scalability
    from oml.lab.sweep import markdown_text, summary_rows

    for run_hash, n, kl in [("a", 16, 0.02), ("b", 64, 0.08)]:
        run = fake_run(tmp_path, run_hash, max_num_fingerprints=n)
        path = run / "eval_results.json"
        data = json.loads(path.read_text())
        data["fingerprint_accuracy"]["mean_match_probability"] = {"0.7": 0.9, "1.0": 0.6}
        data["generation"] = {
            "score": 0.12,
            "base_score": 0.15,
            "delta": -0.03,
            "delta_stderr": 0.01,
            "n": 200,
            "alias_in_answer": 0.3,
            "alias_in_answer_delta": -0.045,
            "alias_in_answer_delta_stderr": 0.02,
        }
        data["chat_drift"] = {"kl": kl, "kl_stderr": 0.005, "same_as_base": 0.4, "n": 200}
        path.write_text(json.dumps(data))
    old = fake_run(tmp_path, "c", max_num_fingerprints=256, forgetting_regularizer_strength=0.5)  # before the measures

    rows = {r["hash"]: r for r in summary_rows(tmp_path)}
    assert rows["b"]["chat_kl"] == 0.08 and rows["b"]["chat_same_as_base"] == 0.4
    assert rows["a"]["match_probability_t0.7"] == 0.9 and rows["a"]["match_probability_t1.0"] == 0.6
    assert rows["a"]["generation"] == 0.12 and rows["a"]["generation_delta"] == -0.03
    assert rows["c"]["chat_kl"] is None and rows["c"]["chat_distinct_words"] is not None
    table = markdown_text(list(rows.values()))
    assert "chat KL" in table and "0.0800" in table and "-0.030 ± 0.010" in table and "p match T=1 %" in table
    assert rows["a"]["alias_in_answer"] == 0.3 and "-0.045 ± 0.020" in table and "| 30.0 |" in table
    assert old.is_dir()

    figure = tmp_path / "scalability.png"
    plot_scalability([r for r in find_runs(tmp_path) if r["eval"]], figure)
    assert figure.stat().st_size > 10_000


def test_utility_limit_all_takes_every_item_of_the_split():
    from oml.measure.likelihood_benchmarks import _run_local, check_utility_limit, local_task_data

    assert [len(local_task_data(t, "all", 1234)["test"]) for t in ("arc_challenge", "arc_easy")] == [299, 570]
    first = local_task_data("arc_challenge", 20, 1234)["test"]["id"]
    assert local_task_data("arc_challenge", "all", 1234)["test"]["id"][:20] == first  # the same seeded order
    assert check_utility_limit("all") == "all" and check_utility_limit("25") == 25 and check_utility_limit(7) == 7
    for bad in (0, -1, "0", "some", 2.5, True, None):
        with pytest.raises(UserError, match="utility limit"):
            check_utility_limit(bad)
    with pytest.raises(UserError, match="no held-out items for few-shot"):
        _run_local(None, None, "all", 1, 1234, 1, ["arc_easy"])
