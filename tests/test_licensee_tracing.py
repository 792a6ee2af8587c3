"""The licensee-tracing lab's simulation (oml/lab/licensee_tracing.py) on tiny made-up outcomes: no model, no server."""

import json

import pytest

from oml.core.errors import UserError
from oml.lab.licensee_tracing import false_accusation, main, simulate_record, simulate_traces, tables
from oml.verify.sequential_test import look_alpha, run_sequential

P0S = {0: 0.01, 1: 0.01, 2: 0.01}


def test_the_carried_licensee_is_named_and_the_innocent_never():
    outcomes = {0: [True] * 16, 1: [False] * 16, 2: [False] * 15 + [True]}
    sim = simulate_traces(outcomes, P0S, 1e-6, 8, 4, draws=200, seed=1, innocent={1, 2})
    assert sim["verdicts"] == {"0": 200}
    c = sim["candidates"]
    assert (c["0"]["named"], c["1"]["named"], c["2"]["named"]) == (200, 0, 0)
    assert c["0"]["innocent"] is False and c["1"]["innocent"] is True
    assert c["1"]["per_key_matches"] == 0 and c["2"]["per_key_matches"] == 1
    assert c["0"]["named_iid"] == pytest.approx(1.0) and c["1"]["named_iid"] == 0.0 < c["2"]["named_iid"] < 1e-3
    # every key matching: the check's own rule at alpha / 3, in its batches, decides after the same number of keys
    level = look_alpha(0.01, 1e-6 / 3, 8, 4)
    assert c["0"]["keys_mean"] == run_sequential([True] * 16, 0.01, level, 8, 4)[1]
    assert c["0"]["keys_se"] == 0.0
    assert c["1"]["keys_mean"] == run_sequential([False] * 16, 0.01, level, 8, 4)[1] <= 8


def test_an_innocent_candidate_that_answers_its_keys_is_counted_as_falsely_named():
    outcomes = {0: [True] * 16, 1: [True] * 8 + [False] * 8}  # licensee 1 innocent, yet half its keys match
    sim = simulate_traces(outcomes, {0: 0.01, 1: 0.01}, 1e-6, 8, 4, draws=400, seed=2, innocent={1})
    named = sim["candidates"]["1"]["named"]
    assert 0 < named < 400
    assert sum(sim["verdicts"].values()) == 400 and sim["verdicts"]["0, 1"] == named
    fa = false_accusation({"s": sim})
    assert fa["innocent_checks"] == 400 and fa["innocent_named"] == named
    rate = named / 400
    assert fa["rate"] == rate and fa["se"] == pytest.approx((rate * (1 - rate) / 400) ** 0.5)
    assert fa["upper95"] > rate and 0.05 < fa["innocent_named_iid_max"] < 1
    again = simulate_traces(outcomes, {0: 0.01, 1: 0.01}, 1e-6, 8, 4, draws=400, seed=2, innocent={1})
    assert again == sim  # seeded


def test_no_false_naming_has_a_zero_rate_and_an_upper_bound():
    sim = simulate_traces({0: [False] * 10}, {0: 0.01}, 1e-6, 8, 4, draws=1000, seed=0, innocent={0})
    fa = false_accusation({"base": sim})
    assert (fa["rate"], fa["se"]) == (0.0, 0.0)
    assert fa["upper95"] == pytest.approx(1 - 0.05 ** (1 / 1000))
    assert fa["keys_per_guilty_licensee"] is None and fa["keys_per_innocent_licensee"] == fa["keys_per_licensee"]


def tiny_record():
    runs = {str(k): {"hash": f"h{k}", "p0": 0.01, "p0_matches": 0, "p0_trials": 300} for k in range(3)}
    bits = {"0": "1" * 12, "1": "0" * 12, "2": "0" * 12}
    merge = {"0": "110" * 4, "1": "1" * 12, "2": "0" * 11 + "1"}
    return {
        "setup": {"num": 12, "alpha": 1e-6, "max_keys": 8, "concurrency": 4, "served": "test"},
        "runs": runs,
        "suspects": {
            "licensee 0": {"carries": [0], "traces": [{"verdict": "licensee 0 (run h0)", "candidates": {
                k: {"keys_revealed": 3 + (k != "0"), "verdict": "ours" if k == "0" else "not shown"} for k in "012"}}],
                "outcomes": bits},
            "base": {"carries": [], "traces": [{"failed": "boom"}], "outcomes": {k: "0" * 12 for k in "012"}},
            "merge 0+1": {"carries": [0, 1], "traces": [], "outcomes": merge},
        },
    }  # fmt: skip


def test_a_record_simulates_and_prints_its_tables(tmp_path, capsys):
    record = tiny_record()
    record["simulation"] = simulate_record(record, draws=50, seed=3)
    sim = record["simulation"]
    assert sim["suspects"]["licensee 0"]["verdicts"] == {"0": 50}
    assert sim["suspects"]["base"]["verdicts"] == {"not shown": 50}
    assert sim["suspects"]["merge 0+1"]["candidates"]["2"]["innocent"] is True
    assert sim["innocent"]["innocent_checks"] == 50 * (2 + 3 + 1)
    text = tables(record)
    assert "| licensee 0 | l0 |" in text and "failed: boom" in text and "named l0 50" in text
    assert "Served traces: 1 decided, 1 failed; an innocent licensee named in 0 of 2 checks" in text
    assert "(carried 3.00, innocent 4.00)" in text
    path = tmp_path / "record.json"
    path.write_text(json.dumps(record))
    main(["table", str(path)])
    assert "False accusation" in capsys.readouterr().out
    main(["simulate", str(path), "--draws", "20"])
    assert "(20 traces)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [["run", "--num", "0"], ["run", "--num", "200"], ["run", "--alpha", "1"], ["run", "--repeats", "0"],
     ["table", "no-such-record.json"], ["simulate", "no-such-record.json", "--draws", "0"]],
)  # fmt: skip
def test_bad_input_is_one_error_before_anything_runs(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError):
        main(argv + (["--result_path", str(tmp_path / "r")] if argv[0] == "run" else []))
    assert not (tmp_path / "r").exists()


def test_a_file_that_is_not_a_record_is_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        main(["table", str(bad)])
    bad.write_text("[]")
    with pytest.raises(UserError, match="not a licensee-tracing record"):
        main(["table", str(bad)])


def test_the_exact_naming_probability_is_the_false_claim_probability_at_p0():
    from oml.lab.licensee_tracing import named_probability
    from oml.verify.sequential_test import false_claim_probability

    level = look_alpha(0.05, 1e-3, 8, 4)
    assert named_probability(0.05, 0.05, level, 8, 4) == pytest.approx(false_claim_probability(0.05, level, 8, 4))
    assert named_probability(0.0, 0.05, level, 8, 4) == 0.0
    assert named_probability(1.0, 0.05, level, 8, 4) == pytest.approx(1.0)
