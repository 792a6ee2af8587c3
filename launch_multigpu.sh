#!/usr/bin/env bash
# Fingerprint a model over a grid of settings. For every point of the grid:
#   1. make the strategy's fingerprints file under generated_data/ if it is missing (generate_finetuning_data.py),
#   2. fine-tune with DeepSpeed (finetune_multigpu.py; skipped when results/<hash>/final_model exists),
#   3. evaluate with the same arguments (eval_for_multigpu.py; skipped when results/<hash>/eval_results.json exists).
# A point that fails is logged and the sweep goes on. At the end a table (one row per point) is printed and
# written to results/sweep_summary.{csv,md}, the figures are redrawn into fig/, and the exit status is non-zero
# if any point failed. Rerunning the same command resumes an interrupted sweep. Logs: results/sweep_logs/.
#
# The grid starts from one point, the chosen preset's values in oml/core/recipes.py. PRESET=embedded (the default) is the
# CPU demo that `make run` runs, ~10 min on 2 cores: SmolLM2-135M-Instruct, 32 English fingerprints, lr 1e-4,
# λ 0.1, 16 epochs, here without and with prompt augmentation. PRESET=seed is the original GPU setting: Mistral-7B,
# 1024 fingerprints, lr 1e-5, λ 0.75, utility on tinyBenchmarks.
#
# Every list can be overridden from the environment (space-separated), without editing this file:
#   bash launch_multigpu.sh                                            # the CPU demo
#   PRESET=seed bash launch_multigpu.sh                                # the original grid on all GPUs
#   NUM_GPUS=4 MODEL_FAMILIES="mistral" MODEL_SIZES="7B 7B-Instruct" USE_PROMPT_AUGMENTATION="false true" \
#     LEARNING_RATES=1e-5 FORGETTING_REGULARIZER_STRENGTHS=0.75 MAX_NUM_FINGERPRINTS="256 1024" bash launch_multigpu.sh
#   GPUS=0,2 PRESET=seed bash launch_multigpu.sh                       # only GPUs 0 and 2 (--include localhost:0,2);
#                                                                      # CUDA_VISIBLE_DEVICES=0,2 does the same
#   HOSTFILE=hostfile PRESET=seed bash launch_multigpu.sh              # several nodes (DeepSpeed hostfile, ssh)
#   NUM_NODES=2 NODE_RANK=0 MASTER_ADDR=node-a PRESET=seed bash launch_multigpu.sh   # several nodes without ssh:
#   NUM_NODES=2 NODE_RANK=1 MASTER_ADDR=node-a PRESET=seed bash launch_multigpu.sh   # the same command on each node
#   LAUNCHER=python bash launch_multigpu.sh                            # plain python, no DeepSpeed
#   MODEL_PATHS="/models/my-llama" EVAL_ARGS="--utility_benchmark none" RESULT_PATH=/scratch/r bash launch_multigpu.sh
# Forgetting mitigations (README, "Capacity"), each a list too: BENIGN_DATA_RATIOS (β), DISTANCE_REGULARIZERS (μ),
# LORA_RANKS ("none" = full fine-tuning); TRAINABLE_LAYERS and --stop_when_learned go in EXTRA_ARGS.
#   BENIGN_DATA_RATIOS="0.0 0.25" LORA_RANKS="none 16" EXTRA_ARGS=--stop_when_learned bash launch_multigpu.sh
# Other knobs: EPOCHS, BATCH_SIZE, MAX_KEY_LENGTHS, MAX_RESPONSE_LENGTHS, FINGERPRINT_GENERATION_STRATEGIES,
# EXTRA_ARGS (added to training and evaluation), EVAL_ARGS (evaluation only), MASTER_PORT, INCLUDE (a raw
# deepspeed --include for several nodes), NUM_NODES, REDO_EVAL=1 (evaluate again), FIG_DIR (default fig).
# Several nodes without ssh (Slurm, Kubernetes): run the same command on every node with NODE_RANK (0..NUM_NODES-1)
# and MASTER_ADDR (node 0's address); each node starts its own d ranks (deepspeed --no_ssh; with HOSTFILE its hosts
# and slots, else NUM_NODES nodes of d ranks each). Node 0 trains, evaluates and summarises; the others only train.
# RESULT_PATH must be one folder all nodes share. A rank that loses a peer fails after --dist_timeout seconds
# (default 1800; EXTRA_ARGS="--dist_timeout 600"), which is also how long the others wait for node 0 between points.
set -uo pipefail
set -f # the lists are split on spaces; never glob them
here=$(cd "$(dirname "$0")" && pwd)
if [[ -z ${VIRTUAL_ENV:-} && -f $here/.venv/bin/activate ]]; then source "$here/.venv/bin/activate"; fi
export PYTHONPATH=$here${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false

# ------------------------------------------------------------------------------------------ the grid
PRESET=${PRESET:-embedded}
# The grid starts from the preset's values, its augmentation values and its evaluation flags (embedded: without and
# with augmentation, the evaluation's --measure quick; seed: tinyBenchmarks; capacity: the preset's own evaluation),
# all in oml/core/recipes.py, the one place they are written.
grid=$(python -m oml.lab.sweep preset-grid --preset "$PRESET") || exit 2
eval "$grid"
model_families=(${MODEL_FAMILIES:-${model_families[*]}})
model_sizes=(${MODEL_SIZES:-${model_sizes[*]}})
max_key_lengths=(${MAX_KEY_LENGTHS:-${max_key_lengths[*]}})
max_response_lengths=(${MAX_RESPONSE_LENGTHS:-${max_response_lengths[*]}})
fingerprint_generation_strategies=(${FINGERPRINT_GENERATION_STRATEGIES:-${fingerprint_generation_strategies[*]}})
learning_rates=(${LEARNING_RATES:-${learning_rates[*]}})
forgetting_regularizer_strengths=(${FORGETTING_REGULARIZER_STRENGTHS:-${forgetting_regularizer_strengths[*]}})
max_num_fingerprints=(${MAX_NUM_FINGERPRINTS:-${max_num_fingerprints[*]}})
use_prompt_augmentation=(${USE_PROMPT_AUGMENTATION:-${use_prompt_augmentation[*]}})
epochs=(${EPOCHS:-${epochs[*]}})
preset_beta=${benign_data_ratios[*]} preset_mu=${distance_regularizers[*]}
benign_data_ratios=(${BENIGN_DATA_RATIOS:-${benign_data_ratios[*]}})
distance_regularizers=(${DISTANCE_REGULARIZERS:-${distance_regularizers[*]}})
lora_ranks=(${LORA_RANKS:-none})
batch_size=${BATCH_SIZE:-$batch_size}
extra_args=(${EXTRA_ARGS:-})
eval_args=(${EVAL_ARGS:-$eval_args})
RESULT_PATH=${RESULT_PATH:-results}
FIG_DIR=${FIG_DIR:-fig}

# Models: family × size, or MODEL_PATHS (local folders or hub ids) instead.
models=() model_tags=()
if [[ -n ${MODEL_PATHS:-} ]]; then
  for path in $MODEL_PATHS; do models+=("--model_path $path") model_tags+=("$(basename "$path")"); done
else
  for family in "${model_families[@]}"; do
    for size in "${model_sizes[@]}"; do
      models+=("--model_family $family --model_size $size") model_tags+=("$family-$size")
    done
  done
fi
for augment in "${use_prompt_augmentation[@]}"; do
  if [[ $augment != true && $augment != false ]]; then
    echo "error: USE_PROMPT_AUGMENTATION takes true/false values, got '$augment'" >&2 && exit 2
  fi
done

# ------------------------------------------------------------------------------- GPUs and the launcher
# d = ranks per node. GPUS picks which GPUs of this machine (deepspeed --include localhost:$GPUS); without it
# deepspeed --num_gpus=$d takes the first d. Without GPUs, DeepSpeed runs d CPU ranks (no --include then).
# DeepSpeed ignores CUDA_VISIBLE_DEVICES once it is given --num_gpus, so a CUDA_VISIBLE_DEVICES list becomes GPUS.
gpu_count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
GPUS=${GPUS:-}
if [[ -z $GPUS && -n ${CUDA_VISIBLE_DEVICES:-} ]] && ((gpu_count > 0)); then GPUS=$CUDA_VISIBLE_DEVICES; fi
if [[ -n $GPUS ]]; then
  d=$(($(tr -cd ',' <<<"$GPUS" | wc -c) + 1))
else
  d=${NUM_GPUS:-$((gpu_count > 0 ? gpu_count : 1))}
fi
LAUNCHER=${LAUNCHER:-deepspeed}
NODE_RANK=${NODE_RANK:-}
LOG_DIR=$RESULT_PATH/sweep_logs
case $LAUNCHER in
python)
  launch=(python)
  if [[ -n $NODE_RANK ]]; then echo "error: NODE_RANK (several nodes) needs LAUNCHER=deepspeed" >&2 && exit 2; fi
  ;;
deepspeed)
  launch=(deepspeed --master_port "${MASTER_PORT:-29500}")
  if [[ -n $NODE_RANK ]]; then # one command per node, no ssh: DeepSpeed needs a hostfile only to count the ranks
    if [[ -z ${MASTER_ADDR:-} ]]; then echo "error: NODE_RANK needs MASTER_ADDR (node 0's address)" >&2 && exit 2; fi
    hostfile=${HOSTFILE:-}
    if [[ -n $hostfile && -n ${INCLUDE:-} ]]; then launch+=(--include "$INCLUDE"); fi
    if [[ -z $hostfile ]]; then
      if [[ ! ${NUM_NODES:-} =~ ^[1-9][0-9]*$ || ! $NODE_RANK =~ ^[0-9]+$ ]] || ((NODE_RANK >= NUM_NODES)); then
        echo "error: NODE_RANK needs NUM_NODES (or HOSTFILE), with 0 <= NODE_RANK < NUM_NODES" >&2 && exit 2
      fi
      mkdir -p "$LOG_DIR"
      # node-<n> are names only (nothing connects to them); with GPUS every node uses those GPU ids
      hostfile=$LOG_DIR/hostfile-node$NODE_RANK include="" slots=$d
      if [[ -n $GPUS ]]; then slots=$gpu_count; fi
      for ((n = 0; n < NUM_NODES; n++)); do
        echo "node-$n slots=$slots" && include+=${include:+@}node-$n:$GPUS
      done >"$hostfile"
      if [[ -n $GPUS ]]; then launch+=(--include "$include"); fi
    fi
    launch+=(--hostfile "$hostfile" --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
  elif [[ -n ${HOSTFILE:-} ]]; then
    launch+=(--hostfile "$HOSTFILE")
    if [[ -n ${INCLUDE:-} ]]; then launch+=(--include "$INCLUDE"); fi
    if [[ -n ${NUM_NODES:-} ]]; then launch+=(--num_nodes "$NUM_NODES"); fi
    if [[ -n ${NUM_GPUS:-} && -z ${INCLUDE:-} ]]; then launch+=(--num_gpus "$NUM_GPUS"); fi
  elif [[ -n $GPUS ]]; then
    if ((gpu_count == 0)); then echo "error: GPUS=$GPUS but this machine has no GPU" >&2 && exit 2; fi
    launch+=(--include "localhost:$GPUS")
  else
    launch+=(--num_gpus "$d")
  fi
  ;;
*) echo "error: LAUNCHER must be deepspeed or python, got '$LAUNCHER'" >&2 && exit 2 ;;
esac
# Evaluation runs in one process on one GPU: the first selected one.
eval_env=()
if [[ -n $GPUS ]]; then eval_env=(CUDA_VISIBLE_DEVICES="${GPUS%%,*}"); fi

mkdir -p "$LOG_DIR"
MANIFEST=$LOG_DIR/sweep-$(date +%Y%m%d-%H%M%S)-$$.jsonl
total=$((${#models[@]} * ${#max_key_lengths[@]} * ${#max_response_lengths[@]} * ${#fingerprint_generation_strategies[@]} * ${#learning_rates[@]} * ${#forgetting_regularizer_strengths[@]} * ${#max_num_fingerprints[@]} * ${#use_prompt_augmentation[@]} * ${#epochs[@]} * ${#benign_data_ratios[@]} * ${#distance_regularizers[@]} * ${#lora_ranks[@]}))
echo "sweep: $total points, launcher: ${launch[*]}, results: $RESULT_PATH, logs: $LOG_DIR"

# ------------------------------------------------------------------------------------------ one point
count=0
run_point() { # $1: the point's name; the rest: the arguments training and evaluation share
  local name=$1 hash="" train="not run" eval="not run" start=$SECONDS
  shift
  local log=$LOG_DIR/$name${NODE_RANK:+.node$NODE_RANK}.log
  count=$((count + 1))
  echo "[$count/$total] $name (log: $log)"
  echo "===== $(date '+%F %T') $name: $*" >>"$log"
  if hash=$(python -m oml.lab.sweep prepare -- "$@" 2>>"$log"); then
    if [[ -d $RESULT_PATH/$hash/final_model ]]; then
      train=reused
      echo "skip training: $RESULT_PATH/$hash/final_model exists" >>"$log"
    elif "${launch[@]}" "$here/finetune_multigpu.py" "$@" >>"$log" 2>&1; then
      train=done
    else
      train=failed
    fi
  fi
  if [[ $train == done || $train == reused ]]; then
    if [[ ${NODE_RANK:-0} != 0 ]]; then
      echo "evaluation: on node 0" >>"$log"
    elif [[ -f $RESULT_PATH/$hash/eval_results.json && -z ${REDO_EVAL:-} ]]; then
      eval=reused
      echo "skip evaluation: $RESULT_PATH/$hash/eval_results.json exists" >>"$log"
    elif env "${eval_env[@]}" python "$here/eval_for_multigpu.py" "$@" "${eval_args[@]}" >>"$log" 2>&1; then
      eval=done
    else
      eval=failed
    fi
  fi
  echo "    run ${hash:-?}: training $train, evaluation $eval ($((SECONDS - start)) s)"
  if [[ $train == failed || $train == "not run" || $eval == failed ]]; then tail -n 2 "$log" | sed 's/^/    | /'; fi
  python -m oml.lab.sweep record --manifest "$MANIFEST" --name "$name" --hash "$hash" --train "$train" --eval "$eval" \
    --log "$log" -- "$@"
}

# ------------------------------------------------------------------------------------------- the sweep
for m in "${!models[@]}"; do
for key_length in "${max_key_lengths[@]}"; do
for response_length in "${max_response_lengths[@]}"; do
for strategy in "${fingerprint_generation_strategies[@]}"; do
for lr in "${learning_rates[@]}"; do
for lambda in "${forgetting_regularizer_strengths[@]}"; do
for num in "${max_num_fingerprints[@]}"; do
for augment in "${use_prompt_augmentation[@]}"; do
for epoch in "${epochs[@]}"; do
for beta in "${benign_data_ratios[@]}"; do
for mu in "${distance_regularizers[@]}"; do
for lora in "${lora_ranks[@]}"; do
  args=(${models[m]} --max_key_length "$key_length" --max_response_length "$response_length"
    --fingerprint_generation_strategy "$strategy" --learning_rate "$lr" --forgetting_regularizer_strength "$lambda"
    --max_num_fingerprints "$num" --num_train_epochs "$epoch" --batch_size "$batch_size" --preset "$PRESET"
    --result_path "$RESULT_PATH" "${extra_args[@]}")
  if [[ $augment == true ]]; then args+=(--use_prompt_augmentation); fi
  # a mitigation names a point only when it differs from the preset, so older points keep their names
  mitigations=""
  if [[ $beta != "$preset_beta" ]]; then args+=(--benign_data_ratio "$beta") mitigations+="_beta$beta"; fi
  if [[ $mu != "$preset_mu" ]]; then args+=(--distance_regularizer "$mu") mitigations+="_mu$mu"; fi
  if [[ $lora != none ]]; then args+=(--lora_rank "$lora") mitigations+="_lora$lora"; fi
  run_point "${model_tags[m]}_${strategy}_n${num}_k${key_length}_r${response_length}_lr${lr}_lam${lambda}_aug-${augment}_ep${epoch}_bs${batch_size}$mitigations" "${args[@]}"
done; done; done; done; done; done; done; done; done; done; done; done

# ----------------------------------------------------------------------------------- summary and figures
echo
if [[ ${NODE_RANK:-0} != 0 ]]; then # node 0 evaluates and summarises
  failed=$(grep -c '"train": "failed"' "$MANIFEST")
  echo "node $NODE_RANK: $count points, $failed failed in training; node 0 evaluates and writes the summary"
  exit $((failed > 0))
fi
python -m oml.lab.sweep summary --results "$RESULT_PATH" --manifest "$MANIFEST"
status=$?
python -m oml.lab.figures --results "$RESULT_PATH" --out "$FIG_DIR" || status=1
exit $status
