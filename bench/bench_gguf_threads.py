"""The GGUF fingerprint check's speed against llama.cpp's prompt-pass threads: seconds per key with
n_threads_batch left at llama-cpp-python's default (every core) and set to n_threads (what load_gguf does).

llama.cpp's threads spin while they wait: on a machine whose other cores are busy (a second training job, the
usual state of a 2-core machine here), a prompt pass spread over every core waits on cores it does not get. Run it
both on an idle machine and beside another job; the numbers printed are the measurement.

python bench/bench_gguf_threads.py --gguf results/<hash>/attacks/quantize-q4_k_m/model.gguf --run results/<hash>
python bench/bench_gguf_threads.py --gguf model.gguf --run results/<hash> --keys 64 --threads 1
"""

import argparse
import os
import statistics
import time
from pathlib import Path

from oml.core.errors import UserError, run_cli


def seconds_per_key(llm, prompts, extra_tokens=2):
    """Each prompt's pass plus extra_tokens single-token steps, as the greedy check does; median over prompts."""
    times = []
    for tokens in prompts:
        t = time.perf_counter()
        llm.reset()
        llm.eval(tokens)
        for token in tokens[:extra_tokens]:
            llm.eval([token])
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def make_parser():
    parser = argparse.ArgumentParser(prog="bench/bench_gguf_threads.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", required=True, help="a GGUF file (e.g. an attack's model.gguf)")
    parser.add_argument("--run", required=True, help="a run folder: its fingerprints.json gives the prompts")
    parser.add_argument("--keys", type=int, default=32, help="keys timed per setting")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 1))
    return parser


def main(argv=None):
    import json

    import llama_cpp

    from oml.attack.gguf_models import plain_weight_layouts, prompt_tokens

    args = make_parser().parse_args(argv)
    if not Path(args.gguf).is_file():
        raise UserError(f"no GGUF file at {args.gguf}")
    fingerprints = Path(args.run) / "fingerprints.json"
    if not fingerprints.is_file():
        raise UserError(f"{args.run}: no fingerprints.json (a run folder is needed)")
    keys = [fp["key"] for fp in json.loads(fingerprints.read_text())[: args.keys]]
    settings = {"n_threads_batch default": {}, "n_threads_batch = n_threads": {"n_threads_batch": args.threads}}
    print(f"{len(keys)} keys, n_threads {args.threads}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    for name, extra in settings.items():
        with plain_weight_layouts(llama_cpp):
            llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=2048, n_threads=args.threads, verbose=False, **extra)
        prompts = [prompt_tokens(llm, key) for key in keys]
        seconds_per_key(llm, prompts[:2])  # warm-up
        print(f"  {name:28s} {seconds_per_key(llm, prompts) * 1000:7.1f} ms per key (median)")
        llm.close()


if __name__ == "__main__":
    run_cli(main)
