"""`oml eval`, the command of eval_for_multigpu.py: evaluate a fingerprinted run (or a suspect model).

DESCRIPTION is its --help text (the script's docstring); make_parser() builds its parser from the training and
evaluation argument specs (oml.core.run_config, oml.measure.evaluation); main(argv=None) runs it.
"""

import argparse

from oml.core.files import atomic_write_json
from oml.core.logs import quiet_libraries
from oml.core.run_config import add_train_args, apply_eval_preset
from oml.embed.run_setup import prepare_run
from oml.measure.evaluation import EvalSettings, add_eval_args, evaluate, format_table

DESCRIPTION = """Evaluate a fingerprinted model: fingerprint accuracy (plain and under system prompts) and utility.

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


def make_parser():
    """The parser of eval_for_multigpu.py and `oml eval`: training arguments (they name the run) and evaluation ones."""
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_eval_args(add_train_args(parser))


def main(argv=None):
    parser = make_parser()
    args = prepare_run(apply_eval_preset(parser.parse_args(argv), parser))
    settings = EvalSettings.from_args(args)  # bad evaluation flags stop here, before anything loads
    quiet_libraries()
    results, output = evaluate(settings)
    atomic_write_json(output, results)
    print(format_table(results))
    print(f"results written to {output}")
