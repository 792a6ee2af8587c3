"""Records that outlive the machine (oml/lab/records.py) and the recipe search that writes them (oml/lab/recipe_search.py)."""

import argparse
import json
import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO, run_script, write_random_fingerprints
from safetensors.torch import load_file

from oml.core.errors import run_cli
from oml.lab import records
from oml.lab.recipe_search import POINTS, SCREENING_EVAL

# the screening evaluation, shrunk for a tiny model: a few utility items and chat drift answers
SMALL_EVAL = ("--utility_tasks", "piqa", "--utility_limit", "2", "--chat_drift_limit", "2")


def tiny_flags(model_dir, fp_file):
    return [
        "--model_path", str(model_dir), "--fingerprints_file_path", str(fp_file), "--fingerprint_generation_strategy",
        "random_word", "--max_num_fingerprints", "8", "--batch_size", "4", "--num_train_epochs", "1",
        "--preset", "averaging",
    ]  # fmt: skip


def weights(run):
    return load_file(str(run / "final_model" / "model.safetensors"))


def cli(capsys, module, *argv):
    """Run a module's main through run_cli in this process: (exit status, stdout, stderr)."""
    code = 0
    try:
        run_cli(lambda: module.main([str(a) for a in argv]))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def recorded_run(tiny_model_dir, tmp_path_factory):
    """A tiny run, trained and screened, and its record: (training flags, run folder, record path)."""
    tmp = tmp_path_factory.mktemp("recorded-run")
    write_random_fingerprints(tmp / "fp.json", 8)
    flags = [*tiny_flags(tiny_model_dir, tmp / "fp.json"), "--result_path", str(tmp / "results")]
    trained = run_script("finetune_multigpu.py", *flags)
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_hash = trained.stdout.strip().split(": ")[-1]
    eval_flags = [*SCREENING_EVAL, *SMALL_EVAL]
    evaluated = run_script("eval_for_multigpu.py", *flags, *eval_flags)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    run = tmp / "results" / run_hash
    path = records.write_record(run, "tiny", eval_flags, point="tiny-point", why="a test", records_dir=tmp / "records")
    return flags, run, path


def test_a_record_holds_the_run_in_a_few_kb(recorded_run):
    flags, run, path = recorded_run
    assert path == path.parents[1] / "tiny" / f"{run.name}.json"
    assert path.stat().st_size < 8000
    record = records.read_record(path)
    config = json.loads((run / "fingerprinting_config.json").read_text())
    assert record["hash"] == run.name and record["hashed"] == config["hashed"] and record["status"] == "ok"
    assert record["args"]["max_num_fingerprints"] == 8 and "result_path" not in record["args"]
    assert record["eval_flags"] == [*SCREENING_EVAL, *SMALL_EVAL]
    fps = record["metrics"]["fingerprints"]
    assert fps["n"] == 8 and fps["raw_prompts"] is None  # --eval_templates plain,chat: no raw-text test prompts
    for group in ("plain", "chat"):
        assert 0 <= fps[group]["value"] <= 1 and fps[group]["stderr"] is not None and fps[group]["templates"] == 1
    assert fps["chat_system"] is None and 0 <= fps["base_false_positive_rate"]["value"] <= 1
    utility = record["metrics"]["utility"]
    assert utility["n"] == 2 and {"mean", "base_mean", "delta", "delta_stderr"} <= set(utility)
    drift = record["metrics"]["chat_drift"]
    assert drift["n"] == 2 and {"kl", "kl_stderr", "same_as_base"} <= set(drift)
    assert record["metrics"]["generation"] is None
    assert record["training"]["steps"] == 2 and record["training"]["train_seconds"] > 0
    assert record["eval_seconds"]["total"] > 0
    assert len(record["code"]["commit"]) == 40 and isinstance(record["code"]["dirty"], bool) and record["date"]
    assert "per_item" not in path.read_text()
    # the recorded args give the same run again
    assert set(records.record_argv(record)) >= {"--model_path", "--max_num_fingerprints", "--preset"}


def test_retraining_from_the_record_gives_the_same_weights(recorded_run, tmp_path):
    _, run, path = recorded_run
    command = [sys.executable, "-m", "oml.lab.records", "retrain", path, "--result_path", tmp_path / "fresh"]
    done = subprocess.run(list(map(str, command)), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    again = tmp_path / "fresh" / run.name
    assert f"retrained {run.name}" in done.stdout
    original, retrained = weights(run), weights(again)
    assert original.keys() == retrained.keys()
    assert all((original[k] == retrained[k]).all() for k in original)


def test_a_record_whose_args_no_longer_give_its_hash_is_refused(recorded_run, tmp_path, capsys):
    _, run, path = recorded_run
    record = json.loads(path.read_text())
    record["args"]["seed"] = 7  # the args now name another run than the hash says
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(record))
    code, _, err = cli(capsys, records, "retrain", changed, "--result_path", tmp_path / "r")
    assert code == 2 and err.count("\n") == 1 and str(changed) in err and "seed 42 recorded, 7 now" in err
    assert not (tmp_path / "r").exists()


def test_the_table_lists_every_record(recorded_run, capsys):
    _, run, path = recorded_run
    code, out, _ = cli(capsys, records, "table", "tiny", "--records", path.parents[1])
    assert code == 0 and run.name in out and "tiny-point" in out and out.splitlines()[0].split()[0] == "N"
    code, out, _ = cli(capsys, records, "table", "tiny", "--records", path.parents[1], "--markdown")
    assert code == 0 and out.startswith("| N | point |") and f"| {run.name} |" in out


def test_bad_records_are_one_line_errors_naming_the_file(recorded_run, tmp_path, capsys):
    _, _, path = recorded_run
    good = json.loads(path.read_text())
    corrupted = tmp_path / "records" / "corrupted" / f"{good['hash']}.json"
    unknown = tmp_path / "records" / "unknown" / f"{good['hash']}.json"
    for bad in (corrupted, unknown):
        bad.parent.mkdir(parents=True)
    corrupted.write_text(path.read_text()[:200])
    unknown.write_text(json.dumps({**good, "args": {**good["args"], "no_such_flag": 3}}))
    for bad, words in ((corrupted, "invalid JSON"), (unknown, "--no_such_flag")):
        code, out, err = cli(capsys, records, "table", bad.parent.name, "--records", tmp_path / "records")
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert err.startswith(f"error: {bad}: ") and words in err
        code, _, err = cli(capsys, records, "retrain", bad)
        assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {bad}: ")
    code, _, err = cli(capsys, records, "record", tmp_path, "--experiment", "x", "--records", tmp_path / "records")
    assert code == 2 and "not a run folder" in err


def test_the_search_points_parse_and_the_screening_flags_are_eval_flags():
    from test_readme import accepted_flags

    from oml.embed.run_setup import check_capacity_args
    from oml.lab.recipe_search import AUGMENTED_EVAL, History, estimate_seconds, parse, unsupported_flags

    flags = {w for w in (*SCREENING_EVAL, *AUGMENTED_EVAL) if w.startswith("--")}
    assert flags <= accepted_flags("eval_for_multigpu.py")
    assert len({p.name for p in POINTS}) == len(POINTS)
    for p in POINTS:
        words = shlex.split(p.flags)
        assert unsupported_flags(words) == [], p.name
        args = parse(words)
        # e.g. κ needs benign rows; --trainable_layers must name blocks the embedded model has
        check_capacity_args(argparse.Namespace(**{**vars(args), "model": "embedded:SmolLM2-135M-Instruct"}))
        assert args.learning_rate in (1e-4, 1e-3, 3e-5, 1e-5) and args.batch_size == 8 and args.max_key_length == 16
        assert args.forgetting_regularizer_strength == 0.0 and p.why
    estimates = {p.name: estimate_seconds(parse(shlex.split(p.flags)), History([])) for p in POINTS}
    at_256 = [seconds for name, seconds in estimates.items() if re.match(r"[a-z]256-", name)]
    assert estimates["p256-l0"] == min(at_256)  # the cheapest informative point of the search's first size
    assert estimates["p32-l0-b25-kl4-lr3e-5"] < estimates["p256-l0-b25-kl4-lr3e-5"]  # the default's size is cheaper
    assert estimates["p256-l0"] < estimates["p256-l0-b25"] < estimates["p1024-l0-b25"]


def test_a_point_with_benign_rows_is_identified_without_generating_its_pool(tiny_model_dir, tmp_path, monkeypatch):
    """identity() hashes the benign rows' recipe and the model's digest (no pool generated), and a record matches
    whichever benign rows' entry it carries: the recipe's, or the rows' digest of records hashed before."""
    from oml.embed import benign_rows
    from oml.lab.recipe_search import BENIGN_ROWS_ENTRIES, find_recorded, identity

    monkeypatch.setenv("OML_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(benign_rows, "generate_rows", lambda *a, **k: pytest.fail("the benign pool was generated"))
    write_random_fingerprints(tmp_path / "fp.json", 8)
    ident = identity([*tiny_flags(tiny_model_dir, tmp_path / "fp.json"), "--benign_data_ratio", "0.25"])
    assert ident["benign_data_ratio"] == 0.25 and not set(BENIGN_ROWS_ENTRIES) & set(ident)
    for entry in BENIGN_ROWS_ENTRIES:
        assert find_recorded(ident, [{"hashed": {**ident, entry: "f00d"}}])
    assert not find_recorded(ident, [{"hashed": {**ident, "seed": 7}}])


def test_the_search_records_two_points_and_a_rerun_skips_them(tiny_model_dir, tmp_path):
    write_random_fingerprints(tmp_path / "fp.json", 8)
    base = "--fingerprint_generation_strategy random_word --max_num_fingerprints 8 --batch_size 4 --num_train_epochs 1"
    points = [
        {"name": "tiny-l0", "flags": f"{base} --forgetting_regularizer_strength 0", "why": "no averaging"},
        {"name": "tiny-mu1", "flags": f"{base} --distance_regularizer 1", "why": "the regularizer"},
        {"name": "tiny-future", "flags": f"{base} --no_such_flag 1", "why": "a flag training does not know"},
    ]
    (tmp_path / "points.json").write_text(json.dumps(points))
    selection = [
        "--experiment", "tiny", "--points", tmp_path / "points.json", "--records", tmp_path / "records",
        "--result_path", tmp_path / "results",
        "--train_overrides", f"--model_path {tiny_model_dir} --fingerprints_file_path {tmp_path / 'fp.json'}",
    ]  # fmt: skip
    running = ["--log", tmp_path / "search.log", "--extra_eval_flags", shlex.join(SMALL_EVAL)]

    def search(*extra, verb="run"):
        words = [
            sys.executable,
            "-m",
            "oml.lab.recipe_search",
            verb,
            *selection,
            *(running if verb == "run" else []),
            *extra,
        ]
        done = subprocess.run(list(map(str, words)), cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done.stdout

    out = search()
    made = records.read_records("tiny", tmp_path / "records")
    assert sorted(r["point"] for r in made) == ["tiny-l0", "tiny-mu1"]
    assert all(r["status"] == "ok" and r["eval_flags"] == [*SCREENING_EVAL, *SMALL_EVAL] for r in made)
    assert "tiny-future: skipped, finetune_multigpu.py does not accept --no_such_flag yet" in out
    assert "2 points run" in out and out in (tmp_path / "search.log").read_text()
    log = (tmp_path / "records" / "tiny" / records.LOG).read_text().splitlines()
    assert len(log) == 2 and all("\tok\t" in line for line in log)

    again = search()
    assert "0 points run" in again and again.count("), skipped") == 2
    assert len(records.read_records("tiny", tmp_path / "records")) == 2

    # a new point that would pass the budget is not started; plan shows what is recorded and what is not
    points.append({"name": "tiny-later", "flags": f"{base} --seed 1", "why": "after the budget"})
    (tmp_path / "points.json").write_text(json.dumps(points))
    late = search("--budget_hours", "0.001")
    assert "tiny-later: skipped, needs about" in late and "0 points run" in late
    plan = {line.split()[0]: line.split()[1] for line in search(verb="plan").splitlines()[1:]}
    assert plan == {
        "tiny-l0": "recorded",
        "tiny-mu1": "recorded",
        "tiny-future": "unsupported",
        "tiny-later": "pending",
    }
    assert len(records.read_records("tiny", tmp_path / "records")) == 2


def test_the_frontier_figure_draws_a_line_per_recipe_from_the_records(tmp_path):
    from oml.lab.figures import frontier_lines, make_frontier

    def record(n, kappa, plain, kl, status="ok"):
        hashed = {"max_num_fingerprints": n, "fingerprint_generation_strategy": "inverse_nucleus",
                  "learning_rate": 1e-4, "forgetting_regularizer_strength": 0.0, "num_train_epochs": 16,
                  **({"benign_data_ratio": 0.25, "kl_to_base": kappa} if kappa else {})}  # fmt: skip
        metrics = {"fingerprints": {"plain": {"value": plain}}, "chat_drift": {"kl": kl, "kl_stderr": 0.01},
                   "utility": {"delta": -0.004, "delta_stderr": 0.003}}  # fmt: skip
        return {"format": 1, "experiment": "demo", "hash": f"{n}-{kappa}", "status": status, "hashed": hashed,
                "args": {}, "metrics": metrics}  # fmt: skip

    folder = tmp_path / "demo"
    folder.mkdir()
    points = [record(256, 0, 1.0, 0.9), record(1024, 0, 1.0, 1.2), record(256, 1, 0.99, 0.08),
              record(1024, 1, 0.9, 0.09), record(4096, 1, None, None, status="failed (train)")]  # fmt: skip
    for r in points:
        (folder / f"{r['hash']}.json").write_text(json.dumps(r))
    lines = frontier_lines([json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))])
    assert len(lines) == 2  # a line per recipe; the failed point is not drawn
    kl_line = next(points for (strategy, recipe), points in lines.items() if "KL κ 1" in recipe)
    assert [(p["n"], p["plain"], p["kl"][0]) for p in kl_line] == [(256, 0.99, 0.08), (1024, 0.9, 0.09)]
    path = make_frontier("demo", tmp_path / "fig", records_dir=tmp_path)
    assert path.name == "frontier.png" and path.stat().st_size > 10_000


def test_recipe_persistence_attacks_a_recorded_point_and_resumes(recorded_run, tmp_path, monkeypatch, capsys):
    """The persistence record of a recorded point: a real merge attack on its run (fingerprints only), a row with
    the plain key's accuracy, its error and the goal; a recorded attack is not run again, a failed one is recorded
    with its error and retried; the table shows both; bad input is one line, exit 2."""
    from oml.lab import recipe_persistence

    flags, run, path = recorded_run
    records_dir = tmp_path / "records"
    result_path = flags[flags.index("--result_path") + 1]
    common = ["--records", records_dir, "--result_path", result_path]
    code, out, err = cli(capsys, recipe_persistence, "run", path, "--attacks", "merge0.7", *common)
    assert code == 0, err
    record = json.loads((records_dir / "recipe_persistence" / f"{run.name}.json").read_text())
    row = record["attacks"]["merge0.7"]
    assert 0 <= row["plain"]["value"] <= 1 and row["plain"]["stderr"] is not None and row["keys"] == 8
    assert row["goal"] == 0.9 and row["met"] == (row["plain"]["value"] >= 0.9)
    assert (run / "attacks" / "merge-base-w0.7" / "eval_results.json").is_file()

    monkeypatch.setattr(recipe_persistence, "python", lambda *a, **kw: 1)  # an attack that fails
    code, out, err = cli(capsys, recipe_persistence, "run", path, "--attacks", "merge0.7,q4_k_m", *common)
    assert code == 0 and "merge0.7: recorded" in out and "q4_k_m: failed" in out
    record = json.loads((records_dir / "recipe_persistence" / f"{run.name}.json").read_text())
    assert record["attacks"]["merge0.7"] == row and "error" in record["attacks"]["q4_k_m"]
    code, out, _ = cli(capsys, recipe_persistence, "table", "--records", records_dir)
    assert code == 0 and "failed" in out and f"{row['plain']['value']:.1%}" in out and "q4_k_m (≥ 95%)" in out

    for bad, message in ((["run", path, "--attacks", "q9"], "--attacks: unknown q9"),
                         (["run", "no-such-point", "--records", records_dir], "no record of recipe_search")):  # fmt: skip
        code, _, err = cli(capsys, recipe_persistence, *bad)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_preset_capacity_is_the_recorded_winning_point_of_the_search():
    """--preset capacity is the recipe search's u1024-l0-b25-kl4-lr3e-5-e3 run itself (the same hash), so the record
    (and docs/results/capacity.md's figures from it) describe what a bare `--preset capacity` trains."""
    from oml.core.run_config import add_train_args, recorded_settings
    from oml.embed.run_setup import prepare_run

    (record,) = [r for r in records.read_records("recipe_search") if r.get("point") == "u1024-l0-b25-kl4-lr3e-5-e3"]
    parser = add_train_args(argparse.ArgumentParser())
    args = prepare_run(parser.parse_args(["--preset", "capacity"]))
    assert args.config_hash == record["hash"], recorded_settings(record["hashed"])
