#!/usr/bin/env bash
# The GPU path in one go, on a machine with a CUDA GPU (about 9 minutes on one H200):
#   1. verification speed on the embedded model: the per-pair generate loop against the batched teacher-forced
#      pass (bench/bench_verify.py --device cuda), bf16 and fp32, 1-token and 8-token responses;
#   2. the default sweep (the grid of `make run`) trained with DeepSpeed ZeRO-2 in bf16 on one GPU, evaluated
#      without utility (fingerprints, base false positives, chat check);
#   3. each model of that sweep checked again with one model.generate per pair (--verify_with_generate), and
#      the per-template accuracies of both verifiers printed side by side.
# Each step has a time limit and a failed step does not stop the others; the exit status says whether all ran.
#   bash bench/gpu_check.sh                      # logs in results/gpu_check/
#   OUT=/tmp/check RESULT_PATH=/tmp/runs bash bench/gpu_check.sh
#   DEVICE=cpu BENCH_ARGS="--num_fingerprints 4" EPOCHS=1 bash bench/gpu_check.sh   # a dry run of the script
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -z ${VIRTUAL_ENV:-} && -f .venv/bin/activate ]]; then source .venv/bin/activate; fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-results/gpu_check}
export RESULT_PATH=${RESULT_PATH:-$out/runs} FIG_DIR=${FIG_DIR:-$out/fig}
mkdir -p "$out" "$RESULT_PATH"
failed=0

step() { # $1: log name, $2: time limit in seconds, then the command
  local name=$1 limit=$2
  shift 2
  echo "===== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "===== $name: exit $rc"
  if ((rc != 0)); then failed=1; fi
}

device=${DEVICE:-cuda}
bench=(python bench/bench_verify.py --device "$device" ${BENCH_ARGS:-})
step env 60 bash -c 'nvidia-smi -L; python -c "import torch, transformers, deepspeed as d; print(torch.__version__,
  torch.version.cuda, transformers.__version__, d.__version__)"'
step verify_bf16 240 "${bench[@]}" --dtype bfloat16
step verify_fp32 240 "${bench[@]}" --dtype float32
step sweep 900 env EVAL_ARGS="--utility_benchmark none" bash launch_multigpu.sh

compare_verifiers() {
  for run in "$RESULT_PATH"/*/eval_results.json; do
    local dir
    dir=$(dirname "$run")
    python eval_for_multigpu.py --check_model "$dir/final_model" --fingerprints_file_path "$dir/fingerprints.json" \
      --verify_with_generate --utility_benchmark none --skip_base_model --output_file "$dir/eval_generate.json" \
      >/dev/null || return 1
    python - "$run" "$dir/eval_generate.json" <<'EOF'
import json, sys
fast, slow = (json.load(open(p))["fingerprint_accuracy"] for p in sys.argv[1:])
print(f"{sys.argv[1]}\n{'template':<50}{'teacher forced':>16}{'generate':>10}")
for a, b in zip(fast["templates"], slow["templates"], strict=True):
    print(f"{a['template'][:48]!r:<50}{a['accuracy']:>16.3f}{b['accuracy']:>10.3f}")
print(f"{'mean':<50}{fast['mean_accuracy']:>16.3f}{slow['mean_accuracy']:>10.3f}")
EOF
  done
}
export -f compare_verifiers
step verifiers 300 bash -c compare_verifiers
step verify_bf16_8tok 300 "${bench[@]}" --dtype bfloat16 --response_tokens 8
step verify_fp32_8tok 300 "${bench[@]}" --dtype float32 --response_tokens 8
exit $failed
