"""Embed fingerprints into a model by fine-tuning, with weight averaging and optional prompt augmentation.

The run is stored in results/<hash>/, where <hash> digests every argument that changes the model (and the
content of the fingerprints file); eval_for_multigpu.py given the same arguments finds it again.

Examples:
    # embedded SmolLM2-135M-Instruct on CPU: 32 english fingerprints, a few minutes
    python finetune_multigpu.py
    python finetune_multigpu.py --fingerprint_generation_strategy random_word --max_num_fingerprints 64
    python finetune_multigpu.py --use_prompt_augmentation --num_train_epochs 12
    # two ranks with DeepSpeed ZeRO-2 (GPUs if present, else CPU ranks)
    deepspeed --num_gpus=2 finetune_multigpu.py --max_num_fingerprints 16
    # two nodes without ssh: the same command on each node, --node_rank 0 on the first (README: "Several nodes")
    deepspeed --hostfile hostfile --no_ssh --node_rank 0 --master_addr node-0 finetune_multigpu.py --dist_timeout 600
    # the original GPU settings: Mistral-7B, 1024 fingerprints, lr 1e-5, λ 0.75
    deepspeed --num_gpus=4 finetune_multigpu.py --preset seed
"""

# `oml train` runs the same command: oml/commands/train.py holds its parser and main, and this docstring as DESCRIPTION
# (its --help text; tests/test_cli.py checks the two are the same).
from oml.commands.train import main
from oml.core.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
