"""Is this deployed model ours? Query a model served through an OpenAI-compatible API with a run's keys.

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

# `oml check` runs the same command: oml/commands/check.py holds its parser and main, and this docstring as DESCRIPTION
# (its --help text; tests/test_cli.py checks the two are the same).
from oml.commands.check import main
from oml.core.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
