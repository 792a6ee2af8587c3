"""One training step with benign rows, before and after passes per row group: the embedded model, a real batch.

A --benign_data_ratio 0.25 batch of 8 holds 6 fingerprint rows (a 16-token key and a one-token response: ~18 tokens)
and 2 benign rows from the model's cached pool (~75 tokens, up to ~150). Padded together, every row is as long as
the longest benign row; oml.embed.trainer.per_row_loss now runs the two groups in passes of their own length. This
times forward + backward + an AdamW step both ways on the same batches (the loss and gradient agree up to rounding:
tests/test_kl_to_base.py), alternating, and prints the median seconds per step and the tokens each way computes.

    python bench/bench_mixed_step.py                      # 12 steps each way, 1 thread
    python bench/bench_mixed_step.py --steps 20 --threads 2 --kl_to_base 1
"""

import argparse
import random
import statistics
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kl_to_base", type=float, default=0.0, help="κ: the benign rows' loss is the KL to the base")
    parser.add_argument("--fingerprints", default="generated_data/fingerprints-perinucleus.json")
    cli = parser.parse_args()

    import torch

    import oml.embed.trainer as trainer
    from oml.core.model_registry import load_model_and_tokenizer
    from oml.embed.benign_rows import benign_pool, encode_benign
    from oml.embed.trainer import FingerprintDataset, PadCollator, frozen_copy, per_row_loss
    from oml.make.fingerprint_files import read_fingerprints

    torch.set_num_threads(cli.threads)
    model, tok = load_model_and_tokenizer("embedded:SmolLM2-135M-Instruct", device="cpu", dtype=torch.float32)
    model.train()
    base = frozen_copy(model) if cli.kl_to_base else None
    pairs = [{"key": p["key"], "response": p["response"]} for p in read_fingerprints(cli.fingerprints)]
    fingerprints = FingerprintDataset(pairs, tok)
    pool = benign_pool("embedded:SmolLM2-135M-Instruct")["rows"]
    rng = random.Random(0)

    def benign_example(row):
        prompt, response = encode_benign(tok, row)
        ids = list(prompt) + list(response)
        return {"input_ids": ids, "labels": [-100] * len(prompt) + list(response), "benign": True}

    def batch():
        examples = [fingerprints[rng.randrange(len(fingerprints))] for _ in range(6)]
        examples = [{**e, "benign": False} for e in examples]
        examples[2:2] = [benign_example(rng.choice(pool))]
        examples[6:6] = [benign_example(rng.choice(pool))]
        return PadCollator(tok.pad_token_id)(examples)

    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: the same weights for every step
    grouped = trainer.row_groups

    def step(inputs, together):
        trainer.row_groups = (lambda benign: [None]) if together else grouped
        t = time.perf_counter()
        loss = per_row_loss(model, inputs, base, cli.kl_to_base)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - t

    times = {"padded together": [], "a pass per group": []}
    tokens = {"padded together": 0, "a pass per group": 0}
    step(batch(), False)  # warm-up
    for _ in range(cli.steps):
        inputs = batch()
        benign = inputs["benign"]
        lengths = inputs["attention_mask"].sum(1)
        tokens["padded together"] += inputs["input_ids"].numel()
        tokens["a pass per group"] += int(lengths[~benign].max()) * int((~benign).sum()) + int(
            lengths[benign].max()
        ) * int(benign.sum())
        for name, together in (("padded together", True), ("a pass per group", False)):
            times[name].append(step(inputs, together))
    trainer.row_groups = grouped
    print(f"{cli.steps} steps of 6 fingerprint + 2 benign rows, {cli.threads} thread(s), κ {cli.kl_to_base:g}")
    before = statistics.median(times["padded together"])
    for name, values in times.items():
        print(f"  {name:<18} median {statistics.median(values):6.2f} s/step  (min {min(values):.2f}, max "
              f"{max(values):.2f}); {tokens[name] / cli.steps:.0f} tokens computed per step")  # fmt: skip
    print(f"  speed-up {before / statistics.median(times['a pass per group']):.2f}x")


if __name__ == "__main__":
    main()
