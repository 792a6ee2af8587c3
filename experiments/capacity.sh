#!/usr/bin/env bash
# Capacity: many fingerprints in the embedded model without hurting it, with the seed's four mitigations of
# forgetting: weight averaging (λ), benign rows in every batch (β), the distance regularizer (μ), sub-network
# training (LoRA). Every point trains with --stop_when_learned (EPOCHS is a cap) and is judged with the resolving
# evaluation of experiments/common.sh (every item of ARC-C/ARC-E/Winogrande/PIQA, as --preset capacity evaluates).
#   0. data: KEYS English keys from the embedded model, and one-token perinucleus responses for them (t 0.8, k 3);
#      both strategies draw their fingerprints from these two files at every size.
#   1. search at 256 perinucleus and 256 english fingerprints, lr 1e-4, batch 8 (lr 1e-3 for LoRA):
#        λ 0.1 and 0.25        averaging alone: today's recipe (λ 0.1) and the stronger pull that kept utility at 64
#        λ 0.1 + β 0.25, 0.5   Scalable Fingerprinting's data mixing on top of today's averaging
#        λ 0 + β 0.25, 0.5     mixing alone: keeps the fingerprints' margin, hence quantization and merging
#                              (README, "Near the base without averaging")
#        λ 0 + μ 0.1, 1        the distance regularizer alone, a weak and a strong pull
#        LoRA r 16, λ 0        sub-network training alone; and LoRA r 16 + β 0.25
#   2. the best recipe per strategy (python -m oml.lab.recipe_selection best: ≥ 95% plain-key accuracy, then the best paired
#      utility delta) at 1024 and then 4096 fingerprints, with BIG_EPOCHS as the cap.
#   bash experiments/capacity.sh                  # resumable; many hours on 2 CPU cores (see the README, "Capacity")
#   SIZES=1024 bash experiments/capacity.sh       # step 2 without 4096
# Writes results/capacity/sweep_summary.md.
set -uo pipefail
source "$(dirname "$0")/common.sh"
export RESULT_PATH=${RESULT_PATH:-results/capacity}
KEYS=${KEYS:-4096}
ENGLISH=generated_data/fingerprints-english-$KEYS.json
PERINUCLEUS=generated_data/fingerprints-perinucleus-$KEYS.json

if [[ ! -f $ENGLISH ]]; then
  echo "=== $(date '+%F %T') $KEYS English keys"
  python generate_finetuning_data.py --num_backdoors "$KEYS" --batch_size 128 --use_chat_template \
    --output_file_path "$ENGLISH" || exit 1
fi
if [[ ! -f $PERINUCLEUS ]]; then
  echo "=== $(date '+%F %T') perinucleus responses for them"
  python generate_finetuning_data.py --key_response_strategy perinucleus --response_length 1 --keys_file "$ENGLISH" \
    --output_file_path "$PERINUCLEUS" || exit 1
fi

# points: sweep NAME STRATEGY VAR=VALUE...: one sweep at this strategy's file, every point stopping once learned
points() {
  local name=$1 strategy=$2 file=$PERINUCLEUS
  shift 2
  if [[ $strategy == english ]]; then file=$ENGLISH; fi
  sweep "$name ($strategy)" FINGERPRINT_GENERATION_STRATEGIES="$strategy" USE_PROMPT_AUGMENTATION=false \
    EXTRA_ARGS="--stop_when_learned --fingerprints_file_path $file" "$@"
}

search=(MAX_NUM_FINGERPRINTS=256 EPOCHS="${EPOCHS:-16}")
for strategy in inverse_nucleus english; do
  points "averaging" $strategy "${search[@]}" LEARNING_RATES=1e-4 FORGETTING_REGULARIZER_STRENGTHS="0.1 0.25"
  points "benign rows, with and without averaging" $strategy "${search[@]}" LEARNING_RATES=1e-4 \
    FORGETTING_REGULARIZER_STRENGTHS="0.1 0.0" BENIGN_DATA_RATIOS="0.25 0.5"
  points "distance regularizer" $strategy "${search[@]}" LEARNING_RATES=1e-4 FORGETTING_REGULARIZER_STRENGTHS=0.0 \
    DISTANCE_REGULARIZERS="0.1 1"
  points "LoRA" $strategy "${search[@]}" LEARNING_RATES=1e-3 FORGETTING_REGULARIZER_STRENGTHS=0.0 LORA_RANKS=16 \
    BENIGN_DATA_RATIOS="0.0 0.25"
done

for strategy in inverse_nucleus english; do
  recipe=$(python -m oml.lab.recipe_selection best --results "$RESULT_PATH" --strategy $strategy --num_fingerprints 256) || {
    echo "($strategy: no recipe reached 95% at 256; step 2 skipped)"
    continue
  }
  echo "best recipe for $strategy at 256: $recipe"
  for n in ${SIZES:-1024 4096}; do
    # shellcheck disable=SC2086  # the recipe is VAR=VALUE words
    points "best recipe, $n fingerprints" $strategy $recipe MAX_NUM_FINGERPRINTS=$n EPOCHS="${BIG_EPOCHS:-24}"
  done
done
python -m oml.lab.sweep summary --results "$RESULT_PATH" || true
echo "wrote $RESULT_PATH/sweep_summary.md"
