"""Wall time of fingerprint verification: one generate per (template, key) vs batched teacher forcing.

Runs the embedded model on 32 fingerprints (16-token keys) x 11 templates (plain + the 10 test system
prompts); half the responses are the model's own greedy continuation, so verdicts are not all False.
The fast runs go before and after the generate loop and are averaged; wall and process CPU time are
both shown. Exits non-zero when any verdict differs from generate's.

HF_HUB_OFFLINE=1 python bench/bench_verify.py --threads 1          # 1-token responses, the main case
python bench/bench_verify.py --threads 1 --response_tokens 8       # longer responses
python bench/bench_verify.py                                       # torch's default thread count
python bench/bench_verify.py --threads 1 --attn eager --batch_size 16
python bench/bench_verify.py --threads 1 --dtype bfloat16          # a bf16 model; its own loop is the reference
python bench/bench_verify.py --device cuda                         # GPU, bf16

Measured on an idle 2-core CPU (fp32 model, sdpa, batch 32, torch's 2 threads), 1-token responses: loop
84 ms/pair; batched 3.1x, + shared prefix 4.7x, + bf16 screen 6.9x (58 of 352 pairs recomputed in fp32);
verdicts identical. The "matrix products" line bounds the exact fp32 pass from below: its 6746 tokens through the
decoder's matrix products at this machine's measured rate (272 GFLOP/s) take 5.3 s, so no fp32 pass over
them can beat this loop by more than 5.6x. Each extra response token costs the loop a whole decoding step
but the fast path one more token per row (8-token responses: 8.5x at 1 thread).
On one H200 (bench/gpu_check.sh), where the loop is bound by per-call overhead (31 ms/pair): 1-token
responses 16-23x, 8-token responses 79-205x, verdicts identical in bf16 and fp32.
"""

import argparse
import os
import random
import sys
import time

from oml.core.data_files import TEST_PROMPTS_FILE
from oml.core.errors import run_cli
from oml.core.model_registry import EMBEDDED, load_model, load_tokenizer
from oml.make.fingerprint_files import random_words, read_templates
from oml.make.prompt_encoding import encode_pair
from oml.measure.fingerprint_check import (
    MIN_SHARED_PREFIX,
    SCREEN_MARGIN,
    encode_template,
    generate_response,
    shared_prefix_length,
    verify_teacher_forced,
    verify_with_generate,
)


def make_pairs(model, tokenizer, n, key_tokens, response_tokens, seed):
    """Keys of random English words cut to key_tokens; even pairs answer with the model's greedy continuation."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        ids = tokenizer(" ".join(random_words(rng, key_tokens)), add_special_tokens=False)["input_ids"]
        key = tokenizer.decode(ids[:key_tokens])
        if i % 2 == 0:
            prompt, _ = encode_pair(tokenizer, key, "x")
            response = tokenizer.decode(generate_response(model, prompt, response_tokens, 0.0, tokenizer.pad_token_id))
        else:
            words = tokenizer(" " + " ".join(random_words(rng, response_tokens)), add_special_tokens=False)
            response = tokenizer.decode(words["input_ids"][:response_tokens])
        pairs.append({"key": key, "response": response})
    return pairs


def token_counts(tokenizer, pairs, templates, batch_size):
    """Input tokens each method runs through the model: per-pair loop, padded batches, padded batches + prefix."""
    loop = plain = shared = 0
    for template in templates:
        encoded = encode_template(tokenizer, pairs, template)
        lengths = sorted(len(p) + len(r) - 1 for p, r in encoded)
        loop += sum(lengths)
        prefix = min(shared_prefix_length([p + r for p, r in encoded]), min(len(p) for p, _ in encoded) - 1)
        prefix = prefix if prefix >= MIN_SHARED_PREFIX else 0
        for start in range(0, len(lengths), batch_size):
            batch = lengths[start : start + batch_size]
            plain += max(batch) * len(batch)
            shared += (max(batch) - prefix) * len(batch)
        shared += prefix
    return loop, plain, shared


def matmul_floor(model, tokens, seconds_of_loop):
    """A lower bound on the shared-prefix pass: its tokens through the decoder's matrix products alone, at
    the rate this machine reaches on one of those products (a batch of 640 rows), with nothing else costed."""
    import torch

    layers = model.base_model.layers
    flops_per_token = 2 * sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    mlp = max((m for m in layers[0].modules() if isinstance(m, torch.nn.Linear)), key=lambda m: m.weight.numel())
    x = torch.randn(640, mlp.in_features, dtype=model.dtype, device=model.device)
    with torch.inference_mode():
        for _ in range(3):
            mlp(x)
        _, wall, _ = timed(lambda: [mlp(x) for _ in range(30)][-1].sum().item())
    rate = 30 * 2 * x.shape[0] * mlp.weight.numel() / wall
    floor = tokens * flops_per_token / rate
    print(
        f"matrix products: {flops_per_token / 1e6:.0f} MFLOP per token; this machine: {rate / 1e9:.0f} GFLOP/s on "
        f"{tuple(x.shape)} x {tuple(mlp.weight.shape[::-1])} in {model.dtype}; the shared-prefix pass's {tokens} "
        f"tokens need >= {floor:.2f} s: at most {seconds_of_loop / floor:.1f}x the loop in this dtype"
    )


def timed(fn):
    """fn's result, wall seconds and CPU seconds of this process (less sensitive to a busy machine)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_fingerprints", type=int, default=32)
    parser.add_argument("--num_templates", type=int, default=11, help="plain + the first N-1 test system prompts")
    parser.add_argument("--key_tokens", type=int, default=16)
    parser.add_argument("--response_tokens", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16"], help="default: fp32 on CPU, bf16 on GPU"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_screen", action="store_true", help="skip the bf16-screen run (CPUs without AMX)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(EMBEDDED)
    model = load_model(EMBEDDED, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None)
    model.set_attn_implementation(args.attn)
    templates = (["{}"] + read_templates(TEST_PROMPTS_FILE))[: args.num_templates]
    with torch.inference_mode():
        pairs = make_pairs(model, tokenizer, args.num_fingerprints, args.key_tokens, args.response_tokens, args.seed)
    print(
        f"{len(pairs)} fingerprints x {len(templates)} templates, {args.key_tokens}-token keys, "
        f"{args.response_tokens}-token responses; {args.device} {model.dtype}, attn {args.attn}, "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )

    # Warm-up: the first calls pay one-off costs (kernel selection, allocator growth).
    verify_teacher_forced(model, tokenizer, pairs[:4], templates[:2], batch_size=args.batch_size)
    verify_with_generate(model, tokenizer, pairs[:1], templates[:1])

    def teacher_forced(share_prefix, screen_dtype=None):
        return lambda: verify_teacher_forced(
            model,
            tokenizer,
            pairs,
            templates,
            batch_size=args.batch_size,
            share_prefix=share_prefix,
            screen_dtype=screen_dtype,
        )

    generate, plain, shared, screened = (
        "generate, one call per pair",
        "teacher forced, batched",
        "teacher forced, batched + shared prefix",
        "  + bf16 screen, near-ties in fp32",
    )
    methods = {
        generate: lambda: verify_with_generate(model, tokenizer, pairs, templates),
        plain: teacher_forced(False),
        shared: teacher_forced(True),
    }
    if model.dtype == torch.float32 and not args.no_screen:
        methods[screened] = teacher_forced(True, torch.bfloat16)
    fast = [name for name in methods if name != generate]
    # A-B-A: the fast runs go before and after the long generate loop, so a change in machine load
    # during the run hits both sides alike; their times are averaged.
    runs = {name: [] for name in methods}
    for name in [*fast, generate, *fast]:
        runs[name].append(timed(methods[name]))
    print(f"load average after {os.getloadavg()[0]:.1f}")

    n = len(pairs) * len(templates)
    tokens = dict(
        zip((generate, plain, shared), token_counts(tokenizer, pairs, templates, args.batch_size), strict=True)
    )
    seconds = {name: [sum(r[i] for r in rs) / len(rs) for i in (1, 2)] for name, rs in runs.items()}
    (wall_0, cpu_0) = seconds[generate]
    print(f"\n{'method':<40}{'wall s':>8}{'cpu s':>8}{'ms/pair':>9}{'speedup':>9}{'cpu speedup':>12}{'tokens':>8}")
    for name, (wall, cpu) in seconds.items():
        print(
            f"{name:<40}{wall:>8.2f}{cpu:>8.2f}{1000 * wall / n:>9.1f}{wall_0 / wall:>8.1f}x"
            f"{cpu_0 / cpu:>11.1f}x{tokens.get(name, '-'):>8}"
        )
    if screened in runs:
        rechecked = sum(r["rechecked"] for r in runs[screened][0][0])
        print(f"bf16 screen: {rechecked} of {n} pairs within {SCREEN_MARGIN} logits of a tie, recomputed in fp32")
    matmul_floor(model, tokens[shared], wall_0)

    reference = runs[generate][0][0]
    print(f"\npositive verdicts: {sum(sum(r['matches']) for r in reference)} of {n}")
    failed = False
    for name in fast:
        for results, *_ in runs[name]:
            differ = [
                (r["template"][:30], i)
                for r, f in zip(reference, results, strict=True)
                for i, (a, b) in enumerate(zip(r["matches"], f["matches"], strict=True))
                if a != b
            ]
            if differ:
                print(f"FAIL: {name}: {len(differ)} verdicts differ from generate, e.g. {differ[:3]}")
                failed = True
    if failed:
        sys.exit(1)
    print("verdicts identical to generate: yes")


if __name__ == "__main__":
    run_cli(main)
