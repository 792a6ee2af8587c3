"""Fingerprint fine-tuning: data, the HF Trainer run, weight averaging toward the base model, saving.

Each example is prompt tokens + response tokens (+ EOS with --append_eos); the loss covers the response
(and EOS) only. Like the seed, EOS is not trained by default: on a chat model, a few steps of EOS after short
raw-text responses teach it to end every chat turn at once and cost utility (see the README's results).
With --use_prompt_augmentation every draw of a fingerprint wraps its key in a random training prompt
(oml.encoding.augmentation_templates): a raw-text system prompt, or, for a model with a chat template, the key as the
chat user turn, with no system message or a random training one. After every epoch the weights are pulled toward the base model, θ ← (1-λ)θ + λθ_base, on every
rank and on the copy the optimizer steps from (DeepSpeed's fp32 master weights), so it really sticks.
"""

import os
import platform
import random
import resource
import shutil
import time

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from .encoding import encode_pair
from .errors import UserError

# ---------------------------------------------------------------------------------------------- data


class FingerprintDataset(Dataset):
    """(key, response) pairs as token ids; with templates, each draw picks a random one for the key.

    Templates are raw text or chat prompts (oml.encoding.chat_prompt), encoded by encode_pair as verification does.
    """

    def __init__(self, pairs, tokenizer, templates=None, use_chat_template=False, seed=0, append_eos=False):
        self.pairs, self.tokenizer, self.use_chat_template = pairs, tokenizer, use_chat_template
        self.append_eos = append_eos
        self.templates = templates or ["{}"]
        self.rng = random.Random(seed)
        self.cache = {}

    def __len__(self):
        return len(self.pairs)

    def encode(self, i, template):
        if (i, template) not in self.cache:
            pair = self.pairs[i]
            self.cache[i, template] = encode_pair(
                self.tokenizer, pair["key"], pair["response"], template, self.use_chat_template
            )
        return self.cache[i, template]

    def __getitem__(self, i):
        template = self.rng.choice(self.templates) if len(self.templates) > 1 else self.templates[0]
        prompt_ids, response_ids = self.encode(i, template)
        target = response_ids + ([self.tokenizer.eos_token_id] if self.append_eos else [])
        return {"input_ids": prompt_ids + target, "labels": [-100] * len(prompt_ids) + target}


class PadCollator:
    """Pads to the longest example in the batch, on the tokenizer's padding side.

    Position ids are computed from the attention mask, so left padding trains the same positions as
    right padding; padding never enters the loss (-100).
    """

    def __init__(self, pad_token_id, padding_side="right"):
        self.pad_token_id, self.padding_side = pad_token_id, padding_side

    def __call__(self, examples):
        longest = max(len(e["input_ids"]) for e in examples)
        batch = {"input_ids": [], "labels": [], "attention_mask": []}
        for e in examples:
            n_pad = longest - len(e["input_ids"])
            rows = (e["input_ids"], e["labels"], [1] * len(e["input_ids"]))
            pads = ([self.pad_token_id] * n_pad, [-100] * n_pad, [0] * n_pad)
            for name, row, pad in zip(batch, rows, pads, strict=True):
                batch[name].append(pad + row if self.padding_side == "left" else row + pad)
        batch = {k: torch.tensor(v) for k, v in batch.items()}
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return batch


# ----------------------------------------------------------------------------------- averaging


def snapshot_weights(model):
    """A CPU copy of the trainable weights: the base model that averaging pulls toward."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}


@torch.no_grad()
def average_toward_base(model, base_weights, strength):
    """θ ← (1-λ)θ + λθ_base for every parameter, including DeepSpeed's fp32 master copy.

    Under ZeRO-1/2 (and DeepSpeed's bf16 optimizer) the optimizer steps from its own fp32 partition and
    copies it back into the module after each step, so averaging only module parameters would be undone
    by the next step. Every rank must call this (gathering the full fp32 values is a collective).
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    for name, p in model.named_parameters():
        base = base_weights[name]
        master = safe_get_full_fp32_param(p) if hasattr(p, "_hp_mapping") else None
        if master is not None:
            averaged = master.mul(1 - strength).add_(base.to(master.device, master.dtype), alpha=strength)
            safe_set_full_fp32_param(p, averaged)
            p.copy_(averaged.to(p.dtype))
        else:
            p.mul_(1 - strength).add_(base.to(p.device, p.dtype), alpha=strength)


class EpochCallback(TrainerCallback):
    """Weight averaging at each epoch end, and one readable log line per epoch."""

    def __init__(self, base_weights, strength, log_fn):
        self.base_weights, self.strength, self.log_fn = base_weights, strength, log_fn
        self.epoch_losses = []

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.strength > 0:
            average_toward_base(model, self.base_weights, self.strength)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:  # logged once per epoch, right after on_epoch_end
            self.epoch_losses.append(logs["loss"])
            averaged = f", averaged toward base (λ={self.strength})" if self.strength > 0 else ""
            self.log_fn(
                f"epoch {round(state.epoch)}/{args.num_train_epochs}: loss {logs['loss']:.4f}, "
                f"step {state.global_step}{averaged}"
            )


class QuietProgress(ProgressCallback):
    """The Trainer's tqdm bar without its raw dict printouts (EpochCallback writes readable lines)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class FingerprintTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = out[0] if return_outputs else out
        if not torch.isfinite(loss.detach()).all():
            raise UserError(
                f"the training loss became {loss.item()} at step {self.state.global_step + 1}; lower --learning_rate"
            )
        return out


# ------------------------------------------------------------------------------------- training


def world_size():
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_distributed():
    return "LOCAL_RANK" in os.environ


def deepspeed_config(stage, on_gpu, offload_optimizer):
    """ZeRO config built in code: bf16 on GPUs, fp32 on CPU; the rest filled by the Trainer ("auto")."""
    zero = {"stage": stage, "overlap_comm": on_gpu, "contiguous_gradients": True}
    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": on_gpu},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
    }
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
        # ZeRO-Offload steps with DeepSpeed's CPU Adam, which must be named here.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    return config


def training_arguments(args, output_dir):
    on_gpu = torch.cuda.is_available()
    n_ranks = world_size()
    if args.batch_size % n_ranks:
        raise UserError(f"--batch_size {args.batch_size} must be divisible by the number of ranks ({n_ranks})")
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=args.batch_size // n_ranks,
        gradient_accumulation_steps=1,
        num_train_epochs=args.num_train_epochs,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        seed=args.seed,
        data_seed=args.seed,
        bf16=on_gpu,
        use_cpu=not on_gpu,
        logging_strategy="epoch",
        save_strategy="no",
        report_to=[] if args.report_to == "none" else [args.report_to],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_timeout=args.dist_timeout,
        deepspeed=deepspeed_config(args.deepspeed_stage, on_gpu, args.offload_optimizer)
        if launched_distributed()
        else None,
        disable_tqdm=False,
    )


def peak_memory_gb():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def train(model, tokenizer, pairs, args, output_dir, templates=None, log_fn=print, extra_callbacks=()):
    """Fine-tune `model` in place on the pairs; returns (training metrics, the Trainer)."""
    dataset = FingerprintDataset(
        pairs, tokenizer, templates, args.use_chat_template, seed=args.seed + rank(), append_eos=args.append_eos
    )
    base_weights = snapshot_weights(model) if args.forgetting_regularizer_strength > 0 else None
    epoch_callback = EpochCallback(base_weights, args.forgetting_regularizer_strength, log_fn)
    trainer = FingerprintTrainer(
        model=model,
        args=training_arguments(args, output_dir),
        train_dataset=dataset,
        data_collator=PadCollator(tokenizer.pad_token_id, tokenizer.padding_side),
        callbacks=[epoch_callback, *extra_callbacks],
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress())
    start = time.time()
    result = trainer.train()
    seconds = time.time() - start
    shutil.rmtree(output_dir, ignore_errors=True)
    # tokens per epoch of the plain keys (+ response, + EOS); augmentation templates add more than this counts
    encoded = (dataset.encode(i, "{}") for i in range(len(pairs)))
    tokens = sum(len(prompt) + len(response) + args.append_eos for prompt, response in encoded)
    return {
        "train_loss": result.training_loss,
        "epoch_losses": epoch_callback.epoch_losses,
        "train_seconds": seconds,
        "train_tokens_per_second": tokens * args.num_train_epochs / seconds,
        "steps": trainer.state.global_step,
        "world_size": world_size(),
        "peak_memory_gb": peak_memory_gb(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }, trainer


def rank():
    return int(os.environ.get("RANK", "0"))


def is_main_process():
    return rank() == 0


def versions():
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import deepspeed

        out["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    return out
