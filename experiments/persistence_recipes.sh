#!/usr/bin/env bash
# Which training change keeps fingerprints through quantization and merging (issue 15: "where a goal is missed, find
# and measure which training change moves it"). The goal attacks that need no fine-tuning, GGUF Q8_0 and Q4_K_M
# checked inside llama.cpp and a 0.7 merge with the base, on 256-fingerprint runs that differ one setting at a time:
#   the scalability experiment's 256 points (8 epochs): english λ 0 / 0.1 / 0.25, random words λ 0 / 0.25
#   the persistence experiment's run (english λ 0.1, 16 epochs)
#   bash experiments/persistence_recipes.sh      # after scalability.sh (NUMS=256) and persistence.sh; resumable
# Attacked models get the fingerprint check only (every template; GGUF files: plain key and [chat]); the utility of
# attacked models is measured by persistence.sh. A run that is not trained yet is reported (one line) and skipped.
# Writes results/persistence/recipes.md (a row per run, a column per attack).
set -uo pipefail
source "$(dirname "$0")/common.sh"
common=(--max_num_fingerprints 256 --learning_rate 1e-4 --batch_size 8)
fingerprints_only=(--utility_benchmark none --generation_benchmark none --chat_drift_limit none --skip_base_model)
recipes=(
  "--result_path results/scalability --num_train_epochs 8 --fingerprint_generation_strategy english --forgetting_regularizer_strength 0.0"
  "--result_path results/scalability --num_train_epochs 8 --fingerprint_generation_strategy english --forgetting_regularizer_strength 0.1"
  "--result_path results/scalability --num_train_epochs 8 --fingerprint_generation_strategy english --forgetting_regularizer_strength 0.25"
  "--result_path results/scalability --num_train_epochs 8 --fingerprint_generation_strategy random_word --forgetting_regularizer_strength 0.0"
  "--result_path results/scalability --num_train_epochs 8 --fingerprint_generation_strategy random_word --forgetting_regularizer_strength 0.25"
  "--result_path results/persistence --num_train_epochs 16 --fingerprint_generation_strategy english --forgetting_regularizer_strength 0.1"
)
attack() {
  echo "=== $(date '+%F %T') $*"
  python attack_fingerprints.py "$@" || echo "(did not finish: a run that is not trained yet says so above)"
}
for recipe in "${recipes[@]}"; do
  read -r -a args <<<"$recipe"
  args+=("${common[@]}")
  for q in q8_0 q4_k_m; do
    attack "${args[@]}" --attack quantize --quantization "$q" --gguf_templates plain "${fingerprints_only[@]}"
  done
  attack "${args[@]}" --attack merge --merge_weight 0.7 "${fingerprints_only[@]}"
done
runs=()
for run in results/scalability/*/ results/persistence/*/; do [[ -d $run/attacks ]] && runs+=("${run%/}"); done
[[ ${#runs[@]} -gt 1 ]] && python -m oml.persistence "${runs[@]}" --out results/persistence/recipes.md
