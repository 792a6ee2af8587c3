"""oml.verify.commitment and oml.verify.claims: the salted Merkle root written at training, the claim a check writes, and checking
a claim without trusting the owner (every field tampered with is caught; --replay against a served tiny model)."""

import copy
import hashlib
import json
import shutil
import stat
import subprocess
import sys
import threading
from argparse import Namespace

import pytest
from conftest import REPO, run_script, tiny_llama, write_random_fingerprints
from test_check import FakeServer, check_args, own_greedy_pairs, sent_lines

from oml.core.errors import UserError
from oml.core.run_config import HASHED
from oml.core.run_store import CONFIG, FINAL_MODEL, FINGERPRINTS, RunIdentity, write_run
from oml.verify import claims as oml_claim
from oml.verify import commitment as cm
from oml.verify.suspect_check import check, measure_p0

ALPHA = 1e-3

# ------------------------------------------------------------------------------------------ the tree


def spec_root(salts, pairs, n, rule, base):
    """The root as the docstring of oml/verify/commitment.py defines it, written out again independently."""

    def h(b):
        return hashlib.sha256(b).digest()

    def lp(b):
        b = b.encode() if isinstance(b, str) else b
        return len(b).to_bytes(8, "big") + b

    nodes = [
        h(b"\x00" + lp(bytes.fromhex(s)) + lp(p["key"]) + lp(p["response"])) for s, p in zip(salts, pairs, strict=True)
    ]
    while len(nodes) > 1:
        pairs_up = [h(b"\x01" + nodes[i] + nodes[i + 1]) for i in range(0, len(nodes) - 1, 2)]
        nodes = pairs_up + ([nodes[-1]] if len(nodes) % 2 else [])
    return h(b"\x02" + lp("oml-commitment-v1") + n.to_bytes(8, "big") + lp("sha256") + lp(rule) + lp(base) + nodes[0])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 13])
def test_every_leaf_proves_its_own_position_and_nothing_else(n):
    pairs = [{"key": f"key {i} ü", "response": f" r{i}"} for i in range(n)]
    salts = cm.new_salts(n)
    root, tree = cm.build(pairs, salts, cm.MATCH_RULE, "base")
    assert root == spec_root(salts, pairs, n, cm.MATCH_RULE, "base")
    for i, (s, p) in enumerate(zip(salts, pairs, strict=True)):
        leaf = cm.leaf_hash(s, p["key"], p["response"])
        path = cm.proof(tree, i)
        assert cm.verify_proof(root, i, n, leaf, path, cm.MATCH_RULE, "base")
        for j in set(range(n)) - {i}:
            assert not cm.verify_proof(root, j, n, leaf, path, cm.MATCH_RULE, "base")  # no key at two positions
        assert not cm.verify_proof(root, i, n + 1, leaf, path, cm.MATCH_RULE, "base")  # the count is bound
        assert not cm.verify_proof(root, i, n, leaf, path, cm.MATCH_RULE, "other base")
        assert not cm.verify_proof(root, i, n, cm.leaf_hash(s, p["key"], " x"), path, cm.MATCH_RULE, "base")
        assert not cm.verify_proof(root, i, n, leaf, path + [leaf.hex()], cm.MATCH_RULE, "base")
    with pytest.raises(UserError, match="unknown hash function"):
        cm.verify_proof(root, 0, n, b"", [], cm.MATCH_RULE, "base", "md5")


def test_fields_are_length_prefixed():
    """Moving a character between key and response, or between salt and key, changes the leaf."""
    salt = "00" * 16
    assert cm.leaf_hash(salt, "ab", "c") != cm.leaf_hash(salt, "a", "bc")
    assert cm.leaf_hash(salt, "a", "") != cm.leaf_hash(salt, "", "a")
    assert len({cm.leaf_hash(s, "k", "r") for s in cm.new_salts(50)}) == 50  # fresh salts, distinct leaves


# ------------------------------------------------------------------------------------------ at training


def test_write_run_commits_and_the_model_folder_holds_only_the_root(tmp_path, tiny_model_dir, embedded_tokenizer):
    pairs = write_random_fingerprints(tmp_path / "fps.json", 6, seed=11)
    args = Namespace(**{name: None for name in HASHED})
    args.__dict__.update(model="tiny-base", result_path=str(tmp_path / "results"), config_hash="c0ffee0000000001")
    run = tmp_path / "results" / args.config_hash
    root = cm.write_commitment(run, pairs, args.model)  # as `oml train` does, before the run is written
    identity = RunIdentity.from_args(args)
    write_run(
        identity,
        vars(args),
        pairs,
        {},
        tiny_llama(embedded_tokenizer),
        embedded_tokenizer,
        {},
        card=cm.model_card(root),
    )
    record = json.loads((run / cm.COMMITMENT).read_text())
    salts = json.loads((run / cm.SALTS).read_text())["salts"]
    assert record["leaves"] == 6 and record["hash"] == "sha256" and record["made"] == "at training"
    assert record["match_rule"] == cm.MATCH_RULE and record["base_model"] == "tiny-base"
    assert len(set(salts)) == 6 and all(len(bytes.fromhex(s)) == 16 for s in salts)
    assert record["root"] == spec_root(salts, pairs, 6, cm.MATCH_RULE, "tiny-base").hex()
    assert stat.S_IMODE((run / cm.SALTS).stat().st_mode) == 0o600
    card = (run / FINAL_MODEL / "README.md").read_text()
    assert record["root"] in card
    blobs = [p.read_bytes() for p in (run / FINAL_MODEL).rglob("*") if p.is_file()]
    secrets = [p["key"] for p in pairs] + [p["response"] for p in pairs] + salts
    assert not [s for s in secrets if any(s.encode() in b for b in blobs)]
    assert not list((run / FINAL_MODEL).rglob("*commitment*"))
    cm.read_commitment(run, pairs)  # consistent
    with pytest.raises(UserError, match="do not give the root"):
        cm.read_commitment(run, pairs[::-1])


# ------------------------------------------------------------------------------------------ a served tiny model


def model_answers(model_dir, tokens=3):
    """answer(prompt): the model's greedy continuation, as own_greedy_pairs made the responses (one at a time)."""
    import torch

    from oml.core.model_registry import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(model_dir))
    lock = threading.Lock()

    def answer(prompt):
        with lock, torch.inference_mode():
            ids = torch.tensor([tok(prompt)["input_ids"]])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)  # fmt: skip
            return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    return answer


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, embedded_tokenizer):
    """A run whose keys the tiny model carries (responses = its own greedy continuations), committed, p0 measured on
    another tiny model (the run's "base"); both models served on 127.0.0.1; and one "ours" check's claim."""
    import torch

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("claims")
    other = tmp / "other"
    tiny_llama(embedded_tokenizer, seed=7).save_pretrained(other)
    embedded_tokenizer.save_pretrained(other)
    run = tmp / "results" / "feedc0de000000c1"
    run.mkdir(parents=True)
    pairs = own_greedy_pairs(tiny_model_dir, 40)
    (run / FINGERPRINTS).write_text(json.dumps(pairs))
    shutil.copytree(tiny_model_dir, run / FINAL_MODEL)
    (run / CONFIG).write_text(json.dumps({"args": {"model": str(other), "use_chat_template": False, "seed": 42}}))
    measure_p0(check_args(run))
    root = cm.write_commitment(run, pairs, str(other))
    ours, theirs = FakeServer(model_answers(tiny_model_dir)), FakeServer(model_answers(other))
    path = tmp / "claim.json"
    result, _ = check(check_args(run, api_base=ours.url, alpha=ALPHA, claim_file=str(path)), log=lambda *_: None)
    assert result["verdict"] == "ours"
    yield Namespace(run=run, pairs=pairs, root=root, ours=ours, theirs=theirs, claim=path, tmp=tmp, result=result)
    ours.stop()
    theirs.stop()


def load(path):
    return json.loads(path.read_text())


def test_the_claim_of_a_real_check(world):
    claim = load(world.claim)
    assert claim["root"] == world.root and claim["complete"] and claim["verdict"] == "ours"
    assert {k: claim[k] for k in world.result if k in claim} == {k: world.result[k] for k in world.result if k in claim}
    for e in claim["entries"]:
        assert set(e) >= {"key_index", "key", "response", "salt", "proof", "answer", "match", "endpoint", "time",
                          "request", "batch"}  # fmt: skip
        assert e["key"] == world.pairs[e["key_index"]]["key"] and e["request"]["prompt"] == e["key"]
        assert e["request"]["temperature"] == 0 and e["request"]["max_tokens"] >= 1 and e["match"] is True
    # the keys in the claim are exactly those the ledger recorded and the server saw
    assert sorted(e["key_index"] for e in claim["entries"]) == sorted(e["key_index"] for e in sent_lines(world.run))
    assert sorted(e["key"] for e in claim["entries"]) == sorted(world.ours.prompts)
    assert claim["p0_measurement"]["references"][0]["keys"] == len(world.pairs)
    assert "outcomes" not in json.dumps(claim["p0_measurement"])
    assert claim["sequential"] == {**claim["sequential"], "budget": 8, "batch": 4, "max_keys": 8}


def test_a_claim_verifies_with_and_without_replay(world, capsys):
    oml_claim.main(["verify", str(world.claim), "--root", world.root])
    out = capsys.readouterr().out
    assert "verdict       ours" in out and "reproduced" in out and "replay" not in out
    oml_claim.main(["verify", str(world.claim), "--root", world.root.upper(), "--replay", world.ours.url])
    out = capsys.readouterr().out
    n = load(world.claim)["keys_revealed"]
    assert f"{n} of {n} answers reproduced exactly" in out and "verdict       ours" in out


def test_replay_fails_where_the_suspect_answers_otherwise(world):
    with pytest.raises(UserError, match=r"replay: key_index \d+: .* now answers .*match=False.*match=True"):
        oml_claim.replay(load(world.claim), world.theirs.url)
    # an answer changed to another that still matches passes every offline check, and fails the replay
    claim = load(world.claim)
    claim["entries"][0]["answer"] += " and more"
    oml_claim.verify(claim, world.root)
    with pytest.raises(UserError, match="replay: key_index"):
        oml_claim.replay(claim, world.ours.url)
    assert "reproduced" in oml_claim.replay(claim, world.ours.url, exact=False)


def other_entry(world, claim, answer=None):
    """A genuine entry (its salt and proof are right) for a key the check did not send."""
    salts = json.loads((world.run / cm.SALTS).read_text())["salts"]
    _, tree = cm.build(world.pairs, salts, cm.MATCH_RULE, claim["commitment"]["base_model"])
    used = {e["key_index"] for e in claim["entries"]}
    i = next(i for i in range(len(world.pairs)) if i not in used)
    entry = copy.deepcopy(claim["entries"][-1])
    p = world.pairs[i]
    entry.update(key_index=i, key=p["key"], response=p["response"], salt=salts[i], proof=cm.proof(tree, i),
                 answer=p["response"] if answer is None else answer, match=answer is None)  # fmt: skip
    entry["request"] = {**entry["request"], "prompt": p["key"]}
    return entry


def _set(path, value):
    def tamper(claim, world):
        *parents, last = path
        obj = claim
        for name in parents:
            obj = obj[name]
        obj[last] = value(obj[last]) if callable(value) else value

    return tamper


def _flip(hex_text):
    return ("0" if hex_text[0] != "0" else "1") + hex_text[1:]


TAMPERS = {
    "key": (_set(["entries", 0, "key"], lambda k: k + " "), "is not under root"),
    "response": (_set(["entries", 0, "response"], lambda r: r + "x"), "is not under root"),
    "salt": (_set(["entries", 0, "salt"], _flip), "is not under root"),
    "proof": (_set(["entries", 0, "proof", 0], _flip), "is not under root"),
    "short proof": (_set(["entries", 0, "proof"], lambda p: p[:-1]), "is not under root"),
    "key_index": (_set(["entries", 0, "key_index"], lambda i: (i + 1) % 40), "is not under root|counted twice"),
    "leaves": (_set(["commitment", "leaves"], 41), "is not under root"),
    "base_model": (_set(["commitment", "base_model"], "someone/else"), "is not under root"),
    "match_rule": (_set(["commitment", "match_rule"], "substring-v0"), "unknown match rule"),
    "hash": (_set(["commitment", "hash"], "md5"), "unknown hash function 'md5'"),
    "root": (_set(["root"], lambda r: _flip(r)), "the claim is for root"),
    "answer": (_set(["entries", 0, "answer"], " nothing like it"), "records match=True but rule"),
    "match": (_set(["entries", 0, "match"], False), "records match=False but rule"),
    "twice": (lambda c, w: c["entries"].append(copy.deepcopy(c["entries"][0])), "key_index \\d+ is counted twice"),
    "p0": (_set(["p0"], lambda p: p / 2), "p0 .* does not reproduce"),
    "p0 trials": (_set(["p0_measurement", "trials"], lambda n: n * 2), "p0 .* does not reproduce"),
    "p0 route": (_set(["p0_measurement", "endpoint"], "chat"), "measured on the chat route"),
    "smaller alpha": (_set(["alpha"], ALPHA / 10), "alpha 0.0001 does not reproduce"),
    "larger alpha": (_set(["alpha"], ALPHA * 10), "alpha 0.01 does not reproduce"),
    "look_alpha": (_set(["sequential", "look_alpha"], lambda a: a * 0.5), "does not reproduce"),
    "budget": (_set(["sequential", "budget"], 20), "does not reproduce|batch 1 holds"),
    "batch": (_set(["sequential", "batch"], 1), "does not reproduce|batch 1 holds"),
    "p_value": (_set(["p_value"], lambda p: p / 10), "p-value .* does not reproduce"),
    "verdict": (_set(["verdict"], "not shown"), "verdict 'not shown' is not the rule's"),
    "counts": (_set(["matches"], lambda m: m + 1), "the claim says"),
    "dropped key": (lambda c, w: c["entries"].pop(), "batch \\d+ holds|the claim says"),
    "route": (_set(["entries", 0, "endpoint"], "chat"), "went to the chat route"),
    "prompt": (_set(["entries", 0, "request", "prompt"], "another prompt"), "does not carry its key"),
    "key after the stop": (
        lambda c, w: c["entries"].append({**other_entry(w, c), "batch": c["entries"][-1]["batch"] + 1}),
        "sent after the verdict was decided",
    ),  # fmt: skip
    "batch order": (lambda c, w: c["entries"].__setitem__(0, {**c["entries"][0], "batch": 9}), "batch numbers"),
    "not a number": (_set(["alpha"], "0.001"), "field 'alpha' is missing or not"),
}


@pytest.mark.parametrize("name", list(TAMPERS))
def test_every_tampered_field_is_rejected_in_one_line(world, name):
    tamper, message = TAMPERS[name]
    claim = load(world.claim)
    oml_claim.verify(claim, world.root)  # the untouched claim passes
    tamper(claim, world)
    with pytest.raises(UserError, match=message) as e:
        oml_claim.verify(claim, world.root)
    assert "\n" not in str(e.value)


def test_the_command_line_exit_status_and_bad_input(world, tmp_path):
    bad = tmp_path / "bad.json"
    claim = load(world.claim)
    claim["entries"][0]["response"] += "!"
    bad.write_text(json.dumps(claim))
    (tmp_path / "broken.json").write_text('{"root": ')
    (tmp_path / "list.json").write_text("[]")
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv, status, text in [([world.claim], 0, "verdict       ours"), ([bad], 2, "is not under root")]:
        r = subprocess.run([sys.executable, "-m", "oml.verify.claims", "verify", *map(str, argv), "--root", world.root],
                           cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert r.returncode == status, (argv, r.stderr)
        if status:
            assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1 and text in r.stderr
        else:
            assert text in r.stdout
    for argv, text in [
        ([tmp_path / "broken.json", "--root", world.root], "is not valid JSON"),
        ([tmp_path / "list.json", "--root", world.root], "is not a JSON object"),
        ([tmp_path / "missing.json", "--root", world.root], "cannot read claim"),
        ([world.claim, "--root", world.root[:-2]], "64 hex digits"),
        ([world.claim, "--root", "g" * 64], "64 hex digits"),
        ([world.claim, "--root", world.root, "--alpha", "1e-6"], "above the --alpha"),
    ]:
        with pytest.raises(UserError, match=text) as e:
            oml_claim.main(["verify", *map(str, argv)])
        assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_check_cli_writes_a_claim_the_verifier_accepts(world, tmp_path):
    """check_fingerprints.py --claim_file, then `python -m oml.verify.claims verify --replay`, both as a user runs them; a
    second check may not overwrite the claim."""
    out = tmp_path / "claim.json"
    common = ["--run", world.run.name, "--result_path", world.run.parent, "--api_base", world.ours.url,
              "--api_model", "suspect", "--alpha", ALPHA, "--claim_file", out]  # fmt: skip
    r = run_script("check_fingerprints.py", *common, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"claim written to {out}" in r.stdout
    v = subprocess.run([sys.executable, "-m", "oml.verify.claims", "verify", str(out), "--root", world.root, "--replay",
                        world.ours.url], cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert v.returncode == 0, v.stderr
    assert "verdict       ours" in v.stdout and "answers reproduced exactly" in v.stdout
    sent = len(sent_lines(world.run))
    with pytest.raises(UserError, match="exists"):
        check(check_args(world.run, api_base=world.ours.url, alpha=ALPHA, claim_file=str(out)), log=lambda *_: None)
    assert len(sent_lines(world.run)) == sent  # refused before anything was sent


def test_a_not_shown_check_is_a_valid_claim_too(world, tmp_path):
    path = tmp_path / "theirs.json"
    result, _ = check(check_args(world.run, api_base=world.theirs.url, alpha=ALPHA, claim_file=str(path)),
                      log=lambda *_: None)  # fmt: skip
    assert result["verdict"] == "not shown"
    summary = oml_claim.verify(load(path), world.root)
    assert summary["verdict"] == "not shown" and summary["matches"] == result["matches"]
    oml_claim.replay(load(path), world.theirs.url)


def test_a_check_killed_midway_leaves_a_valid_claim(world, tmp_path, monkeypatch):
    """Killed after its first batch went out (the answers never came back): the claim lists those keys, unanswered;
    a server fault in a batch: the claim holds that batch's answers and the failed key."""
    from oml.verify.api_client import Client

    path = tmp_path / "killed.json"

    def killed(self, prompts, max_tokens):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Client, "complete_many", killed)
        with pytest.raises(KeyboardInterrupt):
            check(check_args(world.run, api_base=world.ours.url, alpha=ALPHA, claim_file=str(path)), log=print)
    claim = load(path)
    assert not claim["complete"] and claim["entries"] and all(e["answer"] is None for e in claim["entries"])
    ledger = {e["key_index"] for e in sent_lines(world.run)}
    assert {e["key_index"] for e in claim["entries"]} <= ledger
    summary = oml_claim.verify(claim, world.root)
    assert summary["verdict"] == "undecided" and summary["revealed"] == len(claim["entries"]) and summary["keys"] == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    wrong = FakeServer(lambda p: " no", faults=[None, "malformed"])
    try:
        path2 = tmp_path / "fault.json"
        args = check_args(world.run, api_base=wrong.url, alpha=ALPHA, claim_file=str(path2))
        with pytest.raises(UserError, match="malformed"):
            check(args, log=lambda *_: None)
    finally:
        wrong.stop()
    claim = load(path2)
    assert [bool(e["error"]) for e in claim["entries"]].count(True) == 1 and claim["keys_revealed"] >= 1
    assert claim["keys_revealed"] == len(claim["entries"]) - 1 and claim["verdict"] is None
    assert oml_claim.verify(claim, world.root)["verdict"] == "undecided"


def test_a_run_without_commitment(world, tmp_path, capsys):
    """A run trained before commitments: --claim_file refuses before anything is sent and says how to make one;
    `python -m oml.verify.claims commit` makes one (after training), once."""
    run = world.run.parent / "feedc0de000000c2"
    shutil.copytree(world.run, run, ignore=shutil.ignore_patterns("commitment*", "revealed_keys*", FINAL_MODEL))
    server = FakeServer(lambda p: p)
    try:
        with pytest.raises(
            UserError, match="no commitment.json .*`python -m oml.verify.claims commit --run feedc0de000000c2"
        ):
            check(check_args(run, api_base=server.url, claim_file=str(tmp_path / "c.json")), log=lambda *_: None)
        assert server.prompts == [] and not (tmp_path / "c.json").exists() and sent_lines(run) == []
    finally:
        server.stop()
    oml_claim.main(["commit", "--run", run.name, "--result_path", str(run.parent)])
    out = capsys.readouterr().out
    record = load(run / cm.COMMITMENT)
    assert record["made"] == "after training" and record["root"] in out and "after training" in out
    assert record["base_model"] == load(run / CONFIG)["args"]["model"]
    cm.read_commitment(run, world.pairs)
    with pytest.raises(UserError, match="already has a commitment"):
        oml_claim.main(["commit", "--run", run.name, "--result_path", str(run.parent)])
    with pytest.raises(UserError, match="no run"):
        oml_claim.main(["commit", "--run", "nope", "--result_path", str(run.parent)])


# ------------------------------------------------------------------------------------------ licensees (--licensee, --trace)


def parse_train(*argv):
    import argparse

    from oml.core.run_config import add_train_args
    from oml.embed.run_setup import prepare_run

    return prepare_run(add_train_args(argparse.ArgumentParser()).parse_args(list(map(str, argv))))


def test_licensee_is_a_disjoint_slice_named_in_the_hash_only_when_set(tmp_path, tiny_model_dir):
    import shlex

    from oml.core.run_config import hashed_config
    from oml.core.run_store import run_command

    master = tmp_path / "master.json"
    write_random_fingerprints(master, 20, seed=4)
    common = ["--fingerprints_file_path", master, "--max_num_fingerprints", 5, "--model_path", tiny_model_dir]
    plain = parse_train(*common)
    assert "licensee" not in hashed_config(plain)  # runs recorded before --licensee keep their hash
    first, last = parse_train(*common, "--licensee", 0), parse_train(*common, "--licensee", 3)
    assert last.data_split == 3 and first.data_split == 0 and hashed_config(last)["licensee"] == 3
    assert len({plain.config_hash, first.config_hash, last.config_hash}) == 3
    # the command a run's record gives finds the same run again
    words = shlex.split(run_command(vars(last)))
    assert "--licensee" in words and parse_train(*words[2:]).config_hash == last.config_hash
    with pytest.raises(UserError, match="--licensee 4 is beyond .*20 fingerprints make 4 slices of 5"):
        parse_train(*common, "--licensee", 4)
    with pytest.raises(UserError, match="give one of them"):
        parse_train(*common, "--licensee", 2, "--data_split", 1)


@pytest.fixture
def licensees(tmp_path, tiny_model_dir):
    """Three licensees' runs cut from one master file (40 keys each), committed, p0 measured (stored directly)."""
    from oml.core.run_store import REFERENCE_RATES
    from oml.verify.sequential_test import clopper_pearson_upper

    master = tmp_path / "master.json"
    everything = write_random_fingerprints(master, 120, seed=9)
    runs = []
    for k in range(3):
        run = tmp_path / "results" / f"11cense0000000{k}0"
        run.mkdir(parents=True)
        pairs = everything[40 * k : 40 * (k + 1)]
        (run / FINGERPRINTS).write_text(json.dumps(pairs))
        run_args = dict(model=str(tiny_model_dir), use_chat_template=False, fingerprints_file_path=str(master),
                        max_num_fingerprints=40, data_split=k, licensee=k, seed=42)  # fmt: skip
        (run / CONFIG).write_text(json.dumps({"config_hash": run.name, "args": run_args}))
        p0 = clopper_pearson_upper(0, 200)
        m = {"endpoint": "completions", "system_prompt": None, "extra_tokens": 0, "held_out_pairs": 0, "matches": 0,
             "trials": 200, "rate": 0.0, "confidence": 0.95, "p0": p0, "time": "", "references": []}  # fmt: skip
        (run / REFERENCE_RATES).write_text(json.dumps({"measurements": {"completions": m}}))
        runs.append((run, pairs, cm.write_commitment(run, pairs, str(tiny_model_dir))))
    return runs


def serve_keys_of(pairs):
    by_key = {p["key"]: p["response"] for p in pairs}
    return FakeServer(lambda prompt: by_key.get(prompt, " something else entirely"))


def test_trace_names_the_licensee_whose_keys_the_suspect_carries(licensees, tmp_path):
    import argparse

    from oml.verify.suspect_check import add_check_args, format_result, write_result

    assert add_check_args(argparse.ArgumentParser()).parse_args(["--trace", "a", "b"]).trace == ["a", "b"]
    (r0, p0_, _), (r1, pairs1, root1), (r2, _, _) = licensees
    names = [r.name for r, _, _ in licensees]
    server = serve_keys_of(pairs1)
    try:
        args = check_args(r0, trace=names, alpha=ALPHA, api_base=server.url, claim_file=str(tmp_path / "claim.json"))
        result, details = check(args, log=lambda *_: None)
        nobody = serve_keys_of([])
        try:
            none, _ = check(check_args(r0, trace=names, alpha=ALPHA, api_base=nobody.url), log=lambda *_: None)
        finally:
            nobody.stop()
    finally:
        server.stop()
    assert result["verdict"] == f"licensee 1 (run {r1.name})" and result["named"] == [r1.name]
    assert [c["verdict"] for c in result["candidates"]] == ["not shown", "ours", "not shown"]
    assert result["candidate_alpha"] == pytest.approx(ALPHA / 3) and none["verdict"] == "not shown"
    # each run's keys went to its own ledger, none twice; each run's claim verifies under its own root
    for run, _, root in licensees:
        sent = sent_lines(run)
        assert len(sent) == len({e["key_index"] for e in sent}) > 0
        claim = load(tmp_path / f"claim.{run.name}.json")
        assert claim["alpha"] == pytest.approx(ALPHA / 3) and claim["trace"]["runs"] == names
        assert oml_claim.verify(claim, root)["verdict"] == ("ours" if run == r1 else "not shown")
    ledgers = [pairs[e["key_index"]]["key"] for run, pairs, _ in licensees for e in sent_lines(run)]
    assert sorted(ledgers) == sorted(server.prompts + nobody.prompts)  # every key a server saw, in its run's ledger
    assert "licensee 1" in format_result(result, details) and "Bonferroni" in format_result(result, details)
    write_result(tmp_path / "trace.json", result)
    assert load(tmp_path / "trace.json")["named"] == [r1.name]


def test_trace_bad_input_reveals_nothing(licensees, tmp_path, embedded_tokenizer):
    (r0, _, _), (r1, pairs1, _), (r2, _, _) = licensees
    config = load(r2 / CONFIG)
    config["args"]["model"] = "someone/else"
    (r2 / CONFIG).write_text(json.dumps(config))
    server = serve_keys_of(pairs1)
    try:
        for names, message in [
            ([r0.name, r1.name, r2.name], "must share a base model"),
            ([r0.name, r0.name], "names a run twice"),
            ([r0.name, "nope"], "no run 'nope'"),
        ]:
            with pytest.raises(UserError, match=message):
                check(check_args(r0, trace=names, alpha=ALPHA, api_base=server.url), log=lambda *_: None)
        (r1 / "reference_match_rates.json").unlink()  # the second run cannot be checked: the first sends nothing
        with pytest.raises(UserError, match="--measure_p0"):
            check(check_args(r0, trace=[r0.name, r1.name], alpha=ALPHA, api_base=server.url), log=lambda *_: None)
    finally:
        server.stop()
    assert server.prompts == [] and all(sent_lines(r) == [] for r, _, _ in licensees)
