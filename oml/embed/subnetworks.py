"""Sub-network training: which weights a run may change (--trainable_layers) and LoRA adapters (--lora_rank).

A layer spec is BLOCKS[:PART]. BLOCKS is `all` or a comma-separated list of block indices and inclusive ranges
(`20-29`, `0,5,7-9`); PART is `mlp`, `attn` or `block` (the whole block; the default). Examples: `20-29:mlp`,
`all:attn`, `28-29`. Everything else (embeddings, final norm, output layer, other blocks and parts) is frozen.
A spec that names no block of the model is bad input.

With --lora_rank r, LoRA adapters (peft, alpha 2r, no dropout) go on the linear layers of the spec's blocks and
part (every block's linear layers without a spec; never the output layer); only the adapters train, and they are
merged into the weights before saving, so final_model is a plain HF folder.
"""

import re
from dataclasses import dataclass

from oml.core.errors import UserError

PARTS = {
    "mlp": ("mlp", "feed_forward", "ffn"),
    "attn": ("attn", "attention"),
    "block": ("",),
}
# ".layers.12." (Llama, Mistral, Gemma, Phi-3, GPT-NeoX) or ".h.12." (GPT-2 style)
BLOCK = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.(.*)$")


@dataclass(frozen=True)
class LayerSpec:
    text: str
    blocks: tuple
    part: str

    def matches(self, name):
        """Does the parameter or module `name` belong to the spec's blocks and part?"""
        m = BLOCK.search(name)
        if not m or int(m.group(1)) not in self.blocks:
            return False
        rest = m.group(2)
        return any(word in rest.split(".")[0] for word in PARTS[self.part]) if self.part != "block" else True


def num_blocks(model_id, trust_remote_code=False):
    from transformers import AutoConfig

    from oml.core.model_registry import _friendly_load

    config = _friendly_load(AutoConfig.from_pretrained, model_id, trust_remote_code=trust_remote_code)
    config = getattr(config, "text_config", None) or config
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, name, None):
            return getattr(config, name)
    raise UserError(f"--trainable_layers: cannot tell how many blocks {model_id} has")


def parse_layer_spec(text, model_id, trust_remote_code=False):
    """A LayerSpec for the model; one clear error for a malformed spec or one that names no block."""
    blocks_text, _, part = text.strip().partition(":")
    part = part.strip() or "block"
    if part not in PARTS:
        raise UserError(f"--trainable_layers {text!r}: unknown part {part!r}; choose from {', '.join(PARTS)}")
    n = num_blocks(model_id, trust_remote_code)
    if blocks_text.strip() == "all":
        blocks = set(range(n))
    else:
        blocks = set()
        for item in blocks_text.split(","):
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
            if not m:
                raise UserError(f"--trainable_layers {text!r}: expected BLOCKS[:PART], e.g. '20-29:mlp' or 'all:attn'")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            blocks |= set(range(lo, hi + 1))
        blocks = {b for b in blocks if b < n}
    if not blocks:
        raise UserError(f"--trainable_layers {text!r} names no layer: the model has blocks 0-{n - 1}")
    return LayerSpec(f"{compact(sorted(blocks))}:{part}", tuple(sorted(blocks)), part)


def compact(blocks):
    """[0, 1, 2, 5] -> '0-2,5'."""
    runs, start = [], blocks[0]
    for prev, b in zip(blocks, [*blocks[1:], None], strict=True):
        if b is None or b != prev + 1:
            runs.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = b
    return ",".join(runs)


def spec_of(text):
    """The LayerSpec of canonical spec text (parse_layer_spec's .text), or None for None."""
    if text is None:
        return None
    blocks_text, part = text.split(":")
    blocks = set()
    for item in blocks_text.split(","):
        lo, _, hi = item.partition("-")
        blocks |= set(range(int(lo), int(hi or lo) + 1))
    return LayerSpec(text, tuple(sorted(blocks)), part)


def freeze_outside(model, spec):
    """requires_grad only inside the spec; returns the number of trainable parameters."""
    trainable = 0
    for name, p in model.named_parameters():
        p.requires_grad_(spec.matches(name))
        trainable += p.numel() if p.requires_grad else 0
    if not trainable:
        raise UserError(f"--trainable_layers {spec.text} matches no parameter of this model")
    return trainable


def lora_targets(model, spec):
    """Full names of the linear layers LoRA adapts: inside the spec, or every block's without one."""
    import torch

    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and BLOCK.search(name) and (spec is None or spec.matches(name))
    ]
    if not names:
        raise UserError(
            "--lora_rank: no linear layer to adapt" + (f" in --trainable_layers {spec.text}" if spec else "")
        )
    return names


def add_lora(model, rank, spec):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=lora_targets(model, spec))
    return get_peft_model(model, config)


def prepare_subnet(model, trainable_layers, lora_rank, seed):
    """The model to train: LoRA-wrapped (lora_rank, where trainable_layers says), or with everything outside
    trainable_layers (canonical spec text) frozen, or as is."""
    spec = spec_of(trainable_layers)
    if lora_rank:
        import torch

        torch.manual_seed(seed)  # the adapters' random init: the same run (and every rank) starts the same
        return add_lora(model, lora_rank, spec)
    if spec is not None:
        freeze_outside(model, spec)
    return model


def merged(model):
    """A LoRA model's adapters merged into plain weights (anything else unchanged)."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(True)
    return model
