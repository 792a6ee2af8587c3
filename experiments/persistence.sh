#!/usr/bin/env bash
# Persistence (issue 15): which fingerprints survive what a deployer does to the model before serving it.
# One fingerprinted run (the default recipe at NUM fingerprints; RUN_ARGS for another recipe, e.g. the capacity one),
# a second owner's run of the same recipe on other fingerprints (--data_split 1), then every attack:
#   quantization  bf16, fp16, int8 (torch), GGUF q8_0 / q4_k_m / q4_0 checked inside llama.cpp
#   merging       with the base at fingerprinted weight 0.9 / 0.7 / 0.5; with the second owner's model at 0.5
#   fine-tuning   full SFT on 2000 offline QA chat examples: lr 1e-5 x 2 epochs, lr 5e-5 x 1 epoch; LoRA lr 1e-4 x 2
#   bash experiments/persistence.sh                                   # resumable: every step skips what exists
#   NUM=32 bash experiments/persistence.sh                            # smaller: minutes instead of hours on a CPU
#   ATTACK_EVAL_ARGS="--utility_limit 200" bash experiments/persistence.sh   # fewer utility items (run and attacks)
#   GGUF_TEMPLATES=plain bash experiments/persistence.sh              # GGUF types: plain key and [chat] in llama.cpp
#   RUN_ARGS="--learning_rate 3e-5 --forgetting_regularizer_strength 0" bash experiments/persistence.sh
# Writes results/persistence/<hash>/attacks/summary.md and fig/persistence.png.
set -uo pipefail
source "$(dirname "$0")/common.sh"
export RESULT_PATH=${RESULT_PATH:-results/persistence}
NUM=${NUM:-256}
EXAMPLES=${EXAMPLES:-2000}
read -r -a run_args <<<"--max_num_fingerprints $NUM --result_path $RESULT_PATH ${RUN_ARGS:-}"
# ATTACK_EVAL_ARGS: added to the evaluation of the run and of every attacked model (e.g. "--utility_limit 200" to save
# time). One evaluation for both, so each attack's utility cost is paired item by item with the run's.
gguf=(--gguf_templates "${GGUF_TEMPLATES:-all}")  # plain: only the plain key and [chat] in llama.cpp (much faster)
read -r -a eval_args <<<"$EVAL_ARGS ${ATTACK_EVAL_ARGS:-}"

step() { echo "=== $(date '+%F %T') $*"; }
attack() {
  step "attack $*"
  python attack_fingerprints.py "${run_args[@]}" "${eval_args[@]}" "$@" || echo "(attack $* did not finish)"
}

step "fingerprinting ($NUM fingerprints)"
run=$(train "${run_args[@]}") || exit 1
python eval_for_multigpu.py "${run_args[@]}" "${eval_args[@]}" || exit 1
step "a second owner: the same recipe on the next $NUM fingerprints"
other=$(train "${run_args[@]}" --data_split 1)

# The issue's goal points first (Q8_0, Q4_K_M, merge 0.7, SFT 2000 x 2 at lr 1e-5), so a run stopped early answers it.
attack --attack quantize --quantization q8_0 "${gguf[@]}"
attack --attack quantize --quantization q4_k_m "${gguf[@]}"
attack --attack merge --merge_weight 0.7
attack --attack sft --attack_examples "$EXAMPLES" --attack_lr 1e-5 --attack_epochs 2
[[ -n $other ]] && attack --attack merge --merge_weight 0.5 --merge_with "$other"
attack --attack quantize --quantization q4_0 "${gguf[@]}"
for q in bf16 fp16 int8; do attack --attack quantize --quantization "$q"; done
for w in 0.9 0.5; do attack --attack merge --merge_weight "$w"; done
attack --attack sft --attack_examples "$EXAMPLES" --attack_lr 5e-5 --attack_epochs 1
attack --attack lora_sft --attack_examples "$EXAMPLES" --attack_lr 1e-4 --attack_epochs 2

python -m oml.lab.persistence_report "$RESULT_PATH/$run" --fig fig/persistence.png
echo "wrote fig/persistence.png and $RESULT_PATH/$run/attacks/summary.md"
