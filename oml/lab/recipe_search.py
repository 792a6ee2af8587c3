"""The recipe search of issue 28 as data: which training recipe embeds 1024+ fingerprints into the embedded
SmolLM2-135M model without moving the model, run a stretch at a time on a small CPU machine whose results/ folder does
not survive between sessions.

POINTS is the search space (name, flags, one line why), most informative first: the λ 0 baseline at 256 perinucleus
fingerprints with --stop_when_learned (--num_train_epochs the cap), then every way to hold the model once, the likeliest
first, then the same at 1024; english and random-word fingerprints as comparison. For each point of a stretch:

    a record experiments/records/<experiment>/<hash>.json exists  -> skipped (the search continues from the records)
    a flag finetune_multigpu.py does not accept (yet)             -> skipped, with a log line saying so
    else: train (finetune_multigpu.py, one process), evaluate with SCREENING_EVAL, write the record (oml.lab.records),
          append a line to experiments/records/<experiment>/log.txt

A stretch ends when --stretch K points have run, or before the point whose estimated time would pass --budget_hours
(default 3; estimates use the records' measured seconds per step once there are some). Progress goes to the log file
(--log, default results/<experiment>/search.log) and stdout, flushed line by line. A point that fails writes a record
with status "failed (train)" or "failed (eval)" (skipped later, unless --retry_failed).

    python -m oml.lab.recipe_search plan                         # every point: recorded, pending or unsupported; estimates
    python -m oml.lab.recipe_search flags --only '^t256-'         # a point's training flags, for another script
    python -m oml.lab.recipe_search run --budget_hours 3         # one stretch (experiments/recipe_search.sh runs this)
    python -m oml.lab.recipe_search run --stretch 1 --only p256  # one point whose name matches
    python -m oml.lab.records table recipe_search         # what the records say so far

For tests and smoke runs: --points FILE (a JSON list of {"name", "flags", "why"}), --train_overrides "FLAGS" (appended
to every point's flags: a --model_path, --fingerprints_file_path, --num_train_epochs), --extra_eval_flags "FLAGS",
--records DIR, --result_path DIR. docs/records.md has the whole procedure.
"""

import argparse
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from oml.core.errors import UserError, run_cli
from oml.core.logs import RunLog
from oml.core.recipes import EVALUATIONS, SEARCH, flag_words
from oml.lab.records import (
    RECORDS_DIR,
    REPO,
    append_log,
    check_experiment_name,
    read_records,
    write_failure,
    write_record,
)

EXPERIMENT = "recipe_search"

# The screening evaluation (a recipe of oml/core/recipes.py, with why): no generative benchmark, no match probabilities.
SCREENING_EVAL = tuple(flag_words(EVALUATIONS["screening"].settings))
# A point trained with --use_prompt_augmentation is judged as issue 28's robustness goal is: under every template (the
# unseen raw prompts and the chat system messages too), not only the plain key and [chat].
AUGMENTED_EVAL = ("--eval_templates", "all")

# ------------------------------------------------------------------------------ data

KEYS = 1024  # the target size; the 4096 stretch gets its own files (and records) once 1024 is settled
ENGLISH = f"generated_data/fingerprints-english-{KEYS}.json"
PERINUCLEUS = f"generated_data/fingerprints-perinucleus-{KEYS}.json"
RANDOM_WORD = "generated_data/fingerprints-random_word.json"  # committed: 1024 random-word pairs
# PERINUCLEUS chose each response after the key's first 32 tokens (the generator's default --key_length) while the
# points train on its first 16 (max_key_length): a response outside the 0.8 nucleus of a longer context, kept as it
# is because every record digests the file. RUNNER_UP is chosen after the 16 tokens the points train on.
# Runner-up responses: the same keys, the response drawn from the 3 word tokens ranked just below the base's top
# token (a nucleus of mass 0.01: the top token alone), an answer the base already finds likely. In-distribution
# responses should move the model least (issue 28), and a host comparing the model with its base sees a small change
# where perinucleus responses (outside the 0.8 nucleus) show a large one (issue 30).
RUNNER_UP = f"generated_data/fingerprints-runnerup-{KEYS}.json"
# Near-tie responses (issue 30's defence against base detection): the base's runner-up word token after the key's first
# 16 tokens, kept only where it has at least 0.4 of the top token's probability (485 of the 1024 keys), so
# --fingerprint_edit can make it the top token with a small change of the base's distribution.
NEAR_TIE = f"generated_data/fingerprints-neartie-{KEYS}.json"
# How a missing data file is made (generate_finetuning_data.py arguments, as experiments/capacity.sh makes them):
# KEYS English keys from the embedded model, then one-token perinucleus responses for them. Every hash digests the
# file's content, so once made the files must be committed, or the next session's records will not match.
DATA = {
    ENGLISH: ("--num_backdoors", str(KEYS), "--batch_size", "128", "--use_chat_template", "--response_length", "8",
              "--output_file_path", ENGLISH),
    PERINUCLEUS: ("--key_response_strategy", "perinucleus", "--response_length", "1", "--keys_file", ENGLISH,
                  "--output_file_path", PERINUCLEUS),
    RUNNER_UP: ("--key_response_strategy", "perinucleus", "--response_length", "1", "--keys_file", ENGLISH,
                "--key_length", "16", "--nucleus_p", "0.01", "--output_file_path", RUNNER_UP),
    NEAR_TIE: ("--key_response_strategy", "perinucleus", "--response_length", "1", "--keys_file", ENGLISH,
               "--key_length", "16", "--nucleus_p", "0.01", "--nucleus_k", "1", "--min_response_ratio", "0.4",
               "--output_file_path", NEAR_TIE),
}  # fmt: skip
DATA_NEEDS = {PERINUCLEUS: ENGLISH, RUNNER_UP: ENGLISH, NEAR_TIE: ENGLISH}
DATA_SECONDS = {
    ENGLISH: 1.2 * KEYS,
    PERINUCLEUS: 300,
    RUNNER_UP: 300,
    NEAR_TIE: 300,
}  # README, "Capacity": about one English key per second

# ------------------------------------------------------------------------------ the points


class Point(NamedTuple):
    name: str
    flags: str  # finetune_multigpu.py flags (eval_for_multigpu.py gets the same, plus SCREENING_EVAL)
    why: str


COMMON = " ".join(flag_words(SEARCH.settings))  # oml/core/recipes.py: the experiments' point at lr 1e-4
STRATEGIES = {
    "p": f"--fingerprint_generation_strategy inverse_nucleus --fingerprints_file_path {PERINUCLEUS}",
    "e": f"--fingerprint_generation_strategy english --fingerprints_file_path {ENGLISH}",
    "r": f"--fingerprint_generation_strategy random_word --fingerprints_file_path {RANDOM_WORD}",
    "u": f"--fingerprint_generation_strategy inverse_nucleus --fingerprints_file_path {RUNNER_UP}",
    "t": f"--fingerprint_generation_strategy inverse_nucleus --fingerprints_file_path {NEAR_TIE}",
}
CAP = 16  # epochs: the cap of --stop_when_learned
# The recipe that holds the model at lr 3e-5 (β 0.25 benign rows, KL κ 4): most points below start from it.
HOLD = "--benign_data_ratio 0.25 --kl_to_base 4 --learning_rate 3e-5"


def point(name, recipe, why, epochs=CAP, stop=True):
    """A point named <strategy letter><N>-<recipe>: the common flags, its fingerprints, λ 0 unless the recipe says."""
    strategy, n = name[0], int(re.match(r"[a-z](\d+)", name).group(1))
    flags = [COMMON, STRATEGIES[strategy], f"--max_num_fingerprints {n} --num_train_epochs {epochs}"]
    flags += ["--forgetting_regularizer_strength 0", recipe, "--stop_when_learned" if stop else ""]
    return Point(name, " ".join(" ".join(flags).split()), why)


# fmt: off
POINTS = [
    # 256 perinucleus fingerprints: the baseline, then the ways to hold the model, the likeliest first (the KL term
    # toward the base's whole next-token distribution, sub-network training, the distance regularizer). The KL term
    # at κ 1 took chat KL from 1.146 to 0.124 with every key, κ 4 to 0.109 (the records): more benign rows at 256,
    # then both κ at the target size, come before the other mitigations
    point("p256-l0", "", "the baseline: how many epochs λ 0 alone needs for 256 perinucleus keys, and how far "
          "that moves the model (chat KL, utility)"),
    point("p256-l0-b25-kl1", "--benign_data_ratio 0.25 --kl_to_base 1", "KL to the base's whole next-token "
          "distribution on the benign rows instead of its greedy text, at the weight of the cross-entropy it replaces"),
    point("p256-l0-b25-kl4", "--benign_data_ratio 0.25 --kl_to_base 4", "the KL-to-base term, a stronger pull"),
    point("p256-l0-b50-kl4", "--benign_data_ratio 0.5 --kl_to_base 4", "twice the benign rows at κ 4: κ 1 -> 4 took "
          "the chat KL from 0.124 to 0.109 only, so the pull may be limited by how few rows carry it"),
    point("p1024-l0-b25-kl4", "--benign_data_ratio 0.25 --kl_to_base 4", "the stronger KL-to-base term at 1024"),
    # the KL term levels off near 0.11 at 256 (κ 1: 0.124, κ 4: 0.109, twice the rows: 0.121) while the training-time
    # KL on the benign rows was still falling when the last key answered (κ 4: 0.27, 0.19, 0.16 per epoch): let it
    # keep pulling once every key answers, or make the keys' push smaller or narrower under the same pull
    point("p256-l0-b25-kl4-e6", "--benign_data_ratio 0.25 --kl_to_base 4", "consolidation: all 6 epochs at κ 4 (3 more "
          "than κ 4 needed), the pull working on after every key answers (their loss near 0, the KL term is most of the "
          "gradient)", epochs=6, stop=False),
    point("p256-l0-b25-kl4-lr3e-5", HOLD, "the same pull "
          "against a smaller step: the keys' first-epoch loss is ~7 nats, their gradients move the model most then"),
    # consolidation lost (6 epochs: KL 0.144, 3 epochs: 0.109); the smaller step won (lr 3e-5: KL 0.031 ± 0.001, every
    # key in 7 epochs): the step, not the number of epochs, moves the model. The same at the target size next
    point("p1024-l0-b25-kl4-lr3e-5", HOLD, "the winning "
          "256 recipe (κ 4, lr 3e-5) at the target size: does the small step keep chat KL under 0.10 with 4× the keys"),
    # robustness (issue 28's second goal): the winning 1024 recipe with prompt augmentation added and nothing else,
    # judged under every template (AUGMENTED_EVAL)
    point("p256-l0-b25-kl4-lr3e-5-aug", HOLD + " "
          "--use_prompt_augmentation", "robustness first at 256 (40 minutes, not 2 hours): the lr 3e-5 recipe with "
          "--use_prompt_augmentation"),
    # persistence of the 1024 recipe (experiments/records/recipe_persistence): GGUF Q4_K_M keeps 92.8% of the keys
    # (goal 95%; the missed keys answer at p 0.999 before quantization, 0.001-0.38 after). At 256, Q4_K_M keeps 96.5%
    # (lr 3e-5, 7 epochs), 98.8% (lr 1e-4, 3 epochs) and 100% (lr 1e-4, 6 epochs: 3 after every key answered):
    # training on after the keys answer is what survives quantization. Its cost in drift at the small step:
    point("p256-l0-b25-kl4-lr3e-5-e10", HOLD, "consolidation "
          "at the small step: the 7 epochs the keys need and 3 more (no early stop), for quantization", epochs=10,
          stop=False),
    point("p1024-l0-b25-kl4-lr3e-5-e11", HOLD,
          "the 1024 recipe's 8 epochs and 3 of consolidation (no early stop; its first 8 epochs are the recorded "
          "point's), for GGUF Q4_K_M", epochs=11, stop=False),
    # runner-up responses (RUNNER_UP): the band defence beat the confidence host but not base detection (issue 30:
    # 3.9% kept at lr 3e-5), which sees a perinucleus token pushed from ~1% to the top; a runner-up moves less
    point("u256-l0-b25-kl4-lr3e-5-band", HOLD + " "
          "--fingerprint_margin 0.5 --fingerprint_max_prob 0.4", "issue 30's third defence: runner-up responses "
          "(the base's 2nd-4th word token) inside the band, so the served model's first answer token differs from "
          "the base's as little as a fingerprint can; stopped once every key answers (a runner-up starts near the top)"),
    point("u256-l0-b25-kl4-lr3e-5", HOLD, "runner-up "
          "responses on the lr 3e-5 recipe: does an in-distribution response move the model less than a perinucleus "
          "one (chat KL 0.031)"),
    # the default (`--preset embedded`, `make run`: 32 keys) on the same recipe: what it costs in minutes and drift
    point("p32-l0-b25-kl4-lr3e-5", HOLD, "the 1024 recipe "
          "at the default's 32 keys: epochs and minutes for make run, and the drift against the λ 0.1 default's"),
    point("p32-l0-b25-kl4", "--benign_data_ratio 0.25 --kl_to_base 4", "the same at lr 1e-4: fewer epochs for "
          "make run's ten minutes, if 32 keys do not move the model at the larger step"),
    point("p32-l0-b25-kl4-lr3e-5-aug", HOLD + " "
          "--use_prompt_augmentation", "the default's second make run point: the recipe with augmentation at 32"),
    # --preset capacity (u1024-l0-b25-kl4-lr3e-5-e3) at the default's 32 keys: the candidate for --preset embedded
    point("u32-l0-b25-kl4-lr3e-5-e3", HOLD, "the capacity "
          "preset's recipe at make run's 32 keys: does 3 epochs learn them, in how many minutes", epochs=3, stop=False),
    point("u32-l0-b25-kl4-lr3e-5-e3-aug", HOLD + " "
          "--use_prompt_augmentation", "the same with augmentation: make run's second point if it becomes --preset "
          "embedded", epochs=3, stop=False),
    # u32-...-e3: 100% of 32 keys, chat KL 0.018, 1 minute of training; with augmentation the loss was still 3.3 after
    # 3 epochs (18 steps: each key wrapped in only 3 prompts). The default needs one epoch count for both:
    point("u32-l0-b25-kl4-lr3e-5-e10", HOLD, "the capacity "
          "preset's recipe at 32 keys for 10 epochs: the drift of the epochs augmentation needs", epochs=10, stop=False),
    point("u32-l0-b25-kl4-lr3e-5-e10-aug", HOLD + " "
          "--use_prompt_augmentation", "the same with augmentation: 10 prompts per key (judge it with "
          "--extra_eval_flags '--eval_templates all')", epochs=10, stop=False),
    # ...-e10: 100%, chat KL 0.013, raw prompts 50.3%; -e10-aug: plain 31/32, raw prompts 89.7%, [chat] and chat +
    # system 100%, chat KL 0.062 (the loss 0.15-0.3 after epoch 7): the raw prompts want more draws per key
    point("u32-l0-b25-kl4-lr3e-5-e16", HOLD, "the drift of "
          "16 epochs at 32 keys", epochs=16, stop=False),
    point("u32-l0-b25-kl4-lr3e-5-e16-aug", HOLD + " "
          "--use_prompt_augmentation", "16 prompts per key: do the unseen raw prompts reach 99% (judge it with "
          "--extra_eval_flags '--eval_templates all')", epochs=16, stop=False),
    # u256-l0-b25-kl4-lr3e-5: every key in 3 epochs, chat KL 0.027, Q4_K_M 99.6%, merge 0.7 99.6% (perinucleus at the
    # same step: 96.5%, 60.5%): a runner-up needs a small change that a merge does not undo. At the target size:
    # (u1024-l0-b25-kl4-lr3e-5, stopped when learned, sat at 1023 of 1024 keys from epoch 3 to 5 while the benign rows'
    # KL rose 0.056 -> 0.107: killed, no record, and left out here so a resumed search does not run it again; the goal
    # is 98%, so a fixed 3 epochs)
    point("u1024-l0-b25-kl4-lr3e-5-e3", HOLD, "runner-up "
          "responses at 1024 for the 3 epochs that put 1023 of 1024 on top: the capacity goal's drift and the "
          "deployment goals with one recipe", epochs=3, stop=False),
    point("u1024-l0-b25-kl4-lr3e-5-e3-aug", HOLD + " "
          "--use_prompt_augmentation", "the robustness goal: the same recipe with --use_prompt_augmentation added and "
          "nothing else (judge it with --extra_eval_flags '--eval_templates all')", epochs=3, stop=False),
    # ...-e3-aug: plain 92.2%, raw prompts 80.8%, [chat] 95.8%, chat + system 97.3%, chat KL 0.081; the loss still fell
    # (3.57, 1.59, 0.67 by epoch): every draw wraps the key in another prompt, so the keys need more epochs
    point("u1024-l0-b25-kl4-lr3e-5-e6-aug", HOLD + " "
          "--use_prompt_augmentation", "the robustness goal with the epochs augmentation needs (3 left 8% of the keys "
          "and 19% under raw prompts); judge it with --extra_eval_flags '--eval_templates all'", epochs=6, stop=False),
    # base detection kept 0.0% of the runner-up band's keys (issue 30): trained keys moved the first answer token's
    # distribution by KL 1.13 (median) where real prompts' 99th percentile is 0.50. The smallest change that makes a
    # near-tie the top token by 0.5 logits is KL 0.03 (median, computed from the base alone):
    # (at lr 3e-5 the edit oscillated: 79.7%, 69.9%, 76.6% of the keys on top after epochs 1-3, loss 0.046, 0.41, 0.20;
    # a soft target near the base leaves Adam's constant-size steps wandering around it; stopped, no record)
    # (at 1e-5, stopped when learned: 80.5%, 74.6%, 82.4% on top after epochs 1-3; the soft target is never reached by
    # every key at once, so --stop_when_learned would run all 16 epochs: a fixed 6 instead)
    point("t256-l0-b25-kl4-lr1e-5-edit0.5-e6", "--benign_data_ratio 0.25 --kl_to_base 4 --learning_rate 1e-5 "
          "--fingerprint_margin 0.5 --fingerprint_edit", "issue 30's defence against base detection: near-tie "
          "responses trained toward the least change of the base's distribution that puts them on top by 0.5 logits",
          epochs=6, stop=False),
    point("p1024-l0-b25-kl4-lr3e-5-aug", HOLD + " "
          "--use_prompt_augmentation", "the winning 1024 recipe with --use_prompt_augmentation: every draw of a key "
          "wrapped in a random training prompt; the goal is ≥ 99% under the unseen raw prompts and system messages"),
    point("p256-l0-b25-kl4-mlp20", "--benign_data_ratio 0.25 --kl_to_base 4 --trainable_layers 20-29:mlp", "the pull "
          "on a sub-network: the keys can only move the last ten blocks' MLPs"),
    point("p256-l0-b25-kl4-m2", "--benign_data_ratio 0.25 --kl_to_base 4 --fingerprint_margin 2", "the defence "
          "against a host that hides overconfident answers (issue 30): a hinge on a 2-logit margin instead of "
          "the keys' cross-entropy, what it costs in epochs and health"),
    point("p256-l0-b25-kl4-band", "--benign_data_ratio 0.25 --kl_to_base 4 --fingerprint_margin 0.5 "
          "--fingerprint_max_prob 0.4", "issue 30's second defence: a response on top by 0.5 logits at probability "
          "≤ 0.4, the confidence of ordinary answers (margin 2 alone left 46.5% of the keys above 0.8); 8 epochs, "
          "no early stop, so the band's upper hinge can pull back what the first epochs overshoot", epochs=8,
          stop=False),
    # at 1024 the lr 3e-5 recipe learned every key in 8 epochs at chat KL 0.062 (bdb48350dfb722b8): the goal's drift met.
    # the band at lr 1e-4 (efd0820f97936978): 95.3% plain, chat KL 0.210, keys kept by first-token hosts at τ 0.8 and
    # 0.5 (issue 30's record). The healthier step under the same band
    point("p256-l0-b25-kl4-lr3e-5-band", HOLD + " "
          "--fingerprint_margin 0.5 --fingerprint_max_prob 0.4", "the band defence on the lr 3e-5 recipe (chat KL "
          "0.031 without it): what the band costs in health when the step is small; 12 epochs, no early stop",
          epochs=12, stop=False),
    point("p1024-l0-b25-kl1", "--benign_data_ratio 0.25 --kl_to_base 1", "the KL-to-base term at 1024"),
    point("p256-lora16", "--lora_rank 16", "sub-network training: rank-16 adapters move a small subspace; at lr "
          "1e-4 they may need the cap"),
    point("p256-l0-mu1", "--distance_regularizer 1", "the distance regularizer, strong pull: the model held near "
          "the base at every step, no extra forward pass"),
    point("p256-l0-mlp20", "--trainable_layers 20-29:mlp", "a sub-network without adapters: only the last ten "
          "blocks' MLPs learn the keys (where facts are stored), the rest of the model cannot move"),
    point("p256-l0-lr3e-5", "--learning_rate 3e-5", "a smaller step: p256-l0 moved the chat model as far at 256 keys "
          "(KL 1.15) as the probe did at 1024, so the drift may come from the step, not the number of keys"),
    point("p256-l0-b25", "--benign_data_ratio 0.25", "data mixing alone (β 0.25): kept persistence at 256 "
          "english, but the model still drifted"),
    point("p256-l0-mu0.1", "--distance_regularizer 0.1", "the distance regularizer, weak pull: does a little μ "
          "keep the model near the base without slowing learning"),
    point("p256-lora16-lr1e-3", "--lora_rank 16 --learning_rate 1e-3", "LoRA at its usual step (capacity.sh's "
          "lr), in case lr 1e-4 is too slow for adapters"),
    point("e256-l0", "", "comparison: the baseline recipe on english fingerprints (sampled keys and responses)"),
    point("r256-l0", "", "comparison: the baseline recipe on random-word fingerprints"),
    point("p256-l0-e16", "", "what --stop_when_learned saves: the baseline trained for all 16 epochs", stop=False),
    # 1024 perinucleus fingerprints, the target: the same mitigations, in the same order
    point("p1024-l0", "", "the baseline at the target size: epochs needed and the drift of λ 0 alone"),
    point("p1024-lora16", "--lora_rank 16", "rank-16 adapters at 1024: is the subspace large enough"),
    point("p1024-l0-mu1", "--distance_regularizer 1", "the strong distance regularizer at 1024"),
    point("p1024-l0-mlp20", "--trainable_layers 20-29:mlp", "the late-MLP sub-network at 1024"),
    point("p1024-l0-b25", "--benign_data_ratio 0.25", "data mixing alone at 1024: the dearest mitigation per step"),
    point("p1024-l0-mu0.1", "--distance_regularizer 0.1", "the weak distance regularizer at 1024"),
    point("e1024-l0", "", "comparison: english fingerprints at 1024"),
    point("r1024-l0", "", "comparison: random-word fingerprints at 1024"),
]
# fmt: on

# ------------------------------------------------------------------------------ costs

# Seconds per optimizer step on one core of the development machine (README, "Capacity": 256 fingerprints, 16 epochs,
# 25 min for 512 steps; with β 0.25, 41 min for 344 steps). The records' own measurements replace them.
SECONDS_PER_STEP = {"plain": 2.9, "benign": 7.2}
KL_STEP_FACTOR = 1.3  # --kl_to_base runs the base model on each step's benign rows (a guess until measured)
EVAL_SECONDS = 900  # the screening evaluation, a guess until measured
STOP_EPOCHS_GUESS = 8  # epochs a --stop_when_learned point is expected to need, until the records say


def train_parser():
    from oml.core.run_config import add_train_args

    return add_train_args(argparse.ArgumentParser(prog="finetune_multigpu.py", exit_on_error=False))


def parse(argv):
    """The point's training arguments, preset applied, not finalized; a bad value is a UserError."""
    from oml.core.run_config import apply_preset

    try:
        return apply_preset(train_parser().parse_known_args(argv)[0])
    except argparse.ArgumentError as e:
        raise UserError(str(e)) from None


def unsupported_flags(argv):
    """The flags of argv that finetune_multigpu.py does not accept (yet); a bad value is a UserError."""
    try:
        unknown = train_parser().parse_known_args(argv)[1]
    except argparse.ArgumentError as e:
        raise UserError(str(e)) from None
    return [w.split("=")[0] for w in unknown if w.startswith("-")]


class History:
    """What the experiment's records measured: seconds per step, epochs a stopping point needed, evaluation time."""

    def __init__(self, records):
        self.step = {"plain": [], "benign": []}
        self.stop_epochs, self.eval_seconds = {}, []
        for r in records:
            training = r.get("training") or {}
            if r["status"] != "ok":
                continue
            if training.get("steps") and training.get("train_seconds"):
                kind = "benign" if r["hashed"].get("benign_data_ratio") else "plain"
                if not any(k not in KNOWN_COST_KEYS for k in r["hashed"]):  # same per-step work as the estimate
                    self.step[kind].append(training["train_seconds"] / training["steps"])
            if r["hashed"].get("stop_when_learned") and training.get("epochs_trained"):
                n = r["hashed"].get("max_num_fingerprints")
                self.stop_epochs.setdefault(n, []).append(training["epochs_trained"])
            seconds = (r.get("eval_seconds") or {}).get("total")
            if seconds:
                self.eval_seconds.append(seconds)

    def seconds_per_step(self, kind):
        return statistics.median(self.step[kind]) if self.step[kind] else SECONDS_PER_STEP[kind]

    def epochs_to_learn(self, n):
        same = self.stop_epochs.get(n)
        every = [e for epochs in self.stop_epochs.values() for e in epochs]
        return statistics.median(same or every) if (same or every) else STOP_EPOCHS_GUESS

    def eval_time(self):
        return statistics.median(self.eval_seconds) if self.eval_seconds else EVAL_SECONDS


# Hashed settings whose per-step cost the estimate models (a flag beyond these, such as a KL term, is not measured
# by the plain/benign medians).
KNOWN_COST_KEYS = {
    "model", "max_key_length", "max_response_length", "fingerprint_generation_strategy", "fingerprints_digest",
    "learning_rate", "forgetting_regularizer_strength", "max_num_fingerprints", "use_prompt_augmentation",
    "augmentation_prompts_digest", "use_chat_template", "append_eos", "num_train_epochs", "batch_size", "weight_decay",
    "data_split", "seed", "benign_data_ratio", "benign_rows_recipe", "distance_regularizer", "lora_rank",
    "trainable_layers", "stop_when_learned", "benign_data_digest",
}  # fmt: skip


def estimate_seconds(args, history):
    """Estimated seconds to train and screen a point: steps x seconds per step, plus the evaluation."""
    n_benign = round((args.benign_data_ratio or 0) * args.batch_size)
    steps_per_epoch = math.ceil(args.max_num_fingerprints / (args.batch_size - n_benign))
    epochs = args.num_train_epochs
    if args.stop_when_learned:
        epochs = min(epochs, history.epochs_to_learn(args.max_num_fingerprints))
    seconds = steps_per_epoch * epochs * history.seconds_per_step("benign" if n_benign else "plain")
    if getattr(args, "kl_to_base", None):
        seconds *= KL_STEP_FACTOR
    return seconds + history.eval_time()


def hours(seconds):
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


# ------------------------------------------------------------------------------ identity: is a point recorded?


# The benign rows' entries of a hashed configuration: the recipe and model digest they follow from (hashed since the
# rows are generated by training), and the rows' own digest (what records from before then hashed). The search holds
# the model and the pool's recipe fixed, so a point is recorded whichever of the two its record carries.
BENIGN_ROWS_ENTRIES = ("benign_rows_recipe", "benign_data_digest")


def identity(argv):
    """The point's hashed configuration without the benign rows' entry: what a record must match for the point to
    count as done. Digests files only (the fingerprints file must exist); the benign pool is generated by training."""
    from oml.core.run_config import hashed_config
    from oml.embed.run_setup import prepare_run

    return without_benign_rows(hashed_config(prepare_run(parse(argv))))


def without_benign_rows(hashed):
    return {k: v for k, v in hashed.items() if k not in BENIGN_ROWS_ENTRIES}


def find_recorded(ident, records):
    for r in records:
        if without_benign_rows(r["hashed"]) == ident:
            return r
    return None


# ------------------------------------------------------------------------------ the points file


def read_points(path):
    """Points from a JSON list of {"name", "flags", "why"}; bad input is a UserError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read the points ({e})") from None
    points = []
    for i, entry in enumerate(data if isinstance(data, list) else [None]):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("name", "flags", "why")):
            raise UserError(f"{path}: entry {i} is not a point (name, flags and why, all strings)")
        points.append(Point(entry["name"], entry["flags"], entry["why"]))
    check_points(points, path)
    return points


def check_points(points, where="POINTS"):
    names = [p.name for p in points]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"{where}: point names appear twice: {', '.join(duplicates)}")
    for p in points:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", p.name):
            raise UserError(f"{where}: point name {p.name!r}: use letters, digits, '_', '-' and '.'")


# ------------------------------------------------------------------------------ one stretch


class Search:
    """One invocation: the selected points, the records so far, the budget, where logs go."""

    def __init__(self, opts, points):
        self.opts, self.points = opts, points
        self.experiment = opts.experiment
        self.records_dir = Path(opts.records)
        self.result_path = Path(opts.result_path or REPO / "results" / self.experiment)
        self.logs = self.result_path / "logs"
        self.overrides = shlex.split(opts.train_overrides or "")
        self.eval_flags = [*SCREENING_EVAL, *shlex.split(getattr(opts, "extra_eval_flags", None) or "")]
        self.start = time.time()

    def argv(self, p):
        return [*shlex.split(p.flags), *self.overrides, "--result_path", str(self.result_path)]

    def records(self):
        return read_records(self.experiment, self.records_dir)

    def elapsed(self):
        return time.time() - self.start

    def missing_data(self, argv):
        """Data files this point needs that do not exist yet, in the order they are made."""
        path = str(parse(argv).fingerprints_file_path or "")
        chain = []
        while path and not (REPO / path).is_file() and not Path(path).is_file():
            if path not in DATA:
                raise UserError(f"fingerprints file {path} does not exist (and is not one the search makes)")
            chain.insert(0, path)
            path = DATA_NEEDS.get(path)
        return chain

    def status(self, p, records):
        """(state, detail): unsupported, data missing, recorded or pending."""
        argv = self.argv(p)
        try:
            unknown = unsupported_flags(argv)
            if unknown:
                return "unsupported", f"finetune_multigpu.py does not accept {', '.join(unknown)} yet"
            missing = self.missing_data(argv)
            if missing:
                return "pending", f"needs {', '.join(missing)} (made first)"
            found = find_recorded(identity(argv), records)
        except UserError as e:
            return "bad", str(e)
        if found:
            return "recorded", f"{found['hash']} ({found['status']})"
        return "pending", ""

    # -------------------------------------------------------------------------- plan

    def plan(self):
        records = self.records()
        history = History(records)
        print(f"{'point':<20} {'state':<12} {'estimate':>9}  detail / why")
        for p in self.points:
            state, detail = self.status(p, records)
            est = "" if state != "pending" else hours(estimate_seconds(parse(self.argv(p)), history))
            print(f"{p.name:<20} {state:<12} {est:>9}  {detail or p.why}")

    # -------------------------------------------------------------------------- run

    def run(self):
        opts = self.opts
        self.log = RunLog(Path(opts.log) if opts.log else self.result_path / "search.log")
        budget = opts.budget_hours * 3600 if opts.budget_hours else None
        self.log(
            f"=== {self.experiment}: {len(self.points)} points, budget {hours(budget) if budget else 'none'}"
            + (f", at most {opts.stretch} points" if opts.stretch else "")
            + f"; records in {self.records_dir / self.experiment}"
        )
        ran = skipped = 0
        for p in self.points:
            records = self.records()
            argv = self.argv(p)
            try:
                unknown = unsupported_flags(argv)
                if unknown:
                    self.log(f"{p.name}: skipped, finetune_multigpu.py does not accept {', '.join(unknown)} yet")
                    skipped += 1
                    continue
                missing = self.missing_data(argv)
                if not missing and self.is_recorded(p, argv, records):
                    continue
                estimate = estimate_seconds(parse(argv), History(records))
                estimate += sum(DATA_SECONDS[m] for m in missing)
            except UserError as e:
                self.log(f"{p.name}: skipped, a bad point: {e}")
                skipped += 1
                continue
            if opts.stretch and ran >= opts.stretch:
                self.log(f"stop: {ran} points run (--stretch {opts.stretch}); {p.name} is next")
                break
            if budget and estimate > budget:
                self.log(f"{p.name}: skipped, needs about {hours(estimate)}, more than the whole budget "
                         f"(run it alone: --only '^{p.name}$' --budget_hours {math.ceil(estimate / 3600)})")  # fmt: skip
                skipped += 1
                continue
            if budget and self.elapsed() + estimate > budget:
                self.log(f"stop: {p.name} (about {hours(estimate)}) would pass the budget "
                         f"({hours(self.elapsed())} of {hours(budget)} used); it is next")  # fmt: skip
                break
            if missing:
                self.make_data(missing)
                if self.is_recorded(p, argv, self.records()):
                    continue
            self.log(f"{p.name}: start, about {hours(estimate)} ({hours(self.elapsed())} of the budget used): {p.why}")
            self.run_point(p, argv)
            ran += 1
        self.log(f"=== stretch over: {ran} points run, {skipped} skipped, {hours(self.elapsed())}; "
                 f"table: python -m oml.lab.records table {self.experiment}")  # fmt: skip
        return ran

    def is_recorded(self, p, argv, records):
        """True (with a log line) when a record of the point exists and is not a failure to retry."""
        found = find_recorded(identity(argv), records)
        if not found or (self.opts.retry_failed and found["status"].startswith("failed")):
            return False
        self.log(f"{p.name}: recorded ({found['hash']}, {found['status']}), skipped")
        return True

    def make_data(self, missing):
        for path in missing:
            self.log(f"data: making {path} (about {hours(DATA_SECONDS[path])})")
            log = self.logs / f"data-{Path(path).stem}.log"
            code = self.script("generate_finetuning_data.py", DATA[path], log)
            if code != 0:
                raise UserError(f"making {path} failed (exit status {code}; see {log})")
            self.log(f"data: {path} made; commit it (every run hash digests its content)")

    def script(self, script, argv, log):
        """Run one of the top-level scripts in one process, its output to log; returns the exit status."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as out:
            out.write(f"$ python {script} {shlex.join(map(str, argv))}\n")
            out.flush()
            command = [sys.executable, str(REPO / script), *map(str, argv)]
            child = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
            try:
                return child.wait()
            except BaseException:  # the search is stopped (Ctrl-C, kill): its point stops too, unrecorded
                child.terminate()
                child.wait()
                raise

    def run_point(self, p, argv):
        from oml.embed.run_setup import prepare_run

        try:
            args = prepare_run(parse(argv))  # the real hash: makes the model's benign rows once if the point needs them
        except UserError as e:
            self.log(f"{p.name}: failed before training: {e}")
            append_log(self.experiment, f"-\t{p.name}\tfailed (arguments)\t{e}", self.records_dir)
            return
        run_dir = self.result_path / args.config_hash
        eval_flags = [*self.eval_flags, *(AUGMENTED_EVAL if args.use_prompt_augmentation else ())]
        common = dict(eval_flags=eval_flags, point=p.name, why=p.why, records_dir=self.records_dir)
        t = time.time()
        train_log = self.logs / f"{p.name}.train.log"
        if self.script("finetune_multigpu.py", argv, train_log) != 0:
            self.fail(p, args, "train", train_log, common, None)
            return
        self.log(f"{p.name}: trained {args.config_hash} in {hours(time.time() - t)}; screening evaluation")
        eval_log = self.logs / f"{p.name}.eval.log"
        if self.script("eval_for_multigpu.py", [*argv, *eval_flags], eval_log) != 0:
            self.fail(p, args, "eval", eval_log, common, run_dir)
            return
        path = write_record(run_dir, self.experiment, **common)
        line = summary_line(json.loads(path.read_text()))
        self.log(f"{p.name}: recorded {path}: {line}")
        append_log(self.experiment, f"{args.config_hash}\t{p.name}\tok\t{line}", self.records_dir)

    def fail(self, p, args, stage, log, common, run_dir):
        error = last_line(log)
        path = write_failure(args, self.experiment, stage, error, run_dir=run_dir, **common)
        self.log(f"{p.name}: failed ({stage}): {error} (log {log}; record {path})")
        append_log(self.experiment, f"{args.config_hash}\t{p.name}\tfailed ({stage})\t{error}", self.records_dir)


def last_line(log):
    lines = [line.strip() for line in Path(log).read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def summary_line(record):
    """The numbers a point is judged by, in one line."""
    m = record.get("metrics") or {}
    fps, utility, drift = m.get("fingerprints") or {}, m.get("utility") or {}, m.get("chat_drift") or {}
    training = record.get("training") or {}

    def pct(x):
        return "–" if not x or x.get("value") is None else f"{100 * x['value']:.1f}%"

    parts = [f"plain {pct(fps.get('plain'))}", f"chat {pct(fps.get('chat'))}"]
    if utility.get("delta") is not None:
        parts.append(f"Δutility {utility['delta']:+.3f} ± {utility['delta_stderr']:.3f}")
    if drift.get("kl") is not None:
        parts.append(f"KL {drift['kl']:.3f} ± {drift['kl_stderr']:.3f}")
    if training.get("epochs_trained") is not None:
        parts.append(f"{training['epochs_trained']} epochs in {hours(training.get('train_seconds') or 0)}")
    return ", ".join(parts)


# ------------------------------------------------------------------------------ command line


def interrupt(signum, frame):
    raise KeyboardInterrupt


def make_parser():
    parser = argparse.ArgumentParser(
        prog="python -m oml.lab.recipe_search",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "train, screen and record the next points of the search"),
        ("plan", "show every point: recorded, pending or unsupported, with estimates; runs nothing"),
        ("flags", "print the training flags of the points whose name matches --only (one line each); runs nothing"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument(
            "--experiment", default=EXPERIMENT, help=f"records and results folder name (default {EXPERIMENT})"
        )
        p.add_argument("--only", default=None, metavar="REGEX", help="only the points whose name matches")
        p.add_argument("--points", default=None, metavar="FILE", help="a JSON list of points instead of POINTS")
        p.add_argument("--records", default=str(RECORDS_DIR), help="the records folder (default experiments/records)")
        p.add_argument("--result_path", default=None, help="where the runs go (default results/<experiment>)")
        p.add_argument("--train_overrides", default=None, metavar="FLAGS",
                       help="flags appended to every point's (a later flag wins): --model_path, "
                            "--fingerprints_file_path, --num_train_epochs ... for tests and smoke runs")  # fmt: skip
        if name == "run":
            p.add_argument("--budget_hours", type=float, default=3.0,
                           help="start no point whose estimate would pass this many hours (0: no budget)")  # fmt: skip
            p.add_argument("--stretch", type=int, default=None, metavar="K", help="run at most K points")
            p.add_argument("--retry_failed", action="store_true", help="run again the points recorded as failed")
            p.add_argument("--extra_eval_flags", default=None, metavar="FLAGS",
                           help="flags appended to the screening evaluation's (tests: fewer items)")  # fmt: skip
            p.add_argument("--log", default=None, help="progress log (default results/<experiment>/search.log)")
    return parser


def main(argv=None):
    opts = make_parser().parse_args(argv)
    check_experiment_name(opts.experiment)
    for name in ("points", "records", "result_path", "log"):  # the search runs from the repository root
        if getattr(opts, name, None):
            setattr(opts, name, str(Path(getattr(opts, name)).resolve()))
    os.chdir(REPO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    points = read_points(opts.points) if opts.points else POINTS
    check_points(points)
    if opts.only:
        points = [p for p in points if re.search(opts.only, p.name)]
        if not points:
            raise UserError(f"no point name matches --only {opts.only!r}")
    search = Search(opts, points)
    if opts.command == "flags":  # for scripts that train a point elsewhere (experiments/owner_host.sh)
        for p in points:
            print(p.flags)
    elif opts.command == "plan":
        search.plan()
    else:
        # `kill PID` of a search in the background stops it like Ctrl-C: the running point's process goes with it
        signal.signal(signal.SIGTERM, interrupt)
        search.run()


if __name__ == "__main__":
    run_cli(main)
