"""What a deployer does to a fingerprinted model before serving it: fine-tune it, quantize it, merge it. Each attack
makes one attacked model from a run's final_model/, in results/<hash>/attacks/<attack-id>/:

    sft, lora_sft   supervised fine-tuning on benign instruction data (oml.attack.deployer_data), full or LoRA (peft, merged
                    back into the weights), through the suite's Trainer path (oml.embed.trainer: training_arguments,
                    DeepSpeed under a launcher, PadCollator). The plain-key accuracy is measured at a few steps of
                    the same run (RetentionCallback): retention against the number of examples seen.
    quantize        bf16 / fp16: the weights cast, saved and evaluated in that dtype; int8: torch's dynamic int8
                    quantization of every Linear (made again from final_model/ when evaluated: it has no HF folder
                    form); q8_0 / q4_k_m / q4_0: GGUF by llama.cpp's converter and quantizer (oml.attack.gguf_models), checked
                    inside llama.cpp.
    merge           θ = w θ_fingerprinted + (1 - w) θ_other, every parameter, with the base model or another
                    fingerprinted run of the same base (two owners: each one's fingerprints are checked).
    host_confidence, host_input_filter, host_base_detect
                    the adaptive host (oml/attack/adaptive_host.py): the weights stay the run's; a serving-time filter decides what
                    is answered. No model is written; the evaluation is the fingerprint retention under the filtered
                    greedy decoding (plain key and [chat]) and the attacker's cost on real prompts (oml.attack.adaptive_host.evaluate_host).

The folder appears whole (written under a temporary name, then renamed) with the model and attack.json (the
attack's settings and measurements); eval_results.json follows, in the shape eval_for_multigpu.py writes.
"""

import dataclasses
import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from oml.core.errors import UserError
from oml.core.run_store import ATTACK, EVAL_RESULTS, FINAL_MODEL, FINGERPRINTS, GGUF_MODEL, RunIdentity, read_json
from oml.core.stage_settings import settings_from_args
from oml.embed.run_setup import TrainingSchedule

if TYPE_CHECKING:
    from oml.attack.adaptive_host import HostAttackSettings
    from oml.measure.evaluation import EvalSettings

ATTACK_KINDS = ("sft", "lora_sft", "quantize", "merge", "host_confidence", "host_input_filter", "host_base_detect")
HOST_ATTACKS = ATTACK_KINDS[4:]
QUANTIZATIONS = ("bf16", "fp16", "int8", "q8_0", "q4_k_m", "q4_0")
GGUF_QUANTIZATIONS = ("q8_0", "q4_k_m", "q4_0")
DEFAULT_MAX_LENGTH = 512
LORA_ALPHA_PER_RANK = 2
LORA_DROPOUT = 0.05
WARMUP_SHARE = 0.03

ATTACK_ARGS = [
    (["--attack"], dict(default=None, help="sft | lora_sft | quantize | merge | host_confidence | host_input_filter | "
                                           "host_base_detect")),
    (["--attack_data"], dict(default="qa", metavar="qa|FILE.jsonl",
                             help="fine-tuning data: 'qa' (offline TriviaQA, NQ-open, SciQ, Social IQa as chat turns) "
                                  'or JSONL lines {"messages": [...]} / {"prompt": ..., "completion": ...}')),
    (["--attack_examples"], dict(type=int, default=2000, help="fine-tuning examples (the first N of --attack_data)")),
    (["--attack_epochs"], dict(type=int, default=2)),
    (["--attack_lr"], dict(type=float, default=1e-5)),
    (["--attack_batch_size"], dict(type=int, default=8, help="examples per optimizer step, over all ranks")),
    (["--attack_max_length"], dict(type=int, default=DEFAULT_MAX_LENGTH, help="fine-tuning examples are cut here")),
    (["--attack_lora_rank"], dict(type=int, default=16, help="lora_sft: adapter rank (alpha = 2 x rank, all linear layers)")),
    (["--retention_points"], dict(type=int, default=8,
                                  help="fine-tuning: check the plain keys at this many evenly spaced steps")),
    (["--quantization"], dict(default=None, help="quantize: " + " | ".join(QUANTIZATIONS))),
    (["--gguf_templates"], dict(default="all", choices=["all", "plain"],
                                help="GGUF types: check every template in llama.cpp (one generation per key and "
                                     "template, about 0.2-0.5 s each on a CPU core), or only the plain key and [chat]")),
    (["--merge_weight"], dict(type=float, default=0.7, help="merge: weight of the fingerprinted model")),
    (["--merge_with"], dict(default=None, metavar="PATH_OR_HASH",
                            help="merge: a model folder, hub id or run hash (default: the base model)")),
]  # fmt: skip


def add_attack_args(parser):
    from oml.attack.adaptive_host import HOST_ATTACK_ARGS
    from oml.core.run_config import add_arguments

    return add_arguments(parser, ATTACK_ARGS + HOST_ATTACK_ARGS)


# ------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class AttackSettings:
    """One attack on one run: the attack flags (ATTACK_ARGS, HOST_ATTACK_ARGS), the run they attack and the
    evaluation of the attacked copy. Built once from finalized arguments (from_args); never changed."""

    run: RunIdentity  # the attacked run (its folder, hash and result path)
    base_model: str  # the model the run was fingerprinted from
    seed: int
    use_chat_template: bool
    trust_remote_code: bool
    overwrite: bool  # make and evaluate the attack again even where its folder exists
    attack: str  # one of ATTACK_KINDS (check_attack_settings checks it)
    # sft, lora_sft
    attack_data: str  # "qa" or a JSONL file
    attack_examples: int
    attack_max_length: int
    attack_lora_rank: int
    retention_points: int
    training: TrainingSchedule  # the deployer's batch (--attack_batch_size), epochs and learning rate, no weight decay
    # quantize
    quantization: str | None
    gguf_templates: str  # "all" or "plain"
    # merge
    merge_weight: float
    merge_with: str | None
    host: "HostAttackSettings | None"  # host_confidence, host_input_filter, host_base_detect; else None
    evaluation: "EvalSettings"  # the evaluation of the attacked copy

    @classmethod
    def from_args(cls, args):
        from oml.measure.evaluation import EvalSettings

        host = None
        if args.attack in HOST_ATTACKS:
            from oml.attack.adaptive_host import HostAttackSettings

            host = HostAttackSettings.from_args(args)
        training = settings_from_args(
            TrainingSchedule,
            args,
            batch_size=args.attack_batch_size,
            num_train_epochs=args.attack_epochs,
            learning_rate=args.attack_lr,
            weight_decay=0.0,
        )
        return settings_from_args(
            cls,
            args,
            run=RunIdentity.from_args(args),
            base_model=args.model,
            training=training,
            host=host,
            evaluation=EvalSettings.from_args(args),
        )


# ------------------------------------------------------------------------------ checking and naming


def check_attack_settings(settings):
    """Every check that needs no model, before anything is loaded or written. Returns the fine-tuning examples for
    sft/lora_sft (a malformed file is reported with its line number here), else None."""
    attack = settings.attack
    if attack not in ATTACK_KINDS:
        raise UserError(f"unknown --attack {attack!r}; choose from {', '.join(ATTACK_KINDS)}")
    if attack == "quantize":
        if settings.quantization not in QUANTIZATIONS:
            raise UserError(f"--attack quantize needs --quantization, one of {', '.join(QUANTIZATIONS)}")
        if settings.quantization in GGUF_QUANTIZATIONS:
            from oml.attack.gguf_models import converter_script, require_llama_cpp

            require_llama_cpp()
            converter_script()
    if attack in HOST_ATTACKS:
        from oml.attack.adaptive_host import check_host_attack

        check_host_attack(settings.host)
    if attack == "merge":
        if not 0.0 <= settings.merge_weight <= 1.0:
            raise UserError(f"--merge_weight must be within [0, 1], got {settings.merge_weight}")
        merge_partner(settings)
    if attack in ("sft", "lora_sft"):
        training = settings.training
        positive = {
            "attack_examples": settings.attack_examples,
            "attack_epochs": training.num_train_epochs,
            "attack_batch_size": training.batch_size,
            "attack_max_length": settings.attack_max_length,
            "attack_lora_rank": settings.attack_lora_rank,
        }
        for name, value in positive.items():
            if value <= 0:
                raise UserError(f"--{name} must be positive, got {value}")
        if training.learning_rate <= 0:
            raise UserError("--attack_lr must be positive")
        if settings.retention_points < 0:
            raise UserError("--retention_points must not be negative")
        from oml.attack.deployer_data import load_attack_data

        return load_attack_data(settings.attack_data, settings.attack_examples, settings.seed)
    return None


def data_name(spec):
    if spec in (None, "qa"):
        return "qa"
    from oml.make.fingerprint_files import content_digest

    return f"{_safe(Path(spec).stem)[:24]}-{content_digest(spec)[:8]}"


def attack_id(settings, n_examples=None):
    """The attack's folder name: every setting that changes the attacked model, readable."""
    attack, training = settings.attack, settings.training
    if attack in ("sft", "lora_sft"):
        n = n_examples if n_examples is not None else settings.attack_examples
        name = f"{attack}-{data_name(settings.attack_data)}-n{n}-lr{training.learning_rate:g}-ep{training.num_train_epochs}"
        name += f"-bs{training.batch_size}"
        if settings.attack_max_length != DEFAULT_MAX_LENGTH:
            name += f"-len{settings.attack_max_length}"
        if attack == "lora_sft":
            name += f"-r{settings.attack_lora_rank}"
        return name
    if attack == "quantize":
        return f"quantize-{settings.quantization}"
    if attack in HOST_ATTACKS:
        from oml.attack.adaptive_host import host_attack_id

        return host_attack_id(settings.host, model_name)
    return f"merge-{merge_partner_name(settings)}-w{settings.merge_weight:g}"


def _safe(text):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def model_name(model_id):
    """A readable, unique folder-name part for a model folder or hub id."""
    return _safe(model_id.rstrip("/").split("/")[-1])[:40] + "-" + hashlib.sha256(model_id.encode()).hexdigest()[:6]


def merge_partner(settings):
    """(model id or folder, run folder or None) that --merge_with names; the base model when not given."""
    spec = settings.merge_with
    if spec in (None, "", "base"):
        return settings.base_model, None
    candidate = Path(settings.run.result_path) / spec
    if re.fullmatch(r"[0-9a-f]{16}", spec):
        if not (candidate / FINAL_MODEL).is_dir():
            raise UserError(f"--merge_with {spec}: no finished run {candidate} (no {FINAL_MODEL}/)")
        return str(candidate / FINAL_MODEL), candidate
    if Path(spec).exists() and not (Path(spec) / "config.json").is_file():
        raise UserError(f"--merge_with {spec}: not a Hugging Face model folder (no config.json)")
    return spec, None


def merge_partner_name(settings):
    model_id, other_run = merge_partner(settings)
    if other_run is not None:
        return other_run.name
    if model_id == settings.base_model:
        return "base"
    return model_name(model_id)


# ------------------------------------------------------------------------------ fine-tuning


class RetentionCallback:
    """Plain-key fingerprint accuracy (teacher-forced greedy verdicts) at step 0 and at the given steps."""

    def __init__(self, pairs, tokenizer, use_chat_template, steps, examples_at, log_fn, batch_size=32):
        self.pairs, self.tokenizer, self.use_chat_template = pairs, tokenizer, use_chat_template
        self.steps, self.examples_at, self.log_fn, self.batch_size = set(steps), examples_at, log_fn, batch_size
        self.points = []

    def measure(self, model, step, epoch):
        from oml.measure.fingerprint_check import verify_teacher_forced

        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        was_training = inner.training
        inner.eval()
        result = verify_teacher_forced(
            inner, self.tokenizer, self.pairs, ["{}"], self.use_chat_template, batch_size=self.batch_size
        )[0]
        if was_training:
            inner.train()
        point = {
            "step": step,
            "examples_seen": self.examples_at(step),
            "epoch": round(epoch, 4),
            "accuracy": result["accuracy"],
            "fractional_accuracy": result["fractional_accuracy"],
        }
        self.points.append(point)
        self.log_fn(f"step {step} ({point['examples_seen']} examples seen): plain-key accuracy {point['accuracy']:.1%}")


def _trainer_callback(retention):
    """The RetentionCallback as a transformers TrainerCallback (main process only measures)."""
    from transformers import TrainerCallback

    from oml.embed.trainer import is_main_process

    class Callback(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if is_main_process():
                retention.measure(model, 0, 0.0)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if is_main_process() and state.global_step in retention.steps:
                retention.measure(model, state.global_step, state.epoch or 0.0)

    return Callback()


def retention_steps(total_steps, points):
    return sorted({max(1, round(total_steps * k / points)) for k in range(1, points + 1)}) if points else []


def fine_tune(settings, run, examples, log_fn=print):
    """Fine-tune the run's final model on the examples (all ranks call this). Returns (model, tokenizer, record)."""
    import torch
    from transformers.trainer_callback import ProgressCallback

    from oml.attack.deployer_data import encode_example
    from oml.core.model_registry import load_model, load_tokenizer
    from oml.embed.trainer import (
        FingerprintTrainer,
        PadCollator,
        QuietProgress,
        peak_memory_gb,
        training_arguments,
        world_size,
    )
    from oml.make.fingerprint_files import read_fingerprints

    final, training = run / FINAL_MODEL, settings.training
    tokenizer = load_tokenizer(str(final), settings.trust_remote_code)
    model = load_model(str(final), device="cpu", dtype=torch.float32, trust_remote_code=settings.trust_remote_code)
    dataset = [encode_example(tokenizer, e, settings.attack_max_length) for e in examples]
    dataset = [e for e in dataset if any(t != -100 for t in e["labels"])]
    if not dataset:
        raise UserError(f"--attack_max_length {settings.attack_max_length} cuts every example before its answer")
    record = {"examples": len(dataset), "tokens": sum(len(e["input_ids"]) for e in dataset)}
    record["target_tokens"] = sum(sum(t != -100 for t in e["labels"]) for e in dataset)

    lora = None
    if settings.attack == "lora_sft":
        from peft import LoraConfig, get_peft_model

        lora = dict(
            r=settings.attack_lora_rank,
            lora_alpha=LORA_ALPHA_PER_RANK * settings.attack_lora_rank,
            lora_dropout=LORA_DROPOUT,
            target_modules="all-linear",
        )
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
        record["lora"] = lora
        record["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # The suite's training arguments with a deployer's schedule: cosine decay after a short warmup, no weight decay.
    steps_per_epoch = -(-len(dataset) // training.batch_size)
    total_steps = steps_per_epoch * training.num_train_epochs
    output_dir = run / ".attack_trainer"
    targs = training_arguments(training, output_dir)
    targs = dataclasses.replace(
        targs, lr_scheduler_type="cosine", warmup_steps=round(WARMUP_SHARE * total_steps), logging_strategy="no"
    )

    def examples_at(step):
        full, within = divmod(step, steps_per_epoch)
        return full * len(dataset) + min(within * training.batch_size, len(dataset))

    pairs = [{"key": p["key"], "response": p["response"]} for p in read_fingerprints(run / FINGERPRINTS)]
    retention = RetentionCallback(
        pairs,
        tokenizer,
        settings.use_chat_template,
        retention_steps(total_steps, settings.retention_points),
        examples_at,
        log_fn,
    )
    trainer = FingerprintTrainer(
        model=model,
        args=targs,
        train_dataset=dataset,
        data_collator=PadCollator(tokenizer.pad_token_id, tokenizer.padding_side),
        callbacks=[_trainer_callback(retention)],
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress())
    log_fn(
        f"{settings.attack}: {len(dataset)} examples x {training.num_train_epochs} epochs, "
        f"lr {training.learning_rate:g}, batch {training.batch_size} ({total_steps} steps)"
    )
    start = time.time()
    result = trainer.train()
    import shutil

    shutil.rmtree(output_dir, ignore_errors=True)
    model = trainer.model
    if lora:
        model = model.merge_and_unload()  # a deployer publishes plain weights
    record.update(
        train_loss=result.training_loss,
        train_seconds=time.time() - start,
        steps=trainer.state.global_step,
        world_size=world_size(),
        peak_memory_gb=peak_memory_gb(),
        schedule={"lr_scheduler": "cosine", "warmup_steps": targs.warmup_steps, "weight_decay": 0.0},
        retention=retention.points,
    )
    return model.cpu(), tokenizer, record


# ------------------------------------------------------------------------------ quantization and merging

CASTS = {"bf16": "bfloat16", "fp16": "float16"}


def cast_model(run, quantization, trust_remote_code=False):
    import torch

    from oml.core.model_registry import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(
        str(run / FINAL_MODEL), device="cpu", dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    return model.to(getattr(torch, CASTS[quantization])), tokenizer


def int8_dynamic(model):
    """torch's dynamic int8 quantization of every Linear (int8 weights, activations quantized per batch), on CPU."""
    import warnings

    import torch
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        model = quantize_dynamic(model.cpu().float(), {torch.nn.Linear}, dtype=torch.qint8)
    # A tied lm_head is now its own int8 copy of the embedding matrix: tying it again (lm-eval's loader calls
    # tie_weights) would assign a float Parameter to a quantized module, which has no such attribute to replace.
    model.config.tie_word_embeddings = False
    return model


def loader_for(attack):
    """The evaluation's model loader for an attacked model (None: the default, as for any HF folder)."""
    if attack.get("quantization") in CASTS:
        import torch

        from oml.core.model_registry import load_model_and_tokenizer

        dtype = getattr(torch, CASTS[attack["quantization"]])
        return lambda model_id, **kw: load_model_and_tokenizer(model_id, device="cpu", dtype=dtype, **kw)
    if attack.get("quantization") == "int8":
        import torch

        from oml.core.model_registry import load_model_and_tokenizer

        def load(model_id, **kw):
            model, tokenizer = load_model_and_tokenizer(model_id, device="cpu", dtype=torch.float32, **kw)
            return int8_dynamic(model), tokenizer

        return load
    return None


def merge_models(model, other, weight):
    """In place: θ ← w θ + (1 - w) θ_other for every parameter (tied parameters once). Returns model."""
    import torch

    theirs = dict(other.named_parameters())
    mine = dict(model.named_parameters())
    if set(mine) != set(theirs):
        raise UserError("--merge_with: the two models have different parameters (not the same architecture)")
    with torch.no_grad():
        for name, p in mine.items():
            q = theirs[name]
            if p.shape != q.shape:
                raise UserError(f"--merge_with: parameter {name} has shape {tuple(q.shape)}, not {tuple(p.shape)}")
            p.mul_(weight).add_(q.to(p.dtype), alpha=1.0 - weight)
    return model


def merge_attack(settings, run):
    import torch

    from oml.core.model_registry import load_model, load_model_and_tokenizer

    model_id, other_run = merge_partner(settings)
    if other_run is not None:
        other_config = read_json(other_run / "fingerprinting_config.json") or {}
        if other_config.get("hashed", {}).get("model") not in (None, settings.base_model):
            raise UserError(f"--merge_with {other_run.name} was fingerprinted from another base model")
    trust = settings.trust_remote_code
    model, tokenizer = load_model_and_tokenizer(
        str(run / FINAL_MODEL), device="cpu", dtype=torch.float32, trust_remote_code=trust
    )
    other = load_model(model_id, device="cpu", dtype=torch.float32, trust_remote_code=trust)
    merge_models(model, other, settings.merge_weight)
    del other
    record = {"merge_with": "base" if model_id == settings.base_model else model_id, "merge_model": model_id}
    if other_run is not None:
        record["merge_with_run"] = other_run.name
    return model, tokenizer, record


# ------------------------------------------------------------------------------ running an attack


def settings_record(settings, n_examples=None):
    """attack.json's settings of the attack: the run it attacks and every setting of the attack."""
    record = {"attack": settings.attack, "fingerprinted_run": settings.run.config_hash, "seed": settings.seed}
    if settings.attack in ("sft", "lora_sft"):
        training, data = settings.training, data_name(settings.attack_data)
        record.update(
            data=settings.attack_data or "qa",
            data_digest=None if data == "qa" else data.rsplit("-")[-1],
            examples=n_examples if n_examples is not None else settings.attack_examples,
            epochs=training.num_train_epochs,
            learning_rate=training.learning_rate,
            batch_size=training.batch_size,
            max_length=settings.attack_max_length,
        )
        if settings.attack == "lora_sft":
            record["lora_rank"] = settings.attack_lora_rank
    elif settings.attack == "quantize":
        record["quantization"] = settings.quantization
    elif settings.attack in HOST_ATTACKS:
        from oml.attack.adaptive_host import host_settings_record

        record.update(host_settings_record(settings.host, settings.base_model))
    else:
        record["merge_weight"] = settings.merge_weight
    return record


def make_attacked_model(settings, run, examples, name, folder, log_fn=print):
    """The attack's model, into `folder` (a temporary folder the caller renames). Returns attack.json's record;
    None on a DeepSpeed rank other than the first (it only helps training)."""
    from oml.core.run_store import save_model
    from oml.embed.trainer import is_main_process

    record = {"id": name, **settings_record(settings, len(examples) if examples is not None else None)}
    attack, quantization = settings.attack, settings.quantization
    t0 = time.time()
    if attack in ("sft", "lora_sft"):
        model, tokenizer, measured = fine_tune(settings, run, examples, log_fn)
        if not is_main_process():
            return None
        save_model(model, tokenizer, folder / FINAL_MODEL)
        record.update(model=FINAL_MODEL, **measured)
    elif attack in HOST_ATTACKS:
        from oml.attack.adaptive_host import make_host_attack

        record.update(make_host_attack(settings, run, log_fn))
    elif attack == "quantize" and quantization in CASTS:
        model, tokenizer = cast_model(run, quantization, settings.trust_remote_code)
        save_model(model, tokenizer, folder / FINAL_MODEL)
        record.update(model=FINAL_MODEL, runtime="transformers", dtype=CASTS[quantization])
    elif attack == "quantize" and quantization == "int8":
        # No HF folder holds torch's dynamic int8 modules: the evaluation makes them again from final_model/.
        record.update(model=None, made_from=f"../../{FINAL_MODEL}", runtime="torch.ao.quantization.quantize_dynamic")
    elif attack == "quantize":
        import llama_cpp

        from oml.attack.gguf_models import export_gguf

        record.update(model=GGUF_MODEL, runtime=f"llama.cpp (llama-cpp-python {llama_cpp.__version__})")
        record["gguf"] = export_gguf(run / FINAL_MODEL, folder / GGUF_MODEL, quantization, log_fn=log_fn)
    else:
        model, tokenizer, measured = merge_attack(settings, run)
        save_model(model, tokenizer, folder / FINAL_MODEL)
        record.update(model=FINAL_MODEL, **measured)
    record["seconds"] = time.time() - t0
    return record


def evaluate_attack(settings, run, folder, record, log_fn=print):
    """eval_results.json's dict for the attacked model in `folder`."""
    if record.get("attack") in HOST_ATTACKS:
        from oml.attack.adaptive_host import evaluate_host

        results = evaluate_host(settings, run, record, log_fn)
    elif record.get("model") == GGUF_MODEL:
        results = evaluate_gguf(settings, run, folder / GGUF_MODEL)
    else:
        from oml.measure.evaluation import evaluate

        model_dir = folder / FINAL_MODEL if record.get("model") else run / FINAL_MODEL
        evaluation = dataclasses.replace(
            settings.evaluation,
            check_model=str(model_dir),
            fingerprints_file_path=str(run / FINGERPRINTS),
            output_file=str(folder / EVAL_RESULTS),
        )
        results, _ = evaluate(evaluation, load_model=loader_for(record))
        if record.get("merge_with_run"):
            other_run = Path(settings.run.result_path) / record["merge_with_run"]
            results["other_owner"] = other_owner_check(settings.evaluation, model_dir, other_run)
    results["config_hash"] = settings.run.config_hash
    results["attack"] = record["id"]
    return results


def other_owner_check(evaluation, model_dir, other_run):
    """The second owner's fingerprints in a merged model: their accuracy per template, as evaluate reports ours
    (the EvalSettings `evaluation`, with the chat template the other run trained with)."""
    from oml.core.model_registry import load_model_and_tokenizer
    from oml.make.fingerprint_files import read_fingerprints
    from oml.measure.evaluation import check_as_configured, release_memory

    config = read_json(other_run / "fingerprinting_config.json") or {}
    use_chat_template = config.get("args", {}).get("use_chat_template", evaluation.use_chat_template)
    other = dataclasses.replace(evaluation, use_chat_template=use_chat_template)
    pairs = [{"key": p["key"], "response": p["response"]} for p in read_fingerprints(other_run / FINGERPRINTS)]
    model, tokenizer = load_model_and_tokenizer(str(model_dir), trust_remote_code=evaluation.trust_remote_code)
    out = check_as_configured(model, tokenizer, pairs, other.templates(), other)
    del model
    release_memory()
    return {"run": other_run.name, "num_fingerprints": len(pairs), "fingerprint_accuracy": out}


def evaluate_gguf(settings, run, gguf_path):
    """Fingerprint accuracy per template and the chat check, inside llama.cpp. No utility: the local suite scores
    log-likelihoods through transformers, which a GGUF file does not load into without dequantizing."""
    from oml.attack.gguf_models import GgufModel
    from oml.core.model_registry import load_tokenizer
    from oml.make.fingerprint_files import read_fingerprints
    from oml.make.prompt_encoding import chat_prompt
    from oml.measure.chat_sample import chat_answers, chat_check
    from oml.measure.evaluation import usable
    from oml.measure.fingerprint_check import check_fingerprints

    t0 = time.time()
    pairs = [{"key": p["key"], "response": p["response"]} for p in read_fingerprints(run / FINGERPRINTS)]
    tokenizer = load_tokenizer(str(run / FINAL_MODEL), settings.trust_remote_code)
    backend = GgufModel(gguf_path, tokenizer=tokenizer)
    templates = usable(settings.evaluation.templates(), tokenizer)
    if settings.gguf_templates == "plain":
        templates = [t for t in templates if t in ("{}", chat_prompt())]
    fingerprint = check_fingerprints(backend, pairs, templates, settings.use_chat_template)
    seconds = {"fingerprint_accuracy": time.time() - t0}
    answers = chat_answers(backend, tokenizer)
    seconds["total"] = time.time() - t0
    return {
        "fingerprint_accuracy": fingerprint,
        "chat": chat_check(answers),
        "utility": None,
        "runtime": "llama.cpp",
        "model": str(gguf_path),
        "num_fingerprints": len(pairs),
        "seconds": seconds,
    }


def run_attack(settings, examples=None, log_fn=print):
    """Make (unless its folder exists, or with --overwrite) and evaluate (unless evaluated) one attacked model.
    Returns its folder; None on a DeepSpeed rank other than the first."""
    from oml.core.files import atomic_directory, atomic_write_json
    from oml.core.run_store import attack_dir, find_run
    from oml.embed.trainer import is_main_process

    run = find_run(settings.run)
    name = attack_id(settings, len(examples) if examples is not None else None)
    folder = attack_dir(run, name)
    done = (folder / ATTACK).is_file()
    if done and (folder / EVAL_RESULTS).is_file() and not settings.overwrite:
        log_fn(f"{folder} is already attacked and evaluated: skipping (pass --overwrite to redo it)")
        return folder
    if not done or settings.overwrite:
        log_fn(f"attack {name} on run {run.name}")
        if is_main_process():
            with atomic_directory(folder) as tmp:
                record = make_attacked_model(settings, run, examples, name, Path(tmp), log_fn)
                atomic_write_json(Path(tmp) / ATTACK, record)
        else:
            make_attacked_model(settings, run, examples, name, None, log_fn)  # a helping rank: training only
            return None
    if not is_main_process():
        return None
    record = read_json(folder / ATTACK)
    log_fn(f"evaluating {name}")
    results = evaluate_attack(settings, run, folder, record, log_fn)
    atomic_write_json(folder / EVAL_RESULTS, results)
    return folder
