# Settings shared by the experiment drivers (sourced, not run). Every point goes through launch_multigpu.sh,
# so each one is a normal results/<hash> run and rerunning a driver resumes where it stopped.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
if [[ -z ${VIRTUAL_ENV:-} && -f .venv/bin/activate ]]; then source .venv/bin/activate; fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# One process per point: on a CPU the DeepSpeed launcher adds start-up time and changes nothing (same hash).
export LAUNCHER=${LAUNCHER:-python}
# The experiments' point (PRESET=embedded, keys of 16 tokens, one-token responses, BATCH_SIZE 8) and EVAL_ARGS, the
# resolving evaluation: every item of the four validation sets (299/570/1267/1838), the same for every run and for the
# base model, so deltas are paired and their standard error is about 0.57x that of 200 items per task; --measure full:
# the generative benchmark, chat drift (200 questions each) and the match probabilities too. Both are recipes of
# oml/core/recipes.py (EXPERIMENTS, EVALUATIONS["resolving"]); BATCH_SIZE, UTILITY_LIMIT and UTILITY_TASKS may be
# set. Learning rates: each driver sets its own.
settings=$(python -m oml.lab.sweep experiments-env) || exit 2
eval "$settings"

# train ARGS...: train the run these flags name unless it exists (its log goes to stderr); prints its hash.
train() {
  python finetune_multigpu.py "$@" | tee /dev/stderr | awk '/Config hash/ {print $NF}'
}

# sweep NAME VAR=VALUE...: one launch_multigpu.sh sweep with these grid variables; figures into the results folder.
sweep() {
  local name=$1
  shift
  echo "=== $(date '+%F %T') $name"
  env "$@" FIG_DIR="$RESULT_PATH/fig" bash launch_multigpu.sh || echo "($name: some points did not finish; see above)"
}

# finish FIGURE: the table of every run in RESULT_PATH, and FIGURE (scalability or robustness) copied into fig/.
finish() {
  python -m oml.lab.sweep summary --results "$RESULT_PATH" || true
  python -m oml.lab.figures --results "$RESULT_PATH" --out "$RESULT_PATH/fig"
  cp "$RESULT_PATH/fig/$1.png" "fig/$1.png"
  echo "wrote fig/$1.png and $RESULT_PATH/sweep_summary.md"
}
