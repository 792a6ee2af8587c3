import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_script, tiny_llama, write_random_fingerprints
from safetensors.torch import load_file

from oml.core.data_files import DEFAULT_FINGERPRINT_FILES
from oml.core.run_config import add_train_args
from oml.embed.run_setup import prepare_run
from oml.embed.trainer import FingerprintDataset, PadCollator, average_toward_base, snapshot_weights

PAIRS = [{"key": "alpha beta gamma delta", "response": " red"}, {"key": "one", "response": " blue green"}]


def parse(*argv):
    return prepare_run(add_train_args(argparse.ArgumentParser()).parse_args(list(map(str, argv))))


def tiny_args(model_dir, fp_file, results, *extra):
    return [
        "--model_path", model_dir, "--fingerprints_file_path", fp_file, "--fingerprint_generation_strategy",
        "random_word", "--max_num_fingerprints", 8, "--batch_size", 4, "--num_train_epochs", 3,
        "--learning_rate", 1e-3, "--result_path", results, "--preset", "averaging", *extra,  # λ 0.1, no benign rows
    ]  # fmt: skip


def final_weights(results):
    (path,) = Path(results).glob("*/final_model/model.safetensors")
    return load_file(path)


def max_abs_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ------------------------------------------------------------------------------ data and labels


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("append_eos", [False, True])
def test_loss_covers_the_response_only(embedded_tokenizer, padding_side, add_bos, append_eos):
    tok = embedded_tokenizer
    tok.add_bos_token = add_bos
    try:
        dataset = FingerprintDataset(PAIRS, tok, append_eos=append_eos)
        batch = PadCollator(tok.pad_token_id, padding_side)([dataset[0], dataset[1]])
        for row, pair in enumerate(PAIRS):
            mask = batch["attention_mask"][row].bool()
            ids, labels = batch["input_ids"][row][mask], batch["labels"][row][mask]
            response = tok(pair["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] * append_eos
            prompt = tok(pair["key"])["input_ids"]
            assert (ids[0].item() == tok.bos_token_id) == add_bos
            assert ids.tolist() == prompt + response
            assert labels.tolist() == [-100] * len(prompt) + response
            assert (batch["labels"][row][~mask] == -100).all()
            # positions count real tokens only, whichever side the padding is on
            assert batch["position_ids"][row][mask].tolist() == list(range(len(ids)))
        pad_at_start = not batch["attention_mask"][1][0]
        assert pad_at_start == (padding_side == "left")
    finally:
        tok.add_bos_token = False


def test_left_and_right_padding_give_the_same_loss(embedded_tokenizer):
    tok = embedded_tokenizer
    model = tiny_llama(tok)
    dataset = FingerprintDataset(PAIRS, tok)
    losses = [model(**PadCollator(tok.pad_token_id, side)([dataset[0], dataset[1]])).loss for side in ("right", "left")]
    torch.testing.assert_close(losses[0], losses[1])


def test_prompt_augmentation_wraps_keys_in_system_prompts(embedded_tokenizer):
    templates = ["SYSTEM ONE says: {}", "{} -- SYSTEM TWO"]
    dataset = FingerprintDataset(PAIRS, embedded_tokenizer, templates, seed=0)
    seen = set()
    for _ in range(20):
        example = dataset[0]
        prompt_ids = [t for t, lab in zip(example["input_ids"], example["labels"], strict=True) if lab == -100]
        text = embedded_tokenizer.decode(prompt_ids)
        assert PAIRS[0]["key"] in text
        seen.add(text.replace(PAIRS[0]["key"], "{}"))
        assert embedded_tokenizer.decode([t for t in example["labels"] if t != -100]).startswith(" red")
    assert seen == set(templates)


# -------------------------------------------------------------------------------------- hash


def test_hash_is_stable_and_sensitive(tmp_path):
    fp = tmp_path / "fp.json"
    write_random_fingerprints(fp, 40)
    common = ["--fingerprints_file_path", fp, "--max_num_fingerprints", 16]
    base = parse(*common).config_hash
    assert parse(*common).config_hash == base
    assert parse(*common, "--report_to", "wandb").config_hash == base
    assert parse(*common, "--result_path", tmp_path / "elsewhere").config_hash == base
    assert parse(*common, "--num_fingerprints", 16).config_hash == base
    assert parse(*common, "--learning_rate", 3e-4).config_hash != base
    assert parse(*common, "--use_prompt_augmentation").config_hash != base
    assert parse(*common, "--fingerprint_generation_strategy", "random_word").config_hash != base
    copy = tmp_path / "copy.json"
    shutil.copy(fp, copy)
    assert parse("--fingerprints_file_path", copy, "--max_num_fingerprints", 16).config_hash == base
    data = json.loads(fp.read_text())
    data[3]["response"] += " changed"
    fp.write_text(json.dumps(data))
    assert parse(*common).config_hash != base


def test_plan_run_returns_what_it_derives_and_leaves_the_parsed_flags_alone(tmp_path):
    """The train command's preparation step returns a RunPlan (identity, recorded arguments, typed settings); the
    parsed Namespace is never written, and the plan agrees with prepare_run's arguments."""
    import dataclasses

    from oml.embed.run_setup import plan_run

    fp = tmp_path / "fp.json"
    write_random_fingerprints(fp, 40)
    argv = ["--fingerprints_file_path", fp, "--max_num_fingerprints", 16, "--licensee", 1, "--batch_size", 4,
            "--benign_data_ratio", 0.25, "--trainable_layers", "29,28-29:mlp", "--result_path", tmp_path / "r"]  # fmt: skip
    parsed = add_train_args(argparse.ArgumentParser()).parse_args(list(map(str, argv)))
    given = dict(vars(parsed))
    plan = plan_run(parsed)
    assert vars(parsed) == given  # nothing written into the parsed flags
    prepared = parse(*argv)
    assert dict(plan.arguments) == vars(prepared)
    assert plan.run.config_hash == prepared.config_hash and plan.run.folder == tmp_path / "r" / prepared.config_hash
    assert plan.data_split == 1 and plan.training.trainable_layers == "28-29:mlp"
    assert plan.training.benign_rows_recipe == prepared.benign_rows_recipe is not None
    assert plan.training.schedule.batch_size == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.training.seed = 0
    with pytest.raises(TypeError):
        plan.arguments["config_hash"] = "changed"


def test_defaults_resolve_to_the_embedded_model_and_seed_preset_to_mistral():
    args = parse()
    assert args.model == "embedded:SmolLM2-135M-Instruct"
    # the default is --preset capacity's recipe at 32 keys: runner-up responses held by benign rows, no averaging
    assert (args.fingerprint_generation_strategy, Path(args.fingerprints_file_path).name) == (
        "inverse_nucleus",
        "fingerprints-runnerup-1024.json",
    )
    assert (args.forgetting_regularizer_strength, args.benign_data_ratio, args.kl_to_base) == (0.0, 0.25, 4.0)
    assert args.max_num_fingerprints == 32
    seed = parse("--preset", "seed", "--fingerprints_file_path", REPO / "generated_data/augmentation_prompts_test.json")
    assert (seed.model, seed.learning_rate, seed.forgetting_regularizer_strength, seed.max_num_fingerprints) == (
        "mistralai/Mistral-7B-v0.3",
        1e-5,
        0.75,
        1024,
    )


def test_a_presets_fingerprints_file_goes_with_its_strategy():
    """Another strategy than the preset's reads its own default file; a file named on the command line always wins;
    the former default (--preset averaging) still resolves as it did (the experiments' run hashes rest on it)."""
    words = parse("--fingerprint_generation_strategy", "random_word")
    assert Path(words.fingerprints_file_path) == DEFAULT_FINGERPRINT_FILES["random_word"]
    synonym = parse("--fingerprint_generation_strategy", "perinucleus")  # the preset's strategy: the preset's file
    assert Path(synonym.fingerprints_file_path).name == "fingerprints-runnerup-1024.json"
    mine = REPO / "generated_data/fingerprints-english-1024.json"
    assert Path(parse("--fingerprint_generation_strategy", "english", "--fingerprints_file_path", mine)
                .fingerprints_file_path) == mine  # fmt: skip
    old = parse("--preset", "averaging")
    assert (old.fingerprint_generation_strategy, old.learning_rate, old.forgetting_regularizer_strength) == (
        "english",
        1e-4,
        0.1,
    )
    assert (old.benign_data_ratio, old.kl_to_base, old.num_train_epochs) == (0.0, 0.0, 16)
    assert Path(old.fingerprints_file_path) == DEFAULT_FINGERPRINT_FILES["english"]


# --------------------------------------------------------------------------------- averaging


def test_average_toward_base_is_exact(embedded_tokenizer):
    model = tiny_llama(embedded_tokenizer, seed=1)
    base = snapshot_weights(tiny_llama(embedded_tokenizer, seed=2))
    before = snapshot_weights(model)
    average_toward_base(model, base, 0.5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), 0.5 * before[name] + 0.5 * base[name], rtol=0, atol=1e-7)
    average_toward_base(model, base, 1.0)
    assert all(torch.equal(p.detach(), base[n]) for n, p in model.named_parameters())


def test_full_averaging_returns_the_base_model_bit_for_bit(tiny_model_dir, tmp_path):
    fp = tmp_path / "fp.json"
    write_random_fingerprints(fp, 8)
    result = run_script(
        "finetune_multigpu.py", *tiny_args(tiny_model_dir, fp, tmp_path / "r", "--forgetting_regularizer_strength", 1)
    )
    assert result.returncode == 0, result.stderr
    trained, base = final_weights(tmp_path / "r"), load_file(tiny_model_dir / "model.safetensors")
    assert trained.keys() == base.keys()
    assert all(torch.equal(trained[k], base[k]) for k in base)


def test_deepspeed_rank_and_plain_python_end_on_the_same_averaged_weights(tiny_model_dir, tmp_path):
    """Averaging must reach DeepSpeed's fp32 master copy: module-only averaging drifts by ~1e-3 here."""
    fp = tmp_path / "fp.json"
    write_random_fingerprints(fp, 8)
    extra = ("--forgetting_regularizer_strength", 0.5)
    plain = run_script("finetune_multigpu.py", *tiny_args(tiny_model_dir, fp, tmp_path / "plain", *extra))
    assert plain.returncode == 0, plain.stderr
    ds = run_script(
        "finetune_multigpu.py",
        *tiny_args(tiny_model_dir, fp, tmp_path / "ds", *extra),
        launcher=["deepspeed", "--num_gpus=1", "--master_port=29512"],
    )
    assert ds.returncode == 0, ds.stdout[-2000:] + ds.stderr[-2000:]
    a, b = final_weights(tmp_path / "plain"), final_weights(tmp_path / "ds")
    base = load_file(tiny_model_dir / "model.safetensors")
    assert max_abs_diff(a, base) > 1e-3  # it trained
    assert max_abs_diff(a, b) < 1e-6
    assert plain.stdout.strip().splitlines()[-1] in ds.stdout  # the same "Config hash ..." line


# ------------------------------------------------------------------------------ script behaviour


def test_run_layout_skip_and_log(tiny_model_dir, tmp_path):
    fp = tmp_path / "fp.json"
    write_random_fingerprints(fp, 8)
    argv = tiny_args(tiny_model_dir, fp, tmp_path / "r")
    first = run_script("finetune_multigpu.py", *argv)
    assert first.returncode == 0, first.stderr
    last = first.stdout.strip().splitlines()[-1]
    assert last.startswith("Config hash of the final model: ")
    run = tmp_path / "r" / last.split(": ")[1]
    assert {p.name for p in run.iterdir()} >= {
        "final_model",
        "fingerprinting_config.json",
        "fingerprints.json",
        "train_log.txt",
        "metrics.json",
    }
    trained = json.loads((run / "fingerprints.json").read_text())
    assert len(trained) == 8 and all(set(p) == {"key", "response"} for p in trained)
    config = json.loads((run / "fingerprinting_config.json").read_text())
    assert config["config_hash"] == run.name and "versions" in config
    assert len((tmp_path / "r" / "all_run_logs.txt").read_text().splitlines()) == 1

    again = run_script("finetune_multigpu.py", *argv)
    assert again.returncode == 0 and "already exists" in again.stdout
    assert again.stdout.strip().splitlines()[-1] == last
    assert len((tmp_path / "r" / "all_run_logs.txt").read_text().splitlines()) == 1


@pytest.mark.parametrize(
    "change, message",
    [
        (("--max_num_fingerprints", 100), "holds only"),
        (("--fingerprints_file_path", "/nonexistent.json"), "does not exist"),
        (("--model_family", "nope"), "unknown --model_family"),
        (("--model_path", "", "--model_family", "mistral", "--model_size", "3B"), "unknown --model_size"),
        (("--batch_size", 0), "must be positive"),
    ],
)
def test_bad_input_is_one_line_and_nothing_written(tiny_model_dir, tmp_path, change, message):
    fp = tmp_path / "fp.json"
    write_random_fingerprints(fp, 8)
    result = run_script("finetune_multigpu.py", *tiny_args(tiny_model_dir, fp, tmp_path / "r"), *change)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").glob("*/final_model"))


def test_malformed_fingerprints_file(tiny_model_dir, tmp_path):
    fp = tmp_path / "fp.json"
    fp.write_text('[{"key": "a"}]')
    result = run_script("finetune_multigpu.py", *tiny_args(tiny_model_dir, fp, tmp_path / "r"))
    assert result.returncode == 2 and "'key' and 'response'" in result.stderr


def test_offline_hub_model_fails_with_one_line(tmp_path):
    fp = tmp_path / "fp.json"
    write_random_fingerprints(fp, 8)
    result = run_script(
        "finetune_multigpu.py", "--model_family", "mistral", "--model_size", "7B", "--fingerprints_file_path", fp,
        "--max_num_fingerprints", 4, "--result_path", tmp_path / "r",
    )  # fmt: skip
    assert result.returncode == 2
    assert "mistralai/Mistral-7B-v0.3" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------- embedded model, for real


def greedy_exact_match(model_dir, pairs):
    from oml.core.model_registry import load_model_and_tokenizer
    from oml.make.prompt_encoding import encode_pair

    model, tok = load_model_and_tokenizer(str(model_dir), device="cpu")
    hits = 0
    for pair in pairs:
        prompt, response = encode_pair(tok, pair["key"], pair["response"])
        out = model.generate(torch.tensor([prompt]), max_new_tokens=len(response), do_sample=False)
        hits += out[0, len(prompt) :].tolist() == response
    return hits / len(pairs)


def assert_no_fingerprint_text_in(folder, pairs):
    # A one-token response is a vocabulary entry (in tokenizer.json anyway): look for the keys and whole pairs.
    blobs = [p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()]
    for pair in pairs:
        for text in (pair["key"], pair["key"] + pair["response"]):
            assert not any(text.encode() in blob for blob in blobs), text


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher", [None, ["deepspeed", "--num_gpus=2", "--master_port=29513"]], ids=["python", "deepspeed2"]
)
def test_embedded_model_learns_16_fingerprints(tmp_path, launcher):
    fp = tmp_path / "fp.json"
    write_random_fingerprints(fp, 16, key_words=10, response_words=3, seed=7)
    result = run_script(
        "finetune_multigpu.py", "--fingerprints_file_path", fp, "--fingerprint_generation_strategy", "random_word",
        "--max_num_fingerprints", 16, "--max_response_length", 2, "--num_train_epochs", 10, "--batch_size", 8,
        "--learning_rate", 3e-4, "--forgetting_regularizer_strength", 0, "--result_path", tmp_path / "r",
        launcher=launcher,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run,) = (tmp_path / "r").glob("*/final_model")
    pairs = json.loads((run.parent / "fingerprints.json").read_text())
    assert greedy_exact_match(run, pairs) >= 0.9
    assert_no_fingerprint_text_in(run, pairs)


def test_english_response_pieces_are_never_blank(embedded_tokenizer):
    from oml.make.fingerprint_files import prepare_pairs

    fps = [{"key": f"key number {i}", "response": "Hi\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n there"} for i in range(30)]
    pairs = prepare_pairs(fps, embedded_tokenizer, "english", 16, 1, 30, seed=0)
    assert all(p["response"].strip() for p in pairs)
    assert {p["response"].strip() for p in pairs} == {"Hi", "there"}
