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


def quiet_libraries():
    """Keep the libraries' warnings and info chatter out of the way; errors still show."""
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns that it fell back to CPU
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for name in ("transformers", "deepspeed", "DeepSpeed", "accelerate", "datasets", "torch.distributed", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from oml.core.model_registry import quiet_transformers

    quiet_transformers()
