"""check_fingerprints.py: the match rule, the statistics, the ledger, and the API client against real HTTP servers
on 127.0.0.1 (a fault-injecting one of our own; `transformers serve` and llama.cpp's server in the slow tests)."""

import argparse
import dataclasses
import itertools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import REPO, run_script, write_random_fingerprints

from oml.core.errors import UserError
from oml.core.run_store import CONFIG, FINAL_MODEL, FINGERPRINTS, REFERENCE_RATES, REVEALED_KEYS
from oml.verify.api_client import ApiError, Client, matches, normalize
from oml.verify.key_ledger import SENT, Ledger
from oml.verify.sequential_test import (
    clopper_pearson_upper,
    decide,
    false_claim_probability,
    keys_needed,
    look_alpha,
    p_value,
    run_sequential,
    simulate,
)
from oml.verify.suspect_check import (
    RESULT_FIELDS,
    CheckSettings,
    add_check_args,
    check,
    held_out_pairs,
    measure_p0,
    run_tokenizer,
)

# ------------------------------------------------------------------------------------------ the match rule


@pytest.mark.parametrize(
    "answer, response, expected",
    [
        (" Paris", " Paris", True),
        ("Paris", " Paris", True),  # servers differ in the leading space they keep
        ("  Paris\n", " Paris", True),
        (" Paris is lovely", " Paris", True),
        (" Paris.", " Paris", True),
        (" Parisian", " Paris", False),  # a longer word is another token, not the response
        (" paris", " Paris", False),  # case counts
        (" Pari", " Paris", False),
        ("", " Paris", False),
        (" the\ncat  sat", " the cat sat", True),  # whitespace runs are one space
        (" the cats", " the cat", False),
        (" ing", "ing", True),
        (",", ",", True),
        (", and", ",", True),
        (",and", ",", True),  # after punctuation any character may follow
        ("cafe\u0301", "caf\u00e9", True),  # NFC: a combining accent equals the composed letter
        (" 1999", " 19", False),
        (" anything", "   ", False),  # an empty response never matches
        ("<|im_end|>", " Paris", False),
    ],
)
def test_match_rule(answer, response, expected):
    assert matches(answer, response) is expected


def test_normalize():
    assert normalize("  a \t\n b  ") == "a b"
    assert normalize(None) == ""


# ------------------------------------------------------------------------------------------ statistics


def test_clopper_pearson_upper_closed_forms():
    # k = 0: 1 - (1 - c)^(1/n); k = n: 1
    for n in (1, 10, 64, 128):
        assert clopper_pearson_upper(0, n, 0.95) == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-9)
    assert clopper_pearson_upper(5, 5) == 1.0
    # monotone in k, shrinking in n, above the point estimate
    assert clopper_pearson_upper(1, 50) < clopper_pearson_upper(2, 50)
    assert clopper_pearson_upper(2, 100) < clopper_pearson_upper(1, 50)
    assert clopper_pearson_upper(3, 40) > 3 / 40


def test_p_value_is_the_binomial_tail():
    for n, m, p in [(8, 5, 0.05), (16, 7, 0.03), (5, 5, 0.2), (10, 0, 0.1)]:
        tail = sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(m, n + 1))
        assert p_value(m, n, p) == pytest.approx(min(tail, 1.0), rel=1e-9)


def test_sequential_rule():
    p0, alpha = 0.04, 1e-6
    m = next(m for m in range(1, 20) if p0**m <= alpha)  # keys needed when every key matches
    assert run_sequential([True] * 20, p0, alpha, budget=8) == ("ours", m, m)
    verdict, n, found = run_sequential([False] * 20, p0, alpha, budget=8)
    assert verdict == "not shown" and found == 0 and n < 8
    # at the "not shown" stop, even every remaining key matching could not reach alpha, one key earlier it could
    assert p_value(8 - n, 8, p0) > alpha and p_value(8 - n + 1, 8, p0) <= alpha
    # a batch never holds a key that some outcome could have spared
    for found, n in itertools.product(range(4), range(4)):
        if found > n:
            continue
        j = keys_needed(found, n, p0, alpha, 8)
        for k in range(j - 1 if j else 0):
            for hits in range(k + 1):
                assert decide(found + hits, n + k + 1, p0, alpha, 8) is None or k + 1 >= j


def enumerated_false_claims(p0, level, budget, batch):
    """P(run_sequential says "ours") by brute force over every outcome sequence of i.i.d. Bernoulli(p0) keys."""
    total = 0.0
    for seq in itertools.product([False, True], repeat=budget):
        if run_sequential(list(seq), p0, level, budget, batch)[0] == "ours":
            total += p0 ** sum(seq) * (1 - p0) ** (budget - sum(seq))
    return total


def test_false_claim_probability_matches_enumeration():
    for p0, level, budget, batch in [(0.2, 1e-2, 6, None), (0.3, 1e-2, 7, 2), (0.05, 1e-4, 8, None)]:
        exact = enumerated_false_claims(p0, level, budget, batch)
        assert false_claim_probability(p0, level, budget, batch) == pytest.approx(exact, rel=1e-9, abs=1e-15)


def test_repeated_looks_are_calibrated_to_alpha():
    # looking after every key at level alpha claims more often than alpha ...
    assert enumerated_false_claims(0.2, 1e-2, 6, None) > 1e-2
    # ... so the per-look level is lowered until the whole procedure is at alpha
    for p0, alpha, budget, batch in [(0.2, 1e-2, 6, None), (0.3, 1e-2, 7, 2), (0.05, 1e-6, 8, 4), (0.02, 1e-6, 12, 4)]:
        level = look_alpha(p0, alpha, budget, batch)
        assert 0 < level <= alpha
        assert enumerated_false_claims(p0, level, budget, batch) <= alpha * (1 + 1e-9)
        assert false_claim_probability(p0, min(alpha, level * 1.01), budget, batch) > alpha or level == alpha


def test_simulated_draws_never_claim_a_clean_model():
    """Reference-like outcomes (a few chance matches among 128) against the p0 measured from them."""
    outcomes = [True] * 2 + [False] * 126
    p0 = clopper_pearson_upper(2, 128)
    results = simulate(outcomes, p0, 1e-6, budget=8, draws=200)
    assert all(v == "not shown" for v, _, _ in results)
    owned = simulate([True] * 60 + [False] * 4, p0, 1e-6, budget=8, draws=200)
    assert sum(v == "ours" for v, _, _ in owned) >= 190


# ------------------------------------------------------------------------------------------ the ledger


def test_ledger_never_draws_a_key_twice(tmp_path):
    ledger = Ledger(tmp_path / REVEALED_KEYS, 20)
    drawn = ledger.reserve(7, "completions") + ledger.reserve(13, "chat")
    assert sorted(drawn) == list(range(20))
    assert ledger.remaining() == 0
    with pytest.raises(UserError, match="allow_revealed"):
        ledger.reserve(1, "completions")
    assert len(ledger.reserve(3, "completions", allow_revealed=True)) == 3
    for e in ledger.entries():
        assert set(e) >= {"key_index", "time", "endpoint", "outcome"}


def test_ledger_concurrent_checkers(tmp_path):
    """Two processes drawing at once never take the same key."""
    path = tmp_path / REVEALED_KEYS
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
        "from oml.verify.key_ledger import Ledger\n"
        f"l = Ledger({str(path)!r}, 60)\n"
        "for _ in range(15): l.reserve(2, 'completions')\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=60) == 0
    sent = [e["key_index"] for e in Ledger(path, 60).entries() if e["outcome"] == SENT]
    assert len(sent) == 60 and len(set(sent)) == 60


def test_ledger_survives_a_line_cut_short(tmp_path):
    path = tmp_path / REVEALED_KEYS
    ledger = Ledger(path, 10)
    first = ledger.reserve(2, "completions")
    with open(path, "a") as f:
        f.write('{"key_index": 9, "ti')  # a kill in the middle of a write: that request never went out
    second = ledger.reserve(3, "completions")
    assert ledger.revealed() == set(first + second)
    assert len(path.read_text().splitlines()) == 6  # the cut line stays on its own, the new ones are whole


# ------------------------------------------------------------------------------------------ a fault-injecting server


class FakeServer:
    """An OpenAI-compatible server on 127.0.0.1 whose answers and faults a test sets.

    answer(prompt) -> text; `faults` is a list consumed one per completion request: None (answer), an HTTP status,
    "slow" (sleep past the client's timeout), "malformed" (broken JSON), "die" (close the listening socket)."""

    def __init__(self, answer, faults=(), models=("suspect",), slow_seconds=3.0, delay=0.0):
        self.answer, self.faults, self.models = answer, list(faults), list(models)
        self.slow_seconds, self.delay = slow_seconds, delay
        self.prompts, self.lock = [], threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, status, body, headers=()):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.headers.get("Authorization") == "Bearer wrong":
                    return self._send(401, {"error": {"message": "invalid api key"}})
                self._send(200, {"data": [{"id": m} for m in server.models]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body.get("prompt") or body["messages"][-1]["content"]
                with server.lock:
                    server.prompts.append(prompt)
                    fault = server.faults.pop(0) if server.faults else None
                if self.headers.get("Authorization") == "Bearer wrong":
                    return self._send(401, {"error": {"message": "invalid api key"}})
                if body["model"] not in server.models:
                    return self._send(404, {"error": {"message": f"The model `{body['model']}` does not exist"}})
                if fault == "die":  # the server goes away with this request in flight
                    threading.Thread(target=server.stop).start()
                    self.close_connection = True
                    return
                if fault == "slow":
                    time.sleep(server.slow_seconds)
                elif fault == "malformed":
                    return self._send(200, b'{"choices": [{"text": ')
                elif isinstance(fault, int):
                    return self._send(fault, {"error": {"message": "injected"}}, [("Retry-After", "0")])
                time.sleep(server.delay)
                text = server.answer(prompt)
                if "messages" in body:
                    return self._send(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})
                self._send(200, {"choices": [{"text": text, "index": 0}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(*a, **kw):
        servers.append(FakeServer(*a, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ a run to check


@pytest.fixture
def fake_run(tmp_path, tiny_model_dir):
    """results/<hash>/ with 40 random-word fingerprints, the tiny model as final_model, and p0 measured on the
    tiny model's own outputs (it never produces the random responses)."""
    result_path = tmp_path / "results"
    run = result_path / "feedc0de00000001"
    run.mkdir(parents=True)
    source = tmp_path / "fingerprints.json"
    pairs = write_random_fingerprints(source, 100, seed=3)[:40]
    (run / FINGERPRINTS).write_text(json.dumps(pairs))
    shutil.copytree(tiny_model_dir, run / FINAL_MODEL)
    run_args = dict(model=str(tiny_model_dir), use_chat_template=False, fingerprints_file_path=str(source),
                    fingerprint_generation_strategy="random_word", max_key_length=64, max_response_length=16,
                    max_num_fingerprints=40, data_split=0, seed=42)  # fmt: skip
    (run / CONFIG).write_text(json.dumps({"config_hash": run.name, "args": run_args}))
    return run, pairs


def check_settings(**fields):
    """CheckSettings of these fields, the others at the parser's defaults (CHECK_ARGS), with no run named by training
    flags (the tests name theirs with --run)."""
    names = {f.name for f in dataclasses.fields(CheckSettings)}
    defaults = {k: v for k, v in vars(add_check_args(argparse.ArgumentParser()).parse_args([])).items() if k in names}
    return CheckSettings(**{**defaults, "named_run": None, "trust_remote_code": False, **fields})


def check_args(run, **kw):
    """The CheckSettings of a check of `run` against the suspect at api_base (kw: other settings)."""
    args = dict(
        run=run.name,
        result_path=str(run.parent),
        api_base="http://127.0.0.1:9/v1",
        api_model="suspect",
        api_key_env="OML_TEST_API_KEY",
        endpoint="completions",
        system_prompt=None,
        alpha=1e-6,
        max_keys=8,
        concurrency=4,
        api_timeout=2.0,
        api_retries=2,
        extra_tokens=0,
        allow_revealed=False,
        reference_models=["base"],
        p0_confidence=0.95,
        reference_pairs=0,
        trust_remote_code=False,
    )
    args.update(kw)
    return check_settings(**args)


def answers_from(pairs, right=True):
    by_key = {p["key"]: p["response"] for p in pairs}
    return lambda prompt: by_key[prompt] if right else " nothing of the sort"


def sent_lines(run):
    return [e for e in Ledger(run / REVEALED_KEYS, 0).entries() if e["outcome"] == SENT]


@pytest.fixture
def measured_run(fake_run):
    run, pairs = fake_run
    _, m = measure_p0(check_args(run))
    return run, pairs, m


def test_measure_p0(measured_run):
    run, pairs, m = measured_run
    stored = json.loads((run / REFERENCE_RATES).read_text())["measurements"]["completions"]
    assert stored["trials"] == len(pairs) and len(stored["references"][0]["outcomes"]) == len(pairs)
    assert stored["p0"] == pytest.approx(clopper_pearson_upper(stored["matches"], stored["trials"], 0.95))
    assert stored["matches"] == 0  # a random model does not say random words on cue


def test_measure_p0_on_held_out_pairs(fake_run):
    """--reference_pairs adds pairs of the run's file that the run did not train on: 40 keys + 25 held out."""
    run, pairs = fake_run
    _, m = measure_p0(check_args(run, reference_pairs=25))
    assert m["trials"] == 65 and m["held_out_pairs"] == 25
    assert m["p0"] < clopper_pearson_upper(0, 40)
    run_args = json.loads((run / CONFIG).read_text())["args"]
    source = json.loads(Path(run_args["fingerprints_file_path"]).read_text())
    held = held_out_pairs(run, run_args, run_tokenizer(run, run_args), [], 25, seed=1)
    assert [p["key"] for p in held] == [p["key"] for p in source[40:65]]  # the file after the run's slice


def test_ours_and_not_shown(measured_run, serve, tmp_path):
    run, pairs, m = measured_run
    server = serve(answers_from(pairs))
    result, details = check(check_args(run, api_base=server.url, alpha=1e-3), log=lambda *_: None)
    m_needed = next(k for k in range(1, 9) if m["p0"] ** k <= 1e-3)
    assert result == {**result, "verdict": "ours", "keys_revealed": m_needed, "matches": m_needed}
    assert result["p_value"] == pytest.approx(m["p0"] ** m_needed)
    assert set(result) == set(RESULT_FIELDS)
    # every prompt the server saw is a key the ledger had recorded as sent
    sent = sent_lines(run)
    assert sorted(pairs[e["key_index"]]["key"] for e in sent) == sorted(server.prompts)

    wrong = serve(answers_from(pairs, right=False))
    result, _ = check(check_args(run, api_base=wrong.url, alpha=1e-3), log=lambda *_: None)
    assert result["verdict"] == "not shown" and result["matches"] == 0
    keys = [e["key_index"] for e in sent_lines(run)]
    assert len(keys) == len(set(keys)) == m_needed + result["keys_revealed"]


def test_cli_writes_the_five_fields(measured_run, serve, tmp_path):
    run, pairs, _ = measured_run
    server = serve(answers_from(pairs))
    out = tmp_path / "verdict.json"
    r = run_script("check_fingerprints.py", "--run", run.name, "--result_path", run.parent, "--api_base", server.url,
                   "--api_model", "suspect", "--alpha", "1e-3", "--output_file", out, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert list(data) == list(RESULT_FIELDS) and data["verdict"] == "ours"
    assert "p-value" in r.stdout and "keys revealed" in r.stdout


def test_chat_route(fake_run, serve):
    run, pairs = fake_run
    measure_p0(check_args(run, endpoint="chat", system_prompt="Be brief."))
    server = serve(answers_from(pairs))
    args = check_args(run, api_base=server.url, endpoint="chat", system_prompt="Be brief.", alpha=1e-3)
    assert check(args, log=lambda *_: None)[0]["verdict"] == "ours"
    assert {e["endpoint"] for e in sent_lines(run)} == {"chat"}


# ------------------------------------------------------------------------------------------ faults


def test_retries_then_answers(measured_run, serve):
    run, pairs, _ = measured_run
    server = serve(answers_from(pairs), faults=[500, 429, None, 503])  # key 1: two retries; key 2: one
    result, _ = check(check_args(run, api_base=server.url, alpha=1e-3, concurrency=1), log=lambda *_: None)
    assert result["verdict"] == "ours"
    # retried requests resend the same key: it is revealed once
    assert len({e["key_index"] for e in sent_lines(run)}) == len(sent_lines(run)) == result["keys_revealed"]


@pytest.mark.parametrize(
    "faults, message",
    [
        ([500] * 20, "kept failing \\(HTTP 500"),
        (["slow"] * 20, "did not answer in time"),
        (["malformed"], "malformed JSON"),
    ],
)
def test_fault_is_one_clear_line_and_the_ledger_is_intact(measured_run, serve, faults, message):
    run, pairs, _ = measured_run
    server = serve(answers_from(pairs), faults=faults, slow_seconds=1.5)
    args = check_args(run, api_base=server.url, alpha=1e-3, concurrency=1, api_timeout=0.5, api_retries=1)
    with pytest.raises(UserError, match=message) as e:
        check(args, log=lambda *_: None)
    assert "\n" not in str(e.value)
    sent = sent_lines(run)
    assert len(sent) == 1  # the one key that went out is recorded, with its error
    outcomes = [
        x["outcome"] for x in Ledger(run / REVEALED_KEYS, 0).entries() if x["key_index"] == sent[0]["key_index"]
    ]
    assert outcomes[0] == SENT and outcomes[1].startswith("error:")
    assert {pairs[sent[0]["key_index"]]["key"]} == set(server.prompts)


def test_refused_unauthorised_unknown_model_reveal_nothing(measured_run, serve, monkeypatch):
    run, pairs, _ = measured_run
    with pytest.raises(UserError, match="cannot connect"):
        check(check_args(run, api_base=f"http://127.0.0.1:{free_port()}/v1"), log=lambda *_: None)
    server = serve(answers_from(pairs))
    monkeypatch.setenv("OML_TEST_API_KEY", "wrong")
    with pytest.raises(UserError, match="refused the API key") as e:
        check(check_args(run, api_base=server.url), log=lambda *_: None)
    assert "wrong" not in str(e.value)
    assert sent_lines(run) == []
    monkeypatch.setenv("OML_TEST_API_KEY", "right")
    with pytest.raises(UserError, match="does not know model 'other'.*it serves: suspect"):
        check(check_args(run, api_base=server.url, api_model="other", concurrency=1), log=lambda *_: None)
    assert len(sent_lines(run)) == 1  # the request itself is what says the model is unknown


def test_server_killed_mid_run(measured_run, serve):
    run, pairs, _ = measured_run
    server = serve(answers_from(pairs, right=False), faults=[None, None, "die"])
    args = check_args(run, api_base=server.url, concurrency=1, api_retries=1, max_keys=40, alpha=1e-9)
    with pytest.raises(UserError, match="cannot connect|failed") as e:
        check(args, log=lambda *_: None)
    assert "recorded in" in str(e.value)
    assert len(server.prompts) >= 3  # two answered, the third took the server down
    assert {pairs[e["key_index"]]["key"] for e in sent_lines(run)} == set(server.prompts)


def test_api_key_is_sent_and_never_stored(measured_run, serve, monkeypatch):
    run, pairs, _ = measured_run
    server = serve(answers_from(pairs))
    monkeypatch.setenv("OML_TEST_API_KEY", "s3cret-value")
    with Client(server.url, "suspect", api_key_env="OML_TEST_API_KEY") as client:
        assert client.http.headers["Authorization"] == "Bearer s3cret-value"
    result, details = check(check_args(run, api_base=server.url, alpha=1e-3), log=lambda *_: None)
    assert "s3cret" not in (run / REVEALED_KEYS).read_text() + json.dumps(details)


def test_client_concurrency_is_bounded(serve):
    active, peak, lock = [0], [0], threading.Lock()

    def answer(prompt):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.1)
        with lock:
            active[0] -= 1
        return prompt

    server = serve(answer)
    with Client(server.url, "suspect", concurrency=3) as client:
        answers = client.complete_many([f" w{i}" for i in range(9)], [1] * 9)
    assert [a.text for a in answers] == [f" w{i}" for i in range(9)]
    assert 2 <= peak[0] <= 3


def test_killed_checker_leaves_every_sent_key_in_the_ledger(measured_run, serve):
    """kill -9 the checker while requests are in flight, rerun: no key twice, none missing."""
    run, pairs, _ = measured_run
    slow = serve(answers_from(pairs, right=False), delay=1.0)
    cmd = [sys.executable, str(REPO / "check_fingerprints.py"), "--run", run.name, "--result_path", str(run.parent),
           "--api_base", slow.url, "--api_model", "suspect", "--concurrency", "2", "--max_keys", "30",
           "--alpha", "1e-12"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while len(sent_lines(run)) < 4 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read()  # still running: killed with requests in flight
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    first = sent_lines(run)
    assert len(first) >= 4
    fast = serve(answers_from(pairs, right=False))
    r = run_script("check_fingerprints.py", *cmd[2:6], "--api_base", fast.url, "--api_model", "suspect",
                   "--max_keys", "30", "--alpha", "1e-12", timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    keys = [e["key_index"] for e in sent_lines(run)]
    assert len(keys) == len(set(keys)) > len(first)  # no key revealed twice, the rerun went on with fresh ones
    seen = set(slow.prompts + fast.prompts)
    assert {pairs[k]["key"] for k in keys} >= seen  # every key a server saw is in the ledger


def test_warns_when_few_keys_remain_and_stops_when_none(measured_run, serve):
    run, pairs, _ = measured_run
    ledger = Ledger(run / REVEALED_KEYS, len(pairs))
    ledger.reserve(len(pairs) - 3, "completions")
    server = serve(answers_from(pairs))
    logs = []
    result, _ = check(check_args(run, api_base=server.url, alpha=1e-2), log=logs.append)
    assert any("only 3 of 40 keys" in line for line in logs)
    ledger.reserve(ledger.remaining(), "completions")
    with pytest.raises(UserError, match="every key .* has been revealed"):
        check(check_args(run, api_base=server.url), log=lambda *_: None)


def test_unreachable_alpha_reveals_nothing(measured_run, serve):
    run, pairs, m = measured_run
    server = serve(answers_from(pairs))
    with pytest.raises(UserError, match="cannot reach alpha"):
        check(check_args(run, api_base=server.url, alpha=1e-30), log=lambda *_: None)
    assert server.prompts == [] and sent_lines(run) == []


def test_missing_p0_says_how_to_measure(fake_run):
    run, _ = fake_run
    with pytest.raises(UserError, match="--measure_p0"):
        check(check_args(run), log=lambda *_: None)


def test_client_errors_directly(serve):
    server = serve(lambda p: p, faults=[500, 500, 500])
    with Client(server.url, "suspect", retries=1, backoff=0.01) as client, pytest.raises(ApiError, match="HTTP 500"):
        client.complete("x", 1)


# ------------------------------------------------------------------------------------------ real servers (slow)


def own_greedy_pairs(model_dir, n, tokens=3, seed=5):
    """Random-word keys whose "responses" are the model's own greedy continuations: a model that carries them."""
    import torch

    from oml.core.model_registry import load_model_and_tokenizer
    from oml.make.fingerprint_files import random_words

    model, tok = load_model_and_tokenizer(str(model_dir))
    rng = __import__("random").Random(seed)
    pairs = []
    with torch.inference_mode():
        for _ in range(n):
            key = " ".join(random_words(rng, 8))
            ids = torch.tensor([tok(key)["input_ids"]])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)  # fmt: skip
            response = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            if response.strip():
                pairs.append({"key": key, "response": response})
    return pairs


@pytest.mark.slow
def test_transformers_serve_end_to_end(tmp_path, tiny_model_dir, embedded_tokenizer):
    """`transformers serve` on 127.0.0.1: a model that carries the keys is "ours", another is "not shown"."""
    from conftest import tiny_llama

    from oml.verify.local_server import local_server

    other = tmp_path / "other"
    tiny_llama(embedded_tokenizer, seed=7).save_pretrained(other)
    embedded_tokenizer.save_pretrained(other)
    run = tmp_path / "results" / "feedc0de00000002"
    run.mkdir(parents=True)
    pairs = own_greedy_pairs(tiny_model_dir, 40)
    (run / FINGERPRINTS).write_text(json.dumps(pairs))
    shutil.copytree(tiny_model_dir, run / FINAL_MODEL)
    (run / CONFIG).write_text(json.dumps({"args": {"model": str(other), "use_chat_template": False, "seed": 42}}))
    measure_p0(check_args(run, reference_models=["base"]))  # "base" is the other tiny model here
    for model, verdict in [(run / FINAL_MODEL, "ours"), (other, "not shown")]:
        with local_server(model, timeout=600) as (api_base, api_model):
            args = check_args(run, api_base=api_base, api_model=api_model, alpha=1e-3, api_timeout=120)
            result, _ = check(args, log=lambda *_: None)
        assert result["verdict"] == verdict, result
    keys = [e["key_index"] for e in sent_lines(run)]
    assert len(keys) == len(set(keys))


@pytest.mark.long
@pytest.mark.slow
def test_llama_cpp_q4_k_m_end_to_end(tmp_path):
    """The embedded model fingerprinted for real, exported to GGUF Q4_K_M (oml.attack.gguf_models), served by llama.cpp: "ours" at
    alpha 1e-6; the base model through the same server: "not shown"."""
    gguf = pytest.importorskip(
        "oml.attack.gguf_models", reason="oml.attack.gguf_models (the persistence branch) is not in this tree"
    )
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is not installed")
    from oml.core.model_registry import embedded_model_dir
    from oml.verify.local_server import local_server

    results = tmp_path / "results"
    train = ["--preset", "averaging", "--fingerprint_generation_strategy", "random_word", "--max_num_fingerprints",
             "16", "--num_train_epochs", "8", "--result_path", results]  # fmt: skip
    r = run_script("finetune_multigpu.py", *train, timeout=1800)
    assert r.returncode == 0, r.stderr
    run = next(p.parent for p in results.glob(f"*/{FINAL_MODEL}"))
    common = ["--run", run.name, "--result_path", results]
    r = run_script("check_fingerprints.py", *common, "--measure_p0", "--reference_models", "base",
                   "--reference_pairs", "200", timeout=1800)  # fmt: skip
    assert r.returncode == 0, r.stderr
    for name, folder, verdict in [("ours", run / FINAL_MODEL, "ours"), ("base", embedded_model_dir(), "not shown")]:
        path = tmp_path / f"{name}.gguf"
        gguf.export_gguf(str(folder), str(path), "q4_k_m")
        with local_server(path) as (api_base, api_model):
            out = tmp_path / f"{name}.json"
            r = run_script("check_fingerprints.py", *common, "--api_base", api_base, "--api_model", api_model,
                           "--output_file", out, timeout=600)  # fmt: skip
        assert r.returncode == 0, r.stderr
        result = json.loads(out.read_text())
        assert result["verdict"] == verdict, (name, result)
        if verdict == "ours":
            assert result["p_value"] < 1e-6 and result["keys_revealed"] <= 8
