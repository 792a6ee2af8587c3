"""What an evaluation will measure and roughly how long it will take here: the plan eval_for_multigpu.py prints before
it loads anything, and the per-unit rates it learns from the evaluations that finished on this machine.

Each part of an evaluation is linear in a count of units (fingerprint pairs x templates, utility items, questions)
and in the model's size, so its time is estimated as units x seconds per unit per GB of weights x GB. The rates start
from DEFAULT_RATES (measured on the embedded model, one torch thread, a 2-core CPU: `python bench/bench_eval.py`) and
are replaced by this machine's own after every evaluation (`<result_path>/eval_rates.json`, the `seconds` of the
results divided by their units), so the estimate follows the machine it runs on. The base model's parts count only
when its cached result is missing.
"""

import json
from pathlib import Path

from oml.core.files import atomic_write_json

RATES_FILE = "eval_rates.json"
# Seconds per unit per GB of fp32 weights (the embedded model is 0.54 GB), from one evaluation of each part on the
# embedded model, one torch thread, an idle 2-core CPU. Replaced by the machine's own rates after its first evaluation.
DEFAULT_RATES = {
    "fingerprint_accuracy": 0.10,  # per (key, template) pair
    "chat_check": 1.5,  # per chat question (8), greedy generate of 24 tokens
    "utility": 0.55,  # per utility item (lm-eval loglikelihood requests, 2-4 per item)
    "generation": 0.9,  # per TriviaQA question
    "chat_reference": 1.4,  # per question the base answers for chat drift
    "chat_drift": 0.6,  # per question of the teacher-forced drift pass
}
BASE_PARTS = {  # base-model part -> the rate it shares with the model's part
    "base_fingerprint_accuracy": "fingerprint_accuracy",
    "base_chat_check": "chat_check",
    "base_utility": "utility",
    "base_generation": "generation",
    "base_chat_reference": "chat_reference",
}


def weights_gb(model_id):
    """GB of weight files in a local model folder (the embedded model's too); None for a hub id not on disk."""
    from oml.core.model_registry import local_path

    try:
        folder = Path(local_path(model_id))
    except Exception:  # the embedded model not converted yet, or not installed
        return None
    if not folder.is_dir():
        return None
    files = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e9 or None


def read_rates(result_path):
    """This machine's rates (DEFAULT_RATES where it has none), and whether any came from it."""
    path = Path(result_path) / RATES_FILE
    learned = {}
    if path.is_file():
        try:
            learned = {k: float(v) for k, v in json.loads(path.read_text()).items() if k in DEFAULT_RATES}
        except (ValueError, AttributeError, TypeError):
            learned = {}
    return {**DEFAULT_RATES, **learned}, bool(learned)


def learn_rates(result_path, seconds, units, gb):
    """Record seconds per unit per GB for every part that ran with a known unit count (the model's and the base's
    parts both teach their shared rate; the latest measurement wins)."""
    if not gb:
        return
    rates, _ = read_rates(result_path)
    path = Path(result_path) / RATES_FILE
    learned = json.loads(path.read_text()) if path.is_file() else {}
    for part, n in units.items():
        rate_name = BASE_PARTS.get(part, part)
        if n and part in seconds and rate_name in rates and seconds[part] > 0.5:
            learned[rate_name] = round(seconds[part] / (n * gb), 5)
    if learned:
        atomic_write_json(path, learned)


def estimate(parts, rates, gb):
    """{part: seconds} for parts {part: units}; gb None (a hub model) is read as the embedded model's size."""
    gb = gb or 0.54
    return {part: n * rates[BASE_PARTS.get(part, part)] * gb for part, n in parts.items()}


def format_duration(seconds):
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


LABELS = {
    "fingerprint_accuracy": "fingerprint check",
    "chat_check": "chat check",
    "utility": "utility",
    "generation": "generative benchmark",
    "chat_reference": "chat reference (base answers)",
    "chat_drift": "chat drift",
    "base_fingerprint_accuracy": "base model: false positives",
    "base_chat_check": "base model: chat check",
    "base_utility": "base model: utility",
    "base_generation": "base model: generative benchmark",
    "base_chat_reference": "base model: chat reference",
}


def format_plan(title, parts, details, cached, seconds, from_machine, hint=None):
    """The lines printed before an evaluation: each part with its units and estimated time, cached base parts, the
    total, and where the rates came from."""
    lines = [title]
    for part in parts:
        lines.append(f"  {LABELS[part]:<34} {details.get(part, ''):<40} ~{format_duration(seconds[part])}")
    for part in cached:
        lines.append(f"  {LABELS[part]:<34} {'cached':<40}  0 s")
    source = "this machine's last evaluations" if from_machine else "rates measured on a 2-core CPU"
    lines.append(f"  about {format_duration(sum(seconds.values()))} in all (estimate from {source})")
    if hint:
        lines.append(f"  {hint}")
    return "\n".join(lines)
