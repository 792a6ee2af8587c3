"""Claims: the evidence a check leaves behind, and checking it without trusting the owner.

    ClaimWriter            check_fingerprints.py --claim_file PATH: every key the check reveals, with its salt and
                           Merkle path (oml/verify/commitment.py), the suspect's raw answer, the request exactly as sent,
                           p0 and how it was measured, alpha, the sequential rule's parameters and the verdict;
                           rewritten atomically before each batch goes out and after its answers come back
    verify(claim, root)    the claim against a root published at training: every path, every match, the
                           p-value, the sequential procedure and its false-claim probability
    replay(claim, ...)     the claim's revealed keys sent again to the suspect: do its answers reproduce?

Commands (docs/claims.md describes the formats):

    python -m oml.verify.claims commit --run HASH [--result_path results]      # a commitment for a run trained before them
    python -m oml.verify.claims verify CLAIM --root ROOT [--replay API_BASE [--api_model NAME]]

verify prints the verdict the claim supports (exit status 0, whatever the verdict), or one `error:` line saying
what is wrong and exit status 2: a key not under the root, a changed key, response, salt, answer or match, a key
counted twice, a p0 or alpha (per-look level) that does not reproduce, a batch the sequential rule would not have
sent, a verdict or p-value the recorded answers do not give, or (--replay) an answer the suspect does not give
again. Nothing is written.

A check with --trace writes one claim per candidate run, each at alpha / K (its `trace` field names the family);
each verifies on its own, against its run's root.

What a valid claim shows: the revealed keys and responses were fixed when the root was published (they are
under it, with salts nobody else knew), the suspect gave the recorded answers (checkable with --replay while it
is served), and under H0 (each key matches with probability at most p0) a check run this way says "ours" with
probability at most alpha. What it cannot show: that the owner ran no other checks and kept only this one
(the owner's ledger, revealed_keys.jsonl, lists every key ever sent), and that p0 was measured honestly (the
measurement's reference models are named; anyone can measure again).
"""

import argparse
import json
import math
import re
import time
from pathlib import Path

from oml.core.errors import UserError
from oml.verify.commitment import FORMAT as COMMITMENT_FORMAT
from oml.verify.commitment import HASH, build, leaf_hash, match_function, proof, read_commitment, verify_proof

CLAIM_FORMAT = "oml-claim-v1"
SEQUENTIAL_RULE = "oml-sequential-v1"  # oml.verify.sequential_test: decide / keys_needed batches at the per-look level
HEX64 = re.compile(r"[0-9a-f]{64}")
HEX32 = re.compile(r"[0-9a-f]{32}")
NUMBER = (int, float)


def now():
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ------------------------------------------------------------------------------------------ writing a claim


class ClaimWriter:
    """The claim of one check, rewritten (temporary name, then rename) at every step: a check killed at any
    moment leaves a valid claim over every key it sent, those without an answer marked unanswered."""

    def __init__(self, path, run, pairs, measurement, settings, level, budget, alpha, family=None):
        from oml.verify.sequential_test import false_claim_probability

        self.path = Path(path)
        if self.path.exists():
            raise UserError(f"claim file {self.path} exists; choose a new name (a claim records one check)")
        record, self.salts = read_commitment(run, pairs)  # before any key goes out
        _, self.tree = build(pairs, self.salts, record["match_rule"], record["base_model"])
        self.pairs, self.match = pairs, match_function(record["match_rule"])
        self.claim = {
            "format": CLAIM_FORMAT,
            "root": record["root"],
            "commitment": {k: record[k] for k in ("format", "hash", "leaves", "match_rule", "base_model", "made")},
            "run": Path(run).name,
            "suspect": {
                "api_base": settings.api_base,
                "api_model": settings.api_model,
                "endpoint": settings.endpoint,
                "system_prompt": settings.system_prompt,
            },  # fmt: skip
            "p0": measurement["p0"],
            "p0_source": f"{measurement['confidence']:.0%} Clopper-Pearson upper bound, {measurement['matches']} of "
            f"{measurement['trials']} reference trials matched",
            "p0_measurement": stored_measurement(measurement),
            "alpha": alpha,
            "sequential": {
                "rule": SEQUENTIAL_RULE,
                "max_keys": settings.max_keys,
                "budget": budget,
                "batch": settings.concurrency,
                "look_alpha": level,
                "false_claim": false_claim_probability(measurement["p0"], level, budget, settings.concurrency),
            },
            "entries": [],
            "keys_revealed": 0,
            "matches": 0,
            "p_value": 1.0,
            "verdict": None,
            "complete": False,
            "started": now(),
            "updated": None,
        }
        if family:  # --trace: this run's check is one of several, each at alpha / candidates (Bonferroni)
            self.claim["trace"] = family

    def sent(self, indices, bodies, endpoint, api_base):
        """Before a batch goes out: its keys, proofs and requests, unanswered."""
        batch = 1 + max((e["batch"] for e in self.claim["entries"]), default=0)
        for i, body in zip(indices, bodies, strict=True):
            self.claim["entries"].append({
                "key_index": i, "key": self.pairs[i]["key"], "response": self.pairs[i]["response"],
                "salt": self.salts[i], "proof": proof(self.tree, i), "batch": batch, "endpoint": endpoint,
                "api_base": api_base, "time": now(), "request": body,
                "answer": None, "error": None, "match": None, "answer_time": None,
            })  # fmt: skip
        self.write()

    def answered(self, answers):
        """After a batch: each answer exactly as returned (or the error), and its match under the rule."""
        for entry, answer in zip(self.claim["entries"][-len(answers) :], answers, strict=True):
            entry["answer_time"] = now()
            if answer.error:
                entry["error"] = answer.error
            else:
                entry["answer"] = answer.text
                entry["match"] = self.match(answer.text, entry["response"])
        self.write()

    def finish(self, result):
        self.claim.update({k: result[k] for k in ("keys_revealed", "matches", "p_value", "verdict")})
        self.claim["complete"] = True
        self.write()

    def write(self):
        from oml.core.files import atomic_write_json
        from oml.verify.sequential_test import p_value

        answered = [e for e in self.claim["entries"] if e["answer"] is not None]
        found = sum(bool(e["match"]) for e in answered)
        self.claim.update(keys_revealed=len(answered), matches=found,
                          p_value=p_value(found, len(answered), self.claim["p0"]), updated=now())  # fmt: skip
        atomic_write_json(self.path, self.claim)


def stored_measurement(measurement):
    """The reference-rate record (results/<hash>/reference_match_rates.json) without its per-key outcome lists."""
    out = {k: v for k, v in measurement.items() if k != "references"}
    out["references"] = [{k: v for k, v in r.items() if k != "outcomes"} for r in measurement.get("references", [])]
    return out


def open_claim(path, settings, run, pairs, measurement, level, budget, alpha, family=None):
    """A check's claim (None without a path); checks the run's commitment before anything is sent."""
    return ClaimWriter(path, run, pairs, measurement, settings, level, budget, alpha, family) if path else None


# ------------------------------------------------------------------------------------------ reading a claim


def read_claim(path):
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UserError(f"cannot read claim {path}: {e.strerror or e}") from None
    try:
        claim = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"claim {path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(claim, dict):
        raise UserError(f"claim {path} is not a JSON object")
    return claim


def parse_root(text):
    root = str(text).strip().lower()
    if not HEX64.fullmatch(root):
        raise UserError(f"--root must be 64 hex digits (a sha256 root), got {len(root)} characters: {text!r}")
    return root


def _field(obj, name, kind, where="claim"):
    value = obj.get(name) if isinstance(obj, dict) else None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if value is None or isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise UserError(f"{where} field {name!r} is missing or not a {'/'.join(k.__name__ for k in kinds)}")
    return value


def _close(a, b, rel=1e-9):
    return math.isclose(float(a), float(b), rel_tol=rel, abs_tol=1e-300)


# ------------------------------------------------------------------------------------------ verifying a claim


def verify(claim, root, max_alpha=None):
    """Check a claim against a root (hex) given by someone who does not trust the owner. Returns a summary dict;
    raises UserError with one line naming the first thing wrong."""
    from oml.verify.sequential_test import (
        clopper_pearson_upper,
        decide,
        false_claim_probability,
        keys_needed,
        look_alpha,
        p_value,
    )

    root = parse_root(root)
    commitment = _field(claim, "commitment", dict)
    hash_name = commitment.get("hash")
    if hash_name != HASH:
        raise UserError(f"unknown hash function {hash_name!r} in the claim's commitment (this checker knows {HASH})")
    if claim.get("format") != CLAIM_FORMAT or commitment.get("format") != COMMITMENT_FORMAT:
        raise UserError(
            f"the claim is {claim.get('format')!r} over {commitment.get('format')!r}; this checker reads "
            f"{CLAIM_FORMAT} over {COMMITMENT_FORMAT}"
        )
    n_leaves = _field(commitment, "leaves", int, "commitment")
    rule, base_model = (
        _field(commitment, "match_rule", str, "commitment"),
        _field(commitment, "base_model", str, "commitment"),
    )
    match = match_function(rule)
    claimed_root = str(claim.get("root", "")).lower()
    if claimed_root != root:
        raise UserError(f"the claim is for root {claimed_root[:16]}..., not the root given ({root[:16]}...)")
    suspect = _field(claim, "suspect", dict)
    endpoint = _field(suspect, "endpoint", str, "suspect")
    entries = _field(claim, "entries", list)

    # every key: under the root, once, with the match the rule gives
    seen_index, seen_key = {}, {}
    root_bytes = bytes.fromhex(root)
    for pos, e in enumerate(entries):
        where = f"entry {pos}"
        i = _field(e, "key_index", int, where)
        key, response = _field(e, "key", str, where), _field(e, "response", str, where)
        salt, path = _field(e, "salt", str, where), _field(e, "proof", list, where)
        _field(e, "batch", int, where)
        if i in seen_index:
            raise UserError(f"key_index {i} is counted twice (entries {seen_index[i]} and {pos})")
        if key in seen_key:
            raise UserError(f"key {key[:40]!r} is counted twice (key_index {seen_key[key]} and {i})")
        seen_index[i], seen_key[key] = pos, i
        if not HEX32.fullmatch(salt) or not all(isinstance(h, str) and HEX64.fullmatch(h) for h in path):
            raise UserError(f"key_index {i}: its salt or proof is not hex of the right length")
        leaf = leaf_hash(salt, key, response)
        if not verify_proof(root_bytes, i, n_leaves, leaf, path, rule, base_model, hash_name):
            raise UserError(
                f"key_index {i} is not under root {root[:16]}...: its key, response, salt or proof, or the "
                "commitment's leaves, match rule or base model, differ from what was committed"
            )
        if e.get("endpoint") != endpoint:
            raise UserError(f"key_index {i} went to the {e.get('endpoint')} route, the claim's check to {endpoint}")
        sent_prompt = request_prompt(_field(e, "request", dict, where), endpoint)
        if not isinstance(sent_prompt, str) or key not in sent_prompt:
            raise UserError(f"key_index {i}: the recorded request does not carry its key")
        answer = e.get("answer")
        if answer is None:
            if e.get("match") is not None:
                raise UserError(f"key_index {i} records a match but no answer")
            continue
        if not isinstance(answer, str):
            raise UserError(f"key_index {i}: the recorded answer is not text")
        if e.get("match") is not match(answer, response):
            raise UserError(
                f"key_index {i}: the claim records match={e.get('match')} but rule {rule} gives "
                f"{match(answer, response)} for its answer {answer[:40]!r} (a changed answer, response or match)"
            )

    # p0, alpha, and the sequential procedure
    p0 = _field(claim, "p0", NUMBER)
    m = _field(claim, "p0_measurement", dict)
    try:
        p0_again = clopper_pearson_upper(m["matches"], m["trials"], m["confidence"])
    except (KeyError, TypeError, ValueError):
        raise UserError("the claim's p0_measurement lacks matches, trials or confidence") from None
    if not (0 < p0 < 1) or not _close(p0, p0_again) or not _close(m.get("p0", -1), p0_again):
        raise UserError(
            f"p0 {p0:.6g} does not reproduce: its measurement ({m['matches']} of {m['trials']} reference trials, "
            f"{m['confidence']:.0%} upper bound) gives {p0_again:.6g}"
        )
    if m.get("endpoint") != endpoint:
        raise UserError(f"p0 was measured on the {m.get('endpoint')} route, the keys went to {endpoint}")
    alpha = _field(claim, "alpha", NUMBER)
    if not 0 < alpha < 1:
        raise UserError(f"alpha {alpha} is not within (0, 1)")
    seq = _field(claim, "sequential", dict)
    if seq.get("rule") != SEQUENTIAL_RULE:
        raise UserError(f"unknown sequential rule {seq.get('rule')!r} (this checker knows {SEQUENTIAL_RULE})")
    budget, batch = _field(seq, "budget", int, "sequential"), _field(seq, "batch", int, "sequential")
    level = _field(seq, "look_alpha", NUMBER, "sequential")
    if budget <= 0 or batch <= 0:
        raise UserError("the sequential rule's budget and batch must be positive")
    false_claim = false_claim_probability(p0, level, budget, batch)
    if level > alpha or false_claim > alpha * (1 + 1e-9):
        raise UserError(
            f"alpha {alpha:g} does not reproduce: at the recorded per-look level {level:.6g} the sequential check's "
            f"false-claim probability is {false_claim:.3g}"
        )
    level_again = look_alpha(p0, alpha, budget, batch)
    if not _close(level, level_again, 1e-6):
        raise UserError(
            f"alpha {alpha:g} does not reproduce: p0 {p0:.6g}, budget {budget} and batch {batch} give the per-look "
            f"level {level_again:.6g}, the claim records {level:.6g}"
        )

    # the batches, replayed through the sequential rule
    found = n = 0
    batches = [e.get("batch") for e in entries]
    if batches != sorted(batches) or sorted(set(batches)) != list(range(1, len(set(batches)) + 1)):
        raise UserError("the entries' batch numbers are not 1, 2, 3, ... in order")
    unanswered = 0
    for b in sorted(set(batches)):
        group = [e for e in entries if e["batch"] == b]
        if unanswered:
            raise UserError(f"batch {b} was sent after a batch that got no answer")
        if decide(found, n, p0, level, budget) is not None:
            raise UserError(f"batch {b} was sent after the verdict was decided (keys added after the stop)")
        step = min(keys_needed(found, n, p0, level, budget), batch)
        if len(group) != step:
            raise UserError(f"batch {b} holds {len(group)} keys; the sequential rule sends {step} there")
        answered = [e for e in group if e.get("answer") is not None]
        unanswered = len(group) - len(answered)
        found += sum(e["match"] for e in answered)
        n += len(answered)
    verdict = decide(found, n, p0, level, budget) if not unanswered else None
    pv = p_value(found, n, p0)
    recorded = {k: claim.get(k) for k in ("keys_revealed", "matches", "p_value", "verdict")}
    if recorded["keys_revealed"] != n or recorded["matches"] != found:
        raise UserError(
            f"the claim says {recorded['matches']} matches of {recorded['keys_revealed']} keys; its answers give "
            f"{found} of {n}"
        )
    if not isinstance(recorded["p_value"], (int, float)) or not _close(recorded["p_value"], pv):
        raise UserError(
            f"p-value {recorded['p_value']} does not reproduce: {found} of {n} at p0 {p0:.6g} gives {pv:.6g}"
        )
    if claim.get("complete") and (verdict is None or recorded["verdict"] != verdict):
        raise UserError(f"the claim's verdict {recorded['verdict']!r} is not the rule's: {verdict or 'undecided'}")
    if not claim.get("complete") and recorded["verdict"] is not None:
        raise UserError("an unfinished claim records a verdict")
    if max_alpha is not None and alpha > max_alpha:
        raise UserError(f"the claim is at alpha {alpha:g}, above the --alpha {max_alpha:g} asked for")
    return {
        "root": root,
        "leaves": n_leaves,
        "base_model": base_model,
        "match_rule": rule,
        "made": commitment.get("made"),
        "suspect": suspect,
        "revealed": len(entries),
        "keys": n,
        "matches": found,
        "p0": p0,
        "p0_source": claim.get("p0_source"),
        "p_value": pv,
        "alpha": alpha,
        "look_alpha": level,
        "budget": budget,
        "batch": batch,
        "false_claim": false_claim,
        "verdict": verdict or "undecided",
        "complete": bool(claim.get("complete")),
    }


def request_prompt(request, endpoint):
    """The key's text as a recorded request body carries it (the prompt, or the last user message)."""
    if endpoint == "completions":
        return request.get("prompt")
    messages = request.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        return messages[-1].get("content")
    return None


def format_summary(s, replayed=None):
    suspect = s["suspect"]
    rows = [
        ("claim", f"valid: {s['revealed']} revealed keys, each under root {s['root'][:16]}... "
                  f"({s['leaves']} leaves, made {s['made']}; base model {s['base_model']})"),
        ("suspect", f"{suspect.get('api_base')} model {suspect.get('api_model')} ({suspect.get('endpoint')})"),
        ("matches", f"{s['matches']} of {s['keys']} answered keys (rule {s['match_rule']}, re-decided)"),
        ("p0", f"{s['p0']:.4g} ({s['p0_source']}; reproduced)"),
        ("p-value", f"{s['p_value']:.3g}  (exact binomial tail, reproduced)"),
        ("false claims", f"{s['false_claim']:.2g} <= alpha {s['alpha']:g}  (sequential, at most {s['budget']} keys, "
                         f"batches of <= {s['batch']}, per-look level {s['look_alpha']:.3g})"),
    ]  # fmt: skip
    if replayed is not None:
        rows.append(("replay", replayed))
    verdict = s["verdict"] + ("" if s["complete"] else "  (the check stopped early; the claim covers what it sent)")
    rows.append(("verdict", verdict))
    return "\n".join(f"{name:<13} {value}" for name, value in rows)


# ------------------------------------------------------------------------------------------ replay


def replay(claim, api_base, api_model=None, api_key_env="OPENAI_API_KEY", timeout=60.0, retries=3, concurrency=4,
           exact=True):  # fmt: skip
    """Send the claim's answered keys again, with the recorded requests, and compare the answers. Returns a line;
    UserError when an answer does not reproduce (exactly, or with exact=False in its match decision)."""
    from oml.verify.api_client import Client

    suspect, rule = claim["suspect"], claim["commitment"]["match_rule"]
    match = match_function(rule)
    entries = [e for e in claim["entries"] if e.get("answer") is not None]
    if not entries:
        raise UserError("the claim holds no answered key to replay")
    temperatures = {e["request"].get("temperature", 0.0) for e in entries}
    if len(temperatures) != 1:
        raise UserError("the claim's requests use different temperatures")
    model = api_model or suspect.get("api_model")
    with Client(api_base, model, suspect["endpoint"], api_key_env, suspect.get("system_prompt"), timeout=timeout,
                retries=retries, concurrency=concurrency, temperature=temperatures.pop()) as client:  # fmt: skip
        prompts, max_tokens = [], []
        for e in entries:
            request = e["request"]
            prompt = request_prompt(request, suspect["endpoint"])
            if {**request, "model": model} != client.body(prompt, request.get("max_tokens")):
                raise UserError(f"key_index {e['key_index']}: the recorded request is not one this checker can resend")
            prompts.append(prompt)
            max_tokens.append(request.get("max_tokens"))
        client.check_reachable()
        answers = client.complete_many(prompts, max_tokens)
    same = 0
    for e, a in zip(entries, answers, strict=True):
        if a.error:
            raise UserError(f"replay: {a.error}")
        if a.text == e["answer"]:
            same += 1
            continue
        now_match = match(a.text, e["response"])
        if exact or now_match != e["match"]:
            raise UserError(
                f"replay: key_index {e['key_index']}: {api_base} now answers {a.text[:60]!r} "
                f"(match={now_match}), the claim recorded {e['answer'][:60]!r} (match={e['match']})"
            )
    decided = "" if exact else f", every match decision under {rule}"
    return f"{same} of {len(entries)} answers reproduced exactly by {api_base} model {model}{decided}"


# ------------------------------------------------------------------------------------------ a commitment after training


def commit_run(run):
    """commitment.json for a run trained before commitments (made after training). Returns the root."""
    from oml.core.run_store import recorded_args
    from oml.make.fingerprint_files import run_fingerprints
    from oml.verify.commitment import COMMITMENT, write_commitment

    run = Path(run)
    if (run / COMMITMENT).exists():
        raise UserError(f"run {run.name} already has a commitment ({run / COMMITMENT}); a new one would not match "
                        "the root already published")  # fmt: skip
    return write_commitment(run, run_fingerprints(run), recorded_args(run)["model"], made="after training")


# ------------------------------------------------------------------------------------------ commands

DESCRIPTION = __doc__


def add_verify_args(parser):
    parser.add_argument("claim", help="the claim file (check_fingerprints.py --claim_file)")
    parser.add_argument("--root", required=True, help="the commitment root published with the model (64 hex digits)")
    parser.add_argument("--alpha", type=float, default=None, help="also require the claim's alpha to be at most this")
    parser.add_argument("--replay", default=None, metavar="API_BASE",
                        help="send the revealed keys again to this OpenAI-compatible base URL and compare the answers")  # fmt: skip
    parser.add_argument("--api_model", default=None, help="--replay: model name (default: the claim's)")
    parser.add_argument("--api_key_env", default="OPENAI_API_KEY", help="--replay: environment variable of the API key")
    parser.add_argument("--api_timeout", type=float, default=60.0, help="--replay: seconds per request")
    parser.add_argument("--api_retries", type=int, default=3, help="--replay: retries on timeouts and HTTP 429/5xx")
    parser.add_argument("--concurrency", type=int, default=4, help="--replay: requests in flight at once")
    parser.add_argument("--replay_rule", choices=["exact", "match"], default="exact",
                        help="--replay: answers must be identical (exact), or only decide the same match (match)")  # fmt: skip
    parser.set_defaults(func=verify_command)
    return parser


def add_commit_args(parser):
    parser.add_argument("--run", required=True, metavar="HASH", help="the run (results/<hash>/)")
    parser.add_argument("--result_path", default="results/", help="where runs are stored")
    parser.set_defaults(func=commit_command)
    return parser


def make_parser(subparsers=None):
    """`python -m oml.verify.claims {commit,verify}`; given an argparse sub-parsers action (a console command's), the two
    commands are added to it instead (as `commit-claim` and `verify-claim`)."""
    names = ("commit", "verify") if subparsers is None else ("commit-claim", "verify-claim")
    parser = None
    if subparsers is None:
        parser = argparse.ArgumentParser(prog="python -m oml.verify.claims", description=DESCRIPTION,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        subparsers = parser.add_subparsers(dest="command", required=True)
    add_commit_args(subparsers.add_parser(names[0], help="a commitment for a run trained before commitments"))
    add_verify_args(subparsers.add_parser(names[1], help="check a claim against a published root"))
    return parser


def make_verify_parser():
    """The parser of `verify` alone (for a console verb `oml verify-claim CLAIM --root ROOT`)."""
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_verify_args(parser)


def verify_command(args):
    root = parse_root(args.root)  # bad input stops before anything is read or sent
    if args.alpha is not None and not 0 < args.alpha < 1:
        raise UserError("--alpha must be within (0, 1)")
    claim = read_claim(args.claim)
    summary = verify(claim, root, args.alpha)
    replayed = None
    if args.replay:
        replayed = replay(claim, args.replay, args.api_model, args.api_key_env, args.api_timeout, args.api_retries,
                          args.concurrency, exact=args.replay_rule == "exact")  # fmt: skip
    print(format_summary(summary, replayed))


def commit_command(args):
    from oml.verify.commitment import COMMITMENT, SALTS
    from oml.verify.suspect_check import resolve_run

    run = resolve_run(args.run, args.result_path)
    root = commit_run(run)
    print(f"commitment root {root}")
    print(f"written to {run / COMMITMENT} (salts: {run / SALTS}, private)")
    print("made after training: it binds the keys from now on, not from when the model was first released")


def main(argv=None):
    args = make_parser().parse_args(argv)
    args.func(args)


def verify_main(argv=None):
    args = make_verify_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    from oml.core.errors import run_cli

    run_cli(main)
