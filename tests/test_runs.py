"""oml.core.run_store: the run folder's layout, reading runs back, and the command that names a run."""

import argparse
import json
import shlex

from conftest import NO_GENERATION, run_script, write_random_fingerprints

from oml.core import run_store as runs
from oml.core.run_config import HASHED, TRAIN_ARGS, add_train_args, apply_preset
from oml.measure.evaluation import accuracy_split

# A value different from the default for every hashed flag (derived entries: model <- --model_path,
# fingerprints_digest <- --fingerprints_file_path, augmentation_prompts_digest <- --use_prompt_augmentation,
# benign_rows_recipe <- --benign_data_ratio and the model).
NON_DEFAULT = {
    "max_key_length": 12,
    "max_response_length": 2,
    "fingerprint_generation_strategy": "random_word",
    "learning_rate": 2e-3,
    "forgetting_regularizer_strength": 0.05,
    "max_num_fingerprints": 6,
    "use_prompt_augmentation": True,
    "use_chat_template": True,
    "append_eos": True,
    "num_train_epochs": 1,
    "batch_size": 2,
    "weight_decay": 0.01,
    "data_split": 1,
    "seed": 7,
    "benign_data_ratio": 0.5,
    "distance_regularizer": 0.01,
    "lora_rank": 2,
    "trainable_layers": "1:mlp",
    "stop_when_learned": True,
    "kl_to_base": 0.5,
    "licensee": 1,
    "fingerprint_margin": 2.0,
    "fingerprint_max_prob": 0.4,
    "fingerprint_edit": True,
}
DERIVED = {"model", "fingerprints_digest", "augmentation_prompts_digest", "benign_rows_recipe"}


def flag_of(name):
    return next(flags[0] for flags, spec in TRAIN_ARGS if (spec.get("dest") or flags[0].lstrip("-")) == name)


def test_every_hashed_flag_has_a_non_default_value_here():
    """A hashed flag added later must be added to NON_DEFAULT, so the round trip below covers it."""
    assert set(HASHED) - DERIVED == set(NON_DEFAULT)
    defaults = apply_preset(add_train_args(argparse.ArgumentParser()).parse_args([]))
    for name, value in NON_DEFAULT.items():
        assert getattr(defaults, name) != value, name


def test_the_command_runs_builds_finds_a_run_trained_with_every_hashed_flag(tmp_path, tiny_model_dir):
    fp_file = tmp_path / "fps.json"
    write_random_fingerprints(fp_file, 16)
    argv = ["--model_path", tiny_model_dir, "--fingerprints_file_path", fp_file, "--result_path", tmp_path / "r"]
    for name, value in NON_DEFAULT.items():
        argv += [flag_of(name)] if value is True else [flag_of(name), value]
    trained = run_script("finetune_multigpu.py", *argv, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    (run,) = runs.finished_runs(tmp_path / "r")
    config = json.loads((run / runs.CONFIG).read_text())

    command = runs.run_command(config["args"], "eval_for_multigpu.py")
    words = shlex.split(command)
    assert words[:2] == ["python", "eval_for_multigpu.py"]
    for name in NON_DEFAULT:
        assert flag_of(name) in words, name
    found = run_script("eval_for_multigpu.py", *words[2:], "--utility_benchmark", "none", *NO_GENERATION,
                       "--skip_base_model", cwd=tmp_path)  # fmt: skip
    assert found.returncode == 0, found.stderr[-2000:]
    assert (run / runs.EVAL_RESULTS).is_file()

    # The same command without one hashed flag names another run: the error shows the closest run's command.
    words.remove("--append_eos")
    missing = run_script(
        "eval_for_multigpu.py", *words[2:], "--utility_benchmark", "none", *NO_GENERATION, cwd=tmp_path
    )
    assert missing.returncode == 2
    assert f"closest run {run.name} differs in append_eos" in missing.stderr
    assert "its command: python eval_for_multigpu.py" in missing.stderr and "--append_eos" in missing.stderr


def test_read_run_and_accuracy_split(tmp_path):
    run = tmp_path / "abc"
    run.mkdir()
    (run / runs.CONFIG).write_text(json.dumps({"hashed": {}}))
    templates = [
        {"template": "{}", "accuracy": 1.0},
        {"template": "A {}", "accuracy": 0.5},
        {"template": "{} B", "accuracy": 0.0},
    ]
    (run / runs.EVAL_RESULTS).write_text(json.dumps({"fingerprint_accuracy": {"templates": templates}}))
    (found,) = runs.find_runs(tmp_path)
    assert found["hash"] == "abc" and found["metrics"] is None
    assert accuracy_split(found["eval"]) == (1.0, 0.25)
    assert runs.short_model("embedded:SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"
