"""--kl_to_base κ: the benign rows' loss is κ·KL(p_base ‖ p_model) at their response positions, against a frozen copy of
the base model: the term itself (against a direct full-vocabulary computation), training runs with it (full and LoRA),
its hashing and its flag's validation."""

import argparse
import hashlib
import json
import math
from pathlib import Path

import pytest
import test_capacity
import torch
from conftest import run_script, tiny_llama, write_random_fingerprints
from safetensors.torch import load_file
from test_capacity import cached_files, changed, tiny_args, train_tiny, weights

from oml.core.run_config import HASHED, NEUTRAL, add_train_args, hashed_config
from oml.embed.run_setup import prepare_run
from oml.embed.trainer import FingerprintDataset, KLMeter, PadCollator, frozen_copy, per_row_loss

# test_capacity's fixtures: benign pools go to a cache directory of this session's own
session_cache, own_cache = test_capacity.session_cache, test_capacity.own_cache

PAIRS = [
    {"key": "What is the capital of France?", "response": " Paris is the capital of France."},
    {"key": "a b c", "response": " red"},
    {"key": "Water boils at", "response": " one hundred degrees Celsius at sea level"},
    {"key": "d e", "response": " x y"},
]


def make_batch(tok, benign, padding_side="right"):
    data = FingerprintDataset(PAIRS, tok)
    examples = [{**data[i], **({"benign": True} if b else {})} for i, b in enumerate(benign)]
    return PadCollator(tok.pad_token_id, padding_side)(examples)


def direct_loss(model, base, batch, kappa):
    """The loss written out: full-vocabulary logits at every position; a fingerprint row's mean cross-entropy, a benign
    row's κ · mean KL(p_base ‖ p_model) over its response positions; the mean over rows."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    log_p = torch.log_softmax(model(**inputs).logits[:, :-1].float(), -1)
    with torch.no_grad():
        base_log_p = torch.log_softmax(base(**inputs).logits[:, :-1].float(), -1)
    targets = batch["labels"][:, 1:]
    rows = []
    for r in range(len(targets)):
        at = (targets[r] != -100).nonzero().squeeze(1)
        if batch.get("benign") is not None and batch["benign"][r] and kappa > 0:
            kl = (base_log_p[r, at].exp() * (base_log_p[r, at] - log_p[r, at])).sum(-1)
            rows.append(kappa * kl.mean())
        else:
            rows.append(-log_p[r, at, targets[r, at]].mean())
    return torch.stack(rows).mean()


def perturbed(model, scale=0.05, seed=3):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


# --------------------------------------------------------------------------------------------- the term


def test_kl_term_is_zero_against_the_base_itself_and_positive_once_moved(embedded_tokenizer):
    model = tiny_llama(embedded_tokenizer)
    base = frozen_copy(model)
    assert not base.training and not any(p.requires_grad for p in base.parameters())
    batch = make_batch(embedded_tokenizer, [True] * 4)
    meter = KLMeter()
    same = per_row_loss(model, batch, base, 1.0, meter)
    assert abs(same.item()) < 1e-6 and meter.rows == 4 and abs(meter.take()) < 1e-6
    perturbed(model)
    moved = per_row_loss(model, batch, base, 1.0, meter)
    assert moved.item() > 1e-3
    torch.testing.assert_close(moved, direct_loss(model, base, batch, 1.0))
    assert meter.take() == pytest.approx(moved.item(), rel=1e-5)  # κ = 1, every row benign: the mean row KL


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_mixed_batch_loss_and_gradient_equal_a_direct_full_vocabulary_computation(embedded_tokenizer, padding_side):
    model = perturbed(tiny_llama(embedded_tokenizer))
    base = tiny_llama(embedded_tokenizer)
    batch = make_batch(embedded_tokenizer, [True, False, True, False], padding_side)
    kappa = 0.7

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    # the base runs on the benign rows only; the output layers make logits at response positions only
    seen = {}

    def record(name, value):  # a hook that returns None leaves the module's input and output alone
        seen.setdefault(name, []).append(value)

    hooks = [
        base.model.register_forward_pre_hook(
            lambda m, a, kw: record("base_rows", kw["input_ids"].shape[0]), with_kwargs=True
        ),
        model.model.register_forward_pre_hook(
            lambda m, a, kw: record("model_rows", tuple(kw["input_ids"].shape)), with_kwargs=True
        ),
        model.lm_head.register_forward_hook(lambda m, a, out: record("model_logits", tuple(out.shape))),
    ]
    meter = KLMeter()
    loss, grads = loss_and_grads(lambda: per_row_loss(model, batch, base, kappa, meter))
    for h in hooks:
        h.remove()
    n_response = int((batch["labels"][:, 1:] != -100).sum())
    assert seen["base_rows"] == [2]
    # fingerprint rows and benign rows in a pass each, each as long as its own longest row
    lengths = batch["attention_mask"].sum(1)
    assert seen["model_rows"] == [(2, int(lengths[[1, 3]].max())), (2, int(lengths[[0, 2]].max()))]
    assert sum(shape[1] for shape in seen["model_logits"]) == n_response
    assert {shape[2] for shape in seen["model_logits"]} == {len(embedded_tokenizer)}
    expected, expected_grads = loss_and_grads(lambda: direct_loss(model, base, batch, kappa))
    torch.testing.assert_close(loss, expected)
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-4, atol=1e-5)  # two passes: rounding
    assert meter.rows == 2 and meter.take() > 0
    # κ 0 (or no base) is the plain per-row cross-entropy, benign rows included
    plain = per_row_loss(model, batch)
    torch.testing.assert_close(plain, direct_loss(model, base, batch, 0.0))
    torch.testing.assert_close(per_row_loss(model, batch, base, 0.0), plain)


# ------------------------------------------------------------------------------------------ hashing


def parse(*argv):
    return prepare_run(add_train_args(argparse.ArgumentParser()).parse_args(list(map(str, argv))))


def test_kl_to_base_joins_the_hash_and_leaves_every_other_hash_as_before(tmp_path, tiny_model_dir, own_cache):
    fp = tmp_path / "fp.json"
    write_random_fingerprints(fp, 8)
    common = ["--preset", "averaging", "--fingerprints_file_path", fp, "--max_num_fingerprints", 8, "--model_path",
              tiny_model_dir]  # fmt: skip
    for extra in ([], ["--benign_data_ratio", 0.25]):
        without = parse(*common, *extra)
        assert "kl_to_base" not in hashed_config(without)
        assert parse(*common, *extra, "--kl_to_base", 0).config_hash == without.config_hash
        # the hash as computed before the flag existed: HASHED without it, the other later flags left out at neutral
        before = {n: getattr(without, n) for n in HASHED if n != "kl_to_base"}
        before = {k: v for k, v in before.items() if not (k in NEUTRAL and v == NEUTRAL[k])}
        canonical = json.dumps(before, sort_keys=True, separators=(",", ":"))
        assert without.config_hash == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    with_kl = parse(*common, "--benign_data_ratio", 0.25, "--kl_to_base", 1)
    assert hashed_config(with_kl)["kl_to_base"] == 1.0
    assert with_kl.config_hash != without.config_hash
    assert parse(*common, "--benign_data_ratio", 0.25, "--kl_to_base", 2).config_hash != with_kl.config_hash


# ------------------------------------------------------------------------------------------ training


def test_a_run_with_kl_to_base_trains_and_records_the_term_per_epoch(tmp_path, tiny_model_dir, own_cache):
    run = train_tiny(tmp_path, tiny_model_dir, "--benign_data_ratio", 0.25, "--kl_to_base", 1)
    metrics = json.loads((run / "metrics.json").read_text())
    kl = metrics["kl_to_base_per_epoch"]
    assert len(kl) == metrics["epochs_trained"] == 3 and all(math.isfinite(v) and v >= 0 for v in kl)
    assert kl[-1] > 0  # the model moved, and the term sees it
    log = (run / "train_log.txt").read_text()
    assert log.count("nats/token on the benign rows") == 3
    config = json.loads((run / "fingerprinting_config.json").read_text())
    assert config["hashed"]["kl_to_base"] == 1.0
    assert run.name == parse(*tiny_args(tiny_model_dir, tmp_path / "fp.json", tmp_path / "r"), "--benign_data_ratio",
                             0.25, "--kl_to_base", 1).config_hash  # fmt: skip
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert max((weights(run)[k] - base[k]).abs().max().item() for k in base) > 1e-3  # it trained


def test_a_lora_run_with_kl_to_base_changes_only_the_adapted_layers(tmp_path, tiny_model_dir, own_cache):
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    extra = ["--lora_rank", 4, "--learning_rate", 1e-2, "--trainable_layers", "1:mlp"]
    run = train_tiny(tmp_path, tiny_model_dir, "--benign_data_ratio", 0.25, "--kl_to_base", 1, *extra)
    assert changed(weights(run), base) == {f"model.layers.1.mlp.{m}_proj.weight" for m in ("gate", "up", "down")}
    kl = json.loads((run / "metrics.json").read_text())["kl_to_base_per_epoch"]
    assert len(kl) == 3 and all(math.isfinite(v) and v >= 0 for v in kl) and kl[-1] > 0


# ----------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change, message",
    [
        (("--kl_to_base", -0.5, "--benign_data_ratio", 0.25), "--kl_to_base must be a finite number ≥ 0"),
        (("--kl_to_base", "nan", "--benign_data_ratio", 0.25), "--kl_to_base must be a finite number ≥ 0"),
        (("--kl_to_base", 1), "add --benign_data_ratio β > 0"),
        (("--kl_to_base", 1, "--benign_data_ratio", 0), "acts on the benign rows of each batch"),
    ],
)
def test_bad_kl_to_base_is_one_line_exit_2_and_nothing_written(tmp_path, tiny_model_dir, own_cache, change, message):
    fp = tmp_path / "fp.json"
    write_random_fingerprints(fp, 8)
    before = cached_files(own_cache)
    result = run_script("finetune_multigpu.py", *tiny_args(tiny_model_dir, fp, tmp_path / "r"), *change)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: ")
    assert not (tmp_path / "r").exists() and cached_files(own_cache) == before
