#!/usr/bin/env bash
# Which licensee's copy is this? (issue 29, item 5) Three licensee copies of the embedded model (--licensee 0/1/2, NUM
# perinucleus fingerprints each, one master file), an unrelated fingerprinted run, the base and a 50/50 merge of
# licensee 0 and 1, each served by llama.cpp on 127.0.0.1 and traced REPEATS times with
# `check_fingerprints.py --trace`; then DRAWS simulated traces per suspect from the measured per-key outcomes.
#   bash experiments/licensee_tracing.sh                 # NUM=128 REPEATS=3 DRAWS=1000; rerunning resumes
# Writes results/licensee_tracing/ (runs, GGUFs, traces, server logs) and the record
# experiments/records/licensee_tracing/N$NUM.json; prints the tables (docs/claims.md, "Measured").
set -uo pipefail
source "$(dirname "$0")/common.sh"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OPENAI_API_KEY=${OPENAI_API_KEY:-local}
python -m oml.lab.licensee_tracing run --result_path "${RESULT_PATH:-results/licensee_tracing}" --num "${NUM:-128}" \
  --repeats "${REPEATS:-3}" --draws "${DRAWS:-1000}"
