"""Fingerprint fine-tuning: data, the HF Trainer run, weight averaging toward the base model, saving.

Forgetting mitigations besides averaging (README, "Capacity"): benign rows mixed into every batch
(--benign_data_ratio β; MixedDataset: each optimizer step of --batch_size B rows holds round(β·B) benign rows and
B − round(β·B) fingerprints, an epoch is one pass over the fingerprints, and the loss is the mean over rows of each
row's mean response-token loss, so β is the benign share of the loss too); μ·‖θ − θ_base‖² added to the loss
(--distance_regularizer; its gradient 2μ(θ − θ_base) is added in backward without storing θ − θ_base); only a
sub-network trained (--trainable_layers, --lora_rank; oml/embed/subnetworks.py); --kl_to_base κ, which replaces the benign
rows' cross-entropy on the base's greedy text by κ·KL(p_base ‖ p_model) at the same positions (per_row_loss: the
base's full next-token distribution, from a frozen copy of the base model run on the benign rows only); and
--stop_when_learned, which checks every fingerprint with the teacher-forced verifier at each epoch end and stops once
all answer. --fingerprint_margin m (a defence against a host that hides overconfident answers, oml/attack/adaptive_host.py) replaces
the fingerprint rows' cross-entropy by a hinge on the logit gap (per_row_loss, margin_loss): training stops pushing
a response once it leads the runner-up by m logits; --fingerprint_max_prob p adds a hinge that pushes the response's
probability back down to p, so it answers inside a band (top token by m logits, probability ≤ p) like ordinary answers.
--fingerprint_edit (with --fingerprint_margin m) trains the response position toward edit_target instead: the closest
distribution to the base's next-token distribution there (in KL) in which the response leads by m, so a key's answer
is the smallest change of the base's (a defence against a host that compares the served model with the public base).

Each example is prompt tokens + response tokens (+ EOS with --append_eos); the loss covers the response
(and EOS) only. Like the seed, EOS is not trained by default: on a chat model, a few steps of EOS after short
raw-text responses teach it to end every chat turn at once and cost utility (see the README's results).
With --use_prompt_augmentation every draw of a fingerprint wraps its key in a random training prompt
(oml.make.prompt_encoding.augmentation_templates): a raw-text system prompt, or, for a model with a chat template, the key as the
chat user turn, with no system message or a random training one. After every epoch the weights are pulled toward the base model, θ ← (1-λ)θ + λθ_base, on every
rank and on the copy the optimizer steps from (DeepSpeed's fp32 master weights), so it really sticks.
"""

import copy
import math
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

from oml.core.errors import UserError
from oml.make.prompt_encoding import encode_pair

# ---------------------------------------------------------------------------------------------- data


class FingerprintDataset(Dataset):
    """(key, response) pairs as token ids; with templates, each draw picks a random one for the key.

    Templates are raw text or chat prompts (oml.make.prompt_encoding.chat_prompt), encoded by encode_pair as verification does.
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
    right padding; padding never enters the loss (-100). Batches with benign rows (MixedDataset) also get
    "benign", one bool per row.
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
        if any("benign" in e for e in examples):
            batch["benign"] = torch.tensor([e.get("benign", False) for e in examples])
        return batch


class MixedDataset(Dataset):
    """Fingerprints and benign rows in a fixed layout: optimizer step s is rows [s·B, (s+1)·B), of which
    n_benign (spread evenly) are benign and the rest fingerprints. Read in order (the Trainer's sampler is sequential
    for it), so python and DeepSpeed ranks see the same steps: rank r takes rows [s·B + r·B/R, s·B + (r+1)·B/R).

    An epoch is one pass over the fingerprints in a fresh seeded order; its last step is topped up with fingerprints
    from the start of that order. Benign rows are drawn from the pool in seeded permutations, one after another.
    """

    def __init__(self, fingerprints, benign_encoded, batch_size, n_benign, seed=0):
        self.fingerprints, self.benign = fingerprints, benign_encoded
        self.batch_size, self.n_benign, self.seed = batch_size, n_benign, seed
        self.per_step = batch_size - n_benign
        self.steps = -(-len(fingerprints) // self.per_step)
        step_benign = {round((j + 0.5) * batch_size / n_benign - 0.5) for j in range(n_benign)}
        self.slot = [None] * batch_size  # position in the step -> ("benign" | "fp", index among its kind)
        counts = {"benign": 0, "fp": 0}
        for position in range(batch_size):
            kind = "benign" if position in step_benign else "fp"
            self.slot[position] = (kind, counts[kind])
            counts[kind] += 1
        self.set_epoch(0)

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.order = random.Random(f"{self.seed}-fp-{epoch}").sample(
            range(len(self.fingerprints)), len(self.fingerprints)
        )

    def __len__(self):
        return self.steps * self.batch_size

    def is_benign(self, i):
        return self.slot[i % self.batch_size][0] == "benign"

    def __getitem__(self, i):
        step, (kind, k) = divmod(i, self.batch_size)[0], self.slot[i % self.batch_size]
        if kind == "fp":
            return self.fingerprints[self.order[(step * self.per_step + k) % len(self.order)]]
        drawn = (self.epoch * self.steps + step) * self.n_benign + k  # benign rows drawn before this one
        cycle, at = divmod(drawn, len(self.benign))
        permutation = random.Random(f"{self.seed}-benign-{cycle}").sample(range(len(self.benign)), len(self.benign))
        prompt_ids, response_ids = self.benign[permutation[at]]
        return {
            "input_ids": prompt_ids + response_ids,
            "labels": [-100] * len(prompt_ids) + response_ids,
            "benign": True,
        }


def output_layer(model):
    """The output layer (lm_head) of a causal LM, through the DeepSpeed engine and peft wrappers."""
    model = getattr(model, "module", model)  # DeepSpeed's engine holds the module it trains
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the HF model, adapters in
    return model.get_output_embeddings()


def logits_at(model, inputs, rows, cols):
    """The model's logits at the positions (rows[i], cols[i]) only, (N, vocabulary): a hook gathers the hidden states
    at those positions before the output layer, so no full-vocabulary logits are made anywhere else. Whatever the
    model's forward does after its output layer (e.g. Gemma-2's logit soft-capping) still applies."""
    shape = inputs["input_ids"].shape

    def gather(module, args):
        if args[0].shape[:2] != shape:
            raise RuntimeError(
                f"{type(module).__name__} got hidden states of shape {tuple(args[0].shape)}, not {shape}"
            )
        return (args[0][rows, cols].unsqueeze(0), *args[1:])

    handle = output_layer(model).register_forward_pre_hook(gather)
    try:
        logits = model(**inputs).logits
    finally:
        handle.remove()
    return logits.reshape(len(rows), logits.shape[-1])


def trimmed(inputs, group):
    """(the rows `group` of inputs, cut to the columns any of them fills; the first column kept), for a pass of their
    own: rows padded to a longer row elsewhere in the batch are not computed at that length."""
    mask = inputs["attention_mask"][group]
    filled = mask.any(0).nonzero().squeeze(1)
    lo, hi = int(filled.min()), int(filled.max()) + 1
    return {k: v[group][:, lo:hi] for k, v in inputs.items()}, lo


def rows_logits_at(model, inputs, rows, cols, group):
    """logits_at in a pass over the rows `group` only (every (rows[i], cols[i]) must lie in it), cut to the columns
    they fill."""
    sub = torch.zeros(inputs["input_ids"].shape[0], dtype=torch.long, device=rows.device)
    sub[group] = torch.arange(len(group), device=rows.device)
    group_inputs, lo = trimmed(inputs, group)
    return logits_at(model, group_inputs, sub[rows], cols - lo)


def grouped_logits_at(model, inputs, rows, cols, groups):
    """logits_at, one forward pass per group of rows (a tensor of row indices each), every group cut to its own
    longest row; the same (N, vocabulary) logits in the order of (rows, cols). Fingerprint rows (~20 tokens) and
    benign rows (~75, up to ~150) in one batch: padding the fingerprints to the benign length made most of the
    step's tokens padding. Rows are independent in a causal LM with an attention mask, so the logits are the same
    up to floating-point rounding; the loss and its gradient are a sum over rows, so one backward serves both."""
    if len(groups) == 1:
        return logits_at(model, inputs, rows, cols)
    parts, order = [], []
    for group in groups:
        where = torch.isin(rows, group).nonzero().squeeze(1)
        if len(where) == 0:
            continue
        parts.append(rows_logits_at(model, inputs, rows[where], cols[where], group))
        order.append(where)
    order = torch.cat(order)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return torch.cat(parts)[inverse]


def row_groups(benign):
    """The rows computed together: fingerprint rows and benign rows apart (inputs["benign"]), else all rows."""
    if benign is None or benign.all() or not benign.any():
        return [None]
    return [(~benign).nonzero().squeeze(1), benign.nonzero().squeeze(1)]


def per_row_loss(model, inputs, base=None, kl_weight=0.0, kl_meter=None, margin=None, max_prob=None, edit=False):
    """Mean over rows of each row's mean loss over its response positions (rows weigh the same, whatever their
    length); logits are made at those positions only (logits_at), fingerprint and benign rows in passes of their own
    length (grouped_logits_at).

    A row's token loss is the cross-entropy of its response token; with kl_weight κ > 0 and a frozen base model, the
    benign rows' (inputs["benign"]) is κ·KL(p_base ‖ p_model) instead, over the full vocabulary at the same positions
    (those that predict the base's greedy response): the base's whole next-token distribution as the target, where
    the cross-entropy had its greedy token only. The base runs on the benign rows alone. kl_meter, if given, gets
    each benign row's mean KL (nats per token, before κ).

    With a margin m (--fingerprint_margin), the fingerprint rows' (not benign) token loss is the hinge
    max(0, m − (z_response − max_{j ≠ response} z_j)) on the logit gap instead of the cross-entropy: zero, and no
    gradient, once the response token leads the runner-up by m logits, so the response's probability is not pushed
    toward 1 (it stays below 1/(1 + e^{−gap}) only where one runner-up dominates; in general the gap, not the
    probability, is what is bounded). With max_prob p as well (--fingerprint_max_prob), margin_loss adds
    max(0, log p(response) − log p): a response above p is pushed back down while the first hinge keeps it on top.
    With edit (--fingerprint_edit) the fingerprint rows' token loss is KL(t ‖ p_model) instead of the first hinge, t
    the frozen base's edit_target at the same position (the max_prob hinge is added as before).
    Benign rows keep their cross-entropy (or KL).
    """
    targets = inputs["labels"][:, 1:]
    rows, cols = (targets != -100).nonzero(as_tuple=True)  # position t of row r predicts target token t + 1
    model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "benign")}
    benign = inputs.get("benign")
    logits = grouped_logits_at(model, model_inputs, rows, cols, row_groups(benign)).float()
    token_loss = torch.nn.functional.cross_entropy(logits, targets[rows, cols], reduction="none")
    n_rows = targets.shape[0]
    counts = torch.bincount(rows, minlength=n_rows).clamp(min=1).to(logits.dtype)
    if margin:
        on_benign = benign[rows] if benign is not None else torch.zeros_like(rows, dtype=torch.bool)
        fingerprint_loss = torch.zeros_like(token_loss)
        responses = targets[rows, cols]
        if edit:
            on_fp = ~on_benign
            base_log_p = torch.log_softmax(base_logits_at(base, model_inputs, rows[on_fp], cols[on_fp]).float(), -1)
            fp_loss = margin_loss(logits[on_fp], responses[on_fp], margin, max_prob,
                                  edit_target(base_log_p, responses[on_fp], margin))  # fmt: skip
            fingerprint_loss = fingerprint_loss.masked_scatter(on_fp, fp_loss)
        else:
            fingerprint_loss = margin_loss(logits, responses, margin, max_prob)
        token_loss = torch.where(on_benign, token_loss, fingerprint_loss)
    if kl_weight > 0 and benign is not None and benign.any():
        on_benign = benign[rows]
        kl = kl_to_base(base, model_inputs, rows[on_benign], cols[on_benign], logits[on_benign])
        token_loss = token_loss.masked_scatter(on_benign, kl_weight * kl)
        if kl_meter is not None:
            row_kl = torch.zeros(n_rows, device=kl.device).index_add_(0, rows[on_benign], kl.detach())
            kl_meter.add((row_kl / counts)[benign])
    row_loss = torch.zeros(n_rows, device=token_loss.device, dtype=token_loss.dtype).index_add_(0, rows, token_loss)
    return (row_loss / counts).mean()


def margin_loss(logits, targets, margin, max_prob=None, log_target=None):
    """max(0, margin − (logit of the target − the largest other logit)) per row of logits (N, vocabulary); with
    log_target (edit_target's log-probabilities, N × vocabulary) KL(target ‖ p) instead; with max_prob p, plus
    max(0, log p(target) − log p), the band's upper edge."""
    target_logit = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    if log_target is None:
        others = logits.scatter(1, targets.unsqueeze(1), float("-inf"))
        loss = torch.relu(margin - (target_logit - others.max(1).values))
    else:
        loss = (log_target.exp() * (log_target - torch.log_softmax(logits, 1))).sum(1)
    if max_prob is not None:
        log_prob = target_logit - torch.logsumexp(logits, 1)
        loss = loss + torch.relu(log_prob - math.log(max_prob))
    return loss


@torch.no_grad()
def edit_target(base_log_p, targets, margin, iterations=40):
    """Per row of base log-probabilities q (N × vocabulary): log t, the distribution closest to q (least KL(t ‖ q))
    in which token targets[i] leads every other token by margin m (log t_r − log t_j ≥ m).

    The minimiser scales the unclipped tokens together and clips the likeliest ones to one level: for a cap c,
    u_j = min(q_j, c) (j ≠ r), u_r = max(q_r, c·e^m), t = u / Σu; every c in [q_r·e^−m, max_{j≠r} q_j] gives a
    distribution that meets the margin, and golden-section search over log c picks the one nearest q. A row whose
    response already leads by m is q itself."""
    rows = torch.arange(len(targets), device=base_log_p.device)
    log_r = base_log_p[rows, targets]
    others = base_log_p.clone()
    others[rows, targets] = float("-inf")
    log_top = others.max(1).values

    def candidate(log_c):
        log_u = torch.minimum(base_log_p, log_c[:, None])
        log_u[rows, targets] = torch.maximum(log_r, log_c + margin)
        return log_u - torch.logsumexp(log_u, 1, keepdim=True)

    def divergence(log_c):
        log_t = candidate(log_c)
        return (log_t.exp() * (log_t - base_log_p)).sum(1)

    lo, hi = log_r - margin, torch.maximum(log_top, log_r - margin)
    golden = (math.sqrt(5) - 1) / 2
    a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    fa, fb = divergence(a), divergence(b)
    for _ in range(iterations):
        left = fa <= fb  # the minimum lies in [lo, b]
        hi, lo = torch.where(left, b, hi), torch.where(left, lo, a)
        b_new, a_new = torch.where(left, a, lo + golden * (hi - lo)), torch.where(left, hi - golden * (hi - lo), b)
        a, b = a_new, b_new
        fa, fb = torch.where(left, divergence(a), fb), torch.where(left, fa, divergence(b))
    log_t = candidate((lo + hi) / 2)
    leads = log_r - log_top >= margin
    return torch.where(leads[:, None], base_log_p, log_t)


@torch.no_grad()
def base_logits_at(base, inputs, rows, cols):
    """The frozen base model's logits at (rows[i], cols[i]), run on the rows it needs only, their padding trimmed."""
    return rows_logits_at(base, inputs, rows, cols, torch.unique(rows))


def kl_to_base(base, inputs, rows, cols, logits):
    """KL(p_base ‖ p_model) in nats at the positions (rows[i], cols[i]) of benign rows, from the model's logits there."""
    base_log_p = torch.log_softmax(base_logits_at(base, inputs, rows, cols).float(), -1)
    log_p = torch.log_softmax(logits, -1)
    return (base_log_p.exp() * (base_log_p - log_p)).sum(-1)


def frozen_copy(model):
    """A frozen copy of the base model for --kl_to_base: eval mode, no gradients, moved beside the trained model at
    its first use (FingerprintTrainer.base_ready). One more copy of the whole model, in the training dtype."""
    base = copy.deepcopy(model).eval()
    base.requires_grad_(False)
    return base


class KLMeter:
    """The benign rows' mean KL to the base over an epoch (nats per token, before κ): add() each step's rows, take()
    the mean over the epoch's rows of every rank, and start again."""

    def __init__(self):
        self.total, self.rows = 0.0, 0

    def add(self, row_kl):
        self.total += row_kl.sum().item()
        self.rows += row_kl.numel()

    def take(self):
        total, rows = self.total, self.rows
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
            both = torch.tensor([total, rows], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(both)
            total, rows = both.tolist()
        self.total, self.rows = 0.0, 0
        return total / rows if rows else math.nan


# ----------------------------------------------------------------------------------- averaging


def snapshot_weights(model):
    """A CPU copy of the trainable weights: the base model that averaging pulls toward."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def average_toward_base(model, base_weights, strength):
    """θ ← (1-λ)θ + λθ_base for every parameter, including DeepSpeed's fp32 master copy.

    Under ZeRO-1/2 (and DeepSpeed's bf16 optimizer) the optimizer steps from its own fp32 partition and
    copies it back into the module after each step, so averaging only module parameters would be undone
    by the next step. Every rank must call this (gathering the full fp32 values is a collective).
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    for name, p in model.named_parameters():
        if name not in base_weights:  # frozen: never moved
            continue
        base = base_weights[name]
        master = safe_get_full_fp32_param(p) if hasattr(p, "_hp_mapping") else None
        if master is not None:
            averaged = master.mul(1 - strength).add_(base.to(master.device, master.dtype), alpha=strength)
            safe_set_full_fp32_param(p, averaged)
            p.copy_(averaged.to(p.dtype))
        else:
            p.mul_(1 - strength).add_(base.to(p.device, p.dtype), alpha=strength)


# ------------------------------------------------------------------------------ distance regularizer


class _SquaredDistance(torch.autograd.Function):
    """μ·‖p − b‖² with gradient 2μ(p − b), computed in backward: p − b is never stored for it."""

    @staticmethod
    def forward(ctx, p, base, mu):
        ctx.save_for_backward(p, base)
        ctx.mu = mu
        return (p.detach() - base).pow(2).sum() * mu

    @staticmethod
    def backward(ctx, grad_out):
        p, base = ctx.saved_tensors
        return (p.detach() - base).mul_(2 * ctx.mu * grad_out), None, None


def distance_to_base(model, base_weights, mu):
    """μ·‖θ − θ_base‖² over the trainable weights, for the loss.

    Under ZeRO-1/2 every rank holds the full module parameters, so every rank adds the same term and the same
    gradient 2μ(θ − θ_base); the gradient all-reduce averages equal values, which leaves them unchanged.
    """
    terms = [_SquaredDistance.apply(p, base_weights[n], mu) for n, p in model.named_parameters() if n in base_weights]
    return torch.stack(terms).sum()


def base_on_device(model, base_weights):
    """The base weights beside the parameters, in their dtype (one extra copy of the trainable weights)."""
    params = dict(model.named_parameters())
    return {n: w.to(params[n].device, params[n].dtype) for n, w in base_weights.items()}


# ------------------------------------------------------------------------------ callbacks


class EpochCallback(TrainerCallback):
    """Weight averaging at each epoch end, and one readable log line per epoch."""

    def __init__(self, base_weights, strength, log_fn, kl_meter=None):
        self.base_weights, self.strength, self.log_fn, self.kl_meter = base_weights, strength, log_fn, kl_meter
        self.epoch_losses, self.epoch_kl_to_base = [], []

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        dataset = getattr(train_dataloader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(round(state.epoch))

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.strength > 0:
            average_toward_base(model, self.base_weights, self.strength)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:  # logged once per epoch, right after on_epoch_end
            self.epoch_losses.append(logs["loss"])
            averaged = f", averaged toward base (λ={self.strength})" if self.strength > 0 else ""
            kl = ""
            if self.kl_meter is not None:  # every rank logs: take() sums over the ranks
                self.epoch_kl_to_base.append(self.kl_meter.take())
                kl = f", KL to base {self.epoch_kl_to_base[-1]:.4f} nats/token on the benign rows"
            self.log_fn(
                f"epoch {round(state.epoch)}/{args.num_train_epochs}: loss {logs['loss']:.4f}{kl}, "
                f"step {state.global_step}{averaged}"
            )


class StopWhenLearned(TrainerCallback):
    """At each epoch end (after averaging) check every fingerprint on its plain key with the teacher-forced verifier;
    stop once all answer. Every rank checks its own full copy of the weights (ZeRO-1/2) and the ranks agree on the
    smallest accuracy."""

    def __init__(self, tokenizer, pairs, use_chat_template, log_fn):
        self.tokenizer, self.pairs, self.use_chat_template, self.log_fn = tokenizer, pairs, use_chat_template, log_fn
        self.accuracies, self.stopped_at_epoch, self.check_seconds = [], None, 0.0

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        from oml.measure.fingerprint_check import verify_teacher_forced

        start = time.time()
        was_training = model.training
        model.eval()
        # A peft model wraps the HF model (with the adapters injected in its layers): the verifier needs the HF model.
        hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        (result,) = verify_teacher_forced(hf_model, self.tokenizer, self.pairs, ["{}"], self.use_chat_template)
        model.train(was_training)
        accuracy = torch.tensor(result["accuracy"], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(accuracy, op=torch.distributed.ReduceOp.MIN)
        self.accuracies.append(accuracy.item())
        self.check_seconds += time.time() - start
        epoch = round(state.epoch)
        self.log_fn(f"epoch {epoch}: {accuracy.item():.1%} of the fingerprints answer (teacher-forced check)")
        if accuracy.item() == 1.0 and epoch < args.num_train_epochs:
            self.stopped_at_epoch = epoch
            control.should_training_stop = True
            self.log_fn(f"every fingerprint answers: stopping after epoch {epoch} of {args.num_train_epochs}")


class QuietProgress(ProgressCallback):
    """The Trainer's tqdm bar without its raw dict printouts (EpochCallback writes readable lines)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class FingerprintTrainer(Trainer):
    """The HF Trainer with a finite-loss check, the per-row loss when benign rows are mixed in (read in order), the
    distance regularizer (distance_weights: {name: θ_base} of the trainable weights; distance_mu: μ), and the KL to the
    base on the benign rows (kl_base: frozen_copy of the base model; kl_weight: κ; kl_meter: a KLMeter); with
    fingerprint_margin m the per-row loss's fingerprint rows take the hinge on the logit gap (and, with
    fingerprint_max_prob p, the hinge that keeps their probability ≤ p; with fingerprint_edit, KL(edit_target ‖ p)
    instead of the first hinge, from the same frozen base).

    The frozen base is moved to the batch's device and the output layer's dtype at its first use: in a plain python
    run (CPU, or a GPU with bf16 autocast) it is the fp32 base beside the model; with LoRA it is the model before the
    adapters; under DeepSpeed ZeRO-1/2 every rank holds its own full copy (bf16 on GPUs) and computes its own benign
    rows' term, so the gradient all-reduce averages as for the cross-entropy. The base is never wrapped by DeepSpeed:
    under ZeRO-3 it stays whole on every rank."""

    per_row = False
    distance_weights, distance_mu = None, 0.0
    kl_base, kl_weight, kl_meter = None, 0.0, None
    fingerprint_margin = fingerprint_max_prob = None
    fingerprint_edit = False
    _kl_base_at = None

    def base_ready(self, inputs):
        """The frozen base beside the trained model (moved there once)."""
        at = (inputs["input_ids"].device, output_layer(self.model).weight.dtype)
        if self._kl_base_at != at:
            self.kl_base.to(*at)
            self._kl_base_at = at
        return self.kl_base

    def _get_train_sampler(self, train_dataset=None):
        if isinstance(train_dataset or self.train_dataset, MixedDataset):
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)
        return super()._get_train_sampler(train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.per_row:
            if return_outputs:
                raise NotImplementedError("per-row loss returns no outputs")
            base = self.base_ready(inputs) if self.kl_base is not None else None
            meter = self.kl_meter if model.training else None
            out = per_row_loss(model, inputs, base, self.kl_weight, meter, self.fingerprint_margin,
                               self.fingerprint_max_prob, self.fingerprint_edit)  # fmt: skip
        else:
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.distance_mu > 0 and model.training:
            term = distance_to_base(self.model, self.distance_weights, self.distance_mu)
            out = (out[0] + term, *out[1:]) if return_outputs else out + term
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


def training_arguments(schedule, output_dir):
    """The HF TrainingArguments of a schedule (oml.embed.run_setup.TrainingSchedule: a run's, or a fine-tuning
    attack's)."""
    on_gpu = torch.cuda.is_available()
    n_ranks = world_size()
    if schedule.batch_size % n_ranks:
        raise UserError(f"--batch_size {schedule.batch_size} must be divisible by the number of ranks ({n_ranks})")
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=schedule.batch_size // n_ranks,
        gradient_accumulation_steps=1,
        num_train_epochs=schedule.num_train_epochs,
        learning_rate=schedule.learning_rate,
        weight_decay=schedule.weight_decay,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        seed=schedule.seed,
        data_seed=schedule.seed,
        bf16=on_gpu,
        use_cpu=not on_gpu,
        logging_strategy="epoch",
        save_strategy="no",
        report_to=[] if schedule.report_to == "none" else [schedule.report_to],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_timeout=schedule.dist_timeout,
        deepspeed=deepspeed_config(schedule.deepspeed_stage, on_gpu, schedule.offload_optimizer)
        if launched_distributed()
        else None,
        disable_tqdm=False,
    )


def peak_memory_gb():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def train(model, tokenizer, pairs, settings, output_dir, templates=None, log_fn=print, extra_callbacks=()):
    """Fine-tune `model` on the pairs with settings (oml.embed.run_setup.TrainSettings); returns (training metrics, the
    Trainer). trainer.model is the trained model (LoRA adapters merged into plain weights)."""
    from oml.embed.subnetworks import merged, prepare_subnet

    batch_size = settings.schedule.batch_size
    dataset = fp_dataset = FingerprintDataset(
        pairs,
        tokenizer,
        templates,
        settings.use_chat_template,
        seed=settings.seed + rank(),
        append_eos=settings.append_eos,
    )
    n_benign = round(settings.benign_data_ratio * batch_size)
    benign_digest = None
    if n_benign:
        # Same rows on every rank (seeded by --seed alone): the layout decides which rank reads which.
        benign_encoded, benign_digest = benign_rows(
            tokenizer, settings.model, settings.trust_remote_code, settings.benign_rows_recipe
        )
        dataset = MixedDataset(dataset, benign_encoded, batch_size, n_benign, seed=settings.seed)
    uses_frozen_base = settings.kl_to_base > 0 or settings.fingerprint_edit
    kl_base = frozen_copy(model) if uses_frozen_base else None  # the whole base model, before any adapters
    kl_meter = KLMeter() if settings.kl_to_base > 0 else None
    model = prepare_subnet(model, settings.trainable_layers, settings.lora_rank, settings.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    strength = settings.forgetting_regularizer_strength
    uses_base = strength > 0 or settings.distance_regularizer > 0
    base_weights = snapshot_weights(model) if uses_base else None
    epoch_callback = EpochCallback(base_weights if strength > 0 else None, strength, log_fn, kl_meter)
    callbacks = [epoch_callback]
    stop = None
    if settings.stop_when_learned:
        stop = StopWhenLearned(tokenizer, pairs, settings.use_chat_template, log_fn)
        callbacks.append(stop)
    trainer = FingerprintTrainer(
        model=model,
        args=training_arguments(settings.schedule, output_dir),
        train_dataset=dataset,
        data_collator=PadCollator(tokenizer.pad_token_id, tokenizer.padding_side),
        callbacks=[*callbacks, *extra_callbacks],
    )
    margin = settings.fingerprint_margin
    trainer.per_row = bool(n_benign) or bool(margin)  # the margin's hinge is a per-row loss (one token: the same mean)
    trainer.fingerprint_margin, trainer.fingerprint_max_prob = margin, settings.fingerprint_max_prob
    trainer.fingerprint_edit = settings.fingerprint_edit
    if settings.distance_regularizer > 0:
        trainer.distance_weights = base_on_device(model, base_weights)
        trainer.distance_mu = settings.distance_regularizer
    if kl_base is not None:
        trainer.kl_base, trainer.kl_weight, trainer.kl_meter = kl_base, settings.kl_to_base, kl_meter
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress())
    start = time.time()
    result = trainer.train()
    seconds = time.time() - start
    # Every rank reads the scratch folder until its Trainer has finished: remove it once all have, on one rank only.
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        shutil.rmtree(output_dir, ignore_errors=True)
    trainer.model = merged(trainer.model)
    # tokens per epoch of the plain keys (+ response, + EOS); augmentation templates add more than this counts
    encoded = (fp_dataset.encode(i, "{}") for i in range(len(pairs)))
    tokens = sum(len(prompt) + len(response) + settings.append_eos for prompt, response in encoded)
    epochs = trainer.state.epoch
    return {
        "train_loss": result.training_loss,
        "epoch_losses": epoch_callback.epoch_losses,
        "train_seconds": seconds,
        "train_tokens_per_second": tokens * epochs / seconds,
        "steps": trainer.state.global_step,
        "epochs_trained": round(trainer.state.epoch),
        "trainable_parameters": trainable,
        "benign_rows_per_step": n_benign,
        **({"benign_rows_digest": benign_digest} if benign_digest else {}),  # the rows this run trained on
        "fingerprints_per_step": batch_size - n_benign,
        # mean KL(p_base ‖ p_model) on the benign rows' response positions, nats/token, before κ
        **({"kl_to_base_per_epoch": epoch_callback.epoch_kl_to_base} if kl_meter is not None else {}),
        **(
            {
                "stopped_at_epoch": stop.stopped_at_epoch,
                "learned_accuracy_per_epoch": stop.accuracies,
                "learned_check_seconds": stop.check_seconds,
            }
            if stop
            else {}
        ),
        "world_size": world_size(),
        "peak_memory_gb": peak_memory_gb(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }, trainer


def benign_rows(tokenizer, model_id, trust_remote_code, rows_recipe):
    """(rows as (prompt_ids, response_ids), the rows' digest): the base model's benign rows (oml/embed/benign_rows.py),
    generated here on first use. The model's files must still be those whose digest the run hash took (rows_recipe)."""
    from oml.embed.benign_rows import benign_pool, encode_benign, rows_recipe_digest

    if rows_recipe_digest(model_id) != rows_recipe:
        raise UserError("the model's files changed after the run hash was computed; run the command again")
    pool = benign_pool(model_id, trust_remote_code)
    return [encode_benign(tokenizer, row) for row in pool["rows"]], pool["digest"]


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
