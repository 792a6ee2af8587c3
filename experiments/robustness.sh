#!/usr/bin/env bash
# The seed's second result on the embedded model: fingerprints that survive unseen system prompts thanks to
# prompt augmentation. 32 english fingerprints, augmentation off and on; the evaluation reports the plain-key
# accuracy, the accuracy under each of the 10 test prompts (never used in training) and the utility delta.
#   bash experiments/robustness.sh            # resumable; about 30 min on 2 CPU cores
# Writes results/robustness/sweep_summary.md and fig/robustness.png.
set -uo pipefail
source "$(dirname "$0")/common.sh"
export RESULT_PATH=${RESULT_PATH:-results/robustness}

sweep "augmentation off/on, 12 epochs" FINGERPRINT_GENERATION_STRATEGIES=english MAX_NUM_FINGERPRINTS=32 \
  FORGETTING_REGULARIZER_STRENGTHS=0.0 USE_PROMPT_AUGMENTATION="false true" EPOCHS=12
sweep "augmentation on, 24 epochs" FINGERPRINT_GENERATION_STRATEGIES=english MAX_NUM_FINGERPRINTS=32 \
  FORGETTING_REGULARIZER_STRENGTHS=0.0 USE_PROMPT_AUGMENTATION=true EPOCHS=24
finish robustness
