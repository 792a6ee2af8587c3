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


def test_common_eval_arguments_are_eval_flags():
    from test_readme import accepted_flags

    common = (REPO / "experiments" / "common.sh").read_text()
    (eval_args,) = re.findall(r'export EVAL_ARGS="([^"]*)"', common)
    flags = set(re.findall(r"--[a-z_]+", eval_args))
    assert {"--utility_tasks", "--utility_limit"} <= flags <= accepted_flags("eval_for_multigpu.py")


@pytest.mark.parametrize("driver", [d for d in DRIVERS if d.name.startswith("persistence")], ids=lambda p: p.name)
def test_every_flag_of_a_persistence_driver_is_an_attack_flag(driver):
    """The persistence drivers pass run recipes and attacks to attack_fingerprints.py (and --fig/--out to
    oml.lab.persistence_report): a misspelt flag would only show hours into a run."""
    from test_readme import accepted_flags

    flags = set(re.findall(r"(?<![\w-])--[a-z_0-9]+", driver.read_text())) - {"--fig", "--out"}
    assert flags and flags <= accepted_flags("attack_fingerprints.py"), flags - accepted_flags("attack_fingerprints.py")
