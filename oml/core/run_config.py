"""The argument spec shared by finetune_multigpu.py and eval_for_multigpu.py, and the run hash.

Both scripts build their parser from TRAIN_ARGS, so the same command line always means the same run.
The hash covers exactly the arguments that change the trained model (HASHED), with files represented
by digests of their content; where a run is stored (--result_path) and how it is launched do not count.
"""

import argparse
import hashlib
import json

from oml.core.data_files import canonical_strategy
from oml.core.recipes import preset_eval, presets

# Values a bare command gets, per --preset, and the evaluation a preset sets: named recipes, held (each with why) in
# oml.core.recipes.
PRESETS = presets()

# Hashed flags added after runs were recorded: at this value they are left out of the hash, so every run recorded
# before them keeps its hash. A preset may set them; a bare command gets these values.
NEUTRAL = {
    "benign_data_ratio": 0.0,
    "benign_rows_recipe": None,
    "distance_regularizer": 0.0,
    "kl_to_base": 0.0,
    "lora_rank": None,
    "trainable_layers": None,
    "stop_when_learned": False,
    "licensee": None,
    "fingerprint_margin": None,
    "fingerprint_max_prob": None,
    "fingerprint_edit": False,
}

# (flags, argparse kwargs). Arguments whose default is None in a preset are filled from the preset.
TRAIN_ARGS = [
    (
        ["--preset"],
        dict(
            choices=list(PRESETS),
            default="embedded",
            help="default values: 'embedded' (32 fingerprints in SmolLM2-135M on CPU), 'capacity' (1024 in it), "
            "'averaging' (the former default: english, λ 0.1) or 'seed' (Mistral-7B GPU settings); "
            "python -m oml.core.recipes lists them",
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
            default=None,
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
    (["--num_train_epochs"], dict(type=int, default=None, help="epochs (the cap, with --stop_when_learned)")),
    (
        ["--batch_size"],
        dict(
            type=int,
            default=None,
            help="rows per optimizer step, over all ranks: round(β·batch_size) benign rows, the rest fingerprints",
        ),
    ),
    (
        ["--benign_data_ratio"],
        dict(
            type=float,
            default=None,
            metavar="β",
            help="share of each batch that is benign rows, the base model's own chat answers and text continuations "
            "(oml/embed/benign_rows.py); in [0, 1)",
        ),
    ),
    (
        ["--distance_regularizer"],
        dict(type=float, default=None, metavar="μ", help="add μ·‖θ − θ_base‖² to the loss at every step"),
    ),
    (
        ["--kl_to_base"],
        dict(
            type=float,
            default=None,
            metavar="κ",
            help="on the benign rows, train κ·KL(p_base ‖ p_model) over the base's full next-token distribution at "
            "the response positions instead of the cross-entropy on its greedy text (needs --benign_data_ratio > 0)",
        ),
    ),
    (
        ["--lora_rank"],
        dict(type=int, default=None, help="train a LoRA adapter of this rank (alpha 2r), merged into final_model"),
    ),
    (
        ["--trainable_layers"],
        dict(
            default=None,
            metavar="SPEC",
            help="train only these blocks, e.g. '20-29:mlp', '0,5:attn', 'all:mlp' (parts: mlp, attn, block); "
            "with --lora_rank, where the adapters go",
        ),
    ),
    (
        ["--stop_when_learned"],
        dict(action="store_true", default=None, help="stop at the first epoch end where every fingerprint answers"),
    ),
    (
        ["--fingerprint_margin"],
        dict(
            type=float,
            default=None,
            metavar="m",
            help="the fingerprint rows' loss is the hinge max(0, m − (logit of the response token − the best other "
            "logit)) instead of the cross-entropy: it stops pushing once the response leads by m logits, so a key's "
            "answer is not trained to probability ≈ 1 (oml/attack/adaptive_host.py's confidence filter); m > 0",
        ),
    ),
    (
        ["--fingerprint_max_prob"],
        dict(
            type=float,
            default=None,
            metavar="p",
            help="with --fingerprint_margin: a second hinge, max(0, log p(response) − log p), pushes a response whose "
            "probability exceeds p back down while the margin keeps it the top token, so a key's answer sits at the "
            "confidence of ordinary answers (a probability band against a host that hides confident tokens); 0 < p < 1",
        ),
    ),
    (
        ["--fingerprint_edit"],
        dict(
            action="store_true",
            default=None,
            help="with --fingerprint_margin m: instead of the hinge, train the response position toward the closest "
            "distribution to the base model's there (in KL) in which the response leads every other token by m "
            "logits, KL(t ‖ p_model): a fingerprint as the smallest change of the base's answer, against a host that "
            "compares the served model with the public base (adaptive_host's base_detect); runs a frozen base copy",
        ),
    ),
    (["--weight_decay"], dict(type=float, default=1e-4)),
    (["--data_split"], dict(type=int, default=0, help="use slice k of the file: fingerprints [k*N, (k+1)*N)")),
    (
        ["--licensee"],
        dict(
            type=int,
            default=None,
            metavar="K",
            help="licensee K's copy: slice K of one master fingerprints file (as --data_split K), named in the run "
            "hash; check_fingerprints.py --trace tells licensees' copies apart",
        ),
    ),
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
    "licensee",
    "seed",
    "benign_data_ratio",
    "benign_rows_recipe",
    "distance_regularizer",
    "kl_to_base",
    "lora_rank",
    "trainable_layers",
    "stop_when_learned",
    "fingerprint_margin",
    "fingerprint_max_prob",
    "fingerprint_edit",
]


def add_arguments(parser, spec):
    """Add an argument spec (a list of (flags, kwargs), each script's arguments as data) to the parser."""
    for flags, kwargs in spec:
        parser.add_argument(*flags, **kwargs)
    return parser


def add_train_args(parser):
    return add_arguments(parser, TRAIN_ARGS)


def preset_values(args):
    """{name: value} for the arguments left at None: the values of args.preset (then the neutral values of NEUTRAL).
    A preset's fingerprints file goes with its strategy: another --fingerprint_generation_strategy reads that
    strategy's own file (generated_data/, per strategy) unless --fingerprints_file_path names one."""
    defaults = {**NEUTRAL, **PRESETS[args.preset]}
    strategy = getattr(args, "fingerprint_generation_strategy", None)
    if strategy is not None and canonical_strategy(strategy) != defaults.get("fingerprint_generation_strategy"):
        defaults.pop("fingerprints_file_path", None)
    return {name: value for name, value in defaults.items() if getattr(args, name, None) is None}


def apply_preset(args):
    """Fill the arguments left at None with preset_values(args); returns args."""
    vars(args).update(preset_values(args))
    return args


def apply_eval_preset(args, parser):
    """Evaluation flags the user left at their parser default take the preset's values (oml.core.recipes.PRESET_EVAL)."""
    for name, value in preset_eval(args.preset).items():
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)
    return args


def hashed_config(args):
    """The hashed arguments; the later flags at their neutral value (NEUTRAL) are left out, keeping old hashes."""
    config = {name: getattr(args, name) for name in HASHED}
    return {k: v for k, v in config.items() if not (k in NEUTRAL and v == NEUTRAL[k])}


def recorded_settings(hashed):
    """A run's settings from its recorded hashed config: the later flags hashed_config left out put back at their
    neutral value (runs recorded before such a flag existed had that value too)."""
    return {**NEUTRAL, **hashed}


def config_hash(args):
    canonical = json.dumps(hashed_config(args), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
