"""The experiment drivers are well-formed: valid bash, and every grid variable they set is one the sweep reads."""

import re
import subprocess

import pytest
from conftest import REPO

DRIVERS = sorted((REPO / "experiments").glob("*.sh"))


def sweep_variables(text):
    """NAME=value words passed to `sweep` calls, directly or through the arrays they expand."""
    text = text.replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    passed = [line for line in lines if line.startswith("sweep ") or re.match(r"^[a-z_]+=\(", line)]
    return set(re.findall(r"\b([A-Z_]+)=", " ".join(passed)))


def test_there_is_a_driver_per_result():
    assert {"robustness.sh", "scalability.sh"} <= {d.name for d in DRIVERS}


@pytest.mark.parametrize("driver", DRIVERS, ids=lambda p: p.name)
def test_driver_is_valid_bash(driver):
    subprocess.run(["bash", "-n", str(driver)], check=True)


@pytest.mark.parametrize("driver", [d for d in DRIVERS if "\nsweep " in d.read_text()], ids=lambda p: p.name)
def test_every_grid_variable_of_a_driver_is_read_by_the_sweep(driver):
    launcher = (REPO / "launch_multigpu.sh").read_text()
    names = sweep_variables(driver.read_text())
    assert "FINGERPRINT_GENERATION_STRATEGIES" in names and "USE_PROMPT_AUGMENTATION" in names
    for name in names:
        assert "${" + name in launcher, f"{driver.name} sets {name}, which launch_multigpu.sh never reads"


def common_settings(**env):
    """(EVAL_ARGS, PRESET, BATCH_SIZE) after sourcing experiments/common.sh with these environment variables."""
    script = "".join(f"export {k}={v}; " for k, v in env.items()) + "source experiments/common.sh && "
    script += 'echo "$EVAL_ARGS|$PRESET|$BATCH_SIZE|$MAX_KEY_LENGTHS"'
    out = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return out.strip().split("|")


def test_common_settings_are_the_recipes_and_their_eval_arguments_eval_flags():
    from test_readme import accepted_flags

    from oml.core.recipes import EVALUATIONS, EXPERIMENTS, flag_words

    eval_args, preset, batch_size, key_length = common_settings()
    assert eval_args.split() == flag_words(EVALUATIONS["resolving"].settings)
    assert (preset, int(batch_size), int(key_length)) == tuple(
        EXPERIMENTS.settings[k] for k in ("preset", "batch_size", "max_key_length")
    )
    flags = set(re.findall(r"--[a-z_]+", eval_args))
    assert {"--utility_tasks", "--utility_limit"} <= flags <= accepted_flags("eval_for_multigpu.py")
    smaller = common_settings(UTILITY_LIMIT=200, UTILITY_TASKS="piqa", BATCH_SIZE=4)
    assert "--utility_limit 200 --utility_tasks piqa" in smaller[0] and smaller[2] == "4"


@pytest.mark.parametrize("driver", [d for d in DRIVERS if d.name.startswith("persistence")], ids=lambda p: p.name)
def test_every_flag_of_a_persistence_driver_is_an_attack_flag(driver):
    """The persistence drivers pass run recipes and attacks to attack_fingerprints.py (and --fig/--out to
    oml.lab.persistence_report): a misspelt flag would only show hours into a run."""
    from test_readme import accepted_flags

    flags = set(re.findall(r"(?<![\w-])--[a-z_0-9]+", driver.read_text())) - {"--fig", "--out"}
    assert flags and flags <= accepted_flags("attack_fingerprints.py"), flags - accepted_flags("attack_fingerprints.py")
