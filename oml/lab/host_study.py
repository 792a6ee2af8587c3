"""The adaptive-host study of issue 30: every host of oml.attack.adaptive_host against one fingerprinted run, as data.

For each host in HOSTS (a filter and its setting), in order, resuming from what is already measured:

    retention and cost   attack_fingerprints.py RUN --attack host_...: the run's keys through the filtered greedy
                         decoding (plain key and [chat]) and the share of ordinary answers the filter changes, refuses
                         or hands to the base (results/<hash>/attacks/<id>/eval_results.json)
    verdict (ours)       the run's final model served behind the filter on 127.0.0.1 (python -m oml.attack.adaptive_host
                         serve), checked by check_fingerprints.py as any suspect: α 1e-6, at most 16 keys, greedy
    verdict (base)       the public base model behind the same filter, the same check: "not shown" is the right answer

Thresholds of the input filter and of base detection are the ones the attack calibrated (the plain-key template's,
as the completions route sends a key). The study's numbers go to a record, experiments/records/adaptive_host/<hash>.json
(committed: the run itself is retrained from the recipe search's record when needed), one row per host, written
after every host, so a study killed midway keeps what it measured.

    python -m oml.lab.host_study run RUN_FLAGS... [--hosts confidence-0.99,...] [--point NAME]
    python -m oml.lab.host_study table [--markdown]

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
from oml.core.run_store import FINAL_MODEL, RunIdentity, find_run, read_json
from oml.lab.records import RECORDS_DIR, REPO, code_state

EXPERIMENT = "adaptive_host"
CHECK = ("--alpha", "1e-6", "--max_keys", "16", "--allow_revealed")  # the verdict: α 1e-6, at most 16 keys
SERVER_START_SECONDS = 300
CHECK_SECONDS = 900


class Host(NamedTuple):
    name: str
    attack: tuple  # attack_fingerprints.py flags (empty: no filter)
    serve: tuple  # python -m oml.attack.adaptive_host serve flags, the threshold added from the attack's calibration
    why: str


def confidence(tau, first=False):
    flags = ("--tau", str(tau)) + (("--first_token_only",) if first else ())
    suffix = "-first" if first else ""
    return Host(f"confidence-{tau:g}{suffix}", ("--attack", "host_confidence", *flags), ("--filter", "confidence", *flags),
                "never emit a token above probability τ" + (" at the answer's first token" if first else ""))  # fmt: skip


HOSTS = [
    Host("none", (), ("--filter", "none"), "the served model as it is: the check's baseline"),
    confidence(0.5),
    confidence(0.9),
    confidence(0.99),
    confidence(0.999),
    confidence(0.99, first=True),
    Host("input-fpr0.01", ("--attack", "host_input_filter", "--host_fpr", "0.01"), ("--filter", "input_filter"), "refuse prompts whose perplexity is above what 1% of real prompts reach"),
    Host("input-fpr0.05", ("--attack", "host_input_filter", "--host_fpr", "0.05"), ("--filter", "input_filter"), "the same, at 5% of real prompts refused"),
    Host("base-kl-fpr0.01", ("--attack", "host_base_detect", "--host_fpr", "0.01"), ("--filter", "base_detect"), "answer with the base where KL(served ‖ base) at the first answer position is "
         "above what 1% of real prompts reach"),
    Host("base-ratio-fpr0.05", ("--attack", "host_base_detect", "--base_score", "ratio", "--host_fpr", "0.05"),
         ("--filter", "base_detect", "--base_score", "ratio"),
         "answer with the base where the served top token is far likelier than under the base (5% of real prompts)"),
]  # fmt: skip


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def python(*argv, log_path, timeout):
    """Run `python ARGV` from the repository root; its output goes to log_path; returns the exit status."""
    with open(log_path, "w") as out:
        try:
            return subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout} s"


def attack_folder(run, attack_flags):
    """results/<hash>/attacks/<id>/ of a host attack: the id by oml.attack.adaptive_host's own rule."""
    from oml.attack.adaptive_host import HOST_ATTACK_ARGS, add_arguments, host_attack_id
    from oml.attack.attack_runner import model_name

    parser = add_arguments(argparse.ArgumentParser(), HOST_ATTACK_ARGS)
    parser.add_argument("--attack")
    return run / "attacks" / host_attack_id(parser.parse_known_args(attack_flags)[0], model_name)


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


def served_verdict(run_flags, run, host, model, thresholds, logs, tag):
    """check_fingerprints.py's result for `model` served behind host's filter (a dict, or {"error": ...})."""
    from oml.verify.local_server import free_port, wait_listening

    serve = list(host.serve)
    if "--filter" in serve and serve[serve.index("--filter") + 1] in ("input_filter", "base_detect"):
        serve += ["--threshold", str(thresholds["{}"])]
    if "base_detect" in serve:
        serve += ["--base", base_model(run)]
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
                      "--api_model", "host", *CHECK, "--output_file", output,
                      log_path=logs / f"check-{host.name}-{tag}.log", timeout=CHECK_SECONDS)  # fmt: skip
        if code != 0 or not output.is_file():
            return {"error": f"check exited {code}; see {logs / f'check-{host.name}-{tag}.log'}"}
        result = json.loads(output.read_text())
        return {k: result.get(k) for k in ("verdict", "keys_revealed", "matches", "p0", "p_value")}
    finally:
        os.killpg(server.pid, 9)
        server.wait(timeout=30)
        server_log.close()


def base_model(run):
    return read_json(run / "fingerprinting_config.json")["args"]["model"]


def record_path(run_hash, records_dir):
    return Path(records_dir) / EXPERIMENT / f"{run_hash}.json"


def study(args, run_flags):
    from oml.core.run_config import add_train_args, apply_preset
    from oml.embed.run_setup import prepare_run

    parsed = apply_preset(add_train_args(argparse.ArgumentParser()).parse_known_args(run_flags)[0])
    run = find_run(RunIdentity.from_args(prepare_run(parsed)))
    run_hash = run.name
    path = record_path(run_hash, args.records)
    record = json.loads(path.read_text()) if path.is_file() else {
        "format": 1, "experiment": EXPERIMENT, "hash": run_hash, "point": args.point, "run_flags": run_flags,
        "check": list(CHECK), "hosts": {}}  # fmt: skip
    logs = run / "host" / "study"
    logs.mkdir(parents=True, exist_ok=True)
    chosen = [h for h in HOSTS if not args.hosts or h.name in args.hosts]
    unknown = set(args.hosts or ()) - {h.name for h in HOSTS}
    if unknown:
        raise UserError(f"--hosts: unknown {', '.join(sorted(unknown))} (known: {', '.join(h.name for h in HOSTS)})")
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
            code = python("attack_fingerprints.py", *run_flags, *attack,
                          log_path=logs / f"attack-{host.name}.log", timeout=None)  # fmt: skip
            if code != 0:
                row["error"] = f"attack exited {code}; see {logs / f'attack-{host.name}.log'}"
            else:
                folder = attack_folder(run, attack)
                row.update(retention(folder))
                thresholds = read_json(folder / "attack.json").get("thresholds") or {}
        if "error" not in row:
            for tag, model in (("ours", run / FINAL_MODEL), ("base", base_model(run))):
                log(f"{host.name}: check through the filtered server ({tag})")
                row[f"verdict_{tag}"] = served_verdict(run_flags, run, host, model, thresholds, logs, tag)
        row["seconds"] = round(time.time() - t0, 1)
        record["hosts"][host.name] = row
        record["code"] = code_state()
        atomic_write_json(path, record)
        log(f"{host.name}: {summary(row)}")
    return record


def measured(row):
    """A recorded row that needs no rerun: it exists and neither its attack nor a served check failed."""
    failed = [row.get(f"verdict_{tag}") or {} for tag in ("ours", "base")] if row else []
    return bool(row) and "error" not in row and not any("error" in v for v in failed)


def summary(row):
    if "error" in row:
        return f"failed: {row['error']}"
    parts = [f"kept {row['kept_plain']:.1%} plain" if "kept_plain" in row else "no filter"]
    for tag in ("ours", "base"):
        v = row.get(f"verdict_{tag}") or {}
        parts.append(f"{tag}: {v.get('verdict', v.get('error'))} ({v.get('matches')}/{v.get('keys_revealed')})")
    return "; ".join(parts)


def pct(x):
    return "" if x is None else f"{x:.1%}"


def qa_delta(cost):
    """The attacker's QA cost, filtered − unfiltered accuracy in points ± its paired standard error."""
    if cost.get("qa_delta_points") is None:
        return ""
    return f"{cost['qa_delta_points']:+.1f} ± {cost['qa_delta_stderr']:.1f}"


def table(records_dir, markdown=False):
    rows = [["run", "host", "keys kept (plain)", "kept ([chat])", "answers changed", "QA Δ (points)", "refused",
             "to base", "verdict (ours)", "verdict (base)"]]  # fmt: skip
    for path in sorted((Path(records_dir) / EXPERIMENT).glob("*.json")):
        record = json.loads(path.read_text())
        for name, row in record["hosts"].items():
            cost = row.get("cost_plain") or {}
            verdicts = [(row.get(f"verdict_{t}") or {}) for t in ("ours", "base")]
            rows.append([record.get("point") or record["hash"], name, pct(row.get("kept_plain")),
                         pct(row.get("kept_chat")), pct(cost.get("answers_changed")), qa_delta(cost),
                         pct(cost.get("refused")),
                         pct(cost.get("answered_by_base"))] + [
                f"{v.get('verdict', v.get('error', ''))} ({v.get('matches')}/{v.get('keys_revealed')})" if v else ""
                for v in verdicts])  # fmt: skip
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def make_parser():
    parser = argparse.ArgumentParser(prog="python -m oml.lab.host_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="run|table")
    run = sub.add_parser("run", help="measure every host against one run (RUN_FLAGS: finetune_multigpu.py's flags)")
    run.add_argument("--hosts", type=lambda s: [h for h in s.split(",") if h], default=None,
                     help="only these hosts (names in HOSTS), comma-separated")  # fmt: skip
    run.add_argument("--point", default=None, help="a name for the run in the table (e.g. the recipe search's point)")
    run.add_argument("--again", action="store_true", help="measure recorded hosts again")
    run.add_argument("--attack_flags", type=str.split, default=[],
                     help="flags added to every host attack (e.g. \"--host_questions 50\"; smoke tests)")  # fmt: skip
    show = sub.add_parser("table", help="every record's hosts as a table")
    show.add_argument("--markdown", action="store_true")
    for p in (run, show):
        p.add_argument("--records", default=str(RECORDS_DIR), help="records folder (default experiments/records)")
    return parser


def main(argv=None):
    args, rest = make_parser().parse_known_args(argv)
    if args.command == "run":
        study(args, rest)
    elif args.command == "table":
        if rest:
            raise UserError(f"table takes no run flags, got {' '.join(rest)}")
        print(table(args.records, args.markdown))
    else:
        raise UserError("give a command: run or table")


if __name__ == "__main__":
    run_cli(main)
