"""Evaluate a fingerprinted model: fingerprint accuracy (plain and under system prompts) and utility.

Give it the same arguments as finetune_multigpu.py: it recomputes the run hash and loads
results/<hash>/final_model. Prints what it will measure and about how long that takes here, then
writes results/<hash>/eval_results.json and prints a table.

Examples:
    python eval_for_multigpu.py                                   # the run a bare finetune_multigpu.py made (~1 min)
    python eval_for_multigpu.py --use_prompt_augmentation --num_train_epochs 12
    python eval_for_multigpu.py --utility_benchmark none          # fingerprints only, seconds
    python eval_for_multigpu.py --measure full                    # + TriviaQA, chat drift, match probabilities
    python eval_for_multigpu.py --utility_benchmark tinyBenchmarks   # the original's benchmark (needs the hub)
    # is a suspect model ours? check it against the fingerprints a run trained
    python eval_for_multigpu.py --check_model path/or/hub-id --fingerprints_file_path results/<hash>/fingerprints.json
"""

# `oml eval` runs the same command: oml/commands/eval.py holds its parser and main, and this docstring as DESCRIPTION
# (its --help text; tests/test_cli.py checks the two are the same).
from oml.commands.eval import main
from oml.core.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
