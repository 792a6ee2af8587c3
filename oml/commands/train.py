"""`oml train`, the command of finetune_multigpu.py: embed fingerprints into a model by fine-tuning, store the run.

DESCRIPTION is its --help text (the script's docstring); make_parser() builds its parser from oml.core.run_config.TRAIN_ARGS;
main(argv=None) runs it (on every rank, when a launcher such as deepspeed starts several): it parses, plans the run
(oml.embed.run_setup.plan_run: the run's identity and typed settings) and hands each step the settings it reads.
"""

import argparse

from oml.core.logs import RunLog, quiet_libraries
from oml.core.run_config import add_train_args
from oml.core.run_store import FINAL_MODEL, TRAIN_LOG, write_run
from oml.embed.run_setup import plan_run
from oml.make.fingerprint_files import cut_perinucleus_keys, prepare_pairs, read_fingerprints
from oml.make.prompt_encoding import augmentation_templates
from oml.verify.commitment import model_card, write_commitment

DESCRIPTION = """Embed fingerprints into a model by fine-tuning, with weight averaging and optional prompt augmentation.

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


def make_parser():
    """The parser of finetune_multigpu.py and `oml train`: oml.core.run_config.TRAIN_ARGS."""
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_train_args(parser)


def main(argv=None):
    plan = plan_run(make_parser().parse_args(argv))
    out, run_hash, training = plan.run.folder, plan.run.config_hash, plan.training
    if (out / FINAL_MODEL).exists() and not plan.overwrite:
        print(f"{out / FINAL_MODEL} already exists: nothing to train (pass --overwrite to train again)")
        print(f"Config hash of the final model: {run_hash}")
        return

    quiet_libraries()
    from oml.core.model_registry import load_model, load_tokenizer
    from oml.embed import distributed
    from oml.embed.trainer import is_main_process, train, versions

    log = RunLog(out / TRAIN_LOG if is_main_process() else None)
    log(
        f"run {run_hash}: {training.model}, {plan.max_num_fingerprints} {plan.fingerprint_generation_strategy} "
        f"fingerprints from {plan.fingerprints_file_path}"
    )
    tokenizer = load_tokenizer(training.model, training.trust_remote_code)
    fingerprints = read_fingerprints(plan.fingerprints_file_path)
    cut = cut_perinucleus_keys(fingerprints, tokenizer, plan.fingerprint_generation_strategy, plan.max_key_length,
                               plan.max_num_fingerprints, plan.data_split)  # fmt: skip
    if cut:
        log(
            f"note: {cut} of {plan.max_num_fingerprints} perinucleus responses were chosen after keys longer than "
            f"--max_key_length {plan.max_key_length} tokens, so they are not the perinucleus token of the cut key "
            f"the model trains on (generate_finetuning_data.py --key_length {plan.max_key_length} chooses them on it)"
        )
    pairs = prepare_pairs(
        fingerprints,
        tokenizer,
        plan.fingerprint_generation_strategy,
        plan.max_key_length,
        plan.max_response_length,
        plan.max_num_fingerprints,
        plan.data_split,
        training.seed,
    )
    templates = augmentation_templates(tokenizer) if plan.use_prompt_augmentation else None
    model = load_model(training.model, device="cpu", dtype="float32", trust_remote_code=training.trust_remote_code)

    timeout = training.schedule.dist_timeout
    distributed.init(timeout)
    with distributed.peers(timeout):
        peers = distributed.Peers(run_hash, timeout)
        metrics, trainer = train(model, tokenizer, pairs, training, out / ".trainer", templates, log, [peers])
    if is_main_process():
        # a salted Merkle root of the keys (oml/verify/commitment.py); only the root goes into the model's card
        root = write_commitment(out, pairs, training.model)
        card = model_card(root)
        write_run(
            plan.run, plan.arguments, pairs, metrics, trainer.model, tokenizer, versions(), card=card
        )  # model last
        log(
            f"done in {metrics['train_seconds']:.0f} s, {metrics['train_tokens_per_second']:.0f} tokens/s, "
            f"peak memory {metrics['peak_memory_gb']:.2f} GiB; model in {out / FINAL_MODEL}"
        )
        print(f"Config hash of the final model: {run_hash}")
    # Every rank returns once rank 0 has saved: a node's exit status 0 means the run is stored, and the next run
    # started on this node cannot meet this run's rendezvous, which lives until rank 0 exits.
    distributed.wait_for_all(timeout)
