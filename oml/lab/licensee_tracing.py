"""The licensee-tracing measurement (issue 29, item 5): three licensee copies of the embedded model, checked through a
served endpoint with `check_fingerprints.py --trace`, and simulated traces from the measured per-key outcomes.

    python -m oml.lab.licensee_tracing run [--result_path results/licensee_tracing] [--num 128] [--repeats 3]
    python -m oml.lab.licensee_tracing simulate RECORD [--draws 1000]     # again, from a record's per-key outcomes
    python -m oml.lab.licensee_tracing table RECORD                       # the markdown tables of a record

`run` resumes from what exists, step by step:
  1. trains licensee 0, 1, 2 (`finetune_multigpu.py --licensee K`, N keys each, slices of one perinucleus file) and an
     unrelated run (N/2 english fingerprints: another file, another generator);
  2. measures each licensee run's p0 (`check_fingerprints.py --measure_p0`) on the base model, the two other licensees'
     copies and the unrelated run, plus the file's pairs that no copy trained on (`--reference_pairs`);
  3. merges licensee 0 and 1's copies 50/50 (oml.attack.attack_runner.merge_models, every parameter; two hosts colluding);
  4. exports every suspect (the three copies, the base, the unrelated run, the merge) to GGUF and serves each on
     127.0.0.1 with llama.cpp (oml.verify.local_server), where it runs `check_fingerprints.py --trace RUN0 RUN1 RUN2`
     `--repeats` times (the ledgers draw new keys each time), then asks every key of every candidate once, directly
     (as bench/bench_check.py does: one's own model on one's own machine, so nothing is revealed and no ledger is
     written): the per-key outcomes;
  5. simulates `--draws` traces per suspect from those outcomes (each candidate's keys drawn at random without
     replacement, the check's own sequential rule at alpha / K, its batches) and writes the record,
     experiments/records/licensee_tracing/<name>.json, and its tables.

A step that fails (a check that errors, a key budget spent) is recorded as failed, not hidden; rerunning resumes.
"""

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from oml.core.errors import UserError, run_cli
from oml.core.files import atomic_write_json
from oml.core.run_store import FINAL_MODEL, FINGERPRINTS, METRICS, REFERENCE_RATES, read_json, recorded_args

REPO = Path(__file__).resolve().parents[2]
RECORD_DIR = REPO / "experiments" / "records" / "licensee_tracing"
LICENSEES = (0, 1, 2)
# The recipe: perinucleus keys, one-token responses (the capacity measurements' reliable setting), no forgetting
# regularizer (λ 0 learns them in a few epochs), lr 1e-4, stopped at the first epoch end where every key answers.
# The former default's base (--preset averaging: no benign rows), as measured; the experiment's hashes rest on it.
RECIPE = ["--preset", "averaging", "--max_key_length", "16", "--max_response_length", "1", "--learning_rate", "1e-4",
          "--forgetting_regularizer_strength", "0", "--stop_when_learned", "--num_train_epochs", "16",
          "--batch_size", "8"]  # fmt: skip
TRACE_TIMEOUT = 600  # seconds one check_fingerprints.py --trace may take
SERVER_TIMEOUT = 300


def make_parser():
    p = argparse.ArgumentParser(prog="python -m oml.lab.licensee_tracing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train, serve, trace, measure, simulate (resumes)")
    r.add_argument("--result_path", default="results/licensee_tracing")
    r.add_argument("--num", type=int, default=128, help="fingerprints per licensee copy (N)")
    r.add_argument("--repeats", type=int, default=3, help="served traces per suspect")
    r.add_argument("--draws", type=int, default=1000, help="simulated traces per suspect")
    r.add_argument("--alpha", type=float, default=1e-6, help="the trace's family-wise level")
    r.add_argument("--max_keys", type=int, default=8, help="keys per candidate check at most")
    r.add_argument("--concurrency", type=int, default=4, help="keys per request batch (as check_fingerprints.py)")
    r.add_argument("--quantization", default="f16", help="GGUF type the suspects are served in")
    r.add_argument("--merge_weight", type=float, default=0.5, help="weight of licensee 0's copy in the merge")
    r.add_argument("--name", default=None, help="record name (default: N<num>)")
    r.add_argument("--seed", type=int, default=0, help="seed of the simulation")
    s = sub.add_parser("simulate", help="simulate traces again from a record's per-key outcomes")
    s.add_argument("record")
    s.add_argument("--draws", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("table", help="print a record's markdown tables")
    t.add_argument("record")
    return p


def check_args(args):
    for name in ("num", "repeats", "draws", "max_keys", "concurrency"):
        if getattr(args, name, 1) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    if not 0 < getattr(args, "alpha", 0.5) < 1:
        raise UserError(f"--alpha must be within (0, 1), got {args.alpha}")
    if not 0 <= getattr(args, "merge_weight", 0.5) <= 1:
        raise UserError(f"--merge_weight must be within [0, 1], got {args.merge_weight}")
    if hasattr(args, "num"):
        from oml.core.data_files import DEFAULT_FINGERPRINT_FILES
        from oml.make.fingerprint_files import read_fingerprints

        master = DEFAULT_FINGERPRINT_FILES["inverse_nucleus"]
        size = len(read_fingerprints(master))
        if args.num * len(LICENSEES) > size:
            raise UserError(
                f"--num {args.num}: three slices of {args.num} do not fit the {size} fingerprints of {master}"
            )


# ------------------------------------------------------------------------------ the simulation (no model)


def simulate_traces(outcomes, p0s, alpha, max_keys, concurrency, draws, seed=0, innocent=None):
    """Simulated traces of one suspect from measured per-key outcomes.

    outcomes: {candidate: [bool, ...]} (each candidate's keys on this suspect); p0s: {candidate: p0}. Each draw runs
    every candidate's sequential check (oml.verify.sequential_test.run_sequential) on its keys in a fresh random order,
    at the per-look level that holds it at alpha / K (as check_fingerprints.py --trace does), batches of `concurrency`.
    innocent: the candidates whose keys the suspect does not carry. Returns a summary dict."""
    from oml.verify.sequential_test import look_alpha, run_sequential

    candidates = list(outcomes)
    k = len(candidates)
    levels = {c: look_alpha(p0s[c], alpha / k, max_keys, concurrency) for c in candidates}
    rng = random.Random(seed)
    named_counts = {c: 0 for c in candidates}
    keys = {c: [] for c in candidates}
    named_sets = {}
    for _ in range(draws):
        named = []
        for c in candidates:
            order = list(outcomes[c])
            rng.shuffle(order)
            verdict, n, _ = run_sequential(order, p0s[c], levels[c], max_keys, concurrency)
            keys[c].append(n)
            if verdict == "ours":
                named.append(c)
                named_counts[c] += 1
        label = ", ".join(map(str, named)) or "not shown"
        named_sets[label] = named_sets.get(label, 0) + 1
    out = {"draws": draws, "verdicts": dict(sorted(named_sets.items())), "candidates": {}}
    for c in candidates:
        rate = named_counts[c] / draws
        out["candidates"][str(c)] = {
            "innocent": None if innocent is None else c in innocent,
            "named": named_counts[c],
            "named_rate": rate,
            "named_se": binomial_se(rate, draws),
            "keys_mean": sum(keys[c]) / draws,
            "keys_se": mean_se(keys[c]),
            "per_key_matches": sum(map(bool, outcomes[c])),
            "per_key_keys": len(outcomes[c]),
            # exact P(named) if every key matched independently at the measured rate (not only these draws)
            "named_iid": named_probability(
                sum(map(bool, outcomes[c])) / max(len(outcomes[c]), 1), p0s[c], levels[c], max_keys, concurrency
            ),
        }
    return out


def named_probability(rate, p0, level, budget, batch=None):
    """Exact probability that the sequential check (p0, per-look level, budget, batches: as run_sequential) says
    "ours" when every key matches independently with probability `rate` (a dynamic program over (keys, matches), as
    oml.verify.sequential_test.false_claim_probability, which is this at rate = p0)."""
    from scipy.stats import binom

    from oml.verify.sequential_test import decide, keys_needed

    states, named = {(0, 0): 1.0}, 0.0
    while states:
        nxt = {}
        for (n, m), prob in states.items():
            verdict = decide(m, n, p0, level, budget)
            if verdict is not None:
                named += prob if verdict == "ours" else 0.0
                continue
            step = keys_needed(m, n, p0, level, budget)
            step = min(step, batch) if batch else step
            for k in range(step + 1):
                nxt[(n + step, m + k)] = nxt.get((n + step, m + k), 0.0) + prob * float(binom.pmf(k, step, rate))
        states = nxt
    return named


def false_accusation(simulated):
    """Pooled over suspects: how often an innocent candidate is named, with its binomial standard error and the 95%
    upper bound (Clopper-Pearson), and the keys a trace reveals per licensee (mean, standard error)."""
    from oml.verify.sequential_test import clopper_pearson_upper

    named = trials = 0
    keys, guilty_keys, innocent_keys, iid = [], [], [], []
    for sim in simulated.values():
        for c in sim["candidates"].values():
            keys.append((c["keys_mean"], sim["draws"]))
            if c["innocent"]:
                named += c["named"]
                trials += sim["draws"]
                innocent_keys.append((c["keys_mean"], sim["draws"]))
                iid.append(c["named_iid"])
            elif c["innocent"] is False:
                guilty_keys.append((c["keys_mean"], sim["draws"]))
    rate = named / trials if trials else None
    return {
        "innocent_checks": trials,
        "innocent_named": named,
        "rate": rate,
        "se": binomial_se(rate, trials) if trials else None,
        "upper95": clopper_pearson_upper(named, trials, 0.95) if trials else None,
        "keys_per_licensee": weighted_mean(keys),
        "keys_per_innocent_licensee": weighted_mean(innocent_keys),
        "keys_per_guilty_licensee": weighted_mean(guilty_keys),
        "innocent_named_iid_max": max(iid) if iid else None,
    }


def binomial_se(rate, n):
    return math.sqrt(rate * (1 - rate) / n) if n else None


def mean_se(values):
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def weighted_mean(pairs):
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def simulate_record(record, draws, seed=0):
    """The simulation part of a record, from its per-key outcomes ("1"/"0" strings) and p0s."""
    setup = record["setup"]
    p0s = {int(c): record["runs"][str(c)]["p0"] for c in LICENSEES}
    simulated = {}
    for i, (name, suspect) in enumerate(record["suspects"].items()):
        outcomes = {int(c): [ch == "1" for ch in bits] for c, bits in suspect["outcomes"].items()}
        innocent = {c for c in outcomes if c not in suspect["carries"]}
        simulated[name] = simulate_traces(outcomes, p0s, setup["alpha"], setup["max_keys"], setup["concurrency"],
                                          draws, seed + i, innocent)  # fmt: skip
    return {"draws": draws, "seed": seed, "suspects": simulated, "innocent": false_accusation(simulated)}


# ------------------------------------------------------------------------------ the measurement


def log(message):
    print(f"=== {time.strftime('%H:%M:%S')} {message}", flush=True)


def python(*argv, timeout=None, check=True):
    """A suite script in a child process (this checkout's code), its output passed through; returns its stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:  # the child is killed; a trace records it as failed, anything else stops
        proc = subprocess.CompletedProcess(argv, 124, "", f"{argv[0]} ran past {timeout} s and was stopped")
    sys.stdout.write(proc.stdout[-3000:])
    if proc.returncode and check:
        raise UserError(f"{argv[0]} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return proc


def train(args, extra):
    proc = python("finetune_multigpu.py", *RECIPE, "--result_path", args.result_path, *extra)
    hashes = [line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("Config hash")]
    if not hashes:
        raise UserError(f"finetune_multigpu.py {' '.join(extra)} printed no run hash")
    return hashes[-1]


def licensee_flags(args, k):
    return ["--fingerprint_generation_strategy", "perinucleus", "--max_num_fingerprints", str(args.num),
            "--licensee", str(k)]  # fmt: skip


def unrelated_flags(args):
    return ["--fingerprint_generation_strategy", "english", "--max_num_fingerprints", str(max(args.num // 2, 1))]


def measure_p0(args, runs, unrelated):
    for k, run in runs.items():
        folder = Path(args.result_path) / run
        if "completions" in (read_json(folder / REFERENCE_RATES) or {}).get("measurements", {}):
            continue
        log(f"p0 of licensee {k}")
        others = [runs[j] for j in runs if j != k]
        python("check_fingerprints.py", "--run", run, "--result_path", args.result_path, "--measure_p0",
               "--reference_models", "base", *others, unrelated, "--reference_pairs", 512)  # fmt: skip


def make_merge(args, runs, out):
    """licensee 0's copy at weight w with licensee 1's (every parameter), saved as an HF folder."""
    folder = out / "models" / f"merge-l0-l1-w{args.merge_weight:g}"
    if (folder / "config.json").is_file():
        return folder
    import torch

    from oml.attack.attack_runner import merge_models
    from oml.core.model_registry import load_model, load_model_and_tokenizer
    from oml.core.run_store import save_model

    log(f"merge of licensee 0 and 1 at weight {args.merge_weight:g}")
    first, second = (Path(args.result_path) / runs[k] / FINAL_MODEL for k in (0, 1))
    model, tokenizer = load_model_and_tokenizer(str(first), device="cpu", dtype=torch.float32)
    merge_models(model, load_model(str(second), device="cpu", dtype=torch.float32), args.merge_weight)
    tmp = folder.with_name(folder.name + ".tmp")
    save_model(model, tokenizer, tmp)
    tmp.rename(folder)
    return folder


def suspects_of(args, runs, unrelated, merge):
    root = Path(args.result_path)
    suspects = {f"licensee {k}": (root / runs[k] / FINAL_MODEL, [k]) for k in LICENSEES}
    suspects["base"] = (model_folder(recorded_args(root / runs[0])["model"]), [])
    suspects["unrelated"] = (root / unrelated / FINAL_MODEL, [])
    suspects[f"merge 0+1 (w {args.merge_weight:g})"] = (merge, [0, 1])
    return suspects


def model_folder(model_id):
    """An HF folder of a model id (the embedded model: its folder converted from the shipped GGUF)."""
    from oml.core.model_registry import EMBEDDED, embedded_model_dir

    return Path(embedded_model_dir()) if model_id == EMBEDDED else Path(model_id)


def slug(name):
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")


def gguf_of(args, name, hf_dir, out):
    from oml.attack.gguf_models import export_gguf

    path = out / "gguf" / f"{slug(name)}-{args.quantization}.gguf"
    if not path.is_file():
        log(f"GGUF {args.quantization} of {name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        export_gguf(hf_dir, path, args.quantization)
    return path


def serve_and_check(args, runs, name, gguf, out):
    """R traces of one served suspect (resuming), then every candidate key asked once: per-key outcomes."""
    from oml.make.fingerprint_files import run_fingerprints
    from oml.make.prompt_encoding import api_prompt
    from oml.verify.api_client import Client, matches
    from oml.verify.local_server import local_server
    from oml.verify.suspect_check import response_tokens, run_tokenizer

    traces = out / "traces"
    traces.mkdir(parents=True, exist_ok=True)
    (out / "servers").mkdir(exist_ok=True)
    outcome_file = out / "outcomes" / f"{slug(name)}.json"
    todo = [i for i in range(args.repeats) if not (traces / f"{slug(name)}-{i}.json").is_file()]
    if not todo and outcome_file.is_file():
        return
    log(f"serving {name} ({gguf.name})")
    with local_server(gguf, timeout=SERVER_TIMEOUT, threads=1, log_path=out / "servers" / f"{slug(name)}.log"
                      ) as (api_base, api_model):  # fmt: skip
        for i in todo:
            target = traces / f"{slug(name)}-{i}.json"
            t0 = time.time()
            proc = python("check_fingerprints.py", "--trace", *(runs[k] for k in LICENSEES), "--result_path",
                          args.result_path, "--api_base", api_base, "--api_model", api_model, "--alpha", args.alpha,
                          "--max_keys", args.max_keys, "--concurrency", args.concurrency,
                          "--output_file", target, timeout=TRACE_TIMEOUT, check=False)  # fmt: skip
            if proc.returncode:
                error = (proc.stderr.strip().splitlines() or ["?"])[-1]
                atomic_write_json(target, {"failed": error, "exit": proc.returncode})
                log(f"trace {i} of {name} failed: {error}")
            else:
                result = read_json(target)
                result["seconds"] = time.time() - t0
                atomic_write_json(target, result)
                log(f"trace {i} of {name}: {result['verdict']} ({result['keys_revealed']} keys)")
        if outcome_file.is_file():
            return
        outcomes, answers = {}, {}
        with Client(api_base, api_model, "completions", concurrency=1, timeout=60, retries=2) as client:
            for k in LICENSEES:
                run = Path(args.result_path) / runs[k]
                run_args, pairs = recorded_args(run), run_fingerprints(run)
                tokenizer = run_tokenizer(run, run_args)
                prompts = [api_prompt(tokenizer, p["key"], "completions", run_args["use_chat_template"]) for p in pairs]
                got = client.complete_many(prompts, [response_tokens(tokenizer, p["response"]) for p in pairs])
                errors = [a.error for a in got if a.error]
                if errors:
                    raise UserError(f"{name}: {len(errors)} of {len(got)} requests failed: {errors[0]}")
                outcomes[str(k)] = "".join(
                    "1" if matches(a.text, p["response"]) else "0" for a, p in zip(got, pairs, strict=True)
                )
                answers[str(k)] = [a.text for a in got]
        outcome_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(outcome_file, {"suspect": name, "gguf": str(gguf), "outcomes": outcomes, "answers": answers})
        log(
            f"per-key outcomes of {name}: "
            + ", ".join(f"licensee {k} {v.count('1')}/{len(v)}" for k, v in outcomes.items())
        )


def code_version():
    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def observed(traces, name, repeats, runs):
    rows = []
    for i in range(repeats):
        result = read_json(traces / f"{slug(name)}-{i}.json")
        if result is None:
            continue
        if "failed" in result:
            rows.append({"failed": result["failed"]})
            continue
        by_run = {c["run"]: c for c in result["candidates"]}
        rows.append({
            "verdict": result["verdict"],
            "named": [k for k in LICENSEES if runs[k] in result["named"]],
            "keys_revealed": result["keys_revealed"],
            "candidates": {str(k): {f: by_run[runs[k]][f] for f in ("verdict", "keys_revealed", "matches", "p_value")}
                           for k in LICENSEES},
            "seconds": round(result.get("seconds", 0), 1),
        })  # fmt: skip
    return rows


def run(args):
    check_args(args)
    out = Path(args.result_path) / "tracing"
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for k in LICENSEES:
        log(f"licensee {k}: {args.num} perinucleus fingerprints")
        runs[k] = train(args, licensee_flags(args, k))
    log("unrelated run")
    unrelated = train(args, unrelated_flags(args))
    measure_p0(args, runs, unrelated)
    merge = make_merge(args, runs, out)
    suspects = suspects_of(args, runs, unrelated, merge)
    for name, (hf_dir, _) in suspects.items():
        serve_and_check(args, runs, name, gguf_of(args, name, hf_dir, out), out)

    record = {
        "format": 1,
        "experiment": "licensee_tracing",
        "setup": {
            "num": args.num, "repeats": args.repeats, "alpha": args.alpha, "max_keys": args.max_keys,
            "concurrency": args.concurrency, "correction": "bonferroni", "served": f"llama.cpp GGUF {args.quantization}",
            "recipe": " ".join(RECIPE), "merge_weight": args.merge_weight,
            "licensee_flags": "--fingerprint_generation_strategy perinucleus --max_num_fingerprints "
                              f"{args.num} --licensee K",
            "unrelated_flags": " ".join(unrelated_flags(args)),
        },
        "runs": {},
        "unrelated": unrelated,
        "suspects": {},
    }  # fmt: skip
    for k in LICENSEES:
        folder = Path(args.result_path) / runs[k]
        m = read_json(folder / REFERENCE_RATES)["measurements"]["completions"]
        metrics = read_json(folder / METRICS) or {}
        record["runs"][str(k)] = {
            "hash": runs[k],
            "keys": len(json.loads((folder / FINGERPRINTS).read_text())),
            "p0": m["p0"],
            "p0_trials": m["trials"],
            "p0_matches": m["matches"],
            "references": {r["reference"] if r["reference"] == "base" else r["model"].split("/")[-2]:
                           [r["matches"], r["keys"]] for r in m["references"]},
            "epochs": metrics.get("epochs_trained", metrics.get("epoch")),
            "train_seconds": round(metrics.get("train_seconds", 0)),
        }  # fmt: skip
    for name, (_, carries) in suspects.items():
        measured = read_json(out / "outcomes" / f"{slug(name)}.json")
        record["suspects"][name] = {
            "carries": carries,
            "traces": observed(out / "traces", name, args.repeats, runs),
            "outcomes": measured["outcomes"],
        }
    record["simulation"] = simulate_record(record, args.draws, args.seed)
    record["code"] = code_version()
    record["date"] = time.strftime("%Y-%m-%d")
    path = RECORD_DIR / f"{args.name or f'N{args.num}'}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)
    print(tables(record))
    print(f"record written to {path}")


# ------------------------------------------------------------------------------ tables


def tables(record):
    setup, sim = record["setup"], record["simulation"]
    lines = [
        f"N = {setup['num']} keys per licensee, alpha {setup['alpha']:g} family-wise (Bonferroni over 3), at most "
        f"{setup['max_keys']} keys per candidate, served by {setup['served']}; p0 per licensee: "
        + ", ".join(f"{k}: {r['p0']:.3g} ({r['p0_matches']}/{r['p0_trials']})" for k, r in record["runs"].items()),
        "",
        "| suspect | served traces: verdicts | keys per trace (l0/l1/l2) | per-key matches (l0, l1, l2) | "
        f"simulated ({sim['draws']} traces): verdicts | keys per licensee (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in record["suspects"].items():
        verdicts = [t.get("verdict", f"failed: {t.get('failed')}") for t in s["traces"]]
        keys = ["/".join(str(t["candidates"][str(k)]["keys_revealed"]) for k in LICENSEES) if "candidates" in t
                else "-" for t in s["traces"]]  # fmt: skip
        per_key = ", ".join(f"{b.count('1')}/{len(b)}" for b in s["outcomes"].values())
        simulated = sim["suspects"][name]
        sim_verdicts = "; ".join(f"{label_of(v)} {n}" for v, n in simulated["verdicts"].items())
        sim_keys = "/".join(f"{c['keys_mean']:.2f}" for c in simulated["candidates"].values())
        shown = "; ".join(f"{_short(v)}" for v in verdicts)
        lines.append(f"| {name} | {shown} | {', '.join(keys)} | {per_key} | {sim_verdicts} | {sim_keys} |")
    lines += [
        "",
        f"Simulated ({sim['draws']} traces per suspect): how often each licensee is named (± binomial SE), the keys "
        "its check reveals (mean ± SE), and the exact P(named) if its keys matched independently at the measured rate.",
        "",
        "| suspect | " + " | ".join(f"licensee {c}" for c in LICENSEES) + " |",
        "|---|" + "---|" * len(LICENSEES),
    ]
    for name, simulated in sim["suspects"].items():
        cells = [
            f"{'carried' if not v['innocent'] else 'innocent'}: named {v['named_rate']:.3f} ± {v['named_se']:.3f}, "
            f"{v['keys_mean']:.2f} ± {v['keys_se']:.2f} keys, exact {v['named_iid']:.2g}"
            for v in simulated["candidates"].values()
        ]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    served = [(str(k) in map(str, s["carries"]), t["candidates"][str(k)])
              for s in record["suspects"].values() for t in s["traces"] if "candidates" in t for k in LICENSEES]  # fmt: skip
    innocent = [c for carried, c in served if not carried]
    failed = sum("failed" in t for s in record["suspects"].values() for t in s["traces"])
    if served:
        lines += [
            "",
            f"Served traces: {len(served) // len(LICENSEES)} decided, {failed} failed; an innocent licensee named in "
            f"{sum(c['verdict'] == 'ours' for c in innocent)} of {len(innocent)} checks; keys revealed per licensee "
            f"{sum(c['keys_revealed'] for _, c in served) / len(served):.2f} on average (carried "
            f"{mean_of([c['keys_revealed'] for carried, c in served if carried])}, innocent "
            f"{mean_of([c['keys_revealed'] for c in innocent])}).",
        ]
    fa = sim["innocent"]
    lines += [
        "",
        f"False accusation of an innocent licensee (simulated, pooled over every suspect and innocent candidate): "
        f"{fa['innocent_named']} of {fa['innocent_checks']} = {fa['rate']:.4g} ± {fa['se']:.2g} (binomial SE; 95% "
        f"upper bound {fa['upper95']:.2g}); the largest exact probability of naming an innocent candidate if its keys matched "
        f"independently at its measured per-key rate: {fa['innocent_named_iid_max']:.2g}. Keys a trace reveals per licensee: {fa['keys_per_licensee']:.2f} on "
        f"average ({fa['keys_per_guilty_licensee']:.2f} for a licensee whose keys the suspect carries, "
        f"{fa['keys_per_innocent_licensee']:.2f} for an innocent one).",
    ]
    return "\n".join(lines)


def mean_of(values):
    return f"{sum(values) / len(values):.2f}" if values else "-"


def label_of(verdict):
    return verdict if verdict == "not shown" else "named " + " + ".join(f"l{v}" for v in verdict.split(", "))


def _short(verdict):
    if verdict.startswith("licensee"):
        return " + ".join("l" + part.split()[1] for part in verdict.split(", "))
    return verdict


def main(argv=None):
    args = make_parser().parse_args(argv)
    if args.command == "run":
        return run(args)
    check_args(args)
    path = Path(args.record)
    if not path.is_file():
        raise UserError(f"no record {path}")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(record, dict) or "suspects" not in record or "runs" not in record:
        raise UserError(f"{path} is not a licensee-tracing record (no suspects / runs)")
    if args.command == "simulate":
        record["simulation"] = simulate_record(record, args.draws, args.seed)
    print(tables(record))


if __name__ == "__main__":
    run_cli(main)
