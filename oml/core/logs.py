"""Readable logs: one line per event, to stdout and a run's log file (main process only); noisy libraries hushed."""

import logging
import os
import time
import warnings


class RunLog:
    """Log lines with the time. RunLog(path) prints each line and appends it to path; RunLog(None) is the log of a
    process that is not the main one (another DeepSpeed rank): it writes nothing anywhere."""

    def __init__(self, path=None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, message):
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        if self.path is None:
            return  # not the main process: stay silent
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


# Warnings known to be noise in this suite's runs, each ignored by (category, message regex) and no other: a warning not
# listed here still shows. (Measured by running train, eval --measure full and the merge, GGUF, int8 and SFT attacks
# on a tiny model with every warning shown; torch's int8 deprecation notices are hushed where int8_dynamic calls it.)
KNOWN_NOISE = [
    # transformers (modeling_utils) when peft wraps the model for --lora_rank: peft still asks the old property name
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
]


def quiet_libraries():
    """Keep the libraries' known-noise warnings (KNOWN_NOISE) and info chatter out of the way; errors and any other
    warning still show. Also the environment the libraries read: no tokenizer threads after forking, DeepSpeed's CPU
    accelerator without a GPU."""
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns that it fell back to CPU
    for category, message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in ("transformers", "deepspeed", "DeepSpeed", "accelerate", "datasets", "torch.distributed", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from oml.core.model_registry import quiet_transformers

    quiet_transformers()
