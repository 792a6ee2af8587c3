"""`oml make`, the command of generate_finetuning_data.py: generate fingerprints and write them as a JSON list.

DESCRIPTION is its --help text (the script's docstring); make_parser() builds its parser from oml.make.fingerprint_generator's
argument spec; main(argv=None) runs it.
"""

import argparse

from oml.make.fingerprint_generator import add_generate_args

DESCRIPTION = """Generate fingerprints (key, response pairs) and write them as a JSON list.

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


def make_parser():
    """The parser of generate_finetuning_data.py and `oml make`: oml.make.fingerprint_generator.GENERATE_ARGS."""
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_generate_args(parser)


def main(argv=None):
    args = make_parser().parse_args(argv)
    from oml.make.fingerprint_generator import generate

    generate(args)
