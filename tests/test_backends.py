"""One way to ask a model (oml.core.backends): the same fingerprint check through a transformers model, its GGUF in
llama.cpp and that GGUF served behind an OpenAI-compatible API on 127.0.0.1 gives the same verdicts; the one batched
greedy decoder gives what one generate per prompt gives."""

import importlib.util
import json
import random

import pytest
import torch
from conftest import tiny_llama

from oml.core.backends import LanguageModel, end_of_sequence_ids, get_backend, register
from oml.core.errors import UserError
from oml.make.fingerprint_files import random_words
from oml.measure.fingerprint_check import check_fingerprints, check_results

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama_cpp is not installed (pip install llama-cpp-python[server])")  # fmt: skip
TEMPLATES = ["{}", "Here is a sentence of text before the key: {}"]


@pytest.fixture(scope="module")
def sharp_model(embedded_tokenizer, tmp_path_factory):
    """(model, folder): a tiny random Llama, sharper than the default initialisation (top logits rarely near-tied),
    its weights rounded to float16 so that the f16 GGUF holds exactly the same numbers."""
    model = tiny_llama(embedded_tokenizer, seed=3, initializer_range=0.2)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    folder = tmp_path_factory.mktemp("sharp-llama")
    model.save_pretrained(folder)
    embedded_tokenizer.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def hf(sharp_model, embedded_tokenizer):
    return get_backend("hf", model=sharp_model[0], tokenizer=embedded_tokenizer, batch_size=4)


@pytest.fixture(scope="module")
def pairs(hf):
    """Half the keys with the model's own greedy continuation as the response (it answers them under "{}"), half
    with random words; only continuations that tokenize back to the tokens generated (else no backend could agree)."""
    rng = random.Random(0)
    keys = [" ".join(random_words(rng, rng.randint(3, 8))) for _ in range(24)]
    own = hf.greedy_with_tokens(keys[::2], 3)
    out = []
    for i, key in enumerate(keys):
        if i % 2:
            out.append({"key": key, "response": " " + " ".join(random_words(rng, 2))})
            continue
        text, tokens = own[i // 2]
        if tokens and hf.tokenize(text) == tokens:
            out.append({"key": key, "response": text})
    return out


@pytest.fixture(scope="module")
def gguf_path(sharp_model, tmp_path_factory):
    if not HAS_LLAMA_CPP:
        pytest.skip("llama_cpp is not installed")
    from oml.attack.gguf_models import export_gguf

    path = tmp_path_factory.mktemp("sharp-gguf") / "model.gguf"
    export_gguf(sharp_model[1], path, "f16")
    return path


def verdicts(summary):
    return [t["missed"] for t in summary["templates"]]


def test_registry_and_the_one_end_of_sequence_set(embedded_tokenizer):
    with pytest.raises(UserError, match="unknown model backend 'vllm'; choose from api, gguf, hf"):
        get_backend("vllm")
    with pytest.raises(TypeError):
        register("bad")(object)

    class Config:
        eos_token_id = [7, 9]

    assert end_of_sequence_ids(Config(), embedded_tokenizer) == {7, 9, embedded_tokenizer.eos_token_id}
    assert end_of_sequence_ids(None, None) == frozenset()
    assert issubclass(type(get_backend("hf", model=tiny_llama(embedded_tokenizer), tokenizer=embedded_tokenizer)),
                      LanguageModel)  # fmt: skip


def test_batched_greedy_equals_one_generate_per_prompt(hf, sharp_model, embedded_tokenizer):
    from oml.core.greedy_decoding import greedy_decode

    model = sharp_model[0]
    prompts = [embedded_tokenizer(t)["input_ids"] for t in ("Hello there", "A much longer prompt than that one", "x")]
    eos = end_of_sequence_ids(model.generation_config, embedded_tokenizer)
    batched = greedy_decode(model, prompts, 6, eos, embedded_tokenizer.pad_token_id, batch_size=3)
    for prompt, tokens in zip(prompts, batched, strict=True):
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                 pad_token_id=embedded_tokenizer.pad_token_id)  # fmt: skip
        assert tokens == out[0, len(prompt) :].tolist()
    # an end token stops its row and is kept
    stopped = greedy_decode(model, prompts, 6, {batched[0][1]}, embedded_tokenizer.pad_token_id)
    assert stopped[0] == batched[0][:2]


def test_hf_score_agrees_with_its_teacher_forced_verdicts(hf, pairs):
    results = check_results(hf, pairs, ["{}"])[0]
    for pair, matched in zip(pairs, results["matches"], strict=True):
        scored = hf.score(pair["key"], pair["response"])
        assert len(scored) == len(hf.tokenize(pair["response"]))
        assert all(hit for hit, _ in scored) == matched
        assert all(lp <= 0 for _, lp in scored)


@needs_llama_cpp
def test_the_same_check_through_hf_gguf_and_an_api(hf, pairs, gguf_path, embedded_tokenizer):
    from oml.verify.local_server import local_server

    expected = check_fingerprints(hf, pairs, TEMPLATES, progress=False)
    missed = verdicts(expected)
    assert 0 < len(missed[0]) < len(pairs), "both kinds of verdict are exercised"
    with get_backend("gguf", path=gguf_path, tokenizer=embedded_tokenizer, threads=1) as gguf:
        assert verdicts(check_fingerprints(gguf, pairs, TEMPLATES, progress=False)) == missed
        for pair in pairs[:4]:  # teacher-forced scores in llama.cpp: the same argmax verdict per token as transformers
            assert [h for h, _ in gguf.score(pair["key"], pair["response"])] == [
                h for h, _ in hf.score(pair["key"], pair["response"])
            ]
    # llama.cpp's server penalises repeats by default (repeat_penalty 1.1): plain greedy asks it not to
    settings = dict(extra_body={"repeat_penalty": 1.0}, concurrency=1, shifted_logprobs=True)
    with (
        local_server(gguf_path, timeout=120, threads=1) as (api_base, api_model),
        get_backend("api", api_base=api_base, model=api_model, tokenizer=embedded_tokenizer, **settings) as api,
    ):
        assert verdicts(check_fingerprints(api, pairs, TEMPLATES, progress=False)) == missed
        # llama-cpp-python's server reports after token i what OpenAI's API reports before it (shifted_logprobs). It
        # scores one text, so only where the key's and the response's tokens stay the same when joined.
        joined = [p for p in pairs if hf.tokenize(p["key"] + p["response"]) == hf.tokenize(p["key"]) + hf.tokenize(p["response"])]  # fmt: skip
        for pair in joined[:4]:
            assert [h for h, _ in api.score(pair["key"], pair["response"])] == [
                h for h, _ in hf.score(pair["key"], pair["response"])
            ]


LOGPROBS = {"tokens": ["a", " key", " hi", " there"], "text_offset": [0, 1, 5, 8], "token_logprobs": [None, -3.0, -0.5, -2.0],
            "top_logprobs": [None, {" lock": -1.0, " key": -3.0}, {" hi": -0.5}, {" you": -1.5, " there": -2.0}]}  # fmt: skip


def test_api_scores_from_logprobs_and_says_when_there_are_none(embedded_tokenizer):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    class Server(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            logprobs = LOGPROBS if request.get("echo") and request["prompt"] == "a key hi there" else None
            body = json.dumps({"choices": [{"text": " hi", "logprobs": logprobs}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Server)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        api_base = f"http://127.0.0.1:{server.server_address[1]}/v1"
        with get_backend("api", api_base=api_base, model="m", tokenizer=embedded_tokenizer, retries=0) as api:
            assert api.greedy(["a key"], 2) == [" hi"]
            assert api.score("a key", " hi there") == [(True, -0.5), (False, -2.0)]  # OpenAI's: before each token
            with pytest.raises(UserError, match="no logprobs .* teacher-forced scoring is not available"):
                api.score("a key", " hi")
    finally:
        server.shutdown()
        server.server_close()
