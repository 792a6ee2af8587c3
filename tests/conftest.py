import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
# Evaluation flags for tests that are not about the generation measures (they cost a base-model pass each); the
# default --measure quick leaves them off too, these keep a test's intent explicit.
NO_GENERATION = ("--generation_benchmark", "none", "--chat_drift_limit", "none")
PEER_DATA = REPO.parent / "shared" / "peer_data"


def run_script(script, *args, cwd=REPO, launcher=None, timeout=900):
    """Run one of the top-level scripts the way a user does; returns the CompletedProcess."""
    cmd = (launcher or [sys.executable]) + [str(REPO / script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def embedded_tokenizer():
    from oml.core.model_registry import EMBEDDED, load_tokenizer

    return load_tokenizer(EMBEDDED)


def tiny_llama(tokenizer, seed=0, **overrides):
    """A tiny randomly initialised Llama over the given tokenizer's vocabulary (no download), in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**config, **overrides})).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_tokenizer):
    """A tiny random Llama with the embedded tokenizer, saved as a local HF folder (a --model_path)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(embedded_tokenizer).save_pretrained(path)
    embedded_tokenizer.save_pretrained(path)
    return path


def write_random_fingerprints(path, n, key_words=8, response_words=4, seed=0):
    from oml.make.fingerprint_files import random_words

    rng = random.Random(seed)
    fps = [
        {"key": " ".join(random_words(rng, key_words)), "response": " " + " ".join(random_words(rng, response_words))}
        for _ in range(n)
    ]
    Path(path).write_text(json.dumps(fps))
    return fps


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: batch-of-one generate calls gain little from threads, and on a CPU shared
    with other jobs the threads spin waiting for each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
