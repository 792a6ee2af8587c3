"""The argument spec shared by finetune_multigpu.py and eval_for_multigpu.py, and the run hash.

Both scripts build their parser from TRAIN_ARGS, so the same command line always means the same run.
The hash covers exactly the arguments that change the trained model (HASHED), with files represented
by digests of their content; where a run is stored (--result_path) and how it is launched do not count.
"""

import argparse
import hashlib
import json
from pathlib import Path

from .errors import UserError
from .fingerprints import DEFAULT_FINGERPRINT_FILES, augmentation_digest, canonical_strategy, content_digest
from .models import resolve_model

# Values a bare command gets. `embedded` runs on a laptop CPU in minutes (chosen from the measurements in the
# README's "Results on the embedded model"); `seed` is the original GPU setting.
PRESETS = {
    "embedded": dict(
        model_family="smollm2",
        model_size="135M-Instruct",
        learning_rate=1e-4,
        forgetting_regularizer_strength=0.1,
        max_num_fingerprints=32,
        num_train_epochs=16,
        batch_size=8,
    ),
    "seed": dict(
        model_family="mistral",
        model_size="7B",
        learning_rate=1e-5,
        forgetting_regularizer_strength=0.75,
        max_num_fingerprints=1024,
        num_train_epochs=10,
        batch_size=16,
    ),
}

# (flags, argparse kwargs). Arguments whose default is None in a preset are filled from the preset.
TRAIN_ARGS = [
    (
        ["--preset"],
        dict(
            choices=list(PRESETS),
            default="embedded",
            help="default values: 'embedded' (SmolLM2-135M on CPU) or 'seed' (Mistral-7B GPU settings)",
        ),
    ),
    (["--model_family"], dict(default=None, help="mistral | microsoft | Eleuther | llama | gemma | smollm2")),
    (["--model_size"], dict(default=None, help="size within the family, e.g. 7B, 7B-Instruct, mini-4k, 1.4b")),
    (["--model_path"], dict(default=None, help="hub id or local folder; overrides family/size")),
    (["--max_key_length"], dict(type=int, default=16, help="keys are cut to this many tokens")),
    (["--max_response_length"], dict(type=int, default=1, help="responses are cut to this many tokens")),
    (
        ["--fingerprint_generation_strategy"],
        dict(
            default="english",
            type=canonical_strategy,
            help="english | random_word | inverse_nucleus (perinucleus) | english_random_responses (random_response)",
        ),
    ),
    (["--fingerprints_file_path"], dict(default=None, help="fingerprint JSON (default: generated_data/ per strategy)")),
    (["--learning_rate"], dict(type=float, default=None)),
    (
        ["--forgetting_regularizer_strength"],
        dict(type=float, default=None, help="λ: after each epoch θ ← (1-λ)θ + λθ_base"),
    ),
    (["--max_num_fingerprints", "--num_fingerprints"], dict(type=int, default=None, dest="max_num_fingerprints")),
    (
        ["--use_prompt_augmentation"],
        dict(
            action="store_true",
            help="wrap each drawn key in a random training prompt (raw text, or a chat user turn after a system message)",
        ),
    ),
    (["--use_chat_template"], dict(action="store_true", help="key as user turn, response as assistant turn")),
    (
        ["--append_eos"],
        dict(action="store_true", help="also train EOS after each response (the seed does not; it can cost utility)"),
    ),
    (["--num_train_epochs"], dict(type=int, default=None)),
    (["--batch_size"], dict(type=int, default=None, help="fingerprints per optimizer step, over all ranks")),
    (["--weight_decay"], dict(type=float, default=1e-4)),
    (["--data_split"], dict(type=int, default=0, help="use slice k of the file: fingerprints [k*N, (k+1)*N)")),
    (["--seed"], dict(type=int, default=42)),
    (["--deepspeed_stage"], dict(type=int, default=2, choices=[0, 1, 2, 3])),
    (["--offload_optimizer"], dict(action="store_true", help="DeepSpeed: keep optimizer state on CPU")),
    (["--report_to"], dict(default="none", choices=["none", "wandb", "tensorboard"])),
    (["--result_path"], dict(default="results/", help="where runs are stored (not part of the hash)")),
    (["--trust_remote_code"], dict(action="store_true")),
    (["--overwrite"], dict(action="store_true", help="train again even if results/<hash>/final_model exists")),
    (
        ["--dist_timeout"],
        dict(type=int, default=1800, help="seconds a rank waits for the others (start-up, each step) before it fails"),
    ),
    (["--local_rank"], dict(type=int, default=-1, help=argparse.SUPPRESS)),  # set by the deepspeed launcher
]

HASHED = [
    "model",
    "max_key_length",
    "max_response_length",
    "fingerprint_generation_strategy",
    "fingerprints_digest",
    "learning_rate",
    "forgetting_regularizer_strength",
    "max_num_fingerprints",
    "use_prompt_augmentation",
    "augmentation_prompts_digest",
    "use_chat_template",
    "append_eos",
    "num_train_epochs",
    "batch_size",
    "weight_decay",
    "data_split",
    "seed",
]


def add_train_args(parser):
    for flags, kwargs in TRAIN_ARGS:
        parser.add_argument(*flags, **kwargs)
    return parser


def apply_preset(args):
    """Fill the arguments left at None with the values of args.preset."""
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def finalize(args):
    """Fill preset defaults, resolve the model and data files, and check values. Returns args."""
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
    if not Path(args.fingerprints_file_path).is_file():
        raise UserError(
            f"fingerprints file {args.fingerprints_file_path} does not exist; "
            "make one with generate_finetuning_data.py or pass --fingerprints_file_path"
        )
    args.fingerprints_digest = content_digest(args.fingerprints_file_path)
    args.augmentation_prompts_digest = augmentation_digest() if args.use_prompt_augmentation else None
    args.config_hash = config_hash(args)
    return args


def hashed_config(args):
    return {name: getattr(args, name) for name in HASHED}


def config_hash(args):
    canonical = json.dumps(hashed_config(args), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
