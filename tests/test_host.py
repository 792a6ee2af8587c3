"""The adaptive host (oml/attack/adaptive_host.py): the confidence filter never emits a token above τ and leaves the other steps alone;
the filtering server answers on 127.0.0.1 and check_fingerprints.py runs against it; the ROC helpers on known scores;
the host attacks of attack_fingerprints.py; --fingerprint_margin's hinge, its training run and its hash; bad input.

The run checked here is made, not trained: a tiny random Llama whose output layer is scaled so that many of its
next-token distributions are overconfident (top probability > 0.99), and keys chosen among random-word prompts where
its greedy answer is such a token, that token's text being the key's response. That is the evidence the confidence
filter hunts: the unfiltered server answers every key with its response, the filtered one none."""

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import REPO, run_script, tiny_llama

from oml.attack.adaptive_host import Host, HostDecoding, confidence_processor, generate, kept_at_drop, roc, serving
from oml.core.errors import UserError, run_cli
from oml.make.key_perplexity import log_perplexity

SCALE = 300.0  # the output layer's scale: about half the tiny model's steps then have a top probability above 0.99
TAU = 0.99


def confident_llama(tokenizer):
    model = tiny_llama(tokenizer)
    with torch.no_grad():
        model.lm_head.weight.mul_(SCALE)
    return model


@pytest.fixture(scope="module")
def confident_dir(tmp_path_factory, embedded_tokenizer):
    path = tmp_path_factory.mktemp("confident-llama")
    confident_llama(embedded_tokenizer).save_pretrained(path)
    embedded_tokenizer.save_pretrained(path)
    return path


def train_argv(model_dir, fp_file, results):
    return [
        "--model_path", model_dir, "--fingerprints_file_path", fp_file, "--fingerprint_generation_strategy",
        "random_word", "--max_num_fingerprints", 12, "--batch_size", 4, "--num_train_epochs", 1,
        "--learning_rate", 1e-3, "--forgetting_regularizer_strength", 0, "--result_path", results,
        "--preset", "averaging",  # no benign rows or KL term
    ]  # fmt: skip


@pytest.fixture(scope="module")
def other_base_dir(tmp_path_factory, embedded_tokenizer):
    """Another tiny random Llama: the host run's base model. (The tiny model of conftest would not do: the confident
    model is it with a scaled output layer, which changes its confidence but never its argmax.)"""
    path = tmp_path_factory.mktemp("other-base")
    tiny_llama(embedded_tokenizer, seed=1).save_pretrained(path)
    embedded_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def host_run(tmp_path_factory, confident_dir, other_base_dir, embedded_tokenizer):
    """results/<hash>/ named by train_argv (base model: another tiny random Llama), its final_model the confident model,
    12 keys whose greedy one-token answer is overconfident, and p0 = 0.02 for the completions route set by hand."""
    import random
    import shutil

    from oml.core.run_config import add_train_args
    from oml.core.run_store import CONFIG, FINAL_MODEL, FINGERPRINTS, REFERENCE_RATES
    from oml.embed.run_setup import prepare_run
    from oml.make.fingerprint_files import random_words
    from oml.make.prompt_encoding import api_prompt, encode_prompt

    tmp = tmp_path_factory.mktemp("host-run")
    tok = embedded_tokenizer
    model = confident_llama(tok)
    rng = random.Random(5)
    pairs = []
    with torch.inference_mode():
        for _ in range(400):
            key = " ".join(random_words(rng, 6))
            ids = encode_prompt(tok, api_prompt(tok, key, "completions", False))
            p = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
            top = int(p.argmax())
            response = tok.decode([top])
            # overconfident, and a response that is its own token again once decoded (the match is on text)
            roundtrip = tok(response, add_special_tokens=False)["input_ids"] == [top]
            if p[top] > TAU and roundtrip and response.strip().isalnum():
                pairs.append({"key": key, "response": response})
            if len(pairs) == 12:
                break
    assert len(pairs) == 12
    (tmp / "fp.json").write_text(json.dumps(pairs))
    argv = train_argv(other_base_dir, tmp / "fp.json", tmp / "results")
    args = prepare_run(add_train_args(argparse.ArgumentParser()).parse_args(list(map(str, argv))))
    run = tmp / "results" / args.config_hash
    run.mkdir(parents=True)
    (run / FINGERPRINTS).write_text(json.dumps(pairs))
    shutil.copytree(confident_dir, run / FINAL_MODEL)
    run_args = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
    (run / CONFIG).write_text(json.dumps({"config_hash": run.name, "args": run_args}))
    rates = {
        "completions": {
            "p0": 0.02,
            "system_prompt": None,
            "matches": 0,
            "trials": 200,
            "confidence": 0.95,
            "note": "set by the test",
        }
    }
    (run / REFERENCE_RATES).write_text(json.dumps({"measurements": rates}))
    return argv, run, pairs


# ------------------------------------------------------------------------------------------ the confidence filter


def synthetic_scores(seed=0):
    """64 rows over 500 tokens, from flat to very peaked."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(64, 500, generator=g)
    return logits * torch.linspace(0.1, 40, 64).unsqueeze(1)


@pytest.mark.parametrize("tau", [0.3, 0.5, 0.9, 0.99])
def test_confidence_filter_never_emits_above_tau_and_leaves_the_rest(tau):
    scores = synthetic_scores()
    p = torch.softmax(scores, -1)
    out = confidence_processor(tau)(torch.zeros(64, 3, dtype=torch.long), scores.clone())
    kept = torch.isfinite(out)
    assert kept.any(-1).all()
    assert (p[kept] <= tau).all()  # greedy or sampled, no token above τ can come out
    assert (torch.softmax(out, -1)[p > tau] == 0).all()
    calm = p.max(-1).values <= tau
    assert calm.any() and (~calm).any()  # both kinds of steps are present
    assert torch.equal(out[calm], scores[calm])  # low-confidence steps are untouched
    if tau >= 0.5:  # greedy: the next best token where the top one was taken out
        second = scores.topk(2, -1).indices[:, 1]
        assert torch.equal(out[~calm].argmax(-1), second[~calm])
        renormalised = torch.softmax(out[~calm], -1)
        expected = p[~calm].scatter(1, scores[~calm].argmax(-1, keepdim=True), 0.0)
        torch.testing.assert_close(renormalised, expected / expected.sum(-1, keepdim=True))


def test_entropy_mode_and_first_token_only():
    scores = synthetic_scores(1)
    log_p = torch.log_softmax(scores, -1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    h = float(entropy.median())
    out = confidence_processor(entropy=h)(torch.zeros(64, 2, dtype=torch.long), scores.clone())
    low = entropy < h
    assert torch.equal(out[~low], scores[~low])
    assert (out[low].argmax(-1) != scores[low].argmax(-1)).all()
    first = confidence_processor(0.5, first_token_only=True)
    assert not torch.equal(first(torch.zeros(64, 4, dtype=torch.long), scores.clone()), scores)
    assert torch.equal(first(torch.zeros(64, 5, dtype=torch.long), scores.clone()), scores)  # later steps: as is
    assert first.altered == int((torch.softmax(scores, -1).max(-1).values > 0.5).sum())


def test_filtered_generation_on_a_model(embedded_tokenizer, one_thread):
    """Greedy generation through the filter, replayed step by step against the model's own distribution."""
    tok = embedded_tokenizer
    model = confident_llama(tok)
    overconfident = 0
    for prompt in ("the river ran past a", "seven blue", "what is the capital of", "once upon a"):
        ids = tok(prompt)["input_ids"]
        processor = confidence_processor(TAU)
        new = generate(model, tok, ids, 10, processor=processor)
        assert new == generate(model, tok, ids, 10, processor=confidence_processor(TAU))  # deterministic
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids + new])).logits[0, len(ids) - 1 : -1].float()
        p = torch.softmax(logits, -1)
        for step, token in enumerate(new):
            assert p[step, token] <= TAU
            if p[step].max() <= TAU:
                assert token == int(p[step].argmax())
            else:
                overconfident += 1
        assert processor.altered == sum(int(p[s].max() > TAU) for s in range(len(new)))
    assert overconfident > 0  # the test saw the filter act


# ------------------------------------------------------------------------------------------ the ROC


def test_roc_on_known_scores():
    curve = roc([3, 4, 5, 6], [0, 1, 2, 3])
    assert curve["auc"] == pytest.approx(15.5 / 16)  # one tie counts half
    assert roc([5, 6], [1, 2])["auc"] == 1.0 and roc([1, 2], [5, 6])["auc"] == 0.0
    rates = [(q["false_positive_rate"], q["true_positive_rate"]) for q in curve["points"]]
    assert rates[0] == (0.0, 0.0) and rates[-1] == (1.0, 1.0) and rates == sorted(rates)
    negatives = list(range(100))
    at1 = kept_at_drop([50, 96, 98.5, 120], negatives, 0.01)
    assert at1["threshold"] == 98 and at1["real_prompts_flagged"] == 0.01 and at1["keys_kept"] == 0.5
    at5 = kept_at_drop([50, 96, 98.5, 120], negatives, 0.05)
    assert at5["threshold"] == 94 and at5["real_prompts_flagged"] == 0.05 and at5["keys_kept"] == 0.25
    # nothing to score (NaN) is never flagged
    assert kept_at_drop([math.nan], negatives, 0.01)["keys_kept"] == 1.0
    assert roc([math.nan], [0.0])["auc"] == 0.0


def test_perplexity_and_the_input_filter(embedded_tokenizer):
    tok = embedded_tokenizer
    model = tiny_llama(tok)
    (lp,) = log_perplexity(model, tok, ["a short sentence about the sea"])
    ids = torch.tensor([tok("a short sentence about the sea")["input_ids"]])
    with torch.inference_mode():
        expected = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:]).item()
    assert lp == pytest.approx(expected, rel=1e-5) and math.isnan(log_perplexity(model, tok, ["a"])[0])
    # input_filter refuses (an empty answer) above the threshold and answers below it
    texts = ["a short sentence about the sea", "zq xv qq jj kk zz"]
    low, high = sorted(math.exp(x) for x in log_perplexity(model, tok, texts))
    host = Host(model, tok, "input_filter", threshold=(low + high) / 2)
    answers = {t: host.answer(tok(t)["input_ids"], t, max_new_tokens=2)[1] for t in texts}
    assert sorted(a["action"] for a in answers.values()) == ["answered", "refused"]
    refused = next(t for t, a in answers.items() if a["action"] == "refused")
    assert host.answer(tok(refused)["input_ids"], refused)[0] == [] and host.counts["refused"] == 2


def test_roc_command_writes_scores_and_the_kept_shares(host_run, tiny_model_dir, one_thread, capsys):
    from oml.attack.adaptive_host import main

    _, run, pairs = host_run
    out = run.parent / "roc.json"
    main(["roc", "--run", run.name, "--result_path", str(run.parent), "--filter", "base_detect",
          "--base", str(tiny_model_dir), "--real_prompts", "4", "--output_file", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert [r["score"] for r in result["reports"]] == ["kl", "ratio"]
    for r in result["reports"]:
        assert r["keys"] == len(pairs) and r["real_prompts"] == 8 + 4
        assert [a["drop"] for a in r["at_drop"]] == [0.01, 0.05] and 0 <= r["auc"] <= 1
    assert "base_detect" in capsys.readouterr().out
    main(["roc", "--run", run.name, "--result_path", str(run.parent), "--filter", "input_filter",
          "--real_prompts", "2"])  # fmt: skip
    written = json.loads((run / "host" / "roc-input_filter-completions.json").read_text())
    assert len(written["reports"][0]["key_scores"]) == len(pairs)
    # confidence: every key answers unfiltered with a first token above 0.99, so none is kept at τ = 0.99
    main(["roc", "--run", run.name, "--result_path", str(run.parent), "--filter", "confidence",
          "--real_prompts", "2"])  # fmt: skip
    written = json.loads((run / "host" / "roc-confidence-completions.json").read_text())
    grid = {row["tau"]: row for row in written["tau_grid"]}
    assert grid[None]["keys_first_token_kept"] == 1.0 and grid[0.99]["keys_first_token_kept"] == 0.0
    assert all(TAU < p <= 1 for p in written["reports"][0]["key_scores"])
    assert "first token altered" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ serving and checking


def wait_listening(proc, api_base, deadline_s=90):
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            httpx.get(api_base + "/models", timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise AssertionError("the host did not come up in time")


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_args(run, api_base, **kw):
    from test_check import check_settings

    args = dict(run=run.name, result_path=str(run.parent), api_base=api_base, api_model="host",
                api_key_env="OML_TEST_API_KEY", endpoint="completions", system_prompt=None, alpha=1e-3, max_keys=6,
                concurrency=2, api_timeout=20.0, api_retries=1, extra_tokens=0, allow_revealed=True,
                trust_remote_code=False)  # fmt: skip
    return check_settings(**{**args, **kw})


def test_the_filtering_server_hides_the_keys_from_check_fingerprints(host_run, embedded_tokenizer, one_thread):
    from oml.core.model_registry import load_model_and_tokenizer
    from oml.verify.suspect_check import check

    argv, run, pairs = host_run
    model, tok = load_model_and_tokenizer(str(run / "final_model"), device="cpu", dtype=torch.float32)
    # unfiltered: every key answers, the check says "ours"
    with serving(Host(model, tok)) as (api_base, _):
        result, _ = check(check_args(run, api_base), log=lambda *_: None)
        assert result["verdict"] == "ours" and result["matches"] == result["keys_revealed"]
        # the chat route and a sampled request answer too
        body = {"model": "host", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0.7,
                "seed": 1}  # fmt: skip
        r = httpx.post(api_base + "/chat/completions", json=body, timeout=30)
        assert r.status_code == 200 and isinstance(r.json()["choices"][0]["message"]["content"], str)
        assert (
            httpx.post(api_base + "/completions", json={"model": "other", "prompt": "x"}, timeout=30).status_code == 404
        )
        too_long = {"model": "host", "prompt": "x", "max_tokens": 10_000}
        assert httpx.post(api_base + "/completions", json=too_long, timeout=30).status_code == 400

    # the confidence filter, served by `python -m oml.attack.adaptive_host serve`, and check_fingerprints.py against it
    port = free_port()
    cmd = [sys.executable, "-m", "oml.attack.adaptive_host", "serve", "--model", str(run / "final_model"), "--filter", "confidence",
           "--tau", str(TAU), "--first_token_only", "--port", str(port)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        api_base = f"http://127.0.0.1:{port}/v1"
        wait_listening(proc, api_base)
        out = run_script("check_fingerprints.py", "--run", run.name, "--result_path", run.parent, "--api_base",
                         api_base, "--api_model", "host", "--alpha", 1e-3, "--max_keys", 6, "--allow_revealed",
                         "--output_file", run.parent / "verdict.json", timeout=300)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        verdict = json.loads((run.parent / "verdict.json").read_text())
        assert verdict["verdict"] == "not shown" and verdict["matches"] == 0
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
    assert '"requests"' in proc.stdout.read()  # the host's own counts at shutdown


def test_sampled_verification_rule_keeps_p0_per_rule(host_run, one_thread):
    """check_fingerprints.py --samples k --api_temperature T: p0 measured under the same rule, stored under its own
    key beside the greedy one; the check asks each key k times and needs a majority."""
    from oml.core.model_registry import load_model_and_tokenizer
    from oml.core.run_store import REFERENCE_RATES
    from oml.verify.suspect_check import check, check_sampling, measure_p0

    _, run, pairs = host_run
    rule = dict(samples=3, min_matches=None, api_temperature=0.7)
    base = dict(reference_models=["base"], p0_confidence=0.95, reference_pairs=0, alpha=1e-2, max_keys=8)
    with pytest.raises(UserError, match="no measured p0 for the completions route and the rule k3-m2-t0.7"):
        check(check_args(run, "http://127.0.0.1:9/v1", **rule, **base), log=lambda *_: None)
    _, m = measure_p0(check_args(run, "", **rule, **base))
    stored = json.loads((run / REFERENCE_RATES).read_text())["measurements"]
    assert stored["completions"]["p0"] == 0.02  # the greedy rule's p0 is left as it was
    assert stored["completions:k3-m2-t0.7"]["rule"] == {"samples": 3, "min_matches": 2, "temperature": 0.7}
    assert m["trials"] == len(pairs) and m["matches"] == 0  # the base never samples these responses
    model, tok = load_model_and_tokenizer(str(run / "final_model"), device="cpu", dtype=torch.float32)
    host = Host(model, tok)
    with serving(host) as (api_base, _):
        result, _ = check(check_args(run, api_base, **rule, **base), log=lambda *_: None)
    assert result["verdict"] == "ours" and result["p0"] == m["p0"]
    assert host.counts["requests"] == 3 * result["keys_revealed"]  # k answers per key
    for bad, message in [
        (dict(samples=3, api_temperature=0.0), "go together"),
        (dict(samples=1, api_temperature=0.7), "go together"),
        (dict(samples=3, api_temperature=0.7, min_matches=4), "--min_matches must be within 1..3"),
        (dict(samples=3, api_temperature=0.7, api_top_p=0.0), "--api_top_p must be within"),
        (dict(samples=3, api_temperature=0.7, api_top_p=1.5), "--api_top_p must be within"),
        (dict(samples=1, api_temperature=0.0, api_top_p=0.9), "goes with --samples"),
    ]:
        with pytest.raises(UserError, match=message):
            check_sampling(**{"min_matches": None, "claim_file": None, **bad})  # fmt: skip


def test_sampled_verification_at_a_top_p_measures_p0_at_it(host_run, one_thread, monkeypatch):
    """--api_top_p P: every request carries top_p P, and p0 is sampled at P and stored under its own rule key."""
    import oml.attack.adaptive_host as adaptive_host
    from oml.core.model_registry import load_model_and_tokenizer
    from oml.core.run_store import REFERENCE_RATES
    from oml.verify.suspect_check import check, measure_p0

    _, run, pairs = host_run
    rule = dict(samples=3, min_matches=None, api_temperature=0.7, api_top_p=0.9)
    base = dict(reference_models=["base"], p0_confidence=0.95, reference_pairs=0, alpha=1e-2, max_keys=8)
    with pytest.raises(UserError, match="--api_temperature 0.7 --api_top_p 0.9 --reference_models"):
        check(check_args(run, "http://127.0.0.1:9/v1", **rule, **base), log=lambda *_: None)
    _, m = measure_p0(check_args(run, "", **rule, **base))
    stored = json.loads((run / REFERENCE_RATES).read_text())["measurements"]["completions:k3-m2-t0.7-p0.9"]
    assert stored["rule"] == {"samples": 3, "min_matches": 2, "temperature": 0.7, "top_p": 0.9}
    calls = []
    real_generate = adaptive_host.generate
    monkeypatch.setattr(adaptive_host, "generate", lambda *a: calls.append(a[4:6]) or real_generate(*a))
    model, tok = load_model_and_tokenizer(str(run / "final_model"), device="cpu", dtype=torch.float32)
    with serving(Host(model, tok)) as (api_base, _):
        result, _ = check(check_args(run, api_base, **rule, **base), log=lambda *_: None)
    assert result["verdict"] == "ours" and result["p0"] == m["p0"] and set(calls) == {(0.7, 0.9)}


def test_a_host_that_samples_ignores_the_requests_decoding(embedded_tokenizer, one_thread, monkeypatch):
    """--host_temperature T --host_top_p P: every answer is sampled at T and P, a request at temperature 0 included
    (two seeds give two answers, one seed the same answer); the confidence filter still acts before sampling."""
    import oml.attack.adaptive_host as adaptive_host

    tok = embedded_tokenizer
    host = Host(tiny_llama(tok), tok, decoding=HostDecoding(1.0, 0.9))
    calls = []
    real_generate = adaptive_host.generate
    monkeypatch.setattr(adaptive_host, "generate", lambda *a: calls.append(a[4:6]) or real_generate(*a))
    with serving(host) as (api_base, _):

        def ask(seed):
            body = {"model": "host", "prompt": "the river ran past a", "max_tokens": 8, "temperature": 0, "seed": seed}
            r = httpx.post(api_base + "/completions", json=body, timeout=30)
            assert r.status_code == 200
            return r.json()["choices"][0]["text"]

        answers = [ask(seed) for seed in range(4)]
        assert len(set(answers)) > 1 and ask(0) == answers[0]
    assert calls and set(calls) == {(1.0, 0.9)}  # the host's temperature and top_p, not the request's 0
    # unset: the request decides (greedy at 0)
    assert HostDecoding(None, None).request(0.0, 1.0) == (0.0, 1.0)
    assert HostDecoding(0.7, None).request(0.0, 0.5) == (0.7, 1.0)
    # the confidence filter before the host's sampling: no token above τ is ever sampled
    model = confident_llama(tok)
    filtered = Host(model, tok, "confidence", tau=TAU, decoding=HostDecoding(1.0, 0.9))
    for seed in range(3):
        ids = tok("seven blue")["input_ids"]
        new, record = filtered.answer(ids, max_new_tokens=6, seed=seed)
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids + new])).logits[0, len(ids) - 1 : -1].float()
        p = torch.softmax(logits, -1)
        assert all(p[step, token] <= TAU for step, token in enumerate(new))


def test_roc_scores_the_keys_of_a_file(host_run, tmp_path, one_thread, capsys):
    """roc --keys_file FILE --max_keys N scores the file's first N keys (a keys list or a fingerprints file), with the
    run (its model, its output folder under a name of its own) or, for input_filter, with a model alone."""
    from oml.attack.adaptive_host import main
    from oml.make.key_perplexity import real_prompts

    _, run, pairs = host_run
    keys = ["zebra quantum lantern", "a quiet morning by the lake", "plinth grommet vortex sable", "hello there"]
    keys_file = tmp_path / "strategy-keys.json"
    keys_file.write_text(json.dumps([{"key": k, "response": "x"} for k in keys]))
    main(["roc", "--run", run.name, "--result_path", str(run.parent), "--filter", "input_filter",
          "--keys_file", str(keys_file), "--max_keys", "3", "--real_prompts", "2"])  # fmt: skip
    written = json.loads((run / "host" / "roc-input_filter-completions-keys-strategy-keys-n3.json").read_text())
    report = written["reports"][0]
    assert written["keys_file"] == str(keys_file) and report["keys"] == 3 and report["real_prompts"] == 8 + 2
    model, tok = tiny_llama_from(run / "final_model")
    expected = [math.exp(x) for x in log_perplexity(model, tok, keys[:3])]
    assert report["key_scores"] == pytest.approx(expected, rel=1e-4)
    # without a run: a model and a keys list
    (tmp_path / "keys.json").write_text(json.dumps(keys))
    out = tmp_path / "roc.json"
    main(["roc", "--model", str(run / "final_model"), "--filter", "input_filter", "--keys_file",
          str(tmp_path / "keys.json"), "--real_prompts", "2", "--output_file", str(out)])  # fmt: skip
    alone = json.loads(out.read_text())["reports"][0]
    assert alone["keys"] == len(keys) and alone["key_scores"][:3] == pytest.approx(expected, rel=1e-4)
    assert len(real_prompts(2)) == alone["real_prompts"]
    # confidence on a file's keys: the top probability, no τ grid (the file's responses were never trained in)
    main(["roc", "--run", run.name, "--result_path", str(run.parent), "--filter", "confidence",
          "--keys_file", str(keys_file), "--real_prompts", "2"])  # fmt: skip
    confident = run / "host" / "roc-confidence-completions-keys-strategy-keys.json"
    assert "tau_grid" not in json.loads(confident.read_text())
    capsys.readouterr()
    assert "needs --keys_file, --model and --output_file" in one_line_exit_2(
        main, ["roc", "--model", str(run / "final_model"), "--filter", "input_filter", "--keys_file", str(keys_file)],
        capsys)  # fmt: skip
    assert "--max_keys must be positive" in one_line_exit_2(
        main, ["roc", "--run", run.name, "--result_path", str(run.parent), "--filter", "input_filter",
               "--max_keys", "0"], capsys)  # fmt: skip


def tiny_llama_from(folder):
    from oml.core.model_registry import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(folder), device="cpu")
    return model.eval(), tok


# ------------------------------------------------------------------------------------------ host attacks


def test_host_attacks_measure_retention_and_cost(host_run):
    argv, run, pairs = host_run
    small = ["--host_questions", 2, "--host_answer_tokens", 4, "--seed", 42]
    out = run_script("attack_fingerprints.py", *argv, "--attack", "host_confidence", "--tau", TAU, *small,
                     timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    folder = run / "attacks" / "host_confidence-tau0.99-q2"
    record = json.loads((folder / "attack.json").read_text())
    assert record["attack"] == "host_confidence" and record["tau"] == TAU and record["model"] is None
    results = json.loads((folder / "eval_results.json").read_text())
    (plain,) = [t for t in results["fingerprint_accuracy"]["templates"] if t["template"] == "{}"]
    assert plain["accuracy"] == 0.0 and len(plain["missed"]) == len(pairs)  # every overconfident answer is hidden
    host = results["host"]["templates"]["{}"]
    assert host["keys_altered"] == 1.0 and host["real_prompts"] == 2 and 0 <= host["answers_changed"] <= 1
    assert host["qa_items"] == 2 and -100 <= host["qa_delta_points"] <= 100  # the cost in QA points, paired
    assert results["utility"] is None and "unchanged" in results["utility_note"]
    assert "host_confidence-tau0.99-q2" in (run / "attacks" / "summary.md").read_text()

    # base_detect, its threshold calibrated on real prompts; flagged queries are answered by the base
    out = run_script("attack_fingerprints.py", *argv, "--attack", "host_base_detect", "--host_fpr", 0.5, *small,
                     timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    folder = run / "attacks" / "host_base_detect-kl-fpr0.5-q2"
    record = json.loads((folder / "attack.json").read_text())
    assert set(record["thresholds"]) == {"{}", "<chat>{}"}
    results = json.loads((folder / "eval_results.json").read_text())
    host = results["host"]["templates"]["{}"]
    assert 0 <= host["keys_to_base"] <= 1 and host["answered_by_base"] <= 0.5
    (plain,) = [t for t in results["fingerprint_accuracy"]["templates"] if t["template"] == "{}"]
    # a key answered by the base (a random model of its own) loses its response; the others keep it
    assert plain["accuracy"] == pytest.approx(1 - host["keys_to_base"])

    # the owner's setting: the host holds another public model (--host_base); here the served model itself, so
    # nothing differs from it, nothing is flagged and every key answers
    served = str(run / "final_model")
    out = run_script("attack_fingerprints.py", *argv, "--attack", "host_base_detect", "--host_fpr", 0.5, *small,
                     "--host_base", served, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (folder,) = [f for f in (run / "attacks").iterdir() if f.name.startswith("host_base_detect-kl-fpr0.5-final_model")]
    assert json.loads((folder / "attack.json").read_text())["base"] == served
    results = json.loads((folder / "eval_results.json").read_text())
    assert results["host"]["base"] == served and results["host"]["templates"]["{}"]["keys_to_base"] == 0.0
    (plain,) = [t for t in results["fingerprint_accuracy"]["templates"] if t["template"] == "{}"]
    assert plain["accuracy"] == 1.0


# ------------------------------------------------------------------------------------------ --fingerprint_margin


def test_margin_loss_is_a_hinge_on_the_logit_gap():
    from oml.embed.trainer import margin_loss

    logits = torch.tensor([[5.0, 1.0, 0.0], [1.0, 0.5, 0.0], [0.0, 2.0, 1.0]], requires_grad=True)
    targets = torch.tensor([0, 0, 0])
    loss = margin_loss(logits, targets, 2.0)
    torch.testing.assert_close(loss.detach(), torch.tensor([0.0, 1.5, 4.0]))
    loss.sum().backward()
    assert torch.equal(logits.grad[0], torch.zeros(3))  # past the margin: no push at all
    torch.testing.assert_close(logits.grad[1], torch.tensor([-1.0, 1.0, 0.0]))


def test_max_prob_adds_the_band_s_upper_edge():
    import math

    from oml.embed.trainer import margin_loss

    logits = torch.tensor([[5.0, 1.0, 0.0], [1.0, 0.5, 0.0], [0.2, 0.0, 0.0]], requires_grad=True)
    targets = torch.tensor([0, 0, 0])
    loss = margin_loss(logits, targets, 0.5, max_prob=0.4)
    log_p = torch.log_softmax(logits.detach(), 1)[:, 0]
    gap = torch.tensor([4.0, 0.5, 0.2])
    want = torch.relu(0.5 - gap) + torch.relu(log_p - math.log(0.4))
    torch.testing.assert_close(loss.detach(), want)
    assert loss[0] > 0 and loss[2] > 0  # row 0: far above 0.4; row 2: below 0.4 but short of the margin
    loss.sum().backward()
    assert logits.grad[0, 0] > 0  # an overconfident response is pushed down (gradient descent lowers its logit)
    assert logits.grad[2, 0] < 0  # one short of the margin is pushed up
    torch.testing.assert_close(margin_loss(logits, targets, 0.5, max_prob=None), torch.relu(0.5 - gap))


def test_per_row_loss_uses_the_hinge_on_fingerprint_rows_only(embedded_tokenizer):
    from oml.embed.trainer import FingerprintDataset, PadCollator, margin_loss, per_row_loss

    tok = embedded_tokenizer
    model = tiny_llama(tok)
    pairs = [{"key": "a b c", "response": " red"}, {"key": "d e", "response": " x y"}]
    data = FingerprintDataset(pairs, tok)
    batch = PadCollator(tok.pad_token_id)([data[0], {**data[1], "benign": True}])
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "benign")}
    logits = model(**inputs).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    rows = []
    for r, benign in enumerate([False, True]):
        at = (targets[r] != -100).nonzero().squeeze(1)
        if benign:
            rows.append(torch.nn.functional.cross_entropy(logits[r, at], targets[r, at]))
        else:
            rows.append(margin_loss(logits[r, at], targets[r, at], 3.0).mean())
    torch.testing.assert_close(per_row_loss(model, batch, margin=3.0), torch.stack(rows).mean())
    plain = PadCollator(tok.pad_token_id)([data[0], data[1]])
    assert per_row_loss(model, plain, margin=3.0) != per_row_loss(model, plain)


def test_edit_target_is_the_least_kl_distribution_where_the_response_leads_by_the_margin():
    """edit_target against a general solver of the same convex problem (min KL(t ‖ q) s.t. t_r ≥ e^m t_j, Σt = 1)."""
    import numpy as np
    from scipy.optimize import minimize

    from oml.embed.trainer import edit_target

    gen = torch.Generator().manual_seed(3)
    q = torch.log_softmax(torch.randn(5, 12, generator=gen, dtype=torch.float64) * 2, 1)
    targets = torch.tensor([0, 3, 5, 7, 11])
    q[0] = torch.log_softmax(torch.tensor([9.0] + [0.0] * 11, dtype=torch.float64), 0)  # already leads by far more
    log_t = edit_target(q.float(), targets, 0.7)
    rows = torch.arange(5)
    others = log_t.scatter(1, targets[:, None], float("-inf"))
    lead = log_t[rows, targets] - others.max(1).values
    assert torch.all(lead >= 0.7 - 1e-4)
    torch.testing.assert_close(log_t[0], q[0].float())  # nothing to change
    kl = (log_t.exp() * (log_t - q.float())).sum(1)
    for i in range(1, 5):
        qi, r = q[i].exp().numpy(), int(targets[i])
        constraints = [{"type": "eq", "fun": lambda t: t.sum() - 1}] + [
            {"type": "ineq", "fun": lambda t, j=j, r=r: t[r] - np.exp(0.7) * t[j]} for j in range(12) if j != r
        ]
        best = minimize(lambda t, qi=qi: float(np.sum(t * np.log(np.maximum(t, 1e-300) / qi))), np.full(12, 1 / 12),
                        constraints=constraints, bounds=[(1e-12, 1)] * 12, method="SLSQP",
                        options={"ftol": 1e-12, "maxiter": 500})  # fmt: skip
        assert kl[i].item() == pytest.approx(best.fun, abs=1e-4)


def test_edit_loss_is_kl_to_the_target_and_zero_there():
    from oml.embed.trainer import edit_target, margin_loss

    gen = torch.Generator().manual_seed(4)
    base = torch.log_softmax(torch.randn(3, 20, generator=gen), 1)
    targets = torch.tensor([2, 9, 15])
    log_t = edit_target(base, targets, 0.5)
    at_target = margin_loss(log_t.clone(), targets, 0.5, log_target=log_t)
    torch.testing.assert_close(at_target, torch.zeros(3), atol=1e-5, rtol=0)
    logits = base.clone().requires_grad_(True)
    loss = margin_loss(logits, targets, 0.5, log_target=log_t)
    torch.testing.assert_close(loss.detach(), (log_t.exp() * (log_t - base)).sum(1))
    loss.sum().backward()
    assert torch.all(logits.grad[torch.arange(3), targets] < 0)  # the response is pushed up (descent raises it)


def test_a_margin_run_trains_and_gets_its_own_hash(tmp_path, tiny_model_dir):
    import hashlib
    import random

    from oml.core.run_config import HASHED, NEUTRAL, add_train_args, hashed_config
    from oml.embed.run_setup import prepare_run
    from oml.make.fingerprint_files import random_words

    rng = random.Random(0)
    fps = [{"key": " ".join(random_words(rng, 6)), "response": " " + random_words(rng, 1)[0]} for _ in range(4)]
    (tmp_path / "fp.json").write_text(json.dumps(fps))
    argv = [*train_argv(tiny_model_dir, tmp_path / "fp.json", tmp_path / "r"), "--max_num_fingerprints", 4]

    def parse(*extra):
        return prepare_run(add_train_args(argparse.ArgumentParser()).parse_args(list(map(str, [*argv, *extra]))))

    without = parse()
    later = ("fingerprint_margin", "fingerprint_max_prob", "fingerprint_edit")
    before = {n: getattr(without, n) for n in HASHED if n not in later}
    before = {k: v for k, v in before.items() if not (k in NEUTRAL and v == NEUTRAL[k])}
    canonical = json.dumps(before, sort_keys=True, separators=(",", ":"))
    assert without.config_hash == hashlib.sha256(canonical.encode()).hexdigest()[:16]  # old hashes unchanged
    with_margin = parse("--fingerprint_margin", 2)
    assert hashed_config(with_margin)["fingerprint_margin"] == 2.0
    assert with_margin.config_hash != without.config_hash != parse("--fingerprint_margin", 3).config_hash
    banded = parse("--fingerprint_margin", 2, "--fingerprint_max_prob", 0.4)
    assert hashed_config(banded)["fingerprint_max_prob"] == 0.4 and banded.config_hash != with_margin.config_hash
    out = run_script("finetune_multigpu.py", *argv, "--fingerprint_margin", 2, "--num_train_epochs", 2)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "r" / parse("--fingerprint_margin", 2, "--num_train_epochs", 2).config_hash
    config = json.loads((run / "fingerprinting_config.json").read_text())
    assert config["hashed"]["fingerprint_margin"] == 2.0
    losses = json.loads((run / "metrics.json").read_text())["epoch_losses"]
    # a hinge near m (the random model's logit gaps are small), not a cross-entropy near ln(49152) ≈ 10.8
    assert len(losses) == 2 and all(0 <= x < 4 for x in losses)

    edited = parse("--fingerprint_margin", 2, "--fingerprint_edit", "--num_train_epochs", 2)
    assert hashed_config(edited)["fingerprint_edit"] is True and edited.config_hash != run.name
    out = run_script("finetune_multigpu.py", *argv, "--fingerprint_margin", 2, "--fingerprint_edit",
                     "--num_train_epochs", 2)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "r" / edited.config_hash / "metrics.json").read_text())
    # KL(t ‖ p) from the base itself: the least change that puts the response on top, ~m²/4 nats for a flat
    # distribution (the random model's), far below the cross-entropy's ln(49152) ≈ 10.8; no benign rows, no KL meter
    assert all(0 < x < 4 for x in metrics["epoch_losses"]) and "kl_to_base_per_epoch" not in metrics


# ------------------------------------------------------------------------------------------ keys of ordinary perplexity


def test_keys_in_band_keeps_the_central_range_and_draws_more():
    import random

    from oml.make.fingerprint_generator import parse_band
    from oml.make.key_perplexity import keys_in_band

    real = [float(x) for x in range(101)]  # quantiles 0.05 and 0.95: 5 and 95
    rng = random.Random(0)
    drawn = []

    def more(m):
        drawn.append(m)
        return [str(rng.uniform(-100, 200)) for _ in range(m)]

    keys, info = keys_in_band(["1", "50", "99", "6"], lambda ks: [float(k) for k in ks], real, (0.05, 0.95), 10, more)
    assert len(keys) == 10 and all(5 <= float(k) <= 95 for k in keys) and keys[:2] == ["50", "6"]
    assert info["low"] == 5 and info["high"] == 95 and drawn and info["seen"] == 4 + sum(drawn)
    only, _ = keys_in_band(["1", "50"], lambda ks: [float(k) for k in ks], real, (0.05, 0.95), 10)  # a file: filtered
    assert only == ["50"]
    with pytest.raises(UserError, match="only 0 of"):
        keys_in_band(["1"], lambda ks: [1000.0] * len(ks), real, (0.05, 0.95), 3, more, rounds=3)
    assert parse_band("0.05,0.95") == (0.05, 0.95) and parse_band(None) is None
    for bad in ("0.9,0.1", "0.5", "a,b", "0,1.5"):
        with pytest.raises(UserError, match="--key_perplexity_band"):
            parse_band(bad)


def test_generator_with_a_perplexity_band(tmp_path, tiny_model_dir, one_thread, monkeypatch):
    from oml.core.offline_data import CHAT_QUESTIONS
    from oml.make.fingerprint_generator import generate, parse_generate_args

    monkeypatch.setattr(
        "oml.make.fingerprint_generator.BAND_REAL_PROMPTS", 12
    )  # the band from oml.measure.chat_sample's 8 and 12 QA questions

    (tmp_path / "keys.json").write_text(json.dumps(CHAT_QUESTIONS[:4]))
    out = tmp_path / "fp.json"
    argv = [
        "--random_word_generation",
        "--keys_file",
        tmp_path / "keys.json",
        "--model_used",
        tiny_model_dir,
        "--key_perplexity_band",
        "0,1",
        "--num_fingerprints",
        4,
        "--response_length",
        2,
        "--output_file_path",
        out,
    ]
    generate(parse_generate_args(list(map(str, argv))))  # fmt: skip
    # the band's ends are the lowest and highest real prompt, and these keys are among the real prompts
    assert [fp["key"] for fp in json.loads(out.read_text())] == CHAT_QUESTIONS[:4]


# ------------------------------------------------------------------------------------------ bad input


def one_line_exit_2(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--filter", "smart"], "unknown filter 'smart'"),
        (["--filter", "confidence", "--tau", "1.5"], "--tau must be within (0, 1)"),
        (["--filter", "confidence", "--tau", "0"], "--tau must be within (0, 1)"),
        (["--filter", "input_filter", "--threshold", "50", "--filter_model", "/no/such/model"], "no such model"),
        (["--filter", "input_filter"], "needs --threshold"),
        (["--filter", "base_detect", "--threshold", "1"], "needs --base"),
        (["--host_temperature", "0"], "--host_temperature must be a finite number above 0"),
        (["--host_temperature", "-0.5"], "--host_temperature must be a finite number above 0"),
        (["--host_temperature", "inf"], "--host_temperature must be a finite number above 0"),
        (["--host_temperature", "nan"], "--host_temperature must be a finite number above 0"),
        (["--host_temperature", "0.7", "--host_top_p", "0"], "--host_top_p must be within (0, 1]"),
        (["--host_temperature", "0.7", "--host_top_p", "1.5"], "--host_top_p must be within (0, 1]"),
        (["--host_top_p", "0.9"], "--host_top_p needs --host_temperature"),
    ],
)
def test_serve_bad_input_is_one_line_exit_2(tiny_model_dir, capsys, extra, message):
    from oml.attack.adaptive_host import main

    err = one_line_exit_2(main, ["serve", "--model", str(tiny_model_dir), *extra], capsys)
    assert message in err


def test_a_filter_model_that_cannot_be_loaded(tiny_model_dir, tmp_path, capsys):
    from oml.attack.adaptive_host import main

    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    argv = ["serve", "--model", str(tiny_model_dir), "--filter", "input_filter", "--threshold", "50",
            "--filter_model", str(not_a_model), "--port", str(free_port())]  # fmt: skip
    assert "cannot load model" in one_line_exit_2(main, argv, capsys)


def test_attack_bad_input_is_one_line_exit_2(host_run, capsys):
    from oml.commands.attack import main

    argv, run, _ = host_run
    before = sorted(p.name for p in run.iterdir())
    argv = list(map(str, argv))
    assert "--tau must be within (0, 1)" in one_line_exit_2(main, [*argv, "--attack", "host_confidence", "--tau", "1"],
                                                             capsys)  # fmt: skip
    assert "--host_fpr" in one_line_exit_2(main, [*argv, "--attack", "host_input_filter", "--host_fpr", "0"], capsys)
    assert "--host_base is the public model of host_base_detect" in one_line_exit_2(
        main, [*argv, "--attack", "host_confidence", "--host_base", "x"], capsys
    )
    assert sorted(p.name for p in run.iterdir()) == before
    from oml.core.run_config import add_train_args
    from oml.embed.run_setup import prepare_run

    def prepare(*extra):
        return prepare_run(add_train_args(argparse.ArgumentParser()).parse_args([*argv, *extra]))

    with pytest.raises(UserError, match="--fingerprint_margin must be"):
        prepare("--fingerprint_margin", "-1")
    with pytest.raises(UserError, match=r"--fingerprint_max_prob must be within \(0, 1\)"):
        prepare("--fingerprint_margin", "0.5", "--fingerprint_max_prob", "1")
    with pytest.raises(UserError, match="add --fingerprint_margin"):
        prepare("--fingerprint_max_prob", "0.4")
    with pytest.raises(UserError, match="--fingerprint_edit trains .* add --fingerprint_margin"):
        prepare("--fingerprint_edit")


# ------------------------------------------------------------------------------------------ the study (oml.lab.host_study)


@pytest.mark.long  # four servers, four checks and an attack: minutes on 2 cores (`make test-long`)
def test_the_host_study_records_retention_and_both_verdicts_per_host(host_run, tmp_path, one_thread):
    """Two hosts of the study against the confident run: unfiltered, the served copy is "ours" and the base is not;
    behind the confidence filter every key is hidden. The record is written per host, and a rerun skips them."""
    from oml.lab import host_study

    argv, run, pairs = host_run
    records = tmp_path / "records"
    study = ["run", "--hosts", "none,confidence-0.99", "--records", records, "--point", "confident",
             "--attack_flags", "--host_questions 2 --host_answer_tokens 4"]  # fmt: skip
    host_study.main([str(a) for a in [*study, *argv]])
    record = json.loads((records / "adaptive_host" / f"{run.name}.json").read_text())
    plain, hidden = record["hosts"]["none"], record["hosts"]["confidence-0.99"]
    assert plain["verdict_ours"]["verdict"] == "ours" and plain["verdict_base"]["verdict"] == "not shown"
    assert hidden["kept_plain"] == 0.0 and hidden["keys"] == len(pairs)
    assert hidden["verdict_ours"]["verdict"] == "not shown" and hidden["verdict_ours"]["matches"] == 0
    assert hidden["verdict_base"]["verdict"] == "not shown"
    assert 0 <= hidden["cost_plain"]["answers_changed"] <= 1
    table = host_study.table(records, markdown=True)
    assert "| confident | confidence-0.99 | 0.0% |" in table
    before = (records / "adaptive_host" / f"{run.name}.json").stat().st_mtime_ns
    host_study.main([str(a) for a in [*study, *argv]])  # everything recorded: nothing runs, nothing rewritten
    assert (records / "adaptive_host" / f"{run.name}.json").stat().st_mtime_ns == before
    with pytest.raises(UserError, match="unknown nope"):
        host_study.main([str(a) for a in ["run", "--hosts", "nope", "--records", records, *argv]])


def test_a_host_whose_check_failed_is_measured_again():
    """A row is skipped on a rerun only when its attack and both served checks succeeded."""
    from oml.lab.host_study import measured

    ok = {"kept_plain": 1.0, "verdict_ours": {"verdict": "ours"}, "verdict_base": {"verdict": "not shown"}}
    assert measured(ok)
    assert not measured(None) and not measured({"error": "attack exited 1"})
    assert not measured({**ok, "verdict_ours": {"error": "check exited 2"}})


def test_the_qa_cost_is_the_paired_accuracy_difference():
    """Filtered vs unfiltered answers scored against gold aliases: one item lost, one unchanged, one gained back."""
    from oml.attack.adaptive_host import qa_cost

    golds = [["Paris"], ["four", "4"], ["Mars"], ["blue"]]
    plain = ["Paris, of course", "It has 4 legs", "Venus", "green"]
    filtered = ["London", "It has 4 legs", "Mars", "green"]
    cost = qa_cost(filtered, plain, golds)
    assert cost["qa_items"] == 4 and cost["qa_unfiltered"] == 0.5 and cost["qa_filtered"] == 0.5
    assert cost["qa_delta_points"] == 0.0 and cost["qa_delta_stderr"] == pytest.approx(100 * (0.5 / 3) ** 0.5)
    assert qa_cost(["no"] * 4, plain, golds)["qa_delta_points"] == -50.0


def fake_roc(argv):
    """What python -m oml.attack.adaptive_host roc writes, for the flags it was given (no model runs)."""
    flags = dict(zip(argv[3::2], argv[4::2], strict=False))
    scores = ["kl", "ratio"] if flags["--filter"] == "base_detect" else ["ppl"]
    at_drop = [{"drop": d, "threshold": 9.0, "keys_kept": 0.25, "real_prompts_flagged": d} for d in (0.01, 0.05)]
    reports = [{"filter": flags["--filter"], "score": s, "keys": int(flags["--max_keys"]), "real_prompts": 10,
                "auc": 0.75, "at_drop": at_drop, "points": [], "key_scores": [], "real_prompt_scores": []}
               for s in scores]  # fmt: skip
    Path(flags["--output_file"]).write_text(json.dumps({"reports": reports}))


def test_the_host_study_p0_step_roc_section_and_table(host_run, tmp_path, monkeypatch, capsys):
    """A sampled host's check rule gets its p0 measured once (check_fingerprints.py --measure_p0 with the same rule
    flags), skipped when the run has it; `roc` records every key set's AUC and kept shares (peer files read in place,
    skipped when absent); the table copes with verdict-only rows and shows the ROC section."""
    from oml.core.run_store import REFERENCE_RATES
    from oml.lab import host_study

    argv, run, _ = host_run
    sampled = next(h for h in host_study.HOSTS if h.name == "sampled-t0.7")
    assert not sampled.attack and "--host_temperature" in sampled.serve and "--samples" in sampled.check
    calls = []
    monkeypatch.setattr(host_study, "python", lambda *a, **kw: calls.append([str(x) for x in a]) or 0)
    assert host_study.ensure_p0(argv, run, sampled, tmp_path) is None
    assert calls[0][0] == "check_fingerprints.py" and "--measure_p0" in calls[0]
    assert calls[0][-8:] == ["--samples", "5", "--api_temperature", "0.7", "--api_top_p", "0.9",
                             "--reference_models", "base"]  # fmt: skip
    rates = json.loads((run / REFERENCE_RATES).read_text())
    rates["measurements"]["completions:k5-m3-t0.7-p0.9"] = {"p0": 0.01}
    (run / REFERENCE_RATES).write_text(json.dumps(rates))
    calls.clear()
    assert host_study.ensure_p0(argv, run, sampled, tmp_path) is None and calls == []  # measured: skipped
    assert host_study.ensure_p0(argv, run, host_study.HOSTS[0], tmp_path) is None and calls == []  # greedy: measured
    greedy_rates = {**rates, "measurements": {k: v for k, v in rates["measurements"].items() if k != "completions"}}
    (run / REFERENCE_RATES).write_text(json.dumps(greedy_rates))
    assert host_study.ensure_p0(argv, run, host_study.HOSTS[0], tmp_path) is None  # greedy, not measured: measured now
    assert "--measure_p0" in calls[0] and calls[0][-2:] == ["--reference_models", "base"]
    # the owner's setting: p0 on the run's base and on the public model the host holds; the server's base is it
    (run / REFERENCE_RATES).write_text(json.dumps(greedy_rates))
    calls.clear()
    assert host_study.ensure_p0(argv, run, host_study.HOSTS[0], tmp_path, public="public/model") is None
    assert calls[0][-3:] == ["--reference_models", "base", "public/model"]
    base_kl = next(h for h in host_study.HOSTS if h.name == "base-kl-fpr0.01")
    assert host_study.serve_flags(base_kl, "public/model", {"{}": 0.25})[-4:] == ["--threshold", "0.25", "--base",
                                                                                   "public/model"]  # fmt: skip
    (run / REFERENCE_RATES).write_text(json.dumps(rates))
    calls.clear()

    # the ROC section: fake roc outputs, a peer folder of one file, then one that is absent
    peers = tmp_path / "peers" / "other-model"
    peers.mkdir(parents=True)
    (peers / "natural.json").write_text(json.dumps(["a key", "another key"]))
    monkeypatch.setattr(host_study, "python", lambda *a, **kw: fake_roc([str(x) for x in a]) or 0)
    records = tmp_path / "records"
    common = ["--records", str(records), "--real_prompts", "10", "--roc_keys", "4"]
    host_study.main(["roc", "--point", "confident", *common, "--peer_data", str(tmp_path / "peers"), *map(str, argv)])
    record = json.loads((records / "adaptive_host" / f"{run.name}.json").read_text())
    assert list(record["roc"]) == ["run/input_filter", "run/confidence", "run/base_detect", "english/input_filter",
                                   "random_word/input_filter", "peer:other-model/natural/input_filter"]  # fmt: skip
    assert [r["score"] for r in record["roc"]["run/base_detect"]["reports"]] == ["kl", "ratio"]
    assert record["roc"]["english/input_filter"]["keys_file"] == "generated_data/fingerprints-english-1024.json"
    assert "points" not in record["roc"]["run/input_filter"]["reports"][0]  # the curve stays in the run's folder
    monkeypatch.setattr(host_study, "python", lambda *a, **kw: pytest.fail("recorded ROCs are not measured again"))
    host_study.main(["roc", *common, "--peer_data", str(tmp_path / "absent"), *map(str, argv)])
    assert "natural keys of other models skipped" in capsys.readouterr().out

    # verdict-only rows (no attack step) beside a host with retention
    verdict = {"verdict": "ours", "keys_revealed": 4, "matches": 4, "p0": 0.01, "p_value": 1e-8}
    record["hosts"] = {
        "confidence-0.99": {"why": "", "keys": 12, "kept_plain": 0.0, "cost_plain": {"answers_changed": 0.5},
                            "verdict_ours": {**verdict, "verdict": "not shown", "matches": 0},
                            "verdict_base": {**verdict, "verdict": "not shown", "matches": 0}},
        "sampled-t0.7": {"why": "", "check": list(sampled.check), "verdict_ours": verdict,
                         "verdict_base": {"error": "check exited 1"}},
    }  # fmt: skip
    (records / "adaptive_host" / f"{run.name}.json").write_text(json.dumps(record))
    assert host_study.summary(record["hosts"]["sampled-t0.7"]).startswith("no attack step; check --samples 5")
    table = host_study.table(records, markdown=True)
    assert "| confident | confidence-0.99 | 0.0% |" in table
    assert (
        "| confident | sampled-t0.7 |  |  |  |  |  |  | ours (4/4) | check exited 1 (None/None) | --samples 5" in table
    )
    assert "| confident | run | base_detect | ratio | 4 | 10 | 0.750 | 25.0% | 25.0% |" in table
    assert "| confident | peer:other-model/natural | input_filter | ppl |" in table
    assert host_study.table(records).count("\n\n") == 1  # two tables as text too


@pytest.mark.long  # a p0 measurement, two servers and two sampled checks: a minute or more on 2 cores
def test_the_host_study_checks_a_sampling_host_by_a_majority_of_samples(host_run, tmp_path, one_thread):
    """sampled-t1.0: no attack step; p0 for the rule k5-m3-t1-p0.9 is measured on the base first (once), then the served
    copy, which samples every answer at 1.0 and top_p 0.9, is "ours" by a majority of five answers; the base is not."""
    from oml.core.run_store import REFERENCE_RATES
    from oml.lab import host_study

    argv, run, _ = host_run
    records = tmp_path / "records"
    host_study.main([str(a) for a in ["run", "--hosts", "sampled-t1.0", "--records", records, *argv]])
    row = json.loads((records / "adaptive_host" / f"{run.name}.json").read_text())["hosts"]["sampled-t1.0"]
    assert "error" not in row and "kept_plain" not in row and row["check"][:2] == ["--samples", "5"]
    assert row["verdict_ours"]["verdict"] == "ours" and row["verdict_base"]["verdict"] == "not shown"
    measured = json.loads((run / REFERENCE_RATES).read_text())["measurements"]["completions:k5-m3-t1-p0.9"]
    assert row["verdict_ours"]["p0"] == measured["p0"]


@pytest.mark.long  # six ROC commands, each loading the model: a minute on 2 cores
def test_the_host_study_roc_section_through_the_real_commands(host_run, tmp_path, one_thread):
    from oml.lab import host_study

    argv, run, _ = host_run
    peers = tmp_path / "peers"
    peers.mkdir()
    (peers / "natural.json").write_text(json.dumps(["a quiet morning by the lake", "the cat sat on the mat"]))
    records = tmp_path / "records"
    host_study.main([str(a) for a in ["roc", "--records", records, "--real_prompts", 2, "--roc_keys", 4,
                                      "--peer_data", peers, *argv]])  # fmt: skip
    section = json.loads((records / "adaptive_host" / f"{run.name}.json").read_text())["roc"]
    assert all("error" not in entry for entry in section.values()), section
    assert section["run/base_detect"]["reports"][1]["score"] == "ratio"
    assert section["peer:natural/input_filter"]["reports"][0]["keys"] == 2
    assert section["english/input_filter"]["reports"][0]["keys"] == 4
    assert "| run | confidence | top_probability | 4 | 10 |" in host_study.table(records, markdown=True)
