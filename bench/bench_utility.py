"""Wall time and scores of the local utility suite on the embedded model, one task at a time.

HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python bench/bench_utility.py              # 100 items per task, CPU
python bench/bench_utility.py --limit 20 --tasks arc_easy piqa --device cpu
python bench/bench_utility.py --limit all --tasks arc_challenge arc_easy winogrande piqa   # the resolving setting
"""

import argparse
import os
import time

from oml.core.errors import run_cli
from oml.core.model_registry import EMBEDDED, load_model_and_tokenizer
from oml.measure.likelihood_benchmarks import LOCAL_TASKS, check_utility_limit, evaluate_utility, local_suite_name


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=check_utility_limit, default=100, help="items per task, or all")
    parser.add_argument("--num_fewshot", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--tasks", nargs="+", default=list(LOCAL_TASKS), choices=list(LOCAL_TASKS))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    start = time.time()
    model, tokenizer = load_model_and_tokenizer(EMBEDDED, device=args.device)
    print(f"loaded {EMBEDDED} on {args.device} ({next(model.parameters()).dtype}) in {time.time() - start:.1f} s")
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")

    rows = []
    for task in args.tasks:
        r = evaluate_utility(
            model, tokenizer, limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size, tasks=[task]
        )
        rows.append((task, r["tasks"][task], r["seconds"]))

    print(f"\n{local_suite_name(args.tasks)}, {args.num_fewshot}-shot, batch size {args.batch_size}")
    print(f"{'task':<15}{'metric':<10}{'n':>5}{'score':>8}{'stderr':>8}{'seconds':>9}")
    for task, row, seconds in rows:
        print(f"{task:<15}{row['metric']:<10}{row['n']:>5}{row['score']:>8.3f}{row['stderr']:>8.3f}{seconds:>9.1f}")
    mean = sum(row["score"] for _, row, _ in rows) / len(rows)
    total = sum(seconds for *_, seconds in rows)
    print(f"{'mean / total':<15}{'':<10}{'':>5}{mean:>8.3f}{'':>8}{total:>9.1f}")


if __name__ == "__main__":
    run_cli(main)
