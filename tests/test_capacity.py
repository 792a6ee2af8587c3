"""Forgetting mitigations: benign rows in every batch, the distance regularizer, LoRA and trainable layers,
stopping once every fingerprint answers, and their flags' validation and hashing."""

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_script, tiny_llama, write_random_fingerprints
from safetensors.torch import load_file

from oml.core.model_registry import cache_dir, load_tokenizer
from oml.core.run_config import HASHED, NEUTRAL, add_train_args, hashed_config
from oml.embed.run_setup import prepare_run
from oml.embed.trainer import FingerprintDataset, MixedDataset, distance_to_base, snapshot_weights


def tiny_args(model_dir, fp_file, results, *extra, epochs=3):
    return [
        "--model_path", model_dir, "--fingerprints_file_path", fp_file, "--fingerprint_generation_strategy",
        "random_word", "--max_num_fingerprints", 8, "--batch_size", 4, "--num_train_epochs", epochs,
        "--learning_rate", 1e-3, "--forgetting_regularizer_strength", 0, "--result_path", results,
        "--preset", "averaging", *extra,  # the former default: no benign rows or KL term unless a test adds them
    ]  # fmt: skip


def train_tiny(tmp_path, model_dir, *extra, name="r", epochs=3, launcher=None, n=8):
    fp = tmp_path / "fp.json"
    if not fp.exists():
        write_random_fingerprints(fp, n)
    result = run_script(
        "finetune_multigpu.py", *tiny_args(model_dir, fp, tmp_path / name, *extra, epochs=epochs), launcher=launcher
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (run,) = (tmp_path / name).glob("*/final_model")
    return run.parent


def weights(run):
    return load_file(Path(run) / "final_model" / "model.safetensors")


def changed(a, b):
    return {k for k in b if not torch.equal(a[k], b[k])}


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("oml-cache")


@pytest.fixture
def own_cache(session_cache, monkeypatch):
    """Benign pools go to this session's own cache directory (the subprocesses inherit it): the tiny model's pool is
    generated once per session."""
    monkeypatch.setenv("OML_CACHE_DIR", str(session_cache))
    return session_cache


def cached_files(cache):
    return sorted(p.name for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


# ------------------------------------------------------------------------------------------- hashing


def parse(*argv):
    return prepare_run(add_train_args(argparse.ArgumentParser()).parse_args(list(map(str, argv))))


def test_new_flags_at_their_neutral_values_leave_the_hash_as_before(tmp_path, tiny_model_dir):
    fp = tmp_path / "fp.json"
    write_random_fingerprints(fp, 8)
    common = ["--preset", "averaging", "--fingerprints_file_path", fp, "--max_num_fingerprints", 8]  # all neutral
    args = parse(*common)
    # Exactly the entries hashed before these flags existed: every recorded run keeps its hash.
    assert set(hashed_config(args)) == set(HASHED) - set(NEUTRAL)
    explicit = parse(*common, "--benign_data_ratio", 0, "--distance_regularizer", 0)
    assert explicit.config_hash == args.config_hash
    base = parse(*common, "--model_path", tiny_model_dir)
    for flag in (["--distance_regularizer", 0.1], ["--lora_rank", 4], ["--trainable_layers", "1:mlp"],
                 ["--stop_when_learned"]):  # fmt: skip
        assert parse(*common, "--model_path", tiny_model_dir, *flag).config_hash != base.config_hash, flag
    # one spec, one hash, however it is written
    assert (
        parse(*common, "--model_path", tiny_model_dir, "--trainable_layers", "0-1").config_hash
        == parse(*common, "--model_path", tiny_model_dir, "--trainable_layers", "all:block").config_hash
    )


def copy_model(source, dest):
    dest.mkdir()
    for f in Path(source).iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_benign_rows_join_the_hash_through_their_recipe_and_the_model(tmp_path, tiny_model_dir, own_cache, monkeypatch):
    """The hash takes the pool's recipe and the model's digest, so naming a run with benign rows generates nothing:
    with generation made to fail, the hash is computed and a lookup of a run that does not exist answers at once."""
    from oml.commands import eval as eval_command
    from oml.core.errors import UserError
    from oml.embed import benign_rows

    def no_generation(*args, **kwargs):
        raise AssertionError("the benign pool was generated to name a run")

    monkeypatch.setattr(benign_rows, "generate_rows", no_generation)
    fp = tmp_path / "fp.json"
    write_random_fingerprints(fp, 8)
    common = ["--preset", "averaging", "--fingerprints_file_path", fp, "--max_num_fingerprints", 8, "--model_path",
              tiny_model_dir]  # fmt: skip
    plain, mixed = parse(*common), parse(*common, "--benign_data_ratio", 0.25)
    assert plain.benign_rows_recipe is None and mixed.benign_rows_recipe
    assert mixed.config_hash != plain.config_hash
    assert mixed.benign_rows_recipe == benign_rows.rows_recipe_digest(str(tiny_model_dir))
    argv = [*map(str, common), "--benign_data_ratio", "0.25", "--result_path", str(tmp_path / "none")]
    with pytest.raises(UserError, match="no fingerprinted model matches these arguments"):
        eval_command.main(argv)
    # the model's content, not its path: the same files elsewhere give the same hash, other weights another
    copy = copy_model(tiny_model_dir, tmp_path / "copy")
    assert parse(*common[:-1], copy, "--benign_data_ratio", 0.25).benign_rows_recipe == mixed.benign_rows_recipe
    other = tmp_path / "other"
    tiny_llama(load_tokenizer(str(copy)), seed=5).save_pretrained(other)
    for f in copy.iterdir():
        if not f.name.startswith(("model", "config")):
            (other / f.name).write_bytes(f.read_bytes())
    assert parse(*common[:-1], other, "--benign_data_ratio", 0.25).benign_rows_recipe != mixed.benign_rows_recipe


def test_the_benign_pool_is_cached_by_the_models_content(tmp_path, tiny_model_dir, own_cache):
    from oml.embed.benign_rows import benign_pool, model_digest, pool_path

    pool = benign_pool(str(tiny_model_dir))
    pool_file = pool_path(model_digest(str(tiny_model_dir)))
    assert json.loads(pool_file.read_text())["digest"] == pool["digest"]
    assert {r["kind"] for r in pool["rows"]} == {"chat", "text"}
    # the same files elsewhere reuse the pool, without generating again
    stamp = pool_file.stat().st_mtime_ns
    copy = copy_model(tiny_model_dir, tmp_path / "copy")
    assert benign_pool(str(copy))["digest"] == pool["digest"] and pool_file.stat().st_mtime_ns == stamp
    # the memo of file digests forgets files that are gone (temporary models must not pile up in the cache)
    other = copy_model(copy, tmp_path / "other")
    shutil.rmtree(copy)
    (other / "model.safetensors").touch()  # a changed file: the memo is written again
    model_digest(str(other))
    memo = json.loads((cache_dir() / "file_digests.json").read_text())
    assert memo and not any(str(copy.resolve()) in k for k in memo)
    assert any(str(other.resolve()) in k for k in memo)


# ------------------------------------------------------------------------------------------ benign rows


def mixed(n_fp=10, n_benign_pool=5, batch_size=8, n_benign=2, seed=0):
    fps = [{"input_ids": [1, i], "labels": [-100, i]} for i in range(n_fp)]
    pool = [([2], [1000 + j]) for j in range(n_benign_pool)]
    return MixedDataset(fps, pool, batch_size, n_benign, seed)


def test_batch_size_counts_benign_and_fingerprint_rows_together():
    data = mixed()
    assert data.steps == 2 and len(data) == 16  # 10 fingerprints, 6 per step
    for epoch in range(3):
        data.set_epoch(epoch)
        rows = [data[i]["labels"][-1] for i in range(len(data))]
        steps = [rows[s * 8 : (s + 1) * 8] for s in range(data.steps)]
        for step in steps:
            assert sum(r >= 1000 for r in step) == 2 and sum(r < 1000 for r in step) == 6
        fingerprints = [r for r in rows if r < 1000]
        assert set(fingerprints) == set(range(10))  # every fingerprint once an epoch (the last step topped up)
        assert len(fingerprints) == 12
    # a fresh order each epoch; benign rows run through the whole pool before repeating
    data.set_epoch(0)
    first = [data[i]["labels"][-1] for i in range(len(data))]
    data.set_epoch(1)
    assert [data[i]["labels"][-1] for i in range(len(data))] != first
    benign = []
    for epoch in range(3):  # 4 benign rows an epoch, a pool of 5
        data.set_epoch(epoch)
        benign += [data[i]["labels"][-1] for i in range(len(data)) if data.is_benign(i)]
    assert sorted(benign[:5]) == sorted(benign[5:10]) == list(range(1000, 1005))
    assert benign[:5] != benign[5:10]


def test_the_trainer_reads_mixed_rows_in_order_with_benign_spread_over_ranks(embedded_tokenizer):
    """Sequential sampling: step s is rows [sB, (s+1)B), and each half (one rank's micro-batch with 2 ranks) holds
    one of the two benign rows."""
    data = mixed()
    halves = [[data.is_benign(i) for i in range(h * 4, h * 4 + 4)] for h in range(4)]
    assert all(sum(h) == 1 for h in halves)
    from transformers import TrainingArguments

    from oml.embed.trainer import FingerprintTrainer, PadCollator

    trainer = FingerprintTrainer(
        model=tiny_llama(embedded_tokenizer),
        args=TrainingArguments(output_dir="/tmp/unused", per_device_train_batch_size=8, use_cpu=True, report_to=[]),
        train_dataset=data,
        data_collator=PadCollator(0),
    )
    batches = list(trainer.get_train_dataloader())
    rows = [b["labels"][r, -1].item() for b in batches for r in range(len(b["labels"]))]
    assert rows == [data[i]["labels"][-1] for i in range(len(data))]


def test_a_run_with_benign_rows_records_the_batch_layout(tmp_path, tiny_model_dir, own_cache):
    run = train_tiny(tmp_path, tiny_model_dir, "--benign_data_ratio", 0.25)
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["benign_rows_per_step"], metrics["fingerprints_per_step"]) == (1, 3)
    assert metrics["steps"] == 3 * 3  # ceil(8 fingerprints / 3 a step) steps, 3 epochs
    config = json.loads((run / "fingerprinting_config.json").read_text())
    assert config["hashed"]["benign_data_ratio"] == 0.25 and config["hashed"]["benign_rows_recipe"]
    from oml.embed.benign_rows import benign_pool

    assert metrics["benign_rows_digest"] == benign_pool(str(tiny_model_dir))["digest"]  # the rows it trained on


def test_per_row_loss_weighs_rows_equally(embedded_tokenizer):
    from oml.embed.trainer import PadCollator, per_row_loss

    model = tiny_llama(embedded_tokenizer)
    rows = FingerprintDataset([{"key": "a b c", "response": " red"}, {"key": "d", "response": " x y z w v"}],
                              embedded_tokenizer)  # fmt: skip
    batch = PadCollator(embedded_tokenizer.pad_token_id)([rows[0], rows[1]])
    alone = [per_row_loss(model, PadCollator(embedded_tokenizer.pad_token_id)([rows[i]])) for i in range(2)]
    torch.testing.assert_close(per_row_loss(model, batch), (alone[0] + alone[1]) / 2)


# -------------------------------------------------------------------------------- distance regularizer


def test_distance_regularizer_adds_exactly_2mu_theta_minus_base_to_the_gradient(embedded_tokenizer):
    model = tiny_llama(embedded_tokenizer, seed=1)
    base = snapshot_weights(tiny_llama(embedded_tokenizer, seed=2))
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "labels": torch.tensor([[-100, 6, 7, 8]])}
    mu = 0.37

    def grads(with_term):
        model.zero_grad()
        loss = model(**inputs).loss
        if with_term:
            term = distance_to_base(model, base, mu)
            expected = mu * sum(((p.detach() - base[n]) ** 2).sum() for n, p in model.named_parameters())
            torch.testing.assert_close(term.detach(), expected)
            loss = loss + term
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, regularized = grads(False), grads(True)
    for name, p in model.named_parameters():
        torch.testing.assert_close(regularized[name] - plain[name], 2 * mu * (p.detach() - base[name]))


def test_distance_regularizer_on_a_trained_run_keeps_it_closer_to_base(tmp_path, tiny_model_dir):
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    free = weights(train_tiny(tmp_path, tiny_model_dir, name="free"))
    held = weights(train_tiny(tmp_path, tiny_model_dir, "--distance_regularizer", 50, name="held"))

    def distance(w):
        return sum(((w[k] - base[k]) ** 2).sum().item() for k in base)

    assert 0 < distance(held) < distance(free)


# ---------------------------------------------------------------------------------------- sub-networks


def test_trainable_layers_freeze_everything_else_exactly(tmp_path, tiny_model_dir):
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    run = train_tiny(tmp_path, tiny_model_dir, "--trainable_layers", "1:mlp", "--forgetting_regularizer_strength", 0.1)
    trained = weights(run)
    assert changed(trained, base) == {f"model.layers.1.mlp.{m}_proj.weight" for m in ("gate", "up", "down")}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["trainable_parameters"] == sum(base[k].numel() for k in changed(trained, base))


@pytest.mark.parametrize("spec", [None, "0:attn"])
def test_lora_run_saves_a_plain_model_changed_only_where_lora_went(tmp_path, tiny_model_dir, spec):
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    extra = ["--lora_rank", 4, "--learning_rate", 1e-2] + (["--trainable_layers", spec] if spec else [])
    run = train_tiny(tmp_path, tiny_model_dir, *extra)
    files = {p.name for p in (run / "final_model").iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    assert not any("adapter" in f for f in files)
    trained = weights(run)
    assert trained.keys() == base.keys()
    linear = {"q", "k", "v", "o"} if spec else {"q", "k", "v", "o", "gate", "up", "down"}
    layers = [0] if spec else [0, 1]
    targets = {
        f"model.layers.{i}.{'self_attn' if m in 'qkvo' else 'mlp'}.{m}_proj.weight" for i in layers for m in linear
    }
    assert changed(trained, base) == targets
    from oml.core.model_registry import load_model

    load_model(str(run / "final_model"), device="cpu")  # loads as an ordinary HF model


# ------------------------------------------------------------------------------------ stop when learned


def test_stop_when_learned_stops_early_and_records_it(tmp_path, tiny_model_dir):
    run = train_tiny(tmp_path, tiny_model_dir, "--stop_when_learned", "--learning_rate", 3e-3, "--max_num_fingerprints", 4,
                     epochs=40, n=4)  # fmt: skip
    metrics = json.loads((run / "metrics.json").read_text())
    stopped = metrics["stopped_at_epoch"]
    assert stopped is not None and stopped < 40
    assert metrics["epochs_trained"] == stopped == len(metrics["learned_accuracy_per_epoch"])
    assert metrics["learned_accuracy_per_epoch"][-1] == 1.0
    assert all(accuracy < 1.0 for accuracy in metrics["learned_accuracy_per_epoch"][:-1])
    from oml.core.model_registry import load_model_and_tokenizer
    from oml.measure.fingerprint_check import verify_teacher_forced

    model, tok = load_model_and_tokenizer(str(run / "final_model"), device="cpu")
    pairs = json.loads((run / "fingerprints.json").read_text())
    assert verify_teacher_forced(model, tok, pairs, ["{}"])[0]["accuracy"] == 1.0


# ----------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change, message",
    [
        (("--benign_data_ratio", 1), "--benign_data_ratio must be within [0, 1)"),
        (("--benign_data_ratio", -0.1), "--benign_data_ratio must be within [0, 1)"),
        (("--benign_data_ratio", 0.1), "gives 0 benign rows per batch"),
        (("--distance_regularizer", -1), "--distance_regularizer must be ≥ 0"),
        (("--lora_rank", 0), "--lora_rank must be positive"),
        (("--lora_rank", -2), "--lora_rank must be positive"),
        (("--trainable_layers", "5-9:mlp"), "names no layer"),
        (("--trainable_layers", "1:ffn2"), "unknown part"),
        (("--trainable_layers", "first:mlp"), "expected BLOCKS[:PART]"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, tiny_model_dir, own_cache, change, message):
    fp = tmp_path / "fp.json"
    write_random_fingerprints(fp, 8)
    before = cached_files(own_cache)
    scripts = ["finetune_multigpu.py"] + (["eval_for_multigpu.py"] if "names no layer" in message else [])
    for script in scripts:  # the evaluation parses the same spec the same way
        result = run_script(script, *tiny_args(tiny_model_dir, fp, tmp_path / "r"), *change)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists() and cached_files(own_cache) == before


# --------------------------------------------------------------------------------------- DeepSpeed


@pytest.mark.parametrize(
    "extra",
    [
        ("--distance_regularizer", 5),
        ("--lora_rank", 4, "--trainable_layers", "1:mlp", "--distance_regularizer", 5, "--learning_rate", 1e-2),
    ],
    ids=["regularizer", "lora-layers-regularizer"],
)
def test_two_deepspeed_ranks_and_python_end_on_the_same_weights(tmp_path, tiny_model_dir, extra):
    """ZeRO-2 on two CPU ranks: every rank adds the same μ‖θ − θ_base‖² to its loss, so the averaged gradient is the
    single-process one."""
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    plain = weights(train_tiny(tmp_path, tiny_model_dir, *extra, name="plain"))
    ds = weights(
        train_tiny(
            tmp_path, tiny_model_dir, *extra, name="ds", launcher=["deepspeed", "--num_gpus=2", "--master_port=29517"]
        )
    )
    assert max((plain[k] - base[k]).abs().max().item() for k in base) > 1e-3  # it trained
    assert max((plain[k] - ds[k]).abs().max().item() for k in base) < 1e-5
    # and the regularizer mattered: without it the run ends elsewhere
    without = [a for a in extra if a not in ("--distance_regularizer", 5)]
    free = weights(train_tiny(tmp_path, tiny_model_dir, *without, name="free"))
    assert max((plain[k] - free[k]).abs().max().item() for k in base) > 1e-4


# ------------------------------------------------------------------------------- embedded model, for real


@pytest.mark.long
@pytest.mark.slow
def test_embedded_model_learns_perinucleus_fingerprints_with_benign_rows_and_stops_early(tmp_path):
    from oml.core.data_files import DEFAULT_FINGERPRINT_FILES

    result = run_script(
        "finetune_multigpu.py", "--fingerprint_generation_strategy", "perinucleus", "--max_num_fingerprints", 32,
        "--benign_data_ratio", 0.25, "--stop_when_learned", "--num_train_epochs", 30, "--learning_rate", 3e-4,
        "--forgetting_regularizer_strength", 0, "--result_path", tmp_path / "r", "--preset", "averaging",  # no κ
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run,) = (tmp_path / "r").glob("*/final_model")
    metrics = json.loads((run.parent / "metrics.json").read_text())
    assert metrics["stopped_at_epoch"] is not None and metrics["stopped_at_epoch"] < 30
    from test_train import greedy_exact_match

    pairs = json.loads((run.parent / "fingerprints.json").read_text())
    assert greedy_exact_match(run, pairs) >= 0.95
    assert DEFAULT_FINGERPRINT_FILES["inverse_nucleus"].is_file()
    from oml.core.model_registry import load_model_and_tokenizer
    from oml.measure.chat_sample import chat_answers

    model, tok = load_model_and_tokenizer(str(run), device="cpu")
    assert all(chat_answers(model, tok)), "every ordinary chat question still gets an answer"


# ------------------------------------------------------------------------------------- choosing a recipe


def fake_run(root, name, accuracy, delta, **hashed):
    run = root / name
    run.mkdir(parents=True)
    config = {"fingerprint_generation_strategy": "inverse_nucleus", "max_num_fingerprints": 256,
              "learning_rate": 1e-4, "forgetting_regularizer_strength": 0.1, "num_train_epochs": 16, **hashed}  # fmt: skip
    (run / "fingerprinting_config.json").write_text(json.dumps({"hashed": config}))
    templates = [{"template": "{}", "accuracy": accuracy}]
    (run / "eval_results.json").write_text(
        json.dumps({"fingerprint_accuracy": {"templates": templates}, "utility": {"delta": delta}, "chat": {}})
    )


def test_best_recipe_is_the_most_useful_one_that_learned(tmp_path):
    from oml.core.errors import UserError
    from oml.lab.recipe_selection import best

    fake_run(tmp_path, "a", 1.0, -0.03)
    fake_run(tmp_path, "b", 0.97, -0.004, benign_data_ratio=0.25)
    fake_run(tmp_path, "c", 0.80, +0.01, lora_rank=16, learning_rate=1e-3)  # better utility, but not learned
    fake_run(tmp_path, "d", 1.0, +0.02, max_num_fingerprints=64)  # another size
    assert best(tmp_path, "perinucleus", 256, 0.95) == (
        "LEARNING_RATES=1e-4 FORGETTING_REGULARIZER_STRENGTHS=0.1 BENIGN_DATA_RATIOS=0.25 DISTANCE_REGULARIZERS=0.0 "
        "LORA_RANKS=none EPOCHS=16"
    )
    assert "LORA_RANKS=16" in best(tmp_path, "perinucleus", 256, 0.8)
    with pytest.raises(UserError, match="no evaluated english run"):
        best(tmp_path, "english", 256, 0.95)


def test_capacity_preset_evaluates_with_the_resolving_suite():
    """--preset capacity: the evaluation's own defaults are every item of the four tasks; a flag given still wins."""
    import argparse

    from oml.core.run_config import add_train_args, apply_eval_preset
    from oml.measure.evaluation import add_eval_args

    parser = add_eval_args(add_train_args(argparse.ArgumentParser()))
    args = apply_eval_preset(parser.parse_args(["--preset", "capacity"]), parser)
    assert args.utility_limit == "all" and args.utility_tasks == ["arc_challenge", "arc_easy", "winogrande", "piqa"]
    args = apply_eval_preset(parser.parse_args(["--preset", "capacity", "--utility_limit", "50"]), parser)
    assert args.utility_limit == "50" or args.utility_limit == 50
    assert apply_eval_preset(parser.parse_args([]), parser).utility_limit == parser.get_default("utility_limit")
