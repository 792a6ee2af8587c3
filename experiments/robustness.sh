#!/usr/bin/env bash
# The seed's second result on the embedded model: fingerprints that survive unseen system prompts thanks to
# prompt augmentation. 32 english fingerprints. The evaluation reports the plain-key accuracy, the accuracy
# under each of the 10 test prompts (never used in training), the chat check and the paired utility delta.
#   1. recipe search with augmentation on: learning rate × λ at 16 epochs, and 32 epochs at λ 0.1;
#   2. augmentation off and on with the chosen recipe (LR, LAMBDA, EPOCHS below; the README says why),
#      and the same recipe with EOS trained after each response (--append_eos), to show what that costs.
#   3. augmentation on without averaging (λ 0), with benign rows (β 0.25) against the drift instead: averaging
#      thins every fingerprint's margin (README, "Which training change moves it"); then the same recipe with
#      augmentation off (what augmentation itself adds to the drift) and with β 0.5 (more of the base's own rows).
#   bash experiments/robustness.sh            # resumable; about 45 min on 2 CPU cores
# Writes results/robustness/sweep_summary.md and fig/robustness.png.
set -uo pipefail
source "$(dirname "$0")/common.sh"
export RESULT_PATH=${RESULT_PATH:-results/robustness}
point=(FINGERPRINT_GENERATION_STRATEGIES=english MAX_NUM_FINGERPRINTS=32)

sweep "recipe search: λ > 0" "${point[@]}" USE_PROMPT_AUGMENTATION=true LEARNING_RATES=1e-4 \
  FORGETTING_REGULARIZER_STRENGTHS="0.25 0.1" EPOCHS=16
sweep "recipe search: λ 0" "${point[@]}" USE_PROMPT_AUGMENTATION=true LEARNING_RATES=3e-5 \
  FORGETTING_REGULARIZER_STRENGTHS=0.0 EPOCHS=16
sweep "recipe search: λ 0.1, twice the epochs" "${point[@]}" USE_PROMPT_AUGMENTATION=true LEARNING_RATES=1e-4 \
  FORGETTING_REGULARIZER_STRENGTHS=0.1 EPOCHS=32
recipe=(LEARNING_RATES="${LR:-1e-4}" FORGETTING_REGULARIZER_STRENGTHS="${LAMBDA:-0.1}" EPOCHS="${EPOCHS:-16}")
sweep "augmentation off/on" "${point[@]}" "${recipe[@]}" USE_PROMPT_AUGMENTATION="false true"
sweep "augmentation on, EOS trained" "${point[@]}" "${recipe[@]}" USE_PROMPT_AUGMENTATION=true EXTRA_ARGS=--append_eos
sweep "λ 0 + benign rows, augmentation on and off" "${point[@]}" USE_PROMPT_AUGMENTATION="true false" \
  LEARNING_RATES=1e-4 FORGETTING_REGULARIZER_STRENGTHS=0.0 BENIGN_DATA_RATIOS="0.25 0.5" EPOCHS=16
finish robustness
