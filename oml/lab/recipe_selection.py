"""The capacity search's choice: which recipe of a search (experiments/capacity.sh) goes on to more fingerprints.

    python -m oml.lab.recipe_selection best --results results/capacity --strategy inverse_nucleus --num_fingerprints 256

A recipe qualifies when its plain-key accuracy reaches --min_accuracy; of those, the one with the best paired utility
delta wins (ties: more chat answers equal to the base's). Prints the winner as launch_multigpu.sh variables, e.g.
`LEARNING_RATES=1e-4 FORGETTING_REGULARIZER_STRENGTHS=0.1 BENIGN_DATA_RATIOS=0.25 DISTANCE_REGULARIZERS=0.0
LORA_RANKS=none EPOCHS=16`, and every candidate on stderr; exit 2 when none qualifies.
"""

import argparse
import sys

from oml.core.data_files import canonical_strategy
from oml.core.errors import UserError, run_cli
from oml.core.recipes import shell_value
from oml.core.run_config import recorded_settings
from oml.core.run_store import find_runs
from oml.measure.evaluation import accuracy_split


def candidates(result_path, strategy, num_fingerprints):
    """(run, plain accuracy, utility delta, chat same-as-base) of every evaluated run of this strategy and size."""
    out = []
    for run in find_runs(result_path):
        hashed = (run["config"] or {}).get("hashed", {})
        if hashed.get("fingerprint_generation_strategy") != strategy or run["eval"] is None:
            continue
        if hashed.get("max_num_fingerprints") != num_fingerprints:
            continue
        plain, _ = accuracy_split(run["eval"])
        utility = run["eval"].get("utility") or {}
        chat = run["eval"].get("chat") or {}
        out.append((run, plain, utility.get("delta"), chat.get("same_as_base")))
    return out


def best(result_path, strategy, num_fingerprints, min_accuracy):
    found = candidates(result_path, canonical_strategy(strategy), num_fingerprints)
    for run, plain, delta, same in found:
        print(f"{run['hash']}: accuracy {plain:.1%}, Δ utility {delta}, chat as base {same}", file=sys.stderr)
    qualified = [c for c in found if c[1] >= min_accuracy and c[2] is not None]
    if not qualified:
        raise UserError(f"no evaluated {strategy} run with {num_fingerprints} fingerprints reaches {min_accuracy:.0%}")
    run = max(qualified, key=lambda c: (c[2], c[3] or 0))[0]
    settings = recorded_settings(run["config"]["hashed"])
    lora = settings["lora_rank"]
    return " ".join(
        [
            f"LEARNING_RATES={shell_value(settings['learning_rate'])}",
            f"FORGETTING_REGULARIZER_STRENGTHS={shell_value(settings['forgetting_regularizer_strength'])}",
            f"BENIGN_DATA_RATIOS={shell_value(float(settings['benign_data_ratio']))}",
            f"DISTANCE_REGULARIZERS={shell_value(float(settings['distance_regularizer']))}",
            f"LORA_RANKS={'none' if lora is None else lora}",
            f"EPOCHS={settings['num_train_epochs']}",
        ]
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("best", help="the best qualifying recipe of a search, as launch_multigpu.sh variables")
    b.add_argument("--results", required=True)
    b.add_argument("--strategy", required=True)
    b.add_argument("--num_fingerprints", type=int, required=True)
    b.add_argument("--min_accuracy", type=float, default=0.95)
    args = parser.parse_args(argv)
    print(best(args.results, args.strategy, args.num_fingerprints, args.min_accuracy))


if __name__ == "__main__":
    run_cli(main)
