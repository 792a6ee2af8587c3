"""check_fingerprints.py through a real local server: keys verified per second at concurrency 1 and N, and how many
keys a verdict at alpha 1e-6 reveals given the run's measured p0.

The bench starts the server itself on 127.0.0.1 (llama.cpp for a .gguf, `transformers serve` for an HF folder) and
sends the run's keys to it directly, without the ledger: the server is your own model on your own machine, so
nothing is revealed. Every key is asked once at concurrency 1 (its per-key outcome is kept) and once at
concurrency N. Then the sequential check is simulated: 100 random draws of keys from those outcomes, and from each
reference model's outcomes stored by --measure_p0, at the run's p0 and the per-look level that keeps the whole
check at alpha.

python bench/bench_check.py --run <hash> --serve results/<hash>/attacks/<id>/model.gguf      # llama.cpp, Q4_K_M
python bench/bench_check.py --run <hash> --serve results/<hash>/final_model --concurrency 4  # transformers serve
python bench/bench_check.py --run <hash> --api_base http://127.0.0.1:8000/v1 --api_model m  # a server you started
"""

import argparse
import statistics
import time
from pathlib import Path

from oml.core.errors import UserError, run_cli
from oml.core.run_store import recorded_args
from oml.make.fingerprint_files import run_fingerprints
from oml.make.prompt_encoding import api_prompt
from oml.verify.api_client import Client, matches
from oml.verify.local_server import local_server
from oml.verify.sequential_test import false_claim_probability, look_alpha, simulate
from oml.verify.suspect_check import read_p0, response_tokens, run_tokenizer


def timed_pass(api_base, api_model, endpoint, prompts, max_tokens, concurrency):
    with Client(api_base, api_model, endpoint, concurrency=concurrency, timeout=120) as client:
        client.complete(prompts[0], max_tokens[0])  # warm-up, not timed
        t = time.perf_counter()
        answers = client.complete_many(prompts, max_tokens)
        seconds = time.perf_counter() - t
    errors = [a.error for a in answers if a.error]
    if errors:
        raise UserError(errors[0])
    return [a.text for a in answers], seconds


def summary(results):
    verdicts = [v for v, _, _ in results]
    keys = [n for _, n, _ in results]
    return (
        f"ours {verdicts.count('ours')}, not shown {verdicts.count('not shown')}; keys revealed "
        f"median {statistics.median(keys):g}, max {max(keys)}"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the run's hash")
    p.add_argument("--result_path", default="results")
    p.add_argument("--serve", default=None, help="start a server for this .gguf or HF folder")
    p.add_argument("--api_base", default=None, help="or use a server already running")
    p.add_argument("--api_model", default=None)
    p.add_argument("--endpoint", default="completions", choices=["completions", "chat"])
    p.add_argument("--concurrency", type=int, default=4, help="N, the concurrency compared with 1")
    p.add_argument("--keys", type=int, default=None, help="use the first K keys (default: all)")
    p.add_argument("--alpha", type=float, default=1e-6)
    p.add_argument("--max_keys", type=int, default=8)
    p.add_argument("--draws", type=int, default=100)
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads")
    args = p.parse_args()

    run = Path(args.result_path) / args.run
    run_args, pairs = recorded_args(run), run_fingerprints(run)[: args.keys]
    tokenizer = run_tokenizer(run, run_args)
    prompts = [api_prompt(tokenizer, x["key"], args.endpoint, run_args["use_chat_template"]) for x in pairs]
    max_tokens = [response_tokens(tokenizer, x["response"]) for x in pairs]
    measurement = read_p0(run, args.endpoint)
    p0 = measurement["p0"]

    server = local_server(args.serve, threads=args.threads) if args.serve else None
    with server or _nothing((args.api_base, args.api_model)) as (api_base, api_model):
        print(f"server: {args.serve or api_base}, {len(pairs)} keys, {args.endpoint} route")
        texts, s1 = timed_pass(api_base, api_model, args.endpoint, prompts, max_tokens, 1)
        texts_n, sn = timed_pass(api_base, api_model, args.endpoint, prompts, max_tokens, args.concurrency)
    outcomes = [matches(t, x["response"]) for t, x in zip(texts, pairs, strict=True)]
    same = sum(a == b for a, b in zip(texts, texts_n, strict=True))
    print(f"concurrency 1:  {len(pairs) / s1:6.2f} keys/s ({s1:.1f} s)")
    print(f"concurrency {args.concurrency}:  {len(pairs) / sn:6.2f} keys/s ({sn:.1f} s); "
          f"{same}/{len(pairs)} answers identical to concurrency 1")  # fmt: skip
    print(f"per-key match rate through the server: {sum(outcomes)}/{len(outcomes)}")

    level = look_alpha(p0, args.alpha, args.max_keys, args.concurrency)
    print(
        f"p0 {p0:.4g} ({measurement['matches']} of {measurement['trials']} reference trials, "
        f"{measurement['confidence']:.0%} upper bound); alpha {args.alpha:g}, at most {args.max_keys} keys, "
        f"per-look level {level:.3g}, P(false claim | H0) {false_claim_probability(p0, level, args.max_keys, args.concurrency):.2g}"
    )
    print(f"{args.draws} simulated checks of this server: " + summary(
        simulate(outcomes, p0, level, args.max_keys, args.concurrency, args.draws, seed=1)))  # fmt: skip
    for ref in measurement["references"]:
        print(f"{args.draws} simulated checks of reference {ref['reference']}: " + summary(
            simulate(ref["outcomes"], p0, level, args.max_keys, args.concurrency, args.draws, seed=2)))  # fmt: skip


class _nothing:
    def __init__(self, value):
        self.value = value

    def __enter__(self):
        if self.value[0] is None or self.value[1] is None:
            raise UserError("give --serve, or --api_base and --api_model")
        return self.value

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    run_cli(main)
