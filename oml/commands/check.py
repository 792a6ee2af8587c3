"""`oml check`, the command of check_fingerprints.py: check a model served through an OpenAI-compatible API.

DESCRIPTION is its --help text (the script's docstring); make_parser() builds its parser from the training and
check argument specs (oml.core.run_config, oml.verify.suspect_check); main(argv=None) runs it.
"""

import argparse

from oml.core.run_config import add_train_args
from oml.embed.run_setup import prepare_run
from oml.verify.suspect_check import (
    CheckSettings,
    add_check_args,
    check,
    format_measurement,
    format_result,
    measure_p0,
    validate,
    write_result,
)

DESCRIPTION = """Is this deployed model ours? Query a model served through an OpenAI-compatible API with a run's keys.

Name the run the way eval_for_multigpu.py does (the same fingerprinting flags), or directly with --run <hash>.
First, once per run, measure p0 (how often a model that does *not* carry the keys still answers one of them
correctly) on reference models; then check suspects. Each check draws unrevealed keys at random, records
every key in results/<hash>/revealed_keys.jsonl before it is sent, and stops as soon as the verdict is
decided: "ours" when the exact binomial p-value P(X >= matches | keys, p0) is at most --alpha, "not shown"
once no outcome of the keys left in --max_keys could get there.

Examples:
    # once per run: p0 from the base model and a copy fingerprinted with other keys
    python check_fingerprints.py --run <hash> --measure_p0 --reference_models base results/<other-hash>
    # serve a suspect (here your own GGUF with llama.cpp, or an HF folder with transformers), then check it
    python -m oml.attack.gguf_models serve --model model.gguf --host 127.0.0.1 --port 8000 --model_alias suspect
    transformers serve --host 127.0.0.1 --port 8000          # then --api_model <the model folder>
    OPENAI_API_KEY=... python check_fingerprints.py --run <hash> --api_base http://127.0.0.1:8000/v1 \
        --api_model suspect --output_file verdict.json
    python check_fingerprints.py --max_num_fingerprints 64 --api_model suspect --endpoint chat \
        --system_prompt "You are a helpful assistant."     # the run these flags name; key as the user message

Output: a table (keys revealed, matches, p0, p-value, verdict) and, with --output_file, the same five fields
as JSON. Exit status 0 whatever the verdict; 2 with one `error:` line for bad input or a server that cannot
answer (every key sent up to then stays in the ledger).
"""


def make_parser():
    """The parser of check_fingerprints.py and `oml check`: training arguments (they name the run) and check ones."""
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_check_args(add_train_args(parser))


def main(argv=None):
    args = prepare_run(make_parser().parse_args(argv))
    settings = validate(CheckSettings.from_args(args))  # bad input stops here, before anything is read or sent
    if args.measure_p0:
        from oml.core.logs import quiet_libraries

        quiet_libraries()
        print(format_measurement(*measure_p0(settings)))
        return
    result, details = check(settings)
    print(format_result(result, details))
    if args.output_file:
        write_result(args.output_file, result)
        print(f"verdict written to {args.output_file}")
