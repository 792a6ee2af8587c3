"""From parsed flags to a run: the explicit step after parsing (prepare_run) that resolves the model and data files,
checks values, digests the files the run hash covers and computes the hash. Parsing itself (oml.core.run_config) has
no side effects; this step reads files and may generate the base model's benign rows once.
"""

import math
from pathlib import Path

from oml.core.data_files import DEFAULT_FINGERPRINT_FILES
from oml.core.errors import UserError
from oml.core.model_registry import resolve_model
from oml.core.run_config import apply_preset, config_hash
from oml.embed.benign_rows import pool_digest_for
from oml.make.fingerprint_files import augmentation_digest, content_digest


def prepare_run(args):
    """The step after parsing that turns flags into a run: preset defaults, the model and data files resolved, values
    checked, content digests (fingerprints, augmentation prompts, the benign rows: generated once per base model, the
    step that can take minutes) and the run hash. Each script's main calls it by name. Returns args."""
    apply_preset(args)
    args.model = resolve_model(args.model_family, args.model_size, args.model_path)
    if args.fingerprints_file_path is None:
        args.fingerprints_file_path = str(DEFAULT_FINGERPRINT_FILES[args.fingerprint_generation_strategy])
    for name in ("max_key_length", "max_response_length", "max_num_fingerprints", "num_train_epochs", "batch_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    if not 0.0 <= args.forgetting_regularizer_strength <= 1.0:
        raise UserError("--forgetting_regularizer_strength must be within [0, 1]")
    if args.learning_rate <= 0:
        raise UserError("--learning_rate must be positive")
    check_capacity_args(args)
    if not Path(args.fingerprints_file_path).is_file():
        raise UserError(
            f"fingerprints file {args.fingerprints_file_path} does not exist; "
            "make one with generate_finetuning_data.py or pass --fingerprints_file_path"
        )
    check_licensee(args)
    args.fingerprints_digest = content_digest(args.fingerprints_file_path)
    args.augmentation_prompts_digest = augmentation_digest() if args.use_prompt_augmentation else None
    args.benign_data_digest = pool_digest_for(args)  # generates the model's benign rows once, if needed
    args.config_hash = config_hash(args)
    return args


def check_licensee(args):
    """--licensee K takes slice K of the master fingerprints file, disjoint from every other licensee's."""
    if args.licensee is None:
        return
    if args.data_split not in (0, args.licensee):
        raise UserError(f"--licensee {args.licensee} is slice {args.licensee} of the file; --data_split "
                        f"{args.data_split} names another: give one of them")  # fmt: skip
    from oml.make.fingerprint_files import read_fingerprints

    size = len(read_fingerprints(args.fingerprints_file_path))
    slices = size // args.max_num_fingerprints
    if not 0 <= args.licensee < slices:
        raise UserError(
            f"--licensee {args.licensee} is beyond {args.fingerprints_file_path}: its {size} fingerprints make "
            f"{slices} slices of {args.max_num_fingerprints} (licensees 0 to {slices - 1})"
        )
    args.data_split = args.licensee


def check_capacity_args(args):
    """The forgetting mitigations' flags (benign rows, distance regularizer, KL to the base, LoRA, trainable layers)."""
    from oml.embed.subnetworks import parse_layer_spec

    if not 0.0 <= args.benign_data_ratio < 1.0:
        raise UserError(f"--benign_data_ratio must be within [0, 1), got {args.benign_data_ratio}")
    if args.benign_data_ratio > 0:
        n_benign = round(args.benign_data_ratio * args.batch_size)
        if not 0 < n_benign < args.batch_size:
            raise UserError(
                f"--benign_data_ratio {args.benign_data_ratio} with --batch_size {args.batch_size} gives "
                f"{n_benign} benign rows per batch; each batch needs at least one benign and one fingerprint row"
            )
    if args.distance_regularizer < 0:
        raise UserError(f"--distance_regularizer must be ≥ 0, got {args.distance_regularizer}")
    if not (math.isfinite(args.kl_to_base) and args.kl_to_base >= 0):
        raise UserError(f"--kl_to_base must be a finite number ≥ 0, got {args.kl_to_base}")
    if args.kl_to_base > 0 and not args.benign_data_ratio > 0:
        raise UserError(
            f"--kl_to_base {args.kl_to_base} acts on the benign rows of each batch, and there are none: "
            "add --benign_data_ratio β > 0 (e.g. 0.25)"
        )
    margin = args.fingerprint_margin
    if margin is not None and not (math.isfinite(margin) and margin > 0):
        raise UserError(f"--fingerprint_margin must be a finite number > 0, got {margin}")
    if args.lora_rank is not None and args.lora_rank <= 0:
        raise UserError(f"--lora_rank must be positive, got {args.lora_rank}")
    if args.trainable_layers is not None:
        args.trainable_layers = parse_layer_spec(args.trainable_layers, args.model, args.trust_remote_code).text
