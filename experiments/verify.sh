#!/usr/bin/env bash
# Is this deployed model mine? (issue 16) The persistence driver's run (NUM fingerprints, and its second owner on the
# next NUM) checked through a real OpenAI-compatible server on 127.0.0.1, CHECKS times per suspect:
#   ours    the run as GGUF Q4_K_M (made by attack_fingerprints.py --attack quantize), served by llama.cpp
#   base    the base model exported the same way (must come out "not shown")
#   other   a copy fingerprinted with other keys, exported the same way (must come out "not shown"): by default the
#           persistence driver's second owner (the next NUM fingerprints); OTHER_ARGS names another run, e.g.
#           OTHER_ARGS="--fingerprint_generation_strategy random_word --max_num_fingerprints 32" (trained if missing)
# p0 is measured first (base model and the second owner's copy as references), then bench/bench_check.py times the
# server and simulates 100 checks from the measured per-key outcomes.
#   bash experiments/persistence.sh && bash experiments/verify.sh     # NUM=32 for a small version
# Writes results/persistence/verify/ (verdict JSONs, server logs, bench output) and prints the table.
set -uo pipefail
source "$(dirname "$0")/common.sh"
export RESULT_PATH=${RESULT_PATH:-results/persistence}
NUM=${NUM:-256}
CHECKS=${CHECKS:-5}
PORT=${PORT:-8765}
out=$RESULT_PATH/verify
mkdir -p "$out"
read -r -a run_args <<<"--max_num_fingerprints $NUM --result_path $RESULT_PATH ${RUN_ARGS:-}"
step() { echo "=== $(date '+%F %T') $*"; }

run=$(train "${run_args[@]}")
read -r -a other_args <<<"${OTHER_ARGS:---data_split 1}"
other=$(train "${run_args[@]}" "${other_args[@]}")
[[ -n $run && -n $other ]] || { echo "error: run the persistence driver first (no run for NUM=$NUM)"; exit 2; }
ours=$RESULT_PATH/$run/attacks/quantize-q4_k_m/model.gguf
[[ -f $ours ]] || python attack_fingerprints.py "${run_args[@]}" --attack quantize --quantization q4_k_m \
  --utility_benchmark none || exit 1
base_dir=$(python -c "from oml.core.model_registry import resolve_model; print(resolve_model('smollm2', '135M-Instruct'))")
[[ -f $out/base-q4_k_m.gguf ]] || python -m oml.attack.gguf_models export "$base_dir" "$out/base-q4_k_m.gguf" q4_k_m || exit 1
[[ -f $out/other-q4_k_m.gguf ]] ||
  python -m oml.attack.gguf_models export "$RESULT_PATH/$other/final_model" "$out/other-q4_k_m.gguf" q4_k_m || exit 1

if [[ ! -f $RESULT_PATH/$run/reference_match_rates.json ]]; then
  step "p0 on the base model and the second owner's copy"
  python check_fingerprints.py "${run_args[@]}" --measure_p0 --reference_models base "$RESULT_PATH/$other" \
    --reference_pairs 200 || exit 1
fi

# serve NAME GGUF: llama.cpp's server on 127.0.0.1 for CHECKS checks, then stopped
serve() {
  local name=$1 gguf=$2 pid
  step "$name: $CHECKS checks of $gguf"
  python -m oml.attack.gguf_models serve --model "$gguf" --host 127.0.0.1 --port "$PORT" --model_alias suspect \
    >"$out/$name-server.log" 2>&1 &
  pid=$!
  for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null && break; sleep 1; done
  for i in $(seq "$CHECKS"); do
    python check_fingerprints.py --run "$run" --result_path "$RESULT_PATH" --api_base "http://127.0.0.1:$PORT/v1" \
      --api_model suspect --output_file "$out/$name-$i.json" || echo "($name check $i failed)"
  done
  kill "$pid"
  wait "$pid" 2>/dev/null
}
export OPENAI_API_KEY=${OPENAI_API_KEY:-local}
serve ours "$ours"
serve base "$out/base-q4_k_m.gguf"
serve other "$out/other-q4_k_m.gguf"

step "bench: keys per second and simulated checks"
python bench/bench_check.py --run "$run" --result_path "$RESULT_PATH" --serve "$ours" | tee "$out/bench_check.txt"

python - "$out" "$RESULT_PATH/$run/revealed_keys.jsonl" <<'EOF'
import collections, json, pathlib, sys
out, ledger = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
print("| suspect | checks | verdicts | keys revealed | matches | p-values |\n|---|---|---|---|---|---|")
for name in ("ours", "base", "other"):
    rows = [json.loads(p.read_text()) for p in sorted(out.glob(f"{name}-[0-9]*.json"))]
    verdicts = collections.Counter(r["verdict"] for r in rows)
    print(f"| {name} | {len(rows)} | {dict(verdicts)} | {[r['keys_revealed'] for r in rows]} | "
          f"{[r['matches'] for r in rows]} | {[format(r['p_value'], '.2g') for r in rows]} |")
sent = [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]
indices = collections.Counter(e["key_index"] for e in sent if e.get("outcome") == "sent")
print(f"ledger: {len(indices)} keys revealed, {sum(c > 1 for c in indices.values())} revealed twice")
EOF
