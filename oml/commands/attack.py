"""`oml attack`, the command of attack_fingerprints.py: attack a fingerprinted run and check what survives.

DESCRIPTION is its --help text (the script's docstring); make_parser() builds its parser from the training,
evaluation and attack argument specs (oml.core.run_config, oml.measure.evaluation, oml.attack.attack_runner); main(argv=None) runs it.
"""

import argparse

from oml.attack.attack_runner import AttackSettings, add_attack_args, check_attack_settings, run_attack
from oml.core.logs import RunLog, quiet_libraries
from oml.core.run_config import add_train_args
from oml.embed.run_setup import prepare_run
from oml.measure.evaluation import add_eval_args

DESCRIPTION = """Attack a fingerprinted model the way a deployer would, and check which fingerprints survive.

Give it the same arguments as finetune_multigpu.py (they name the run, results/<hash>/) plus the attack. Each attacked
model goes to results/<hash>/attacks/<attack-id>/ (final_model/ or model.gguf, attack.json, eval_results.json);
what exists is skipped, so a rerun resumes. Then it prints the table of every attack of the run and writes
results/<hash>/attacks/summary.md and persistence.png.

Examples:
    python finetune_multigpu.py                                          # the run to attack
    python attack_fingerprints.py --attack sft                           # 2000 offline QA examples, 2 ep, lr 1e-5
    python attack_fingerprints.py --attack sft --attack_lr 5e-5 --attack_epochs 1
    python attack_fingerprints.py --attack lora_sft --attack_lr 1e-4 --attack_lora_rank 16
    python attack_fingerprints.py --attack sft --attack_data my_chats.jsonl --attack_examples 500
    python attack_fingerprints.py --attack quantize --quantization q4_k_m    # GGUF, checked inside llama.cpp
    python attack_fingerprints.py --attack quantize --quantization int8      # torch dynamic int8
    python attack_fingerprints.py --attack merge --merge_weight 0.7          # with the base model
    python attack_fingerprints.py --attack merge --merge_with <other-hash>   # with another owner's run
    python attack_fingerprints.py --attack quantize --quantization bf16 --utility_benchmark none   # fingerprints only
    # two CPU ranks (or GPUs) with DeepSpeed, as for fingerprinting
    deepspeed --num_gpus=2 attack_fingerprints.py --attack sft
"""


def make_parser():
    """The parser of attack_fingerprints.py and `oml attack`: training, evaluation and attack arguments."""
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_attack_args(add_eval_args(add_train_args(parser)))


def main(argv=None):
    settings = AttackSettings.from_args(prepare_run(make_parser().parse_args(argv)))
    examples = check_attack_settings(settings)  # bad input stops here, before anything is loaded or written
    quiet_libraries()
    from oml.core.run_store import ATTACKS, EVAL_RESULTS, find_run, read_json
    from oml.embed.trainer import is_main_process
    from oml.lab.persistence_report import write_summary
    from oml.measure.evaluation import format_table

    log = RunLog(find_run(settings.run) / ATTACKS / "attack_log.txt" if is_main_process() else None)
    folder = run_attack(settings, examples, log)
    if folder is not None:
        print(format_table(read_json(folder / EVAL_RESULTS)))
        print()
        print(write_summary(folder.parent.parent))
        print(f"attacked model and results in {folder}")
