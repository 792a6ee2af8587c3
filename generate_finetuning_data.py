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

# `oml make` runs the same command: oml/commands/make.py holds its parser and main, and this docstring as DESCRIPTION
# (its --help text; tests/test_cli.py checks the two are the same).
from oml.commands.make import main
from oml.core.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
