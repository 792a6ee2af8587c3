#!/usr/bin/env bash
# Which training change keeps fingerprints through quantization and merging (issue 15: "where a goal is missed, find
# and measure which training change moves it"). The goal attacks that need no fine-tuning, GGUF Q8_0 and Q4_K_M
# checked inside llama.cpp and a 0.7 merge with the base, on 256-fingerprint runs that differ one setting at a time:
#   the scalability experiment's 256 points (8 epochs): english λ 0 / 0.1 / 0.25, random words λ 0 / 0.25
#   the persistence experiment's run (english λ 0.1, 16 epochs)
#   english λ 0 with benign rows (β 0.25, 8 epochs): near the base by mixing instead of averaging
#   bash experiments/persistence_recipes.sh      # after scalability.sh (NUMS=256) and persistence.sh; resumable
#   TRAIN=1 ONLY="benign_data_ratio" bash experiments/persistence_recipes.sh     # train what is missing; a subset
#   ATTACKS=sft ONLY="scalability.*english.*0\.0$" bash experiments/persistence_recipes.sh   # the SFT goal point only
# ATTACKS: default "q8_0 q4_k_m merge0.7"; also q4_0, merge<w> (with the base at weight w), sft (2 epochs of full
# SFT at lr 1e-5 on 2000 QA chats, the goal point). ONLY: a regular expression; only the recipes whose line matches.
# Attacked models get the fingerprint check only (every template; GGUF files: plain key and [chat]); the utility of
# attacked models is measured by persistence.sh. A run that is not trained yet is reported (one line) and skipped,
# or with TRAIN=1 trained and evaluated (everything but utility; UTILITY=1: the resolving evaluation too).
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
  "--result_path results/persistence --num_train_epochs 8 --fingerprint_generation_strategy english --forgetting_regularizer_strength 0.0 --benign_data_ratio 0.25"
)
attack() {
  echo "=== $(date '+%F %T') $*"
  python attack_fingerprints.py "$@" || echo "(did not finish: a run that is not trained yet says so above)"
}
# the run's own evaluation when TRAIN=1 trains it: everything but utility unless UTILITY=1 (then the resolving one)
read -r -a run_eval <<<"$EVAL_ARGS"
[[ ${UTILITY:-0} == 1 ]] || run_eval=(--utility_benchmark none)
for recipe in "${recipes[@]}"; do
  [[ $recipe =~ ${ONLY:-.} ]] || continue
  read -r -a args <<<"$recipe"
  args+=("${common[@]}")
  if [[ ${TRAIN:-0} == 1 ]]; then
    echo "=== $(date '+%F %T') train $recipe"
    hash=$(train "${args[@]}")
    [[ -n $hash ]] || continue
    if [[ ! -f ${args[1]}/$hash/eval_results.json ]]; then
      python eval_for_multigpu.py "${args[@]}" "${run_eval[@]}" || continue
    fi
  fi
  for a in ${ATTACKS:-q8_0 q4_k_m merge0.7}; do
    case $a in
      merge*) attack "${args[@]}" --attack merge --merge_weight "${a#merge}" "${fingerprints_only[@]}" ;;
      sft) attack "${args[@]}" --attack sft --attack_examples 2000 --attack_lr 1e-5 --attack_epochs 2 "${fingerprints_only[@]}" ;;
      *) attack "${args[@]}" --attack quantize --quantization "$a" --gguf_templates plain "${fingerprints_only[@]}" ;;
    esac
  done
done
runs=()
for run in results/scalability/*/ results/persistence/*/; do [[ -d $run/attacks ]] && runs+=("${run%/}"); done
[[ ${#runs[@]} -gt 1 ]] && python -m oml.lab.persistence_report "${runs[@]}" --out results/persistence/recipes.md
