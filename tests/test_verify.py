"""Teacher-forced verification must give exactly the verdicts of one greedy generate per (template, key)."""

import random

import pytest
import torch
from conftest import tiny_llama

import oml.measure.fingerprint_check as verify
from oml.core.errors import UserError
from oml.core.model_registry import EMBEDDED, load_model_and_tokenizer, load_tokenizer
from oml.make.fingerprint_files import english_words
from oml.make.prompt_encoding import encode_pair
from oml.measure.fingerprint_check import (
    generate_response,
    shared_prefix_length,
    summarize,
    verify_teacher_forced,
    verify_with_generate,
)

TEMPLATES = [
    "{}",
    "Before the key comes a sentence of plain text: {}",
    "{} <- that was the key, and this text follows it.",
    "System: you are a careful assistant.\nUser: {}\nAssistant:",
]


def tokenizer_variant(name):
    tok = load_tokenizer(EMBEDDED)
    if name == "left_padding":
        tok.padding_side = "left"
    if name == "adds_bos":
        tok.add_bos_token = True
        assert tok("hello")["input_ids"][0] == tok.bos_token_id
    return tok


@pytest.fixture(scope="module")
def random_llama():
    # sharper than the default initialisation, so the top two logits are rarely near-tied
    return tiny_llama(load_tokenizer(EMBEDDED), initializer_range=0.1)


@pytest.fixture
def tiny_model(random_llama, one_thread):
    return random_llama


def random_text(rng, lo, hi):
    return " ".join(rng.choice(english_words()) for _ in range(rng.randint(lo, hi)))


def greedy_text(model, tok, key, template, n_tokens, use_chat_template=False):
    prompt, _ = encode_pair(tok, key, "x", template, use_chat_template)
    with torch.inference_mode():
        return tok.decode(generate_response(model, prompt, n_tokens, pad_token_id=tok.pad_token_id))


def mixed_pairs(model, tok, template, n, seed, use_chat_template=False, max_response_tokens=3):
    """Half the responses are the model's own greedy continuation (positives), half random words."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        key = random_text(rng, 2, 9)
        if i % 2 == 0:
            response = greedy_text(model, tok, key, template, rng.randint(1, max_response_tokens), use_chat_template)
        else:
            response = " " + random_text(rng, 1, 2)
        pairs.append({"key": key, "response": response})
    return pairs


def spy_prefix_runs(monkeypatch):
    """A list that records the prefixes of every shared-prefix forward pass."""
    runs = []
    real = verify._prefix_states
    monkeypatch.setattr(
        verify, "_prefix_states", lambda model, prefixes: runs.append(prefixes) or real(model, prefixes)
    )
    return runs


def assert_same_verdicts(fast, slow):
    assert [r["template"] for r in fast] == [r["template"] for r in slow]
    for f, s in zip(fast, slow, strict=True):
        assert f["matches"] == s["matches"], f["template"]
        assert f["accuracy"] == s["accuracy"]


@pytest.mark.parametrize("tokenizer_name", ["default", "left_padding", "adds_bos"])
def test_teacher_forced_equals_generate(tiny_model, tokenizer_name, monkeypatch):
    tok = tokenizer_variant(tokenizer_name)
    prefix_runs = spy_prefix_runs(monkeypatch)
    verdicts = []
    for t, template in enumerate(TEMPLATES):
        pairs = mixed_pairs(tiny_model, tok, template, 12, seed=t)
        slow = verify_with_generate(tiny_model, tok, pairs, [template])
        for share_prefix in (False, True):
            fast = verify_teacher_forced(tiny_model, tok, pairs, [template], batch_size=5, share_prefix=share_prefix)
            assert_same_verdicts(fast, slow)
        verdicts += slow[0]["matches"]
    assert any(verdicts) and not all(verdicts)  # both kinds of verdict were exercised
    # Only the two templates with text before the key share a prefix long enough to be run once.
    assert len(prefix_runs) == 2
    if tokenizer_name == "adds_bos":
        assert all(prefix[0] == tok.bos_token_id for prefixes in prefix_runs for prefix in prefixes)


def test_bf16_screen_recomputes_near_ties_with_the_model(tiny_model, monkeypatch):
    tok = tokenizer_variant("default")
    pairs = mixed_pairs(tiny_model, tok, TEMPLATES[1], 12, seed=3)
    slow = verify_with_generate(tiny_model, tok, pairs, TEMPLATES)
    dtypes = []
    real = verify._batch_hits
    monkeypatch.setattr(verify, "_batch_hits", lambda model, *rest: dtypes.append(model.dtype) or real(model, *rest))

    screened = verify_teacher_forced(tiny_model, tok, pairs, TEMPLATES, batch_size=5, screen_dtype=torch.bfloat16)
    assert_same_verdicts(screened, slow)
    assert dtypes[0] == torch.bfloat16 and tiny_model.dtype == torch.float32  # a bf16 copy screened
    rechecked = sum(r["rechecked"] for r in screened)
    assert 0 < rechecked < len(pairs) * len(TEMPLATES) and torch.float32 in dtypes

    # Every pair within the margin: all recomputed by the fp32 model, so its verdicts and fractions exactly.
    monkeypatch.setattr(verify, "SCREEN_MARGIN", float("inf"))
    everything = verify_teacher_forced(tiny_model, tok, pairs, TEMPLATES, batch_size=5, screen_dtype=torch.bfloat16)
    plain = verify_teacher_forced(tiny_model, tok, pairs, TEMPLATES, batch_size=5)
    assert [r["rechecked"] for r in everything] == [len(pairs)] * len(TEMPLATES)
    assert [(r["matches"], r["fractional_accuracy"]) for r in everything] == [
        (r["matches"], r["fractional_accuracy"]) for r in plain
    ]


def test_chat_template_and_several_templates_at_once(tiny_model, monkeypatch):
    tok = tokenizer_variant("default")
    prefix_runs = spy_prefix_runs(monkeypatch)
    pairs = mixed_pairs(tiny_model, tok, TEMPLATES[1], 10, seed=7, use_chat_template=True)
    fast = verify_teacher_forced(tiny_model, tok, pairs, TEMPLATES, use_chat_template=True, batch_size=4)
    slow = verify_with_generate(tiny_model, tok, pairs, TEMPLATES, use_chat_template=True)
    assert_same_verdicts(fast, slow)
    assert any(fast[1]["matches"])
    # The chat template's system text starts every prompt: all four prefixes come from one forward pass.
    assert len(prefix_runs) == 1 and len(prefix_runs[0]) == len(TEMPLATES)


def test_one_token_responses_fractional_equals_exact(tiny_model):
    tok = tokenizer_variant("default")
    rng = random.Random(3)
    keys = [random_text(rng, 3, 8) for _ in range(10)]
    pairs = [{"key": k, "response": greedy_text(tiny_model, tok, k, "{}", 1)} for k in keys[:5]]
    pairs += [{"key": k, "response": " " + rng.choice(english_words())} for k in keys[5:]]
    pairs = [p for p in pairs if len(tok(p["response"], add_special_tokens=False)["input_ids"]) == 1]
    fast = verify_teacher_forced(tiny_model, tok, pairs, ["{}"])
    slow = verify_with_generate(tiny_model, tok, pairs, ["{}"])
    assert_same_verdicts(fast, slow)
    assert 0 < fast[0]["accuracy"] < 1
    assert fast[0]["fractional_accuracy"] == fast[0]["accuracy"] == slow[0]["fractional_accuracy"]


def test_teacher_forced_fractional_counts_positions(tiny_model):
    tok = tokenizer_variant("default")
    key = "purple elephants debate quietly"
    own = tok(greedy_text(tiny_model, tok, key, "{}", 2), add_special_tokens=False)["input_ids"]
    wrong = next(t for t in range(1000, 2000) if t not in own)
    pairs = [{"key": key, "response": tok.decode([own[0], wrong])}]
    if tok(pairs[0]["response"], add_special_tokens=False)["input_ids"] != [own[0], wrong]:
        pytest.skip("the two tokens merge when re-encoded")
    (result,) = verify_teacher_forced(tiny_model, tok, pairs, ["{}"])
    assert result["matches"] == [False] and result["fractional_accuracy"] == 0.5


def test_eos_inside_the_response_stops_generate(tiny_model):
    """generate stops at EOS, so a response that goes on after an EOS never matches."""
    tok = tokenizer_variant("default")
    rng = random.Random(5)
    for _ in range(50):  # find a 3-token greedy continuation that survives decode + encode
        key = random_text(rng, 2, 6)
        response = greedy_text(tiny_model, tok, key, "{}", 3)
        ids = tok(response, add_special_tokens=False)["input_ids"]
        if len(ids) == 3 and ids[0] not in ids[1:]:
            break
    else:
        pytest.fail("no usable greedy continuation found")
    pairs = [{"key": key, "response": response}]
    assert verify_teacher_forced(tiny_model, tok, pairs, ["{}"])[0]["matches"] == [True]
    saved = tiny_model.generation_config.eos_token_id
    try:
        tiny_model.generation_config.eos_token_id = ids[0]
        fast = verify_teacher_forced(tiny_model, tok, pairs, ["{}"])
        assert_same_verdicts(fast, verify_with_generate(tiny_model, tok, pairs, ["{}"]))
        assert fast[0]["matches"] == [False]
    finally:
        tiny_model.generation_config.eos_token_id = saved


def test_shared_prefix_length():
    assert shared_prefix_length([[1, 2, 3], [1, 2, 4, 5], [1, 2, 3, 9]]) == 2
    assert shared_prefix_length([[7, 8], [7, 8, 9]]) == 2
    assert shared_prefix_length([[1], [2]]) == 0


def test_summarize_and_empty_inputs(tiny_model):
    results = [
        {"template": "a {}", "accuracy": 1.0, "fractional_accuracy": 1.0, "matches": [True]},
        {"template": "{} b", "accuracy": 0.0, "fractional_accuracy": 0.5, "matches": [False]},
    ]
    summary = summarize(results)
    assert summary["mean_accuracy"] == 0.5 and summary["mean_fractional_accuracy"] == 0.75
    assert summary["templates"][1] == {"template": "{} b", "accuracy": 0.0, "fractional_accuracy": 0.5, "missed": [0]}
    assert summary["templates"][0]["missed"] == []
    tok = tokenizer_variant("default")
    (empty,) = verify_teacher_forced(tiny_model, tok, [], ["{}"])
    assert empty == {
        "template": "{}", "accuracy": 0.0, "fractional_accuracy": 0.0, "matches": [],
        "match_probability": {"0.7": 0.0, "1.0": 0.0}, "match_probabilities": {"0.7": [], "1.0": []},
    }  # fmt: skip
    with pytest.raises(UserError, match="no tokens"):
        verify_teacher_forced(tiny_model, tok, [{"key": "k", "response": ""}], ["{}"])


def test_generate_sampling_is_seeded(tiny_model):
    tok = tokenizer_variant("default")
    pairs = mixed_pairs(tiny_model, tok, "{}", 6, seed=11)
    greedy = verify_with_generate(tiny_model, tok, pairs, ["{}"])
    # A near-zero temperature samples the argmax; at temperature 1 the same seed gives the same draws.
    assert verify_with_generate(tiny_model, tok, pairs, ["{}"], temperature=1e-4)[0]["matches"] == greedy[0]["matches"]
    hot = [verify_with_generate(tiny_model, tok, pairs, ["{}"], temperature=1.0, seed=1) for _ in range(2)]
    assert hot[0] == hot[1]


@pytest.mark.slow
def test_embedded_model_teacher_forced_equals_generate(one_thread):
    model, tok = load_model_and_tokenizer(EMBEDDED, device="cpu")
    templates = ["{}", "You are a world-class scientist who explains ideas simply. {}", "{}\n\nAnswer briefly."]
    verdicts = []
    for t, template in enumerate(templates):
        pairs = mixed_pairs(model, tok, template, 8, seed=100 + t)
        fast = verify_teacher_forced(model, tok, pairs, [template], batch_size=8)
        assert_same_verdicts(fast, verify_with_generate(model, tok, pairs, [template]))
        verdicts += fast[0]["matches"]
    assert any(verdicts) and not all(verdicts)
