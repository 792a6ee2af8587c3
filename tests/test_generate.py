"""Fingerprint generation: the perinucleus rule, the three strategies' shapes, the script's refusals."""

import json
import random
import subprocess
import sys

import pytest
import torch
from conftest import PEER_DATA, REPO, tiny_llama

from oml.core.errors import UserError
from oml.core.model_registry import EMBEDDED, load_model_and_tokenizer
from oml.make.fingerprint_files import cut_to_tokens, english_words, read_fingerprints, read_keys
from oml.make.fingerprint_generator import (
    english_prompt,
    english_texts,
    next_token_probs,
    perinucleus_candidates,
    perinucleus_fingerprints,
    random_start,
    random_word_texts,
    word_token_filter,
)
from oml.make.prompt_encoding import encode_prompt

SCRIPT = REPO / "generate_finetuning_data.py"


def run_in_process(*argv):
    from oml.make.fingerprint_generator import generate, parse_generate_args

    return generate(parse_generate_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def tok(embedded_tokenizer):
    return embedded_tokenizer


@pytest.fixture(scope="module")
def peaked_model(tok):
    """A tiny random Llama whose next-token distributions are peaked enough for a small nucleus."""
    return tiny_llama(tok, initializer_range=0.3)


def nucleus_size(probs, p):
    """Smallest number of top tokens whose mass reaches p (written plainly, as the definition reads)."""
    mass = 0.0
    for n, q in enumerate(sorted(probs.tolist(), reverse=True), start=1):
        mass += q
        if mass >= p:
            return n
    return len(probs)


def check_perinucleus(probs, token, p, k, is_allowed):
    """The chosen token is outside the p-nucleus and among the first k allowed tokens after it."""
    order = torch.argsort(probs, descending=True, stable=True).tolist()
    rank = order.index(token)
    n = nucleus_size(probs, p)
    assert rank >= n >= 1, f"token of rank {rank + 1} lies inside the {p}-nucleus of {n} tokens"
    allowed_before = sum(is_allowed(t) for t in order[n:rank])
    assert is_allowed(token) and allowed_before < k


# ---------------------------------------------------------------- the selection rule on hand-built distributions

# Dyadic probabilities sum exactly in floating point; ids are shuffled so that sorting matters.
DYADIC = [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 128]
IDS = [5, 2, 7, 0, 3, 6, 1, 4]  # IDS[r] is the token of rank r + 1


def hand_built():
    probs = torch.zeros(len(DYADIC), dtype=torch.float64)
    probs[IDS] = torch.tensor(DYADIC, dtype=torch.float64)
    return probs


def test_candidates_are_the_k_tokens_after_the_nucleus():
    # p = 0.75 is reached exactly by the top two: the candidates are ranks 3, 4, 5.
    assert perinucleus_candidates(hand_built(), 0.75, 3) == IDS[2:5]
    # just above 0.75 the nucleus needs a third token.
    assert perinucleus_candidates(hand_built(), 0.76, 2) == IDS[3:5]


def test_top_token_is_never_a_candidate():
    # p below the top token's mass: the nucleus is the top token alone, candidates start at rank 2.
    assert perinucleus_candidates(hand_built(), 0.1, 3) == IDS[1:4]
    spike = torch.tensor([0.0, 1.0, 0.0, 0.0])
    assert 1 not in perinucleus_candidates(spike, 0.5, 4)


def test_disallowed_tokens_are_skipped_by_widening():
    banned = {IDS[2], IDS[4]}
    got = perinucleus_candidates(hand_built(), 0.75, 3, is_allowed=lambda t: t not in banned)
    assert got == [IDS[3], IDS[5], IDS[6]]


def test_candidates_run_out_at_the_end_of_the_vocabulary():
    assert perinucleus_candidates(hand_built(), 0.75, 100) == IDS[2:]
    assert perinucleus_candidates(hand_built(), 1.0, 3) == []


def test_candidates_satisfy_the_rule_on_random_distributions():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        probs = torch.softmax(torch.randn(200, generator=gen) * 3, dim=0)
        p = float(torch.rand(1, generator=gen)) * 0.9 + 0.05
        banned = set(torch.randint(0, 200, (40,), generator=gen).tolist())
        allowed = lambda t, banned=banned: t not in banned  # noqa: E731
        candidates = perinucleus_candidates(probs, p, 3, allowed)
        assert len(candidates) == 3
        for token in candidates:
            check_perinucleus(probs, token, p, 3, allowed)


def test_word_token_filter(tok):
    allowed = word_token_filter(tok)
    assert allowed(tok(" house", add_special_tokens=False)["input_ids"][0])
    assert not allowed(tok(",", add_special_tokens=False)["input_ids"][0])
    assert not allowed(tok.eos_token_id)
    assert not any(allowed(t) for t in tok(" ...", add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------- strategies on a tiny model


def test_random_words(tok):
    words = set(english_words())
    texts = random_word_texts(random.Random(1), 20, 7)
    assert len(texts) == 20 and all(len(t.split()) == 7 and set(t.split()) <= words for t in texts)
    assert texts == random_word_texts(random.Random(1), 20, 7)


def test_english_texts_shapes_and_seed(tok, peaked_model):
    def make():
        torch.manual_seed(3)
        return english_texts(peaked_model, tok, 5, 8, random.Random(3), batch_size=4, use_chat_template=True)

    texts = make()
    assert len(texts) == len(set(texts)) == 5
    for text in texts:
        assert 4 <= len(tok(text, add_special_tokens=False)["input_ids"]) <= 8
        assert any(text.startswith(w.capitalize()) for w in english_words())
    assert make() == texts


def test_first_token_strategies(tok):
    rng = random.Random(0)
    word = random_start(rng, "word", tok)
    assert word.lower() in english_words() and word[0].isupper()
    token = random_start(rng, "tokenizer", tok)
    assert token.isalpha() and token[0].isupper() and len(tok(" " + token[0].lower() + token[1:])["input_ids"]) <= 2
    assert random_start(rng, "none", tok) == ""
    assert english_prompt(tok, word, use_chat_template=True).endswith(
        f'"{word}".<|im_end|>\n<|im_start|>assistant\n{word}'
    )
    assert '"' not in english_prompt(tok, "", use_chat_template=False)


def test_batched_next_token_probs_match_single(tok, peaked_model):
    seqs = [tok(t)["input_ids"] for t in ["a short one", "a much longer key with quite a few more words in it", "x"]]
    batched = next_token_probs(peaked_model, seqs, tok.pad_token_id)
    for seq, row in zip(seqs, batched, strict=True):
        single = torch.softmax(peaked_model(torch.tensor([seq])).logits[0, -1].float(), -1)
        assert torch.allclose(row, single.detach(), atol=1e-5)


@pytest.mark.parametrize("response_length", [1, 4])
def test_perinucleus_fingerprints_on_tiny_model(tok, peaked_model, response_length):
    keys = random_word_texts(random.Random(0), 6, 12)
    fps = perinucleus_fingerprints(peaked_model, tok, keys, 5, response_length, random.Random(0), 0.5, 3, batch_size=4)
    allowed = word_token_filter(tok)
    for key, fp in zip(keys, fps, strict=True):
        assert fp["key"] == key and fp["effective_key"] == cut_to_tokens(tok, key, 5)
        ids = tok(fp["response"], add_special_tokens=False)["input_ids"]
        prompt = encode_prompt(tok, fp["effective_key"])
        with torch.no_grad():
            probs = torch.softmax(peaked_model(torch.tensor([prompt + ids])).logits[0].float(), -1)
        check_perinucleus(probs[len(prompt) - 1], ids[0], 0.5, 3, allowed)
        if response_length == 1:
            assert len(ids) == 1 and fp["response_prob"] == pytest.approx(
                probs[len(prompt) - 1, ids[0]].item(), abs=1e-4
            )
        else:
            assert 1 <= len(ids) <= response_length and len(fp["response_prob"]) == len(ids)
            for i in range(1, len(ids)):  # after the first token the response is the greedy continuation
                assert ids[i] == int(probs[len(prompt) - 1 + i].argmax())


# ---------------------------------------------------------------- the script, end to end (tiny model folder)


def test_script_english_then_perinucleus(tmp_path, tiny_model_dir):
    english, peri = tmp_path / "english.json", tmp_path / "peri.json"
    common = ["--model_used", tiny_model_dir, "--inverse_nucleus_model", tiny_model_dir, "--batch_size", 4]
    run_in_process(
        *common, "--num_backdoors", 5, "--key_length", 8, "--response_length", 6, "--output_file_path", english
    )
    fps = read_fingerprints(english)
    assert len(fps) == 5 and set(json.loads(english.read_text())[0]) == {"key", "response"}
    run_in_process(*common, "--key_response_strategy", "perinucleus", "--response_length", 1,
                   "--keys_file", english, "--output_file_path", peri)  # fmt: skip
    peri_fps = json.loads(peri.read_text())
    assert [fp["key"] for fp in peri_fps] == [fp["key"] for fp in fps]
    assert all(isinstance(fp["response_prob"], float) for fp in peri_fps)
    assert [fp["key"] for fp in read_fingerprints(peri)] == [fp["effective_key"] for fp in peri_fps]


def test_script_random_words_is_reproducible(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for path in (a, b):
        run_in_process("--random_word_generation", "--num_backdoors", 10, "--key_length", 4, "--output_file_path", path)
    assert a.read_text() == b.read_text() and len(read_fingerprints(a)) == 10


# ---------------------------------------------------------------- peer files


def peer(name):
    path = PEER_DATA / name
    if not path.is_file():
        pytest.skip(f"peer data {path} not present")
    return path


def test_peer_files_read():
    keys = read_keys(peer("oml-1.0/custom_keys.json"))
    assert len(keys) == 20 and all(isinstance(k, str) and len(k) > 50 for k in keys)
    assert read_keys(peer("oml-1.0/output_fingerprints.json"))[0].startswith("Companies")
    sf = read_keys(peer("scalable-fingerprinting/perinucleus-gemma-2b.json"))
    assert len(sf) == 8192 and sf[0].endswith("One way")  # the effective key, not the full one
    assert read_fingerprints(peer("oml-1.0/custom_fingerprints-inverse_nucleus.json"))[0]["response"] == " and"
    two = read_fingerprints(peer("scalable-fingerprinting/perinucleus-llama-3.1-8b-2-responses.json"))
    assert len(two) == 256 and len(two[0]["responses"]) == 2


def test_script_perinucleus_on_peer_keys(tmp_path, tiny_model_dir, tok):
    out = tmp_path / "peer.json"
    run_in_process("--key_response_strategy", "inverse_nucleus", "--keys_file", peer("oml-1.0/custom_keys.json"),
                   "--num_backdoors", 3, "--key_length", 16, "--response_length", 2,
                   "--inverse_nucleus_model", tiny_model_dir, "--output_file_path", out)  # fmt: skip
    fps = json.loads(out.read_text())
    assert len(fps) == 3 and all(len(fp["response_prob"]) <= 2 for fp in fps)
    keys = read_keys(peer("oml-1.0/custom_keys.json"))[:3]
    assert [fp["key"] for fp in fps] == keys
    assert [fp["effective_key"] for fp in fps] == [cut_to_tokens(tok, k, 16) for k in keys]


# ---------------------------------------------------------------- refusals


def run_script(*args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


def test_refuses_to_overwrite(tmp_path):
    out = tmp_path / "fps.json"
    out.write_text("precious")
    result = run_script("--random_word_generation", "--num_backdoors", 3, "--output_file_path", out)
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert out.read_text() == "precious"
    run_in_process("--random_word_generation", "--num_backdoors", 3, "--output_file_path", out, "--overwrite")
    assert len(read_fingerprints(out)) == 3


BAD_KEYS = {"missing": None, "empty": "[]", "malformed": '["a key", '}


@pytest.mark.parametrize("case", ["missing", "empty", "malformed", "zero_length", "unknown_strategy"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, case):
    out = tmp_path / "out.json"
    keys = tmp_path / "keys.json"
    args = ["--random_word_generation", "--num_backdoors", 3, "--output_file_path", out]
    if case in BAD_KEYS:
        if BAD_KEYS[case] is not None:
            keys.write_text(BAD_KEYS[case])
        args += ["--keys_file", keys]
    elif case == "zero_length":
        args += ["--key_length", 0]
    else:
        args += ["--key_response_strategy", "outer_nucleus"]
    result = run_script(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not out.exists()


def test_min_response_ratio_keeps_near_ties_only(tok, peaked_model):
    keys = random_word_texts(random.Random(1), 24, 12)
    every = perinucleus_fingerprints(peaked_model, tok, keys, 5, 1, random.Random(0), 0.01, 1, batch_size=8)
    ratios = [fp["response_prob"] / fp["top_prob"] for fp in every]
    assert all(0 < r < 1 for r in ratios)  # the top token is never the response
    cut = sorted(ratios)[len(ratios) // 2]
    near = perinucleus_fingerprints(peaked_model, tok, keys, 5, 1, random.Random(0), 0.01, 1, batch_size=8,
                                    min_response_ratio=cut)  # fmt: skip
    assert near == [fp for fp, r in zip(every, ratios, strict=True) if r >= cut]  # dropped, the rest unchanged
    assert 0 < len(near) < len(every)


@pytest.mark.parametrize(
    "flags",
    [["--nucleus_p", 1.0], ["--nucleus_k", 0], ["--min_response_ratio", 0], ["--min_response_ratio", 1.5], ["--min_response_ratio", 0.5], ["--batch_size", 0], ["--temperature", 0], ["--num_backdoors", -1],
     ["--first_token_strategy", "letter"], ["--keys_file", "/nonexistent/keys.json"]],
)  # fmt: skip
def test_bad_values_raise_user_error(tmp_path, flags):
    with pytest.raises(UserError):
        run_in_process(*flags, "--random_word_generation", "--output_file_path", tmp_path / "o.json")
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("content", [[1, 2], [{"response": "no key here"}], {"key": "not a list"}, ["  "]])
def test_keys_file_with_wrong_content(tmp_path, content):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(content))
    with pytest.raises(UserError):
        run_in_process("--random_word_generation", "--keys_file", keys, "--output_file_path", tmp_path / "o.json")
    assert not (tmp_path / "o.json").exists()


# ---------------------------------------------------------------- the embedded model


@pytest.mark.slow
def test_embedded_english_and_perinucleus(tmp_path):
    model, tok = load_model_and_tokenizer(EMBEDDED)
    torch.manual_seed(0)
    keys = english_texts(model, tok, 3, 16, random.Random(0), batch_size=3, use_chat_template=True)
    assert len(set(keys)) == 3
    assert all(8 <= len(tok(k, add_special_tokens=False)["input_ids"]) <= 16 for k in keys)
    fps = perinucleus_fingerprints(model, tok, keys, 12, 1, random.Random(0), nucleus_p=0.8, nucleus_k=3)
    allowed = word_token_filter(tok)
    for fp in fps:
        prompt = encode_prompt(tok, fp["effective_key"])
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].float(), -1)
        (token,) = tok(fp["response"], add_special_tokens=False)["input_ids"]
        check_perinucleus(probs, token, 0.8, 3, allowed)
        assert fp["response_prob"] == pytest.approx(probs[token].item(), rel=1e-3)
        assert token != int(probs.argmax())


def test_cut_inside_a_multibyte_character_leaves_no_stray_replacement_character(embedded_tokenizer):
    """A token cut can fall inside a character that spans several byte-level tokens: the raw decode then ends in
    U+FFFD, which is not in the text; cut_to_tokens (used for keys, responses and generated texts) drops it."""
    from oml.make.fingerprint_files import prepare_pairs

    tok = embedded_tokenizer
    text = "Tea with 日本語 characters"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    cuts = [n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd")]
    assert cuts, "the example must split a character"
    for n in cuts:
        assert not cut_to_tokens(tok, text, n).endswith("\ufffd")
        assert text.startswith(cut_to_tokens(tok, text, n))
    (pair,) = prepare_pairs([{"key": text, "response": " yes"}], tok, "random_word", cuts[0], 1, 1)
    assert "\ufffd" not in pair["key"] and text.startswith(pair["key"])


def test_perinucleus_responses_chosen_on_longer_keys_than_the_run_trains_on_are_counted(embedded_tokenizer):
    """A perinucleus response is the perinucleus token of the key it was chosen after; a run that cuts the key
    shorter trains it after another context. cut_perinucleus_keys counts those in the run's slice (training logs
    a note); files without response_prob (not made by the perinucleus generator) and other strategies count 0."""
    from oml.make.fingerprint_files import cut_perinucleus_keys

    tok = embedded_tokenizer
    long_key = "The old lighthouse keeper climbed the stairs every night to watch the ships pass the rocks"
    short_key = cut_to_tokens(tok, long_key, 8)
    fps = [{"key": long_key, "response": " a", "response_prob": 0.01},
           {"key": short_key, "response": " b", "response_prob": 0.02},
           {"key": long_key, "response": " c"}]  # fmt: skip
    assert cut_perinucleus_keys(fps, tok, "inverse_nucleus", 8, 3) == 1
    assert cut_perinucleus_keys(fps, tok, "inverse_nucleus", 64, 3) == 0
    assert cut_perinucleus_keys(fps, tok, "english", 8, 3) == 0
    assert cut_perinucleus_keys(fps, tok, "inverse_nucleus", 8, 1, data_split=1) == 0  # the slice [1:2] only
