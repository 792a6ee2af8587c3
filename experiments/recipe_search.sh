#!/usr/bin/env bash
# The recipe search of issue 28: which training recipe embeds 1024+ fingerprints into the embedded SmolLM2-135M model
# without moving it. oml/lab/recipe_search.py holds the points (as data, cheapest informative first), the screening evaluation
# and the budget; this wrapper only sets up the environment (experiments/common.sh) and runs one stretch.
# Every finished point leaves a record, experiments/records/recipe_search/<hash>.json: commit the records (and the
# generated_data/*-1024.json files the first stretch makes), and the next invocation, on this machine or a fresh one
# without results/, continues where the records stop. docs/records.md has the procedure.
#   bash experiments/recipe_search.sh                        # one stretch: points until ~3 hours are used
#   bash experiments/recipe_search.sh --budget_hours 2.5     # a shorter stretch
#   bash experiments/recipe_search.sh --stretch 1            # only the next point
#   python -m oml.lab.recipe_search plan                                # what is recorded, pending, unsupported; estimates
#   mkdir -p results && nohup bash experiments/recipe_search.sh > results/recipe_search.out 2>&1 &   # background
# Progress: results/recipe_search/search.log (flushed per line). Table: python -m oml.lab.records table recipe_search
set -uo pipefail
source "$(dirname "$0")/common.sh"
exec python -m oml.lab.recipe_search run "$@"
