"""What each part of the evaluation costs on the embedded model, and how it scales with its item count.

Times, on one loaded model: the fingerprint check with and without the match probability (32 fingerprints x the
11 templates), the generative benchmark, the base's chat reference (greedy answers + top-k log-probs) and the chat
drift pass, each at two item counts, so the cost per item (the slope) and the fixed cost can be read off; and,
with --utility, the local suite per task at one item count (bench/bench_utility.py has more). --full then times
one whole evaluation with the defaults (eval_for_multigpu.py --check_model, the base cache cold).
Each row gives wall seconds and the process's CPU seconds: on a machine other jobs load, the CPU seconds divided by
the thread count approximate the idle wall time.

HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python bench/bench_eval.py                    # parts, CPU
python bench/bench_eval.py --counts 25 100 --utility --full
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from oml.core.errors import run_cli
from oml.core.model_registry import EMBEDDED, load_model_and_tokenizer

REPO = Path(__file__).resolve().parents[1]


CPU_SECONDS = []  # per timed call: CPU seconds of this process (all threads), a load-independent companion


def timed(fn):
    start, cpu = time.time(), time.process_time()
    out = fn()
    CPU_SECONDS.append(time.process_time() - cpu)
    return time.time() - start, out


def slope(rows):
    """(seconds per item, fixed seconds) from two (count, seconds) points."""
    (n1, s1), (n2, s2) = rows[0], rows[-1]
    per_item = (s2 - s1) / (n2 - n1) if n2 != n1 else s2 / n2
    return per_item, s1 - per_item * n1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs=2, default=[25, 100], help="two item counts per part")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--utility", action="store_true", help="also time the utility suite per task")
    parser.add_argument("--utility_limit", type=int, default=100)
    parser.add_argument("--full", action="store_true", help="also time one whole default evaluation")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from oml.core.data_files import TEST_PROMPTS_FILE
    from oml.make.fingerprint_files import read_fingerprints, read_templates
    from oml.measure.fingerprint_check import verify_teacher_forced
    from oml.measure.generation_measures import chat_drift, chat_reference, evaluate_generation
    from oml.measure.likelihood_benchmarks import LOCAL_TASKS, evaluate_utility

    model, tokenizer = load_model_and_tokenizer(EMBEDDED, device=args.device)
    print(f"{EMBEDDED} on {args.device}, torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}")
    rows, cpu = [], []
    print(f"\n{'part':<52}{'items':>7}{'wall s':>9}{'CPU s':>9}", flush=True)

    def show(name, n, seconds, c):
        wall = "" if seconds is None else f"{seconds:.1f}"
        print(f"{name:<52}{'' if n is None else n:>7}{wall:>9}{'' if c is None else f'{c:.1f}':>9}", flush=True)

    pairs = read_fingerprints(REPO / "generated_data" / "fingerprints-english.json")[:32]
    pairs = [{"key": p["key"], "response": p["response"].split()[0]} for p in pairs]
    templates = ["{}"] + read_templates(TEST_PROMPTS_FILE)
    for temps in [(), (0.7, 1.0)]:
        seconds, _ = timed(lambda t=temps: verify_teacher_forced(model, tokenizer, pairs, templates, temperatures=t))
        rows.append((f"fingerprint check, temperatures {temps or 'none'}", len(pairs) * len(templates), seconds))
        cpu.append(CPU_SECONDS[-1])
        show(*rows[-1], cpu[-1])

    parts = {
        "generative benchmark (trivia_qa)": lambda n: evaluate_generation(
            model, tokenizer, batch_size=args.batch_size, limit=n
        ),
        "base chat reference (greedy answers)": lambda n: chat_reference(
            model, tokenizer, batch_size=args.batch_size, limit=n
        ),
    }
    references = {}
    for name, run in parts.items():
        points = []
        for n in args.counts:
            seconds, out = timed(lambda r=run, n=n: r(n))
            references[n] = out if "reference" in name else references.get(n)
            points.append((n, seconds))
            rows.append((name, n, seconds))
            cpu.append(CPU_SECONDS[-1])
            show(*rows[-1], cpu[-1])
        per_item, fixed = slope(points)
        rows.append((f"  -> {per_item:.2f} s per item + {fixed:.1f} s (wall)", None, None))
        cpu.append(None)
        show(*rows[-1], cpu[-1])
    points = []
    for n in args.counts:
        seconds, _ = timed(lambda n=n: chat_drift(model, references[n], batch_size=args.batch_size))
        points.append((n, seconds))
        rows.append(("chat drift pass (teacher-forced)", n, seconds))
        cpu.append(CPU_SECONDS[-1])
        show(*rows[-1], cpu[-1])
    per_item, fixed = slope(points)
    rows.append((f"  -> {per_item:.3f} s per item + {fixed:.1f} s (wall)", None, None))
    cpu.append(None)
    show(*rows[-1], cpu[-1])

    if args.utility:
        for task in LOCAL_TASKS:
            seconds, _ = timed(
                lambda t=task: evaluate_utility(
                    model, tokenizer, limit=args.utility_limit, tasks=[t], batch_size=args.batch_size
                )
            )
            rows.append((f"utility {task}", args.utility_limit, seconds))
            cpu.append(CPU_SECONDS[-1])
            show(*rows[-1], cpu[-1])

    print(f"load average at the end: {os.getloadavg()[0]:.1f}")

    if args.full:
        del model
        with tempfile.TemporaryDirectory() as tmp:
            fp = REPO / "generated_data" / "fingerprints-english.json"
            cmd = [sys.executable, str(REPO / "eval_for_multigpu.py"), "--check_model", EMBEDDED,
                   "--fingerprints_file_path", str(fp), "--max_num_fingerprints", "32", "--result_path", tmp,
                   "--output_file", f"{tmp}/out.json"]  # fmt: skip
            for label in ("cold base cache", "warm base cache"):
                seconds, done = timed(lambda c=cmd: subprocess.run(c, capture_output=True, text=True))
                if done.returncode:
                    print(done.stderr[-2000:])
                    raise SystemExit(done.returncode)
                parts = json.loads(Path(f"{tmp}/out.json").read_text())["seconds"]
                print(f"\nwhole default evaluation, {label}: {seconds:.0f} s; parts: "
                      + ", ".join(f"{k} {v:.0f}" for k, v in parts.items()))  # fmt: skip


if __name__ == "__main__":
    run_cli(main)
