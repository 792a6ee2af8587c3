"""The adaptive-host study of issue 30: every host of oml.attack.adaptive_host against one fingerprinted run, as data.

For each host in HOSTS (a filter and its setting), in order, resuming from what is already measured:

    retention and cost   attack_fingerprints.py RUN --attack host_...: the run's keys through the filtered greedy
                         decoding (plain key and [chat]) and the share of ordinary answers the filter changes, refuses
                         or hands to the base (results/<hash>/attacks/<id>/eval_results.json)
    verdict (ours)       the run's final model served behind the filter on 127.0.0.1 (python -m oml.attack.adaptive_host
                         serve), checked by check_fingerprints.py as any suspect: α 1e-6, at most 16 keys, greedy
    verdict (base)       the public base model behind the same filter, the same check: "not shown" is the right answer

A host may have no attack step (the sampled hosts: no filter, the server samples every answer at T, top_p 0.9): its
row holds the verdicts only. A host with check flags adds them to check_fingerprints.py's command (the sampled hosts:
--samples 5 --api_temperature T --api_top_p 0.9, a majority of five answers); where that rule has no p0 yet, it is
measured first, once per run and rule (check_fingerprints.py --measure_p0 with the same rule flags,
--reference_models base: sampled locally, seeded, at the same temperature and top_p).

The owner's setting: a run fingerprinted from the owner's own model (--model_path) while the host holds only a
public base (--public_base MODEL). Base detection then compares with, and answers flagged queries with, the public
model (the attack's --host_base, the server's --base); the "base" verdict is the public model's, and p0 is measured on
both the run's base and the public one.

Thresholds of the input filter and of base detection are the ones the attack calibrated (the plain-key template's,
as the completions route sends a key). The study's numbers go to a record, experiments/records/adaptive_host/<hash>.json
(committed: the run itself is retrained from the recipe search's record when needed), one row per host, written
after every host, so a study killed midway keeps what it measured.

    python -m oml.lab.host_study run RUN_FLAGS... [--hosts confidence-0.99,...] [--point NAME]
    python -m oml.lab.host_study roc RUN_FLAGS... [--real_prompts 500] [--roc_keys 256]
    python -m oml.lab.host_study table [--markdown]

`roc` records, under the record's "roc" key, the AUC and the share of keys kept at the thresholds that flag 1% and
5% of real prompts (python -m oml.attack.adaptive_host roc) for the run's keys under input_filter (the served
model's perplexity), confidence and base_detect (kl and ratio), and under input_filter for the keys of other
strategies (KEY_FILES: English, random words) and of other models (every JSON file under ../shared/peer_data/, read
in place; skipped with a log line when absent): --roc_keys keys of each, --real_prompts real prompts.

RUN_FLAGS are finetune_multigpu.py's flags naming a trained run (with --result_path where it lives).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from oml.core.errors import UserError, run_cli
from oml.core.files import atomic_write_json
from oml.core.run_store import FINAL_MODEL, REFERENCE_RATES, RunIdentity, find_run, read_json
from oml.lab.records import RECORDS_DIR, REPO, code_state
from oml.lab.steps import attack_folder, format_table, log, python, record_row

EXPERIMENT = "adaptive_host"
CHECK = ("--alpha", "1e-6", "--max_keys", "16", "--allow_revealed")  # the verdict: α 1e-6, at most 16 keys
SERVER_START_SECONDS = 300
CHECK_SECONDS = 900
P0_SECONDS = 3600
ROC_SECONDS = 3600
ROC_FILTERS = ("input_filter", "confidence", "base_detect")  # the run's keys under each
KEY_FILES = (("english", "generated_data/fingerprints-english-1024.json"),
             ("random_word", "generated_data/fingerprints-random_word.json"))  # fmt: skip
PEER_DATA = REPO.parent / "shared" / "peer_data"  # other models' natural keys, read in place (never copied here)


class Host(NamedTuple):
    name: str
    attack: tuple  # attack_fingerprints.py flags (empty: no attack step, no retention measured)
    serve: tuple  # python -m oml.attack.adaptive_host serve flags, the threshold added from the attack's calibration
    why: str
    check: tuple = ()  # flags added to check_fingerprints.py's (a sampled rule: its p0 is measured first)


def confidence(tau, first=False):
    flags = ("--tau", str(tau)) + (("--first_token_only",) if first else ())
    suffix = "-first" if first else ""
    return Host(f"confidence-{tau:g}{suffix}", ("--attack", "host_confidence", *flags), ("--filter", "confidence", *flags),
                "never emit a token above probability τ" + (" at the answer's first token" if first else ""))  # fmt: skip


def sampled(temperature, top_p=0.9, samples=5):
    """A host that samples every answer at temperature T, top_p P (no filter), checked by a majority of k samples at T
    and P (p0 sampled at T and P too)."""
    return Host(f"sampled-t{temperature:.1f}", (),
                ("--filter", "none", "--host_temperature", str(temperature), "--host_top_p", str(top_p)),
                f"no filter; every answer sampled at temperature {temperature:g}, top_p {top_p:g} (as deployed); the "
                f"check asks each key {samples} times at {temperature:g} and needs a majority",
                ("--samples", str(samples), "--api_temperature", str(temperature), "--api_top_p", str(top_p)))  # fmt: skip


HOSTS = [
    Host("none", (), ("--filter", "none"), "the served model as it is: the check's baseline"),
    confidence(0.5),
    confidence(0.9),
    confidence(0.99),
    confidence(0.999),
    confidence(0.99, first=True),
    confidence(0.9, first=True),
    confidence(0.8, first=True),
    confidence(0.5, first=True),
    confidence(0.3, first=True),
    Host("input-fpr0.01", ("--attack", "host_input_filter", "--host_fpr", "0.01"), ("--filter", "input_filter"), "refuse prompts whose perplexity is above what 1% of real prompts reach"),
    Host("input-fpr0.05", ("--attack", "host_input_filter", "--host_fpr", "0.05"), ("--filter", "input_filter"), "the same, at 5% of real prompts refused"),
    Host("base-kl-fpr0.01", ("--attack", "host_base_detect", "--host_fpr", "0.01"), ("--filter", "base_detect"), "answer with the base where KL(served ‖ base) at the first answer position is "
         "above what 1% of real prompts reach"),
    Host("base-kl-fpr0.05", ("--attack", "host_base_detect", "--host_fpr", "0.05"), ("--filter", "base_detect"),
         "the same at 5% of real prompts handed to the base"),
    Host("base-ratio-fpr0.05", ("--attack", "host_base_detect", "--base_score", "ratio", "--host_fpr", "0.05"),
         ("--filter", "base_detect", "--base_score", "ratio"),
         "answer with the base where the served top token is far likelier than under the base (5% of real prompts)"),
    sampled(0.7),
    sampled(1.0),
]  # fmt: skip


def retention(folder):
    """Keys that still answer (plain, [chat]) and the attacker's cost, from the host attack's eval_results.json."""
    results = read_json(folder / "eval_results.json")
    templates = {t["template"]: t for t in results["fingerprint_accuracy"]["templates"]}
    out = {"keys": results["num_fingerprints"]}
    for template, name in (("{}", "plain"), ("<chat>{}", "chat")):
        if template in templates:
            out[f"kept_{name}"] = templates[template]["accuracy"]
        cost = results["host"]["templates"].get(template)
        if cost:
            out[f"cost_{name}"] = {k: v for k, v in cost.items() if k != "threshold"}
    return out


def serve_flags(host, public, thresholds):
    """python -m oml.attack.adaptive_host serve's filter flags for a host: the attack's calibrated threshold (the
    plain-key template's) and, for base detection, the public model."""
    serve = list(host.serve)
    if "--filter" in serve and serve[serve.index("--filter") + 1] in ("input_filter", "base_detect"):
        serve += ["--threshold", str(thresholds["{}"])]
    if "base_detect" in serve:
        serve += ["--base", public]
    return serve


def served_verdict(run_flags, host, model, public, thresholds, logs, tag):
    """check_fingerprints.py's result for `model` served behind host's filter (a dict, or {"error": ...})."""
    from oml.verify.local_server import free_port, wait_listening

    serve = serve_flags(host, public, thresholds)
    port = free_port()
    server_log = open(logs / f"serve-{host.name}-{tag}.log", "w")  # noqa: SIM115
    server = subprocess.Popen([sys.executable, "-m", "oml.attack.adaptive_host", "serve", "--model", str(model),
                               "--port", str(port), *serve], cwd=REPO, stdout=server_log, stderr=subprocess.STDOUT,
                              start_new_session=True)  # fmt: skip
    try:
        wait_listening(server, f"http://127.0.0.1:{port}/v1", SERVER_START_SECONDS, "the filtered server")
        output = logs / f"check-{host.name}-{tag}.json"
        output.unlink(missing_ok=True)
        code = python("check_fingerprints.py", *run_flags, "--api_base", f"http://127.0.0.1:{port}/v1",
                      "--api_model", "host", *CHECK, *host.check, "--output_file", output,
                      log_path=logs / f"check-{host.name}-{tag}.log", timeout=CHECK_SECONDS)  # fmt: skip
        if code != 0 or not output.is_file():
            return {"error": f"check exited {code}; see {logs / f'check-{host.name}-{tag}.log'}"}
        result = json.loads(output.read_text())
        return {k: result.get(k) for k in ("verdict", "keys_revealed", "matches", "p0", "p_value")}
    finally:
        os.killpg(server.pid, 9)
        server.wait(timeout=30)
        server_log.close()


def check_rule_key(check_flags):
    """Where check_fingerprints.py stores p0 for a check with these flags (oml.verify.suspect_check.p0_key): the
    route alone ("completions") for the greedy rule, with the rule for a sampled one."""
    from oml.verify.suspect_check import add_check_args, p0_key

    flags = add_check_args(argparse.ArgumentParser()).parse_known_args(list(check_flags))[0]
    return p0_key(flags)


def ensure_p0(run_flags, run, host, logs, public=None):
    """Measure p0 for a host's check rule (greedy, or sampled) unless the run has it: check_fingerprints.py
    --measure_p0 with the same rule flags on the base model (and on the public model when the host holds another).
    Returns None when done (or not needed), else an error."""
    key = check_rule_key(host.check)
    if key in (read_json(run / REFERENCE_RATES) or {}).get("measurements", {}):
        log(f"{host.name}: p0 for {key} measured")
        return None
    log(f"{host.name}: measuring p0 for {key} on the base model")
    log_path = logs / f"p0-{key.replace(':', '-')}.log"
    references = ["base"] + ([public] if public and public != base_model(run) else [])
    code = python("check_fingerprints.py", *run_flags, "--measure_p0", *host.check, "--reference_models", *references,
                  log_path=log_path, timeout=P0_SECONDS)  # fmt: skip
    return None if code == 0 else f"p0 measurement exited {code}; see {log_path}"


def base_model(run):
    return read_json(run / "fingerprinting_config.json")["args"]["model"]


def record_path(run_hash, records_dir):
    return Path(records_dir) / EXPERIMENT / f"{run_hash}.json"


def open_record(args, run_flags):
    """(the run's folder, its record's path, the record so far, the study's log folder) for RUN_FLAGS."""
    from oml.core.run_config import add_train_args, apply_preset
    from oml.embed.run_setup import prepare_run

    parsed = apply_preset(add_train_args(argparse.ArgumentParser()).parse_known_args(run_flags)[0])
    run = find_run(RunIdentity.from_args(prepare_run(parsed)))
    path = record_path(run.name, args.records)
    record = json.loads(path.read_text()) if path.is_file() else {
        "format": 1, "experiment": EXPERIMENT, "hash": run.name, "point": args.point, "run_flags": run_flags,
        "check": list(CHECK), "public_base": args.public_base, "hosts": {}}  # fmt: skip
    if record.get("public_base") != args.public_base:
        raise UserError(f"{path} was measured with --public_base {record.get('public_base')}; a study keeps one")
    logs = run / "host" / "study"
    logs.mkdir(parents=True, exist_ok=True)
    return run, path, record, logs


def study(args, run_flags):
    run, path, record, logs = open_record(args, run_flags)
    chosen = [h for h in HOSTS if not args.hosts or h.name in args.hosts]
    unknown = set(args.hosts or ()) - {h.name for h in HOSTS}
    if unknown:
        raise UserError(f"--hosts: unknown {', '.join(sorted(unknown))} (known: {', '.join(h.name for h in HOSTS)})")
    public = args.public_base or base_model(run)
    for host in chosen:
        row = record["hosts"].get(host.name)
        if measured(row) and not args.again:
            log(f"{host.name}: recorded")
            continue
        t0, row = time.time(), {"why": host.why}
        thresholds = {}
        if host.attack:
            log(f"{host.name}: attack_fingerprints.py {' '.join(host.attack)}")
            attack = [*host.attack, *args.attack_flags]
            if args.public_base and "host_base_detect" in attack:
                attack += ["--host_base", args.public_base]
            code = python("attack_fingerprints.py", *run_flags, *attack,
                          log_path=logs / f"attack-{host.name}.log", timeout=None)  # fmt: skip
            if code != 0:
                row["error"] = f"attack exited {code}; see {logs / f'attack-{host.name}.log'}"
            else:
                folder = attack_folder([*run_flags, *attack])
                row.update(retention(folder))
                thresholds = read_json(folder / "attack.json").get("thresholds") or {}
        if "error" not in row:
            if host.check:
                row["check"] = list(host.check)
            error = ensure_p0(run_flags, run, host, logs, public)
            if error:
                row["error"] = error
        if "error" not in row:
            for tag, model in (("ours", run / FINAL_MODEL), ("base", public)):
                log(f"{host.name}: check through the filtered server ({tag})")
                row[f"verdict_{tag}"] = served_verdict(run_flags, host, model, public, thresholds, logs, tag)
        record_row(path, record, "hosts", host.name, row, t0)
        log(f"{host.name}: {summary(row)}")
    return record


def measured(row):
    """A recorded row that needs no rerun: it exists and neither its attack nor a served check failed."""
    failed = [row.get(f"verdict_{tag}") or {} for tag in ("ours", "base")] if row else []
    return bool(row) and "error" not in row and not any("error" in v for v in failed)


def summary(row):
    if "error" in row:
        return f"failed: {row['error']}"
    parts = [f"kept {row['kept_plain']:.1%} plain" if "kept_plain" in row else "no attack step"]
    if row.get("check"):
        parts.append(f"check {' '.join(row['check'])}")
    for tag in ("ours", "base"):
        v = row.get(f"verdict_{tag}") or {}
        parts.append(f"{tag}: {v.get('verdict', v.get('error'))} ({v.get('matches')}/{v.get('keys_revealed')})")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------ ROC per key strategy


def roc_entries(peer_data=PEER_DATA):
    """(name, filter, keys file or None) of every ROC the study records: the run's keys under every filter, then
    other strategies' and other models' keys under input_filter. Peer files that are absent are skipped (logged)."""
    entries = [(f"run/{f}", f, None) for f in ROC_FILTERS]
    entries += [(f"{name}/input_filter", "input_filter", REPO / path) for name, path in KEY_FILES]
    peers = sorted(Path(peer_data).rglob("*.json")) if Path(peer_data).is_dir() else []
    if not peers:
        log(f"no peer key files under {peer_data}: natural keys of other models skipped")
    for path in peers:
        name = "peer:" + str(path.relative_to(peer_data).with_suffix(""))
        entries.append((f"{name}/input_filter", "input_filter", path))
    return entries


def roc_row(result, keys_file):
    """A record's ROC entry from python -m oml.attack.adaptive_host roc's JSON: per score, the AUC and the keys kept
    at each real-prompt drop rate (the curve and the scores stay in the run's folder)."""
    reports = [{k: r[k] for k in ("score", "keys", "real_prompts", "auc", "at_drop")} for r in result["reports"]]
    shown = os.path.relpath(keys_file, REPO) if keys_file else None  # ../shared/peer_data/... for a peer file
    return {"filter": result["reports"][0]["filter"], "keys_file": shown, "reports": reports}


def study_roc(args, run_flags):
    """The record's "roc" section: every ROC of roc_entries, resuming from what is recorded."""
    run, path, record, logs = open_record(args, run_flags)
    section = record.setdefault("roc", {})
    for name, filter_name, keys_file in roc_entries(args.peer_data):
        if name in section and "error" not in section[name] and not args.again:
            log(f"roc {name}: recorded")
            continue
        tag = name.replace("/", "-").replace(":", "-")
        output = logs / f"roc-{tag}.json"
        output.unlink(missing_ok=True)
        flags = ["--run", run.name, "--result_path", run.parent, "--filter", filter_name, "--real_prompts",
                 args.real_prompts, "--max_keys", args.roc_keys, "--output_file", output]  # fmt: skip
        flags += ["--keys_file", keys_file] if keys_file else []
        flags += ["--base", args.public_base] if args.public_base and filter_name == "base_detect" else []
        log(f"roc {name}")
        code = python("-m", "oml.attack.adaptive_host", "roc", *flags, log_path=logs / f"roc-{tag}.log",
                      timeout=ROC_SECONDS)  # fmt: skip
        if code != 0 or not output.is_file():
            section[name] = {"error": f"roc exited {code}; see {logs / f'roc-{tag}.log'}"}
        else:
            section[name] = roc_row(json.loads(output.read_text()), keys_file)
        record["code"] = code_state()
        atomic_write_json(path, record)
        log(f"roc {name}: {roc_summary(section[name])}")
    return record


def roc_summary(entry):
    if "error" in entry:
        return f"failed: {entry['error']}"
    return "; ".join(f"{r['score']} AUC {r['auc']:.3f}, kept " + ", ".join(
        f"{pct(a['keys_kept'])} at {a['drop']:.0%}" for a in r["at_drop"]) for r in entry["reports"])  # fmt: skip


def pct(x):
    return "" if x is None else f"{x:.1%}"


def qa_delta(cost):
    """The attacker's QA cost, filtered − unfiltered accuracy in points ± its paired standard error."""
    if cost.get("qa_delta_points") is None:
        return ""
    return f"{cost['qa_delta_points']:+.1f} ± {cost['qa_delta_stderr']:.1f}"


def table(records_dir, markdown=False):
    """The hosts' table, then (where a record has a "roc" section) the ROC table."""
    rows = [["run", "host", "keys kept (plain)", "kept ([chat])", "answers changed", "QA Δ (points)", "refused",
             "to base", "verdict (ours)", "verdict (base)", "check"]]  # fmt: skip
    roc_rows = [["run", "keys", "filter", "score", "n keys", "real prompts", "AUC"]
                + [f"keys kept, {d:.0%} real flagged" for d in (0.01, 0.05)]]  # fmt: skip
    for path in sorted((Path(records_dir) / EXPERIMENT).glob("*.json")):
        record = json.loads(path.read_text())
        point = record.get("point") or record["hash"]
        for name, row in record.get("hosts", {}).items():
            cost = row.get("cost_plain") or {}
            verdicts = [(row.get(f"verdict_{t}") or {}) for t in ("ours", "base")]
            rows.append([point, name, pct(row.get("kept_plain")),
                         pct(row.get("kept_chat")), pct(cost.get("answers_changed")), qa_delta(cost),
                         pct(cost.get("refused")),
                         pct(cost.get("answered_by_base"))] + [
                f"{v.get('verdict', v.get('error', ''))} ({v.get('matches')}/{v.get('keys_revealed')})" if v else ""
                for v in verdicts] + [" ".join(row.get("check") or ()) or "greedy"])  # fmt: skip
        for name, entry in record.get("roc", {}).items():
            keys, filter_name = name.rsplit("/", 1)
            if "error" in entry:
                roc_rows.append([point, keys, filter_name, f"failed: {entry['error']}"] + [""] * 5)
                continue
            for r in entry["reports"]:
                kept = {a["drop"]: a["keys_kept"] for a in r["at_drop"]}
                roc_rows.append([point, keys, filter_name, r["score"], str(r["keys"]), str(r["real_prompts"]),
                                 f"{r['auc']:.3f}", pct(kept.get(0.01)), pct(kept.get(0.05))])  # fmt: skip
    tables = [rows] + ([roc_rows] if len(roc_rows) > 1 else [])
    return "\n\n".join(format_table(t, markdown) for t in tables)


def make_parser():
    parser = argparse.ArgumentParser(prog="python -m oml.lab.host_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="run|roc|table")
    run = sub.add_parser("run", help="measure every host against one run (RUN_FLAGS: finetune_multigpu.py's flags)")
    run.add_argument("--hosts", type=lambda s: [h for h in s.split(",") if h], default=None,
                     help="only these hosts (names in HOSTS), comma-separated")  # fmt: skip
    run.add_argument("--point", default=None, help="a name for the run in the table (e.g. the recipe search's point)")
    run.add_argument("--again", action="store_true", help="measure recorded hosts again")
    run.add_argument("--attack_flags", type=str.split, default=[],
                     help="flags added to every host attack (e.g. \"--host_questions 50\"; smoke tests)")  # fmt: skip
    roc = sub.add_parser("roc", help="ROC of the run's keys and other strategies' keys against real prompts")
    roc.add_argument("--point", default=None, help="a name for the run in the table (a new record only)")
    roc.add_argument("--again", action="store_true", help="measure recorded ROCs again")
    roc.add_argument("--real_prompts", type=int, default=500, help="offline QA questions (plus the 8 chat questions)")
    roc.add_argument("--roc_keys", type=int, default=256, help="keys scored per key set (the first N)")
    roc.add_argument("--peer_data", default=str(PEER_DATA), help="other models' key files (every *.json under it)")
    show = sub.add_parser("table", help="every record's hosts (and ROCs) as tables")
    show.add_argument("--markdown", action="store_true")
    for p in (run, roc):
        p.add_argument("--public_base", default=None, metavar="MODEL",
                       help="the public model the host holds when the run was fingerprinted from the owner's own "
                            "model (--model_path): base detection uses it, and its verdict must be 'not shown' "
                            "(default: the run's base model)")  # fmt: skip
    for p in (run, roc, show):
        p.add_argument("--records", default=str(RECORDS_DIR), help="records folder (default experiments/records)")
    return parser


def main(argv=None):
    args, rest = make_parser().parse_known_args(argv)
    if args.command == "run":
        study(args, rest)
    elif args.command == "roc":
        if args.real_prompts <= 0 or args.roc_keys <= 0:
            raise UserError("--real_prompts and --roc_keys must be positive")
        study_roc(args, rest)
    elif args.command == "table":
        if rest:
            raise UserError(f"table takes no run flags, got {' '.join(rest)}")
        print(table(args.records, args.markdown))
    else:
        raise UserError("give a command: run, roc or table")


if __name__ == "__main__":
    run_cli(main)
