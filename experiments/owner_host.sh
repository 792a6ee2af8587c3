#!/usr/bin/env bash
# Issue 30 in the owner's setting: the owner fingerprints their own fine-tune of a public model, and the adaptive
# host holds only that public model. Base detection then compares the served model with the public one, which differs
# from it everywhere, not only at the keys (for a model that is the public base plus fingerprints it cannot lose).
#   owner model   the recipe search's p256-l0-b25-kl4 (record 842f1be42371ee6a, trained from the embedded model;
#                 retrained from its record when results/recipe_search/ lacks it): a stand-in for a product fine-tune
#   keys          near-tie responses chosen on the owner's model (generated_data/fingerprints-neartie-owner-1024.json,
#                 committed: its content is in every hash; made here when missing)
#   run           the least-change defence (POINT below, its flags from the search's POINTS) trained from the
#                 owner's model, judged by the search's screening evaluation;
#                 record experiments/records/owner_host/<hash>.json
#   study         python -m oml.lab.host_study run/roc with --public_base: the hosts that decided the base+fingerprints
#                 case, verdicts through the served API; record experiments/records/adaptive_host/<hash>.json
#   bash experiments/owner_host.sh                        # ~1.5 h on one core; rerunning resumes from what exists
#   HOSTS=none,base-kl-fpr0.01 bash experiments/owner_host.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OWNER_RECORD=experiments/records/recipe_search/842f1be42371ee6a.json
OWNER=results/recipe_search/842f1be42371ee6a/final_model # relative: the run hash digests the path as written
PUBLIC=embedded:SmolLM2-135M-Instruct
KEYS=generated_data/fingerprints-neartie-owner-1024.json
HOSTS=${HOSTS:-none,confidence-0.8-first,base-kl-fpr0.01,base-kl-fpr0.05,base-ratio-fpr0.05}

[[ -d $OWNER ]] || python -m oml.lab.records retrain "$OWNER_RECORD" --result_path results/recipe_search
[[ -f $KEYS ]] || python generate_finetuning_data.py --key_response_strategy perinucleus --response_length 1 \
  --keys_file generated_data/fingerprints-english-1024.json --key_length 16 --nucleus_p 0.01 --nucleus_k 1 \
  --min_response_ratio 0.4 --inverse_nucleus_model "$OWNER" --output_file_path "$KEYS"
POINT=t256-l0-b25-kl4-lr1e-5-edit0.5-e6 # the least-change defence of the search (oml/lab/recipe_search.py)
read -ra FLAGS <<<"$(python -m oml.lab.recipe_search flags --only "^$POINT\$")"
RUN=("${FLAGS[@]}" --model_path "$OWNER" --fingerprints_file_path "$KEYS" --result_path results/owner_host)
SCREENING=$(python -c "import shlex; from oml.lab.recipe_search import SCREENING_EVAL; print(shlex.join(SCREENING_EVAL))")
hash=$(train "${RUN[@]}")
if [[ ! -f results/owner_host/$hash/eval_results.json ]]; then
  # shellcheck disable=SC2086 # SCREENING is a list of words
  python eval_for_multigpu.py "${RUN[@]}" $SCREENING
fi
[[ -f experiments/records/owner_host/$hash.json ]] || python -m oml.lab.records record "results/owner_host/$hash" \
  --experiment owner_host --eval_flags "$SCREENING" --point owner-t256-edit0.5-e6 \
  --why "the least-change defence trained from the owner's own model (842f), near-tie keys chosen on it"
python -m oml.lab.host_study run "${RUN[@]}" --public_base "$PUBLIC" --point owner-t256-edit0.5-e6 --hosts "$HOSTS" \
  --attack_flags "--host_questions 50"
python -m oml.lab.host_study roc "${RUN[@]}" --public_base "$PUBLIC"
python -m oml.lab.host_study table --markdown | grep -F owner-t256
