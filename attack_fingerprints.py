"""Attack a fingerprinted model the way a deployer would, and check which fingerprints survive.

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

# `oml attack` runs the same command: oml/commands/attack.py holds its parser and main, and this docstring as DESCRIPTION
# (its --help text; tests/test_cli.py checks the two are the same).
from oml.commands.attack import main
from oml.core.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
