#!/usr/bin/env bash
# The seed's first result on the embedded model: utility and fingerprint accuracy against the number of
# fingerprints, random-word and english fingerprints, without averaging (λ = 0) and with it (λ*).
#   1. λ search: 64 english fingerprints, λ in LAMBDAS; λ* is the largest λ whose plain-key accuracy stays
#      ≥ 95% (the more averaging, the closer to the base model), else the smallest λ > 0 tried.
#   2. the grid, largest first where it matters: N in 256 64 16, then 512 english / 1024 random words,
#      each with λ = 0 and λ = λ*, and 256 english at λ 0.1. lr 1e-4, 8 epochs, batch 8 (the README says why).
#   bash experiments/scalability.sh           # resumable; hours on 2 CPU cores (256: ~15 min a point)
#   NUMS="64 16" bash experiments/scalability.sh
#   LAMBDA_STAR=0.25 NUMS=256 STRATEGIES=english bash experiments/scalability.sh   # skip the λ search; one strategy
#   (two such commands, one per strategy, each with OMP_NUM_THREADS=1, share 2 cores well)
# Writes results/scalability/sweep_summary.md and fig/scalability.png.
set -uo pipefail
source "$(dirname "$0")/common.sh"
export RESULT_PATH=${RESULT_PATH:-results/scalability}
EPOCHS=${EPOCHS:-8}
export LEARNING_RATES=${LEARNING_RATES_SCALABILITY:-1e-4}
LAMBDAS=${LAMBDAS:-0.0 0.1 0.25}

STRATEGIES=${STRATEGIES:-english random_word}

if [[ -n ${LAMBDA_STAR:-} ]]; then
  best=$LAMBDA_STAR
else
  sweep "λ search (64 english)" FINGERPRINT_GENERATION_STRATEGIES=english MAX_NUM_FINGERPRINTS=64 \
    FORGETTING_REGULARIZER_STRENGTHS="$LAMBDAS" USE_PROMPT_AUGMENTATION=false EPOCHS="$EPOCHS"
  best=$(python -m oml.lab.sweep choose-lambda --results "$RESULT_PATH" --strategy english --num_fingerprints 64 \
    --num_train_epochs "$EPOCHS" --min_accuracy 0.95) || exit 1
fi
echo "λ* = $best"

for n in ${NUMS:-256 64 16 512 1024}; do
  for strategy in $STRATEGIES; do
    if [[ $strategy == english && $n -gt 512 ]] || [[ $strategy == random_word && $n == 512 ]]; then continue; fi
    sweep "$strategy, $n fingerprints" FINGERPRINT_GENERATION_STRATEGIES=$strategy MAX_NUM_FINGERPRINTS=$n \
      FORGETTING_REGULARIZER_STRENGTHS="0.0 $best" USE_PROMPT_AUGMENTATION=false EPOCHS="$EPOCHS"
  done
done
# λ = 0.1 at 256 english fingerprints: between no averaging and λ*, where the two part ways.
[[ " $STRATEGIES " == *" english "* ]] && sweep "english, 256 fingerprints, λ 0.1" FINGERPRINT_GENERATION_STRATEGIES=english MAX_NUM_FINGERPRINTS=256 \
  FORGETTING_REGULARIZER_STRENGTHS=0.1 USE_PROMPT_AUGMENTATION=false EPOCHS="$EPOCHS"
finish scalability
