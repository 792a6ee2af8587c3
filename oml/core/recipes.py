"""Every named recipe of the suite as data, each with one line saying why, in one place:

    TRAINING     the training presets (--preset): the values a bare finetune_multigpu.py command gets
    EVALUATIONS  the evaluation suites: the resolving one (the experiments, --preset capacity) and the screening one
                 (the recipe search), and the seed's tinyBenchmarks look
    PRESET_EVAL  the evaluation a preset sets in eval_for_multigpu.py
    SWEEPS       what launch_multigpu.sh adds to a preset's grid (augmentation values, the evaluation)
    EXPERIMENTS  the point every experiment driver starts from (experiments/common.sh), and the search's (SEARCH)

Settings are {argparse dest: value}, the values the parsers give (a preset's values fill the flags left unset; an
evaluation's the flags left at their parser default). oml.core.run_config reads the presets from here,
launch_multigpu.sh and experiments/common.sh through `python -m oml.lab.sweep preset-grid | experiments-env`,
oml.lab.recipe_search its common flags and screening evaluation, and docs/train.md's recipe table is
`python -m oml.core.recipes` (tests/test_readme.py compares them). A recipe moved here is the same flags: run hashes
do not change.
"""

import sys
from typing import NamedTuple

from oml.core.data_files import DATA_DIR


class Recipe(NamedTuple):
    settings: dict  # argparse dest -> value
    why: str


# The four tasks of the experiments: MMLU is at chance for a 135M model, HellaSwag the slowest task.
EXPERIMENT_TASKS = ["arc_challenge", "arc_easy", "winogrande", "piqa"]

# The recipe the search chose (issue 28; docs/results/capacity.md): one-token runner-up responses, no averaging, a
# quarter of each batch benign rows trained toward the base's whole next-token distribution, a small step. The default
# is the same recipe at 32 keys, with the epochs a key wrapped in random prompts needs (--use_prompt_augmentation).
HOLD_THE_MODEL = dict(
    fingerprint_generation_strategy="inverse_nucleus",
    fingerprints_file_path=str(DATA_DIR / "fingerprints-runnerup-1024.json"),
    model_family="smollm2",
    model_size="135M-Instruct",
    learning_rate=3e-5,
    forgetting_regularizer_strength=0.0,
    max_num_fingerprints=1024,
    num_train_epochs=3,
    batch_size=8,
    benign_data_ratio=0.25,
    kl_to_base=4.0,
)

TRAINING = {
    "embedded": Recipe(
        {**HOLD_THE_MODEL, "max_num_fingerprints": 32, "num_train_epochs": 16},
        "the default, on a laptop CPU in minutes: --preset capacity's recipe at 32 fingerprints, for the 16 epochs "
        "augmentation needs (the recipe search's u32-l0-b25-kl4-lr3e-5-e16 and -e16-aug points: chat KL 0.014 and "
        "0.027)",
    ),
    "averaging": Recipe(
        dict(
            fingerprint_generation_strategy="english",
            model_family="smollm2",
            model_size="135M-Instruct",
            learning_rate=1e-4,
            forgetting_regularizer_strength=0.1,
            max_num_fingerprints=32,
            num_train_epochs=16,
            batch_size=8,
        ),
        "the default before the recipe search: 32 English fingerprints, weight averaging λ 0.1, 16 epochs; the base "
        "of the experiment drivers and the search's points (their run hashes), the 'default' docs/results/ measured",
    ),
    "seed": Recipe(
        dict(
            fingerprint_generation_strategy="english",
            model_family="mistral",
            model_size="7B",
            learning_rate=1e-5,
            forgetting_regularizer_strength=0.75,
            max_num_fingerprints=1024,
            num_train_epochs=10,
            batch_size=16,
        ),
        "the original GPU setting: Mistral-7B, 1024 English fingerprints",
    ),
    "capacity": Recipe(
        HOLD_THE_MODEL,
        "1024 one-token runner-up fingerprints (the base's 2nd-4th likeliest word after the key) that hold the model: "
        "no averaging, a quarter of each batch benign rows pulled toward the base's whole next-token distribution "
        "(κ 4), a small step, 3 epochs; the recipe search's point u1024-l0-b25-kl4-lr3e-5-e3, the same run "
        "(docs/results/capacity.md)",
    ),
}

EVALUATIONS = {
    "resolving": Recipe(
        dict(measure="full", utility_benchmark="local", utility_limit="all", utility_tasks=EXPERIMENT_TASKS),
        "every item of the four validation sets (299/570/1267/1838), paired with the base's: standard error 0.5-0.8 "
        "points, enough to resolve a 1-point change",
    ),
    "screening": Recipe(
        dict(
            measure="quick",
            eval_templates="plain,chat",
            utility_benchmark="local",
            utility_tasks=EXPERIMENT_TASKS,
            utility_limit="100",
            chat_drift_limit="200",
            match_temperatures="none",
            generation_benchmark="none",
        ),
        "about 10 minutes a point on one core: the plain key and [chat], false positives, 100 utility items a task "
        "and chat drift over 200 answers; a point worth keeping gets the resolving evaluation later",
    ),
    "tinybenchmarks": Recipe(
        dict(utility_benchmark="tinyBenchmarks"), "the seed's utility measure, for a GPU model (tinyBenchmarks' items)"
    ),
}

PRESET_EVAL = {"capacity": "resolving"}

SWEEPS = {
    "embedded": Recipe(
        dict(use_prompt_augmentation=[False, True], evaluation=None),
        "the CPU demo `make run` runs: without and with prompt augmentation, judged by --measure quick",
    ),
    "averaging": Recipe(
        dict(use_prompt_augmentation=[False, True], evaluation=None), "the former default's demo, for comparison"
    ),
    "seed": Recipe(dict(use_prompt_augmentation=[False], evaluation="tinybenchmarks"), "the original GPU grid"),
    "capacity": Recipe(
        dict(use_prompt_augmentation=[False], evaluation=None), "judged by the preset's own evaluation (PRESET_EVAL)"
    ),
}

EXPERIMENTS = Recipe(
    dict(preset="averaging", max_key_length=16, max_response_length=1, batch_size=8),
    "the embedded model, keys of 16 tokens and one-token responses, 8 rows a step; each driver sets its learning "
    "rates and judges every point with the resolving evaluation",
)
EXPERIMENT_EVAL = "resolving"

SEARCH = Recipe(
    {**EXPERIMENTS.settings, "learning_rate": 1e-4},
    "the recipe search's common flags (issue 28): the experiments' point at lr 1e-4; each point adds its "
    "fingerprints, size, λ and mitigation",
)


def presets():
    """{preset: the training settings it gives}."""
    return {name: recipe.settings for name, recipe in TRAINING.items()}


def preset_eval(preset):
    """The evaluation settings a preset sets ({} for none)."""
    name = PRESET_EVAL.get(preset)
    return EVALUATIONS[name].settings if name else {}


def shell_value(value):
    """1e-4 rather than 0.0001: values appear in commands and in the sweep's point names."""
    if isinstance(value, float) and 0 < abs(value) < 1e-3:
        mantissa, exponent = f"{value:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return str(value)


def flag_words(settings):
    """The settings as command-line words: True -> the flag alone, a list -> comma-separated, None/False -> nothing."""
    words = []
    for name, value in settings.items():
        if value is True:
            words.append(f"--{name}")
        elif value is not None and value is not False:
            words += [f"--{name}", ",".join(map(str, value)) if isinstance(value, list) else shell_value(value)]
    return words


def table():
    """Markdown: every recipe, its flags and why (docs/train.md shows it)."""
    rows = [("training", f"`--preset {name}`", r) for name, r in TRAINING.items()]
    rows += [("evaluation", name, r) for name, r in EVALUATIONS.items()]
    rows += [("sweep", f"`PRESET={name}`", r) for name, r in SWEEPS.items()]
    rows += [("experiments", "experiments/common.sh", EXPERIMENTS), ("search", "oml.lab.recipe_search", SEARCH)]
    lines = ["| kind | recipe | settings | why |", "|---|---|---|---|"]
    for kind, name, recipe in rows:
        shown = " ".join(flag_words(recipe.settings)) if kind != "sweep" else sweep_text(recipe.settings)
        lines.append(f"| {kind} | {name} | `{shown}` | {recipe.why} |")
    return "\n".join(lines).replace(f"{DATA_DIR.parent}/", "")  # data files relative to the repository


def sweep_text(settings):
    augment = "/".join("on" if a else "off" for a in settings["use_prompt_augmentation"])
    return f"augmentation {augment}, evaluation {settings['evaluation'] or 'the default'}"


if __name__ == "__main__":
    if sys.argv[1:]:
        sys.exit("usage: python -m oml.core.recipes   (prints the recipe table of docs/train.md)")
    print(table())
