"""Checking a deployed copy: measure p0 on reference models, then query a suspect's API key by key until the
verdict is decided, with every revealed key in the run's ledger.

    measure_p0(settings)  the run's keys through reference models, locally (greedy generate, the API's match rule):
                      per-key outcomes and p0 = their Clopper-Pearson upper bound -> results/<hash>/reference_match_rates.json
    check(settings)   the suspect's OpenAI-compatible API, sequential batches (oml.verify.sequential_test), oml.verify.key_ledger before every
                      request -> the five-field verdict; with --claim_file also a claim (oml.verify.claims) rewritten
                      before and after every batch
    trace(settings)   --trace RUN [RUN ...]: one such check per candidate licensee's run, each at alpha / K
                      (Bonferroni) -> the licensee(s) named, or "not shown"

The keys are sent the way they were trained: on the completions route the raw prompt (the key, inside the
chat template when the run trained with one), on the chat route the key as the user message. p0 is stored per
route, and a check uses the p0 measured for its route.

Sampled answers (--samples k --api_temperature T; a defence against a host that hides greedy answers, oml/attack/adaptive_host.py):
each key is asked k times at temperature T (the server's default top_p) and counts as a match when its response
comes back in at least --min_matches of the k answers (default ceil(k/2), a majority). p0 must be measured under
the same rule and decoding (measure_p0 with the same flags samples locally, seeded), so it is stored per (route,
rule): "completions" for the greedy rule as before, "completions:k5-m3-t0.7" for five samples at 0.7 needing three.
--api_top_p P sends top_p P with every request and samples p0 at P too ("completions:k5-m3-t0.7-p0.9"): the decoding
of a host that samples at a known top_p (oml.attack.adaptive_host serve --host_top_p).
"""

import math
import time
from dataclasses import dataclass
from pathlib import Path

from oml.core.errors import UserError
from oml.core.run_store import (
    FINAL_MODEL,
    FINGERPRINTS,
    REFERENCE_RATES,
    REVEALED_KEYS,
    RunIdentity,
    find_run,
    read_json,
    recorded_args,
)
from oml.core.stage_settings import settings_from_args
from oml.make.fingerprint_files import run_fingerprints
from oml.make.prompt_encoding import api_prompt

CHECK_ARGS = [
    (["--run"], dict(default=None, metavar="HASH", help="the run whose keys to use (default: the run these flags name)")),
    (["--api_base"], dict(default="http://127.0.0.1:8000/v1", help="the suspect's OpenAI-compatible base URL")),
    (["--api_model"], dict(default=None, help="model name to request from the server")),
    (["--api_key_env"], dict(default="OPENAI_API_KEY",
                             help="environment variable holding the API key (never printed or stored)")),
    (["--endpoint"], dict(default="completions", choices=["completions", "chat"],
                          help="completions: the raw prompt, as keys were trained; chat: the key as the user message")),
    (["--system_prompt"], dict(default=None, help="chat route: a system message before the key")),
    (["--alpha"], dict(type=float, default=1e-6, help="significance level of an 'ours' verdict")),
    (["--max_keys"], dict(type=int, default=8, help="reveal at most this many keys in one check")),
    (["--concurrency"], dict(type=int, default=4, help="requests in flight at once (also caps a batch)")),
    (["--api_timeout"], dict(type=float, default=60.0, help="seconds per request")),
    (["--api_retries"], dict(type=int, default=3, help="retries on timeouts, refused connections, HTTP 429/5xx")),
    (["--extra_tokens"], dict(type=int, default=0,
                              help="ask for this many tokens beyond the response's length in the run's tokenizer")),
    (["--allow_revealed"], dict(action="store_true", help="reuse revealed keys once every unrevealed one is used")),
    (["--output_file"], dict(default=None, help="write the verdict as JSON here")),
    (["--claim_file"], dict(default=None, metavar="PATH",
                            help="write a claim here: every revealed key with its salt and Merkle path, the raw "
                                 "answers, p0, alpha, the verdict (python -m oml.verify.claims verify checks it)")),
    (["--trace"], dict(nargs="+", default=None, metavar="RUN",
                       help="which licensee leaked: a check per candidate run (hash or folder; same base model), "
                            "each at alpha / number of runs (Bonferroni); the verdict names the licensee(s)")),
    (["--measure_p0"], dict(action="store_true", help="measure p0 on --reference_models instead of checking")),
    (["--reference_models"], dict(nargs="+", default=["base"], metavar="MODEL",
                                  help="'base', a run folder or hash (its final_model), or a model folder / hub id")),
    (["--p0_confidence"], dict(type=float, default=0.95, help="confidence of p0's Clopper-Pearson upper bound")),
    (["--samples"], dict(type=int, default=1, metavar="k",
                         help="ask each key k times at --api_temperature; it matches when its response comes back in "
                              "at least --min_matches of them (p0 is measured under the same rule)")),
    (["--min_matches"], dict(type=int, default=None, metavar="j", help="with --samples k: default ceil(k/2)")),
    (["--api_temperature"], dict(type=float, default=0.0,
                                 help="sampling temperature of the requests (0: greedy); > 0 needs --samples")),
    (["--api_top_p"], dict(type=float, default=None, metavar="P",
                           help="with --samples: the requests' top_p, and p0 sampled at it (default: the server's own "
                                "top_p; p0 at top_p 1)")),
    (["--reference_pairs"], dict(type=int, default=0,
                                 help="also measure p0 on up to this many pairs of the run's fingerprints file that "
                                      "neither the run nor a reference run trained on (more trials, tighter p0)")),
]  # fmt: skip

RESULT_FIELDS = ("keys_revealed", "matches", "p0", "p_value", "verdict")


def add_check_args(parser):
    from oml.core.run_config import add_arguments

    return add_arguments(parser, CHECK_ARGS)


@dataclass(frozen=True)
class CheckSettings:
    """A check of a served suspect, or a p0 measurement (CHECK_ARGS): the run whose keys are sent, the server, the
    sequential test and the match rule. Built once from finalized arguments (from_args); never changed."""

    run: str | None  # --run HASH; None: the run the training flags name (named_run)
    result_path: str
    named_run: RunIdentity | None
    api_base: str
    api_model: str | None
    api_key_env: str
    endpoint: str  # completions or chat
    system_prompt: str | None
    alpha: float
    max_keys: int
    concurrency: int
    api_timeout: float
    api_retries: int
    extra_tokens: int
    allow_revealed: bool
    claim_file: str | None
    trace: list | None  # --trace RUN [RUN ...]
    reference_models: list
    p0_confidence: float
    reference_pairs: int
    samples: int
    min_matches: int | None
    api_temperature: float
    api_top_p: float | None
    trust_remote_code: bool

    @classmethod
    def from_args(cls, args):
        return settings_from_args(cls, args, named_run=RunIdentity.from_args(args))


def validate(settings):
    """Every check on CheckSettings that needs no run and no server. Returns settings."""
    if not 0 < settings.alpha < 1:
        raise UserError("--alpha must be within (0, 1)")
    if not 0 < settings.p0_confidence < 1:
        raise UserError("--p0_confidence must be within (0, 1)")
    for name in ("max_keys", "concurrency"):
        if getattr(settings, name) <= 0:
            raise UserError(f"--{name} must be positive")
    if settings.api_timeout <= 0 or settings.api_retries < 0 or settings.extra_tokens < 0:
        raise UserError("--api_timeout must be positive, --api_retries and --extra_tokens not negative")
    check_sampling(settings.samples, settings.min_matches, settings.api_temperature, settings.claim_file,
                   settings.api_top_p)  # fmt: skip
    return settings


def check_sampling(samples, min_matches, api_temperature, claim_file=None, api_top_p=None):
    """--samples, --min_matches, --api_temperature, --api_top_p: a rule that means something."""
    k, j, t = samples, min_matches, api_temperature
    if k < 1:
        raise UserError(f"--samples must be positive, got {k}")
    if not (math.isfinite(t) and 0 <= t <= 2):
        raise UserError(f"--api_temperature must be within [0, 2], got {t}")
    if (k > 1) != (t > 0):
        raise UserError("--samples k > 1 and --api_temperature T > 0 go together: greedy answers are all the same, "
                        "and one sampled answer per key is no rule")  # fmt: skip
    if j is not None and not 1 <= j <= k:
        raise UserError(f"--min_matches must be within 1..{k} (--samples), got {j}")
    if k > 1 and claim_file:
        raise UserError("--claim_file records one answer per key: it does not support --samples yet")
    if api_top_p is not None and not (k > 1 and 0 < api_top_p <= 1):  # NaN fails too
        raise UserError(f"--api_top_p must be within (0, 1] and goes with --samples k > 1, got {api_top_p}")


def rule(settings):
    """(samples, min_matches, temperature) of the match rule of CheckSettings."""
    k = settings.samples
    return k, settings.min_matches or math.ceil(k / 2), settings.api_temperature


def p0_key(settings):
    """Where p0 is stored for this route and rule: the route alone for the greedy rule (as always)."""
    k, j, t = rule(settings)
    top_p = "" if settings.api_top_p is None else f"-p{settings.api_top_p:g}"
    return settings.endpoint if k == 1 else f"{settings.endpoint}:k{k}-m{j}-t{t:g}{top_p}"


# ------------------------------------------------------------------------------------------ the run


def resolve_run(run, result_path, named=None):
    """results/<hash>/ of --run (a hash in result_path), or of the run the training flags name (a RunIdentity)."""
    if run:
        folder = Path(result_path) / run
        if not (folder / FINGERPRINTS).is_file():
            raise UserError(f"no run {run!r} in {result_path} (looked for {folder / FINGERPRINTS})")
        return folder
    return find_run(named)


def run_tokenizer(run, run_args):
    from oml.core.model_registry import load_tokenizer

    final = Path(run) / FINAL_MODEL
    return load_tokenizer(str(final) if final.is_dir() else run_args["model"])


def response_tokens(tokenizer, response):
    from oml.make.prompt_encoding import encode_response

    return len(encode_response(tokenizer, response))


# ------------------------------------------------------------------------------------------ p0


def reference_model_id(ref, run, run_args, result_path):
    """'base' -> the run's base model; a run folder or hash -> its final model; anything else as given."""
    if ref == "base":
        return run_args["model"]
    for folder in (Path(ref), Path(result_path) / ref):
        if (folder / FINAL_MODEL).is_dir():
            if folder.resolve() == Path(run).resolve():
                raise UserError(f"reference {ref!r} is the run itself; references must not carry its keys")
            return str(folder / FINAL_MODEL)
    if Path(ref).resolve() == (Path(run) / FINAL_MODEL).resolve():
        raise UserError(f"reference {ref!r} is the run itself; references must not carry its keys")
    return ref


def local_outcomes(model, tokenizer, pairs, max_tokens, endpoint, use_chat_template, system_prompt=None,
                   samples=1, min_matches=1, temperature=0.0, seed=0, top_p=1.0):  # fmt: skip
    """Per pair, does the model's greedy continuation match the response (oml.verify.api_client.matches)? One prompt
    at a time through the "hf" backend, as a server decodes a request. With samples k > 1: do at least min_matches of
    k continuations sampled at `temperature` (top_p, default 1; no top-k; seeded) match?"""
    from oml.make.prompt_encoding import encode_prompt
    from oml.measure.transformers_backend import TransformersModel
    from oml.verify.api_client import matches

    prompts = []
    for pair in pairs:
        if endpoint == "chat":
            messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
            ids = tokenizer.apply_chat_template(
                messages + [{"role": "user", "content": pair["key"]}], add_generation_prompt=True, tokenize=True
            )
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = encode_prompt(tokenizer, api_prompt(tokenizer, pair["key"], endpoint, use_chat_template),
                                use_chat_template)  # fmt: skip
        prompts.append(list(ids))
    if samples == 1:
        answers = TransformersModel(model, tokenizer, batch_size=1).greedy(prompts, max_tokens)
        return [matches(text, pair["response"]) for text, pair in zip(answers, pairs, strict=True)]
    return sampled_outcomes(model, tokenizer, prompts, pairs, max_tokens, samples, min_matches, temperature, seed,
                            top_p)  # fmt: skip


def sampled_outcomes(model, tokenizer, prompts, pairs, max_tokens, samples, min_matches, temperature, seed, top_p=1.0):
    """Per pair, do at least min_matches of `samples` continuations sampled at `temperature` and `top_p` (seeded per
    pair) match?"""
    import torch
    from tqdm import tqdm

    from oml.verify.api_client import matches

    outcomes = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        for ids, pair, n in tqdm(list(zip(prompts, pairs, max_tokens, strict=True)), desc="reference", disable=None):
            torch.manual_seed(seed + len(outcomes))
            input_ids = torch.tensor([ids], device=model.device).expand(samples, -1)
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                                 pad_token_id=pad, do_sample=True, temperature=temperature, top_p=top_p, top_k=0)  # fmt: skip
            texts = tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)
            outcomes.append(sum(matches(text, pair["response"]) for text in texts) >= min_matches)
    return outcomes


def held_out_pairs(run, run_args, tokenizer, references, limit, seed):
    """Up to `limit` pairs of the run's fingerprints file, cut the way the run cut its own, that neither the run
    nor any reference run trained on. They come from the same generator as the run's keys, so a reference model
    matches them at the same per-key rate: more trials for p0 at no cost in revealed keys."""
    from oml.make.fingerprint_files import prepare_pairs, read_fingerprints

    if limit <= 0:
        return []
    source = run_args["fingerprints_file_path"]
    everything = read_fingerprints(source)
    used = set()
    for config in [run_args] + [recorded_args(Path(m).parent) for m in references if Path(m).name == FINAL_MODEL]:
        if config.get("fingerprints_digest") in (None, run_args.get("fingerprints_digest")):
            n = config["max_num_fingerprints"]
            used.update(range(config["data_split"] * n, config["data_split"] * n + n))
    free = [fp for i, fp in enumerate(everything) if i not in used][:limit]
    if not free:
        return []
    return prepare_pairs(free, tokenizer, run_args["fingerprint_generation_strategy"], run_args["max_key_length"],
                         run_args["max_response_length"], len(free), 0, seed)  # fmt: skip


def measure_p0(settings):
    """Run the keys through every reference model; write and return the run's reference match rates."""
    from oml.core.model_registry import load_model_and_tokenizer
    from oml.verify.sequential_test import clopper_pearson_upper

    run = resolve_run(settings.run, settings.result_path, settings.named_run)
    run_args, pairs = recorded_args(run), run_fingerprints(run)
    tokenizer = run_tokenizer(run, run_args)
    model_ids = [reference_model_id(ref, run, run_args, settings.result_path) for ref in settings.reference_models]
    extra = held_out_pairs(run, run_args, tokenizer, model_ids, settings.reference_pairs, run_args["seed"] + 1)
    if settings.reference_pairs:
        print(f"{len(pairs)} run keys + {len(extra)} held-out pairs of {run_args['fingerprints_file_path']}")
    pairs = pairs + extra
    max_tokens = [response_tokens(tokenizer, p["response"]) + settings.extra_tokens for p in pairs]
    references = []
    for ref, model_id in zip(settings.reference_models, model_ids, strict=True):
        print(f"reference {ref}: {model_id}")
        model, ref_tok = load_model_and_tokenizer(model_id, trust_remote_code=settings.trust_remote_code)
        k, j, t = rule(settings)
        outcomes = local_outcomes(model, ref_tok, pairs, max_tokens, settings.endpoint, run_args["use_chat_template"],
                                  settings.system_prompt, k, j, t, run_args["seed"],
                                  1.0 if settings.api_top_p is None else settings.api_top_p)  # fmt: skip
        references.append({"reference": ref, "model": model_id, "matches": sum(outcomes), "keys": len(outcomes),
                           "outcomes": outcomes})  # fmt: skip
        print(f"  {sum(outcomes)} of {len(outcomes)} keys match")
        del model
    k = sum(r["matches"] for r in references)
    n = sum(r["keys"] for r in references)
    measurement = {
        "endpoint": settings.endpoint,
        "rule": dict(
            zip(("samples", "min_matches", "temperature"), rule(settings), strict=True),
            **({"top_p": settings.api_top_p} if settings.api_top_p is not None else {}),
        ),
        "system_prompt": settings.system_prompt,
        "extra_tokens": settings.extra_tokens,
        "held_out_pairs": len(extra),
        "matches": k,
        "trials": n,
        "rate": k / n,
        "confidence": settings.p0_confidence,
        "p0": clopper_pearson_upper(k, n, settings.p0_confidence),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "references": references,
    }
    from oml.core.files import atomic_write_json

    stored = read_json(run / REFERENCE_RATES) or {}
    stored.setdefault("measurements", {})[p0_key(settings)] = measurement
    atomic_write_json(run / REFERENCE_RATES, stored)
    return run, measurement


def read_p0(run, endpoint, settings=None):
    """The p0 measurement of a route (and, given the CheckSettings, of its match rule: p0_key)."""
    key = p0_key(settings) if settings is not None else endpoint
    measurement = (read_json(Path(run) / REFERENCE_RATES) or {}).get("measurements", {}).get(key)
    if not measurement:
        k, j, t = rule(settings) if settings is not None else (1, 1, 0.0)
        flags = f" --samples {k} --min_matches {j} --api_temperature {t:g}" if k > 1 else ""
        if settings is not None and settings.api_top_p is not None:
            flags += f" --api_top_p {settings.api_top_p:g}"
        what = f"the {endpoint} route" + (f" and the rule {key.split(':', 1)[1]}" if k > 1 else "")
        raise UserError(
            f"run {Path(run).name} has no measured p0 for {what}: run "
            f"`python check_fingerprints.py --run {Path(run).name} --measure_p0 --endpoint {endpoint}{flags} "
            "--reference_models base [other runs]` first"
        )
    return measurement


# ------------------------------------------------------------------------------------------ the check


def check(settings, log=print):
    """Query the suspect until the verdict is decided. Returns (result with RESULT_FIELDS, details).

    With --trace, the licensee trace instead (`trace`)."""
    if settings.trace:
        return trace(settings, log)
    if not settings.api_model:
        raise UserError("--api_model is required: the model name the server serves")
    run = resolve_run(settings.run, settings.result_path, settings.named_run)
    plan = plan_check(settings, run, settings.alpha, settings.claim_file, log)
    with open_client(settings) as client:
        client.check_reachable()  # nothing is revealed to a server that is not there
        return run_check(settings, plan, client, log)


def open_client(settings):
    from oml.verify.api_client import Client

    return Client(
        settings.api_base,
        settings.api_model,
        settings.endpoint,
        settings.api_key_env,
        settings.system_prompt,
        timeout=settings.api_timeout,
        retries=settings.api_retries,
        concurrency=settings.concurrency,
        temperature=rule(settings)[2],
        extra_body={"top_p": settings.api_top_p} if settings.api_top_p is not None else None,
    )


@dataclass(frozen=True)
class CheckPlan:
    """One run's check before its first request (plan_check): the run, its keys, p0 and its measurement, the ledger,
    the key budget, the per-look level that keeps the check at alpha, and its claim (or None)."""

    run: Path
    run_args: dict
    pairs: list
    measurement: dict
    p0: float
    ledger: object  # oml.verify.key_ledger.Ledger
    budget: int
    level: float
    alpha: float
    claim: object  # oml.verify.claims.ClaimWriter, or None


def plan_check(settings, run, alpha, claim_file=None, log=print, family=None):
    """Everything one run's check needs before its first request, every input checked (nothing is sent when one
    fails): its keys, p0, ledger, key budget, the per-look level that keeps the check at `alpha`, its claim."""
    from oml.verify.claims import open_claim
    from oml.verify.key_ledger import LOW_FRACTION, Ledger
    from oml.verify.sequential_test import decide, look_alpha

    run_args, pairs = recorded_args(run), run_fingerprints(run)
    measurement = read_p0(run, settings.endpoint, settings)
    p0 = measurement["p0"]
    if measurement.get("system_prompt") != settings.system_prompt:
        log(f"warning: p0 was measured with system prompt {measurement.get('system_prompt')!r}, not this one")
    ledger = Ledger(run / REVEALED_KEYS, len(pairs))
    available = len(pairs) if settings.allow_revealed else ledger.remaining()
    if available < LOW_FRACTION * len(pairs):
        log(f"warning: only {ledger.remaining()} of {len(pairs)} keys of run {run.name} are unrevealed")
    budget = min(settings.max_keys, available)
    if budget == 0:
        raise UserError(f"every key of run {run.name} has been revealed; --allow_revealed reuses them")
    level = look_alpha(p0, alpha, budget, settings.concurrency)  # per look, so that the whole check is at alpha
    if level <= 0 or decide(budget, budget, p0, level, budget) != "ours":
        raise UserError(
            f"with p0 = {p0:.3g}, even {budget} matching keys cannot reach alpha {alpha:g}: "
            "measure p0 on more reference trials, raise --max_keys, or use a larger alpha"
        )
    # --claim_file: the commitment is checked now, before any key goes out
    claim = open_claim(claim_file, settings, run, pairs, measurement, level, budget, alpha, family)
    return CheckPlan(run=run, run_args=run_args, pairs=pairs, measurement=measurement, p0=p0, ledger=ledger,
                     budget=budget, level=level, alpha=alpha, claim=claim)  # fmt: skip


def run_check(settings, plan, client, log=print):
    """One run's sequential check through an open client. Returns (result, details)."""
    from oml.verify.api_client import matches
    from oml.verify.sequential_test import decide, false_claim_probability, keys_needed, p_value

    run, pairs, ledger, claim = plan.run, plan.pairs, plan.ledger, plan.claim
    p0, level, budget = plan.p0, plan.level, plan.budget
    tokenizer = run_tokenizer(run, plan.run_args)
    use_chat = plan.run_args["use_chat_template"]
    n = found = 0
    while decide(found, n, p0, level, budget) is None:
        step = min(keys_needed(found, n, p0, level, budget), settings.concurrency)
        chosen = ledger.reserve(
            step, settings.endpoint, settings.allow_revealed, api_base=settings.api_base, model=settings.api_model
        )
        prompts = [api_prompt(tokenizer, pairs[i]["key"], settings.endpoint, use_chat) for i in chosen]
        max_tokens = [response_tokens(tokenizer, pairs[i]["response"]) + settings.extra_tokens for i in chosen]
        if claim:
            claim.sent(chosen, list(map(client.body, prompts, max_tokens)), settings.endpoint, settings.api_base)
        k, j, _ = rule(settings)
        asked = client.complete_many([p for p in prompts for _ in range(k)], [m for m in max_tokens for _ in range(k)])
        answers = [asked[c * k : (c + 1) * k] for c in range(len(chosen))]  # each key's k answers
        if claim:
            claim.answered([a[0] for a in answers])
        errors = []
        for i, answer in zip(chosen, answers, strict=True):
            failed = [a.error for a in answer if a.error]
            if failed:
                ledger.record(i, settings.endpoint, f"error: {failed[0]}")
                errors.append(failed[0])
            else:
                hit = sum(matches(a.text, pairs[i]["response"]) for a in answer) >= j
                ledger.record(i, settings.endpoint, "match" if hit else "no match")
                found += hit
                n += 1
        if errors:
            revealed = n + len(errors)
            raise UserError(
                f"{errors[0]} (this check revealed {revealed} keys, {found} of {n} answered ones matched; "
                f"all recorded in {ledger.path})"
            )
        log(f"{n} keys answered, {found} matched, p-value {p_value(found, n, p0):.3g}")

    verdict = decide(found, n, p0, level, budget)
    result = {"keys_revealed": n, "matches": found, "p0": p0, "p_value": p_value(found, n, p0), "verdict": verdict}
    if claim:
        claim.finish(result)
        log(f"claim written to {claim.path}")
    measurement = plan.measurement
    details = {
        "run": run.name,
        "suspect": f"{settings.api_base} model {settings.api_model} ({settings.endpoint})",
        "alpha": plan.alpha,
        "look_alpha": level,
        "budget": budget,
        "p0_source": f"{measurement['confidence']:.0%} upper bound, {measurement['matches']} of "
        f"{measurement['trials']} reference trials matched",
        "false_claim": false_claim_probability(p0, level, budget, settings.concurrency),
        "unrevealed": ledger.remaining(),
        "num_keys": len(pairs),
        "ledger": str(ledger.path),
    }
    return result, details


# ------------------------------------------------------------------------------------------ tracing a licensee


def trace(settings, log=print):
    """--trace RUN [RUN ...]: which candidate licensee's fingerprints does the suspect carry?

    Every candidate run (one licensee's slice of a master fingerprints file, --licensee) gets its own sequential
    check on its own keys, revealed to its own ledger (and claim), at level alpha / K for K candidates; the
    verdict names every candidate whose check says "ours", or "not shown".

    Family-wise error: the probability of naming at least one licensee whose keys the suspect does not carry is
    at most alpha. Bonferroni, because nothing else is safe here: the K checks question one suspect, so their
    outcomes are dependent (a model built from licensee j's copy answers j's keys and may answer the others'
    more or less often than the reference models did), the suspect may carry several licensees' keys at once (a
    merge), and the sequential checks stop at different times. The union bound needs none of that:
    P(any false naming) <= sum over k of P(check k says "ours" | H0_k) <= K * alpha / K. It costs little: each
    check needs about log(K) / log(1 / p0) more matching keys (one more for K = 8 at p0 = 0.03).

    Every input is checked before any key goes out: the runs exist, share a base model, have p0 measured, and can
    each reach alpha / K within --max_keys."""
    if not settings.api_model:
        raise UserError("--api_model is required: the model name the server serves")
    runs = [trace_run(settings.result_path, name) for name in settings.trace]
    if len({r.resolve() for r in runs}) != len(runs):
        raise UserError("--trace names a run twice")
    bases = {r.name: recorded_args(r)["model"] for r in runs}
    if len(set(bases.values())) > 1:
        shown = ", ".join(f"{name}: {model}" for name, model in bases.items())
        raise UserError(f"--trace runs must share a base model (licensees of one model), these differ: {shown}")
    k = len(runs)
    alpha = settings.alpha / k
    family = {"alpha": settings.alpha, "correction": "bonferroni", "runs": [r.name for r in runs]}
    plans = [plan_check(settings, run, alpha, claim_path(settings.claim_file, run, k), log, family) for run in runs]
    outcomes = []
    with open_client(settings) as client:
        client.check_reachable()
        for plan in plans:
            log(f"candidate {licensee_label(plan.run)}")
            outcomes.append(run_check(settings, plan, client, log))
    candidates = [
        {"run": plan.run.name, "licensee": plan.run_args.get("licensee"), **result}
        for plan, (result, _) in zip(plans, outcomes, strict=True)
    ]
    named = [licensee_label(plan.run) for plan, c in zip(plans, candidates, strict=True) if c["verdict"] == "ours"]
    result = {
        "verdict": ", ".join(named) if named else "not shown",
        "named": [c["run"] for c in candidates if c["verdict"] == "ours"],
        "alpha": settings.alpha,
        "candidate_alpha": alpha,
        "keys_revealed": sum(c["keys_revealed"] for c in candidates),
        "candidates": candidates,
    }
    details = {"suspect": f"{settings.api_base} model {settings.api_model} ({settings.endpoint})",
               "candidates": [d for _, d in outcomes]}  # fmt: skip
    return result, details


def trace_run(result_path, name):
    for run in (Path(result_path) / name, Path(name)):
        if (run / FINGERPRINTS).is_file():
            return run
    raise UserError(f"--trace: no run {name!r} in {result_path} (looked for {Path(result_path) / name / FINGERPRINTS})")


def licensee_label(run):
    licensee = recorded_args(run).get("licensee")
    return f"licensee {licensee} (run {Path(run).name})" if licensee is not None else f"run {Path(run).name}"


def claim_path(claim_file, run, candidates):
    """--claim_file PATH, or with several --trace runs PATH with the run's hash before its suffix (one claim each)."""
    if not claim_file or candidates == 1:
        return claim_file
    path = Path(claim_file)
    return str(path.with_name(f"{path.stem}.{Path(run).name}{path.suffix}"))


def format_trace(result, details):
    lines = [f"suspect          {details['suspect']}"]
    for c, d in zip(result["candidates"], details["candidates"], strict=True):
        label = f"licensee {c['licensee']}" if c["licensee"] is not None else "run"
        lines.append(f"{label:<16} {c['run']}: {c['verdict']}, {c['matches']} of {c['keys_revealed']} keys match, "
                     f"p0 {c['p0']:.3g}, p-value {c['p_value']:.3g}, false claims {d['false_claim']:.2g}")  # fmt: skip
    lines.append(f"verdict          {result['verdict']}  (family-wise alpha {result['alpha']:g}: Bonferroni, "
                 f"{result['candidate_alpha']:.3g} per candidate; {result['keys_revealed']} keys revealed)")  # fmt: skip
    return "\n".join(lines)


def format_result(result, details):
    if "candidates" in result:
        return format_trace(result, details)
    rows = [
        ("run", details["run"]),
        ("suspect", details["suspect"]),
        ("keys revealed", str(result["keys_revealed"])),
        ("matches", str(result["matches"])),
        ("p0", f"{result['p0']:.4g} ({details['p0_source']})"),
        ("p-value", f"{result['p_value']:.3g}  (exact binomial tail P(X >= {result['matches']} | "
                    f"{result['keys_revealed']}, p0))"),
        ("verdict", f"{result['verdict']}  (alpha {details['alpha']:g}, at most {details['budget']} keys)"),
        ("false claims", f"{details['false_claim']:.2g}  (P(this sequential check says 'ours' | H0), exact; "
                         f"per-look level {details['look_alpha']:.3g})"),
        ("unrevealed keys", f"{details['unrevealed']} of {details['num_keys']}  (ledger {details['ledger']})"),
    ]  # fmt: skip
    return "\n".join(f"{name:<16} {value}" for name, value in rows)


def write_result(path, result):
    from oml.core.files import atomic_write_json

    atomic_write_json(path, result if "candidates" in result else {k: result[k] for k in RESULT_FIELDS})


def format_measurement(run, m):
    lines = [f"run {Path(run).name}, {m['endpoint']} route"]
    for r in m["references"]:
        lines.append(f"  {r['reference']:<24} {r['matches']:>4} of {r['keys']} keys match")
    lines.append(
        f"  pooled: {m['matches']} of {m['trials']} trials; p0 = {m['p0']:.4g} "
        f"({m['confidence']:.0%} Clopper-Pearson upper bound)"
    )
    lines.append(f"written to {Path(run) / REFERENCE_RATES}")
    return "\n".join(lines)
