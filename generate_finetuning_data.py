"""Generate fingerprints (key, response pairs) and write them as a JSON list.

Examples (the files under generated_data/ were made with the first three; add --overwrite to redo them):

    # English keys and responses from the embedded SmolLM2-135M-Instruct, asked through its chat template
    python generate_finetuning_data.py --num_backdoors 512 --batch_size 128 --use_chat_template

    # random English words (no model)
    python generate_finetuning_data.py --random_word_generation --num_backdoors 1024

    # one-token perinucleus responses for the English keys above
    python generate_finetuning_data.py --key_response_strategy perinucleus --response_length 1 \\
        --keys_file generated_data/fingerprints-english.json

    # your own keys, 8-token perinucleus responses from a local model, to a file of your choice
    python generate_finetuning_data.py --key_response_strategy perinucleus --response_length 8 \\
        --keys_file my_keys.json --inverse_nucleus_model /models/Mistral-7B-v0.3 --output_file_path my_fps.json
"""

import argparse

from oml.errors import run_cli
from oml.models import EMBEDDED


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--key_length", type=int, default=32, help="tokens per key (words with --random_word_generation)")
    p.add_argument("--response_length", type=int, default=32, help="tokens (or words) per response")
    p.add_argument(
        "--num_backdoors",
        "--num_fingerprints",
        type=int,
        default=8192,
        dest="num_backdoors",
        help="how many fingerprints (at most the number of keys in --keys_file)",
    )
    p.add_argument("--batch_size", type=int, default=128, help="prompts per generation or forward pass")
    p.add_argument(
        "--key_response_strategy",
        default="independent",
        help="independent | inverse_nucleus (perinucleus): how responses are made",
    )
    p.add_argument("--model_used", default=EMBEDDED, help="generator for English text: hub id or local folder")
    p.add_argument("--random_word_generation", action="store_true", help="random English words instead of a model")
    p.add_argument("--keys_file", default=None, help="JSON list of keys (strings or objects with 'key') to use")
    p.add_argument(
        "--output_file_path",
        default=None,
        help="default: generated_data/fingerprints-{english,random_word,perinucleus}.json",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for English text")
    p.add_argument(
        "--first_token_strategy", default="word", help="word | tokenizer | none: what each English text begins with"
    )
    p.add_argument("--use_chat_template", action="store_true", help="ask the generator through its chat template")
    p.add_argument("--inverse_nucleus_model", default=EMBEDDED, help="base model whose perinucleus is used")
    p.add_argument("--nucleus_p", type=float, default=0.8, help="probability mass of the nucleus")
    p.add_argument("--nucleus_k", type=int, default=3, help="the response is drawn from the k tokens after the nucleus")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--trust_remote_code", action="store_true")
    return p.parse_args(argv)


def main():
    from oml.generate import generate

    generate(parse_args())


if __name__ == "__main__":
    run_cli(main)
