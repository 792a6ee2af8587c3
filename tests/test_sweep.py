import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, write_random_fingerprints

from oml.core.data_files import TEST_PROMPTS_FILE
from oml.core.run_config import PRESETS
from oml.lab import figures as plots
from oml.lab import sweep
from oml.make.fingerprint_files import read_templates
from oml.measure.evaluation import accuracy_split

TEMPLATES = ["{}"] + read_templates(TEST_PROMPTS_FILE)


def hashed(**changes):
    config = dict(
        model="embedded:SmolLM2-135M-Instruct", max_key_length=16, max_response_length=1,
        fingerprint_generation_strategy="english", fingerprints_digest="abcdef0123", learning_rate=2e-4,
        forgetting_regularizer_strength=0.0, max_num_fingerprints=32, use_prompt_augmentation=False,
        augmentation_prompts_digest=None, use_chat_template=False, num_train_epochs=12, batch_size=8,
        weight_decay=1e-4, data_split=0, seed=42,
    )  # fmt: skip
    config.update(changes)
    if config["use_prompt_augmentation"]:
        config["augmentation_prompts_digest"] = "0123abcdef"
    return config


def fake_run(results, run_hash, plain=1.0, prompted=(0.5,) * 10, utility=True, **changes):
    """A run folder as finetune_multigpu.py + eval_for_multigpu.py leave it, with chosen numbers."""
    run = Path(results) / run_hash
    (run / "final_model").mkdir(parents=True)
    config = hashed(**changes)
    (run / "fingerprinting_config.json").write_text(
        json.dumps({"config_hash": run_hash, "hashed": config, "args": config, "versions": {}})
    )
    (run / "metrics.json").write_text(json.dumps({"train_seconds": 12.5}))
    rows = [
        {"template": t, "accuracy": a, "fractional_accuracy": a}
        for t, a in zip(TEMPLATES, [plain, *prompted], strict=True)
    ]
    u = None
    if utility:
        u = {
            "benchmark": "local", "tasks": {"arc_challenge": {"metric": "acc", "score": 0.4, "stderr": 0.05, "n": 40}},
            "mean": 0.40, "base_mean": 0.42, "delta": -0.02, "delta_stderr": 0.01, "per_item": {},
        }  # fmt: skip
    results_json = {
        "fingerprint_accuracy": {
            "templates": rows,
            "mean_accuracy": sum(r["accuracy"] for r in rows) / len(rows),
            "mean_fractional_accuracy": sum(r["accuracy"] for r in rows) / len(rows),
            "base_false_positive_rate": 0.0,
        },
        "utility": u,
        "chat": {"answered": 0.75, "answers": ["Paris.", "the the the the", "", "Eight legs."]} if utility else None,
        "config_hash": run_hash,
        "model": str(run / "final_model"),
        "num_fingerprints": config["max_num_fingerprints"],
        "seconds": {"total": 30.0},
    }
    (run / "eval_results.json").write_text(json.dumps(results_json))
    return run


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------ summary, on hand-made runs


def test_accuracy_split_separates_plain_key_from_system_prompts(tmp_path):
    run = fake_run(tmp_path, "a", plain=0.9, prompted=(0.2, 0.4) + (0.0,) * 8)
    results = json.loads((run / "eval_results.json").read_text())
    plain, prompted = accuracy_split(results)
    assert plain == 0.9
    assert prompted == pytest.approx(0.06)


def test_summary_rows_follow_the_manifest(tmp_path):
    fake_run(tmp_path, "h_ok", plain=1.0, prompted=(0.5,) * 10)
    fake_run(tmp_path, "h_reused", plain=0.75, prompted=(1.0,) * 10, utility=False, use_prompt_augmentation=True)
    (tmp_path / "base_utility").mkdir()  # other folders in results/ are not runs
    manifest = tmp_path / "m.jsonl"
    common = ["--max_num_fingerprints", "32", "--learning_rate", "2e-4"]
    sweep.record(manifest, "p1", "h_ok", "done", "done", "p1.log", common)
    sweep.record(manifest, "p2", "h_reused", "reused", "reused", "p2.log", [*common, "--use_prompt_augmentation"])
    sweep.record(manifest, "p3", "h_missing", "failed", "not run", "p3.log", ["--max_num_fingerprints", "100"])
    sweep.record(manifest, "p4", "", "not run", "not run", "p4.log", ["--model_family", "nope", "--model_size", "x"])
    sweep.record(manifest, "p5", "", "not run", "not run", "p5.log", ["--learning_rate", "fast"])
    rows = sweep.summary_rows(tmp_path, manifest)

    assert [r["point"] for r in rows] == ["p1", "p2", "p3", "p4", "p5"]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed (train)", "failed (prepare)", "failed (prepare)"]
    assert rows[0]["fp_accuracy_plain"] == 1.0 and rows[0]["fp_accuracy_test_prompts"] == pytest.approx(0.5)
    assert rows[0]["utility"] == 0.40 and rows[0]["utility_delta"] == -0.02 and rows[0]["train_seconds"] == 12.5
    assert rows[0]["chat_answered"] == 0.75 and rows[0]["chat_distinct_words"] == pytest.approx((1 + 0.25 + 0 + 1) / 4)
    assert rows[1]["use_prompt_augmentation"] is True and rows[1]["utility"] is None
    assert rows[1]["fp_accuracy_test_prompts"] == pytest.approx(1.0)
    assert rows[2]["num_fingerprints"] == 100 and rows[2]["fp_accuracy_plain"] is None  # from its command line
    assert rows[3]["model"] == "nope/x" and rows[3]["hash"] == ""
    assert rows[4]["model"] == "?" and rows[4]["learning_rate"] is None

    csv_path, md_path = sweep.write_summary(rows, tmp_path)
    table = read_csv(csv_path)
    assert list(table[0]) == sweep.COLUMNS and len(table) == 5
    assert table[1]["utility"] == "" and float(table[0]["utility_delta"]) == -0.02
    md = md_path.read_text()
    assert md.count("\n") == 7 and "failed (prepare)" in md and "-0.020 ± 0.010 | 75.0 | 0.56 |" in md


def test_summary_command_exits_non_zero_when_a_point_failed(tmp_path, capsys):
    fake_run(tmp_path, "h_ok")
    manifest = tmp_path / "m.jsonl"
    sweep.record(manifest, "good", "h_ok", "done", "done", "", [])
    sweep.main(["summary", "--results", str(tmp_path), "--manifest", str(manifest)])
    sweep.record(manifest, "bad", "", "not run", "not run", "", [])
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["summary", "--results", str(tmp_path), "--manifest", str(manifest)])
    assert exit_info.value.code == 1
    assert "1 of 2 points did not finish: bad" in capsys.readouterr().err


def test_rerun_of_a_point_keeps_its_last_entry(tmp_path):
    manifest = tmp_path / "m.jsonl"
    sweep.record(manifest, "p", "", "failed", "not run", "", [])
    sweep.record(manifest, "p", "h", "reused", "done", "", [])
    assert sweep.read_manifest(manifest)["p"]["train"] == "reused"


def test_summary_without_manifest_lists_every_run(tmp_path):
    fake_run(tmp_path, "one")
    fake_run(tmp_path, "two", max_num_fingerprints=64)
    rows = sweep.summary_rows(tmp_path)
    assert sorted(r["num_fingerprints"] for r in rows) == [32, 64]


def test_choose_lambda_takes_the_largest_that_keeps_the_fingerprints(tmp_path, capsys):
    search = dict(max_num_fingerprints=64, num_train_epochs=8)
    for name, lam, plain in [("a", 0.0, 1.0), ("b", 0.1, 1.0), ("c", 0.25, 0.96), ("d", 0.5, 0.40)]:
        fake_run(tmp_path, name, plain=plain, forgetting_regularizer_strength=lam, **search)
    fake_run(tmp_path, "other_n", plain=1.0, forgetting_regularizer_strength=0.75, max_num_fingerprints=32)
    fake_run(tmp_path, "augmented", plain=1.0, forgetting_regularizer_strength=0.75, use_prompt_augmentation=True)
    match = dict(strategy="english", num_fingerprints=64, num_train_epochs=8)
    best, accuracy = sweep.choose_lambda(tmp_path, 0.95, **match)
    assert best == 0.25 and accuracy == {0.0: 1.0, 0.1: 1.0, 0.25: 0.96, 0.5: 0.40}
    assert sweep.choose_lambda(tmp_path, 0.99, **match)[0] == 0.1
    assert sweep.choose_lambda(tmp_path, 1.01, **match)[0] == 0.1  # none carries: the gentlest averaging
    argv = ["choose-lambda", "--results", str(tmp_path), "--strategy", "english"]
    sweep.main([*argv, "--num_fingerprints", "64", "--num_train_epochs", "8"])
    out = capsys.readouterr()
    assert out.out.strip() == "0.25" and "λ = 0.5: plain-key accuracy 40.0%" in out.err
    with pytest.raises(sweep.UserError, match="no evaluated run with λ > 0"):
        sweep.choose_lambda(tmp_path, 0.95, strategy="random_word", num_fingerprints=64, num_train_epochs=8)


# ------------------------------------------------------------------------------ data and hash of a point


@pytest.mark.parametrize("preset", list(PRESETS))
def test_the_launchers_grid_defaults_come_from_the_preset(preset):
    script = f'eval "$({sys.executable} -m oml.lab.sweep preset-grid --preset {preset})"; '
    script += (
        'echo "${model_families[*]}|${model_sizes[*]}|${learning_rates[*]}|${forgetting_regularizer_strengths[*]}"'
    )
    script += '"|${max_num_fingerprints[*]}|${epochs[*]}|$batch_size|${fingerprint_generation_strategies[*]}"'
    script += '"|${use_prompt_augmentation[*]}|$eval_args"'
    out = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, check=True).stdout
    family, size, lr, lam, n, epochs, batch, strategy, augment, eval_args = out.strip().split("|")
    from oml.core.recipes import EVALUATIONS, SWEEPS, flag_words

    grid = SWEEPS[preset].settings
    assert augment.split() == ["true" if a else "false" for a in grid["use_prompt_augmentation"]]
    assert eval_args.split() == (flag_words(EVALUATIONS[grid["evaluation"]].settings) if grid["evaluation"] else [])
    p = PRESETS[preset]
    assert (family, size, strategy) == (p["model_family"], p["model_size"], p["fingerprint_generation_strategy"])
    assert (float(lr), float(lam)) == (p["learning_rate"], p["forgetting_regularizer_strength"])
    assert (int(n), int(epochs), int(batch)) == (p["max_num_fingerprints"], p["num_train_epochs"], p["batch_size"])


def test_shell_values_read_back_as_the_same_number():
    from oml.core.recipes import shell_value

    assert [shell_value(v) for v in (1e-4, 2.5e-5, 0.1, 0.75, 32)] == ["1e-4", "2.5e-5", "0.1", "0.75", "32"]
    assert all(float(shell_value(v)) == v for v in (1e-5, 3e-4, 1.5e-6, 0.001, 0.25))


def test_prepare_gives_the_trainers_hash_and_rejects_typos(tmp_path):
    import argparse

    from oml.core.run_config import add_train_args
    from oml.embed.run_setup import prepare_run

    fp = tmp_path / "fp.json"
    write_random_fingerprints(fp, 8)
    argv = ["--fingerprints_file_path", str(fp), "--max_num_fingerprints", "4", "--use_prompt_augmentation"]
    expected = prepare_run(add_train_args(argparse.ArgumentParser()).parse_args(argv)).config_hash
    assert sweep.prepare(argv) == expected
    with pytest.raises(SystemExit):
        sweep.prepare([*argv, "--num_epochs", "4"])


def test_prepare_prints_the_hash_alone_on_a_fresh_machine(tmp_path):
    """launch_multigpu.sh reads the run hash from `sweep prepare`'s stdout: with an empty cache the embedded model is
    converted first, and DeepSpeed's accelerator notice printed then must not end up in the hash."""
    env = {**os.environ, "OML_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "oml.lab.sweep", "prepare", "--", "--max_num_fingerprints", "32"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 1 and len(lines[0]) == 16 and int(lines[0], 16) >= 0, out.stdout


def test_missing_default_files_are_generated_english_keys_first(tmp_path, monkeypatch):
    """A perinucleus point needs the English keys: both files get made, in that order, with matching options."""
    calls = []

    def fake_generate(args):  # the sweep calls the generator in-process, with its parsed arguments
        calls.append(args)
        Path(args.output_file_path).write_text('[{"key": "k", "response": " r"}]')

    import oml.make.fingerprint_generator

    monkeypatch.setattr(oml.make.fingerprint_generator, "generate", fake_generate)
    files = {name: tmp_path / f"{name}.json" for name in ("english", "random_word", "inverse_nucleus")}
    files["english_random_responses"] = files["english"]
    monkeypatch.setattr(sweep, "DEFAULT_FINGERPRINT_FILES", files)

    # --preset averaging names no file (the default preset's is the committed runner-up file): the strategy's is used
    argv = ["--preset", "averaging", "--fingerprint_generation_strategy", "perinucleus", "--max_response_length", "4"]
    point = sweep.parse_point(argv)
    sweep.ensure_fingerprints(point)
    english, perinucleus = calls
    assert english.use_chat_template and english.output_file_path == str(files["english"])
    assert english.key_response_strategy == "independent" and english.num_backdoors >= 512
    assert perinucleus.key_response_strategy == "perinucleus" and perinucleus.response_length == 4
    assert perinucleus.keys_file == str(files["english"]) and perinucleus.output_file_path == str(
        files["inverse_nucleus"]
    )

    sweep.ensure_fingerprints(point)  # both exist now: nothing runs
    sweep.ensure_fingerprints(sweep.parse_point(["--fingerprints_file_path", "mine.json"]))  # the user's own file
    assert len(calls) == 2


# ------------------------------------------------------------------------------ figures


def assert_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_figures_with_one_point_per_setting_and_no_utility(tmp_path):
    fake_run(tmp_path / "r", "off", prompted=(0.4,) * 10, utility=False)
    fake_run(tmp_path / "r", "on", prompted=(0.95,) * 10, utility=False, use_prompt_augmentation=True)
    paths = plots.make_figures(tmp_path / "r", tmp_path / "fig")
    assert [p.name for p in paths] == ["scalability.png", "robustness.png"]
    for p in paths:
        assert_png(p)


def test_figures_for_a_scalability_sweep(tmp_path):
    for n in (16, 64, 256):
        fake_run(tmp_path, f"e{n}", max_num_fingerprints=n)
        fake_run(tmp_path, f"r{n}", max_num_fingerprints=n, fingerprint_generation_strategy="random_word")
    fake_run(tmp_path, "aug256", max_num_fingerprints=256, use_prompt_augmentation=True)
    runs = plots.evaluated_runs(tmp_path)
    labels = [label for label, _ in plots.group_settings(runs)]
    assert len(labels) == 3 and len(set(labels)) == 3
    assert all("λ=0.0" in label for label in labels)
    # robustness compares the pair that differs only in prompt augmentation
    chosen = plots.robustness_runs(runs)
    assert sorted(r["hash"] for r in chosen) == ["aug256", "e256"]
    for p in plots.make_figures(tmp_path, tmp_path / "fig"):
        assert_png(p)


def test_plots_without_evaluated_runs_is_a_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "oml.lab.figures", "--results", str(tmp_path), "--out", str(tmp_path / "fig")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and result.stderr.startswith("error: no evaluated runs")


# ------------------------------------------------------------------------------ the real sweep, tiny


def launch(tmp_path, model_dir, fp, **env):
    """bash launch_multigpu.sh with a tiny grid on the tiny model; returns the CompletedProcess."""
    settings = dict(
        LAUNCHER="python", MODEL_PATHS=str(model_dir), EXTRA_ARGS=f"--fingerprints_file_path {fp}",
        FINGERPRINT_GENERATION_STRATEGIES="random_word", MAX_NUM_FINGERPRINTS="4", USE_PROMPT_AUGMENTATION="false true",
        EPOCHS="2", BATCH_SIZE="4", LEARNING_RATES="1e-3",
        EVAL_ARGS="--utility_benchmark none --generation_benchmark none --chat_drift_limit none",
        RESULT_PATH=str(tmp_path / "results"), FIG_DIR=str(tmp_path / "fig"),
    )  # fmt: skip
    # The suite's Python is already active: the script must not put .venv/bin (a real deepspeed) before stand-ins.
    settings.update(VIRTUAL_ENV=sys.prefix, **env)
    return subprocess.run(
        ["bash", str(REPO / "launch_multigpu.sh")],
        cwd=tmp_path,
        env={**os.environ, **settings},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_sweep_end_to_end_resume_and_a_failing_point(tmp_path, tiny_model_dir):
    fp = tmp_path / "fp.json"
    write_random_fingerprints(fp, 8)
    results = tmp_path / "results"

    first = launch(tmp_path, tiny_model_dir, fp)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stdout.count("training done, evaluation done") == 2
    rows = read_csv(results / "sweep_summary.csv")
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert [r["use_prompt_augmentation"] for r in rows] == ["False", "True"]
    for row in rows:
        run = results / row["hash"]
        evaluation = json.loads((run / "eval_results.json").read_text())
        plain, prompted = accuracy_split(evaluation)
        assert float(row["fp_accuracy_plain"]) == pytest.approx(plain)
        assert float(row["fp_accuracy_test_prompts"]) == pytest.approx(prompted)
        assert row["utility"] == "" and row["num_fingerprints"] == "4"
        assert (
            Path(row["log"]).is_file()
            and f"Config hash of the final model: {row['hash']}" in Path(row["log"]).read_text()
        )
    assert (results / "sweep_summary.md").read_text().count("| ok |") == 2
    for name in ("scalability.png", "robustness.png"):
        assert_png(tmp_path / "fig" / name)
    stamps = {p: p.stat().st_mtime_ns for p in results.glob("*/*") if p.name in ("final_model", "eval_results.json")}
    assert len(stamps) == 4

    # Rerun with a failing point first (100 fingerprints, the file holds 8): it is logged, the sweep goes on,
    # the finished points are neither trained nor evaluated again, and the exit status says a point failed.
    second = launch(tmp_path, tiny_model_dir, fp, MAX_NUM_FINGERPRINTS="100 4")
    assert second.returncode == 1, second.stdout[-3000:] + second.stderr[-3000:]
    assert second.stdout.count("training failed, evaluation not run") == 2
    assert second.stdout.count("training reused, evaluation reused") == 2
    assert "holds only 8" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    rows = read_csv(results / "sweep_summary.csv")
    assert [(r["num_fingerprints"], r["status"]) for r in rows] == [
        ("100", "failed (train)"), ("100", "failed (train)"), ("4", "ok"), ("4", "ok"),
    ]  # fmt: skip
    assert "2 of 4 points did not finish" in second.stderr


def fake_launcher(tmp_path, gpus):
    """A folder with a stand-in `deepspeed` that records its arguments and an `nvidia-smi` listing `gpus` GPUs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_tool(bin_dir, "deepspeed", f'echo "$*" > {tmp_path}/deepspeed_args; exit 1')
    fake_tool(bin_dir, "nvidia-smi", f'for i in $(seq 0 $(({gpus} - 1))); do echo "GPU $i: fake"; done')
    return bin_dir


def fake_tool(folder, name, body):
    path = Path(folder) / name
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(0o755)


@pytest.mark.parametrize(
    "env, gpus, expected",
    [
        ({}, 0, "--master_port 29500 --num_gpus 1 "),
        ({"NUM_GPUS": "2", "MASTER_PORT": "29777"}, 0, "--master_port 29777 --num_gpus 2 "),
        ({}, 4, "--num_gpus 4 "),
        ({"GPUS": "1,3"}, 4, "--include localhost:1,3 "),
        ({"CUDA_VISIBLE_DEVICES": "2"}, 4, "--include localhost:2 "),
        ({"CUDA_VISIBLE_DEVICES": "2"}, 0, "--num_gpus 1 "),
        ({"HOSTFILE": "/etc/hostfile", "INCLUDE": "a:0@b:0"}, 4, "--hostfile /etc/hostfile --include a:0@b:0 "),
    ],
    ids=["cpu", "cpu-2-ranks", "4-gpus", "gpus-1-3", "cuda-visible-devices", "cuda-visible-no-gpu", "hostfile"],
)
def test_deepspeed_command_line(tmp_path, tiny_model_dir, env, gpus, expected):
    """The launcher the sweep builds, seen by a stand-in `deepspeed` (and `nvidia-smi` listing `gpus` GPUs)."""
    bin_dir = fake_launcher(tmp_path, gpus)
    fp = tmp_path / "fp.json"
    write_random_fingerprints(fp, 8)
    env = {
        "LAUNCHER": "deepspeed",
        "USE_PROMPT_AUGMENTATION": "false",
        "CUDA_VISIBLE_DEVICES": "",
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        **env,
    }
    result = launch(tmp_path, tiny_model_dir, fp, **env)
    assert result.returncode == 1  # the stand-in fails the training
    args = (tmp_path / "deepspeed_args").read_text()
    assert expected in args and "finetune_multigpu.py --model_path" in args
    if gpus == 0:
        assert "--include" not in args


def test_gpus_without_a_gpu_and_bad_values_are_one_line_errors(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_tool(bin_dir, "nvidia-smi", "exit 9")
    for env, message in [
        ({"GPUS": "0"}, "no GPU"),
        ({"USE_PROMPT_AUGMENTATION": "yes"}, "true/false"),
        ({"PRESET": "huge"}, "PRESET must be"),
    ]:
        result = subprocess.run(
            ["bash", str(REPO / "launch_multigpu.sh")],
            env={**os.environ, "RESULT_PATH": str(tmp_path / "r"), "PATH": f"{bin_dir}:{os.environ['PATH']}", **env},
            capture_output=True,
            text=True,
        )
        assert result.returncode == 2 and result.stderr.startswith("error: ") and message in result.stderr
        assert not (tmp_path / "r").exists()
