"""Evaluate a fingerprinted model: fingerprint accuracy (plain and under system prompts) and utility.

Give it the same arguments as finetune_multigpu.py: it recomputes the run hash and loads
results/<hash>/final_model. Writes results/<hash>/eval_results.json and prints a table.

Examples:
    python eval_for_multigpu.py                                   # the run a bare finetune_multigpu.py made
    python eval_for_multigpu.py --use_prompt_augmentation --num_train_epochs 12
    python eval_for_multigpu.py --utility_benchmark none          # fingerprints only, seconds
    python eval_for_multigpu.py --utility_benchmark tinyBenchmarks   # the original's benchmark (needs the hub)
    # is a suspect model ours? check it against the fingerprints a run trained
    python eval_for_multigpu.py --check_model path/or/hub-id --fingerprints_file_path results/<hash>/fingerprints.json
"""

import argparse

from oml.args import add_train_args, apply_eval_preset, finalize
from oml.errors import run_cli
from oml.evaluate import add_eval_args, evaluate, format_table
from oml.io import atomic_write_json
from oml.logs import quiet_libraries


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(add_train_args(parser))
    args = finalize(apply_eval_preset(parser.parse_args(), parser))
    quiet_libraries()
    results, output = evaluate(args)
    atomic_write_json(output, results)
    print(format_table(results))
    print(f"results written to {output}")


if __name__ == "__main__":
    run_cli(main)
