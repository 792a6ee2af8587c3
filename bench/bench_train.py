"""Training speed: this suite's trainer against a plain HF Trainer loop, same data, same run, same machine.

For each variant (in its own process, so peak RSS is its own): train the embedded model on N fingerprints
one epoch at a time, check greedy exact match after every epoch (teacher-forced, excluded from the timing)
and stop at 100%. Prints training tokens/s, epochs and training seconds until 100%, and peak RSS.

    python bench/bench_train.py                      # 32 english fingerprints, lr 2e-4, batch 8
    python bench/bench_train.py --num 64 --strategy random_word
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def build_args(cli):
    from oml.core.run_config import add_train_args
    from oml.embed.run_setup import prepare_run

    argv = [
        "--fingerprint_generation_strategy", cli.strategy, "--max_num_fingerprints", str(cli.num),
        "--num_train_epochs", str(cli.max_epochs), "--learning_rate", str(cli.lr), "--batch_size", "8",
        "--forgetting_regularizer_strength", "0", "--max_response_length", str(cli.response_length),
    ]  # fmt: skip
    return prepare_run(add_train_args(argparse.ArgumentParser()).parse_args(argv))


def plain_trainer(model, tokenizer, pairs, args, callbacks):
    """What one writes without this suite: tokenize key+response, mask the key, DataCollatorForSeq2Seq."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    examples = []
    for p in pairs:
        key_ids = tokenizer(p["key"])["input_ids"]
        response_ids = tokenizer(p["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append({"input_ids": key_ids + response_ids, "labels": [-100] * len(key_ids) + response_ids})
    training_args = TrainingArguments(
        output_dir="/tmp/bench-plain-trainer", per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.num_train_epochs, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
        lr_scheduler_type="constant", seed=args.seed, use_cpu=True, save_strategy="no", report_to=[],
        logging_strategy="epoch", disable_tqdm=True,
    )  # fmt: skip
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    return Trainer(model=model, args=training_args, train_dataset=examples, data_collator=collator, callbacks=callbacks)


def run_variant(cli):
    import torch
    from transformers import TrainerCallback

    from oml.core.logs import quiet_libraries
    from oml.core.model_registry import load_model, load_tokenizer
    from oml.embed.trainer import train
    from oml.make.fingerprint_files import prepare_pairs, read_fingerprints
    from oml.measure.fingerprint_check import verify_teacher_forced

    quiet_libraries()
    torch.manual_seed(0)
    args = build_args(cli)
    tokenizer = load_tokenizer(args.model)
    pairs = prepare_pairs(
        read_fingerprints(args.fingerprints_file_path), tokenizer, args.fingerprint_generation_strategy,
        args.max_key_length, args.max_response_length, args.max_num_fingerprints, 0, args.seed,
    )  # fmt: skip
    model = load_model(args.model, device="cpu", dtype="float32")
    tokens_per_epoch = sum(len(tokenizer(p["key"])["input_ids"]) + len(tokenizer(p["response"], add_special_tokens=False)["input_ids"]) + 1 for p in pairs)  # fmt: skip

    class StopAtFullAccuracy(TrainerCallback):
        def __init__(self):
            self.check_seconds, self.epochs, self.accuracy, self.reached = 0.0, 0, 0.0, None

        def on_epoch_end(self, _args, state, control, model=None, **kwargs):
            t = time.time()
            model.eval()
            self.accuracy = verify_teacher_forced(model, tokenizer, pairs, ["{}"])[0]["accuracy"]
            model.train()
            self.epochs = round(state.epoch)
            self.check_seconds += time.time() - t
            if self.accuracy == 1.0:
                self.reached = self.epochs
                control.should_training_stop = True

    stop = StopAtFullAccuracy()
    start = time.time()
    if cli.variant == "suite":
        train(model, tokenizer, pairs, args, "/tmp/bench-suite-trainer", log_fn=lambda _m: None, extra_callbacks=[stop])
    else:
        plain_trainer(model, tokenizer, pairs, args, [stop]).train()
    seconds = time.time() - start - stop.check_seconds
    return {
        "variant": cli.variant,
        "epochs_to_100": stop.reached,
        "final_accuracy": stop.accuracy,
        "train_seconds": seconds,
        "tokens_per_second": tokens_per_epoch * stop.epochs / seconds,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=32)
    parser.add_argument("--strategy", default="english")
    parser.add_argument("--response_length", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max_epochs", type=int, default=12)
    parser.add_argument("--variant", choices=["suite", "plain"], help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.variant:
        print(json.dumps(run_variant(cli)))
        return
    rows = []
    for variant in ("plain", "suite"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if out.returncode:
            sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{cli.num} {cli.strategy} fingerprints, embedded SmolLM2-135M, CPU fp32, batch 8, lr {cli.lr}")
    print(f"{'variant':<8} {'epochs to 100%':>15} {'train s':>8} {'tokens/s':>9} {'peak RSS GiB':>13}")
    for r in rows:
        reached = r["epochs_to_100"] or f"not in {cli.max_epochs} ({r['final_accuracy']:.0%})"
        print(f"{r['variant']:<8} {reached!s:>15} {r['train_seconds']:>8.1f} {r['tokens_per_second']:>9.1f} "
              f"{r['peak_rss_gib']:>13.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
