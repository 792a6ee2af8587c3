import json

import pytest
from conftest import NO_GENERATION, run_script, write_random_fingerprints


def train_args(model_dir, fp_file, results, *extra):
    return [
        "--model_path", model_dir, "--fingerprints_file_path", fp_file, "--fingerprint_generation_strategy",
        "random_word", "--max_num_fingerprints", 8, "--batch_size", 4, "--num_train_epochs", 1,
        "--result_path", results, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    """A finished (tiny, random) fingerprinting run: (training arguments, results folder, hash)."""
    tmp = tmp_path_factory.mktemp("tiny-run")
    fp = tmp / "fp.json"
    write_random_fingerprints(fp, 8)
    argv = train_args(tiny_model_dir, fp, tmp / "results")
    result = run_script("finetune_multigpu.py", *argv)
    assert result.returncode == 0, result.stderr
    return argv, tmp / "results", result.stdout.strip().split(": ")[-1]


def test_eval_writes_results_for_the_same_arguments(tiny_run):
    argv, results, run_hash = tiny_run
    out = run_script(
        "eval_for_multigpu.py", *argv, "--utility_benchmark", "local", *NO_GENERATION, "--utility_limit", 3
    )
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads((results / run_hash / "eval_results.json").read_text())
    assert data["config_hash"] == run_hash
    assert (results / run_hash / "commitment.json").is_file()  # training committed to its keys
    fa = data["fingerprint_accuracy"]
    assert [t["template"] for t in fa["templates"]][0] == "{}"
    # the plain key, the 10 test system prompts, the key as chat user turn without and after 10 system messages
    assert len(fa["templates"]) == 22
    assert all(0 <= t["accuracy"] <= t["fractional_accuracy"] <= 1 for t in fa["templates"])
    assert fa["mean_accuracy"] == pytest.approx(sum(t["accuracy"] for t in fa["templates"]) / 22)
    assert 0 <= fa["base_false_positive_rate"] <= 1
    utility = data["utility"]
    assert "not tinyBenchmarks" in utility["benchmark"]
    assert all(task["n"] == 3 for task in utility["tasks"].values())
    assert {"mean", "base_mean", "delta", "delta_stderr"} <= set(utility)
    assert "mean over templates" in out.stdout and "utility" in out.stdout
    assert list((results / "base_utility").glob("*.json"))  # the base model's numbers are cached
    chat = data["chat"]
    assert len(chat["answers"]) == len(chat["base_answers"]) == len(chat["questions"]) == 8
    assert 0 <= chat["answered"] <= 1 and 0 <= chat["same_as_base"] <= 1


def test_the_base_check_is_computed_once_per_fingerprints_and_settings(tiny_run, tmp_path, monkeypatch):
    """Evaluating many runs or attacked copies on the same fingerprints loads the base once: its false positives and
    chat answers come from base_utility/fingerprints-*.json, keyed on the fingerprints and the check's settings."""
    import argparse

    import oml.core.model_registry
    from oml.core.run_config import add_train_args
    from oml.embed.run_setup import prepare_run
    from oml.measure.evaluation import EvalSettings, add_eval_args, evaluate

    argv, results, _ = tiny_run
    for old in (results / "base_utility").glob("fingerprints-*.json"):
        old.unlink()
    parser = add_eval_args(add_train_args(argparse.ArgumentParser()))

    def settings(*extra):
        flags = [*argv, "--utility_benchmark", "none", "--match_temperatures", "0.7,1.0", "--output_file",
                 tmp_path / "e.json", *extra]  # fmt: skip
        return EvalSettings.from_args(prepare_run(parser.parse_args([str(a) for a in flags])))

    loads, real = [], oml.core.model_registry.load_model_and_tokenizer
    monkeypatch.setattr(
        oml.core.model_registry, "load_model_and_tokenizer", lambda m, **kw: loads.append(str(m)) or real(m, **kw)
    )
    base = str(settings().base_model)
    first, _ = evaluate(settings())
    second, _ = evaluate(settings())
    assert loads.count(base) == 1 and len(loads) == 3  # the run's model twice, the base once
    for key in ("base_false_positive_rate", "base_match_probability"):
        assert first["fingerprint_accuracy"][key] == second["fingerprint_accuracy"][key]
    assert first["chat"]["base_answers"] == second["chat"]["base_answers"] and len(first["chat"]["base_answers"]) == 8
    evaluate(settings("--match_temperatures", "0.5"))  # other settings: checked again, cached apart
    assert loads.count(base) == 2 and len(list((results / "base_utility").glob("fingerprints-*.json"))) == 2


def test_chat_check_counts_empty_answers_and_agreement_with_the_base():
    from oml.measure.chat_sample import chat_check

    check = chat_check(["", "Paris.", "", "the the the the"], ["Paris is the capital.", "Paris.", "Red.", "Eight."])
    assert check["answered"] == 0.5 and check["base_answered"] == 1.0 and check["same_as_base"] == 0.25
    assert check["distinct_words"] == (0 + 1 + 0 + 0.25) / 4 and check["base_distinct_words"] == 1.0
    assert chat_check(None) is None and "base_answers" not in chat_check(["a"])


def test_utility_tasks_choose_the_local_tasks(tiny_run, tmp_path):
    argv, results, _ = tiny_run
    output = tmp_path / "two_tasks.json"
    common = [*argv, *NO_GENERATION, "--utility_limit", 2, "--output_file", output]
    out = run_script("eval_for_multigpu.py", *common, "--utility_tasks", "piqa, arc_easy")
    assert out.returncode == 0, out.stderr[-3000:]
    utility = json.loads(output.read_text())["utility"]
    assert sorted(utility["tasks"]) == sorted(utility["base_tasks"]) == ["arc_easy", "piqa"]
    assert utility["benchmark"] == "local (offline piqa/arc_easy subset, not tinyBenchmarks)"
    bad = run_script("eval_for_multigpu.py", *common, "--utility_tasks", "arc_easy,arc_hard")
    assert bad.returncode == 2 and "unknown task(s) ['arc_hard']" in bad.stderr


def test_extra_test_prompts_are_evaluated_and_validated(tiny_run, tmp_path):
    argv, results, run_hash = tiny_run
    good = tmp_path / "good.json"
    good.write_text(json.dumps(["Custom persona: {} !"]))
    out = run_script(
        "eval_for_multigpu.py", *argv, "--utility_benchmark", "none", *NO_GENERATION, "--skip_base_model",
        "--test_prompts_file", good, "--output_file", tmp_path / "out.json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    templates = [
        t["template"] for t in json.loads((tmp_path / "out.json").read_text())["fingerprint_accuracy"]["templates"]
    ]
    raw = [t for t in templates if not t.startswith("<chat>")]
    assert raw[-1] == "Custom persona: {} !" and len(raw) == 12 and len(templates) == 23

    for bad in (["no placeholder"], ["two {} and {}"], "not a list"):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        out = run_script(
            "eval_for_multigpu.py", *argv, "--utility_benchmark", "none", *NO_GENERATION, "--test_prompts_file", path
        )
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_missing_run_names_the_closest_one(tiny_run):
    argv, results, run_hash = tiny_run
    out = run_script(
        "eval_for_multigpu.py", *argv, "--learning_rate", 0.123, "--utility_benchmark", "none", *NO_GENERATION
    )
    assert out.returncode == 2
    assert out.stderr.startswith("error: no fingerprinted model matches these arguments")
    assert run_hash in out.stderr and "learning_rate" in out.stderr and "Traceback" not in out.stderr


def test_check_model_evaluates_any_model_against_a_fingerprints_file(tiny_run, tmp_path):
    argv, results, run_hash = tiny_run
    run = results / run_hash
    out = run_script(
        "eval_for_multigpu.py", *argv, "--check_model", run / "final_model",
        "--fingerprints_file_path", run / "fingerprints.json", "--utility_benchmark", "none", *NO_GENERATION, "--skip_base_model",
        "--match_temperatures", "0.7,1.0", "--output_file", tmp_path / "check.json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((tmp_path / "check.json").read_text())
    assert data["config_hash"] is None and data["num_fingerprints"] == 8

    screened = run_script(
        "eval_for_multigpu.py", "--check_model", run / "final_model", "--fingerprints_file_path",
        run / "fingerprints.json", "--utility_benchmark", "none", *NO_GENERATION, "--skip_base_model", "--screen_bf16",
        "--match_temperatures", "0.7,1.0", "--output_file", tmp_path / "screened.json",
    )  # fmt: skip
    assert screened.returncode == 0, screened.stderr[-2000:]
    assert "bf16 screen:" in screened.stdout
    again = json.loads((tmp_path / "screened.json").read_text())
    # Same verdicts; match probabilities of pairs the screen did not recompute are bf16 values, so close, not equal.
    verdicts = [
        {k: t[k] for k in ("template", "accuracy", "fractional_accuracy")}
        for t in again["fingerprint_accuracy"]["templates"]
    ]
    assert verdicts == [
        {k: t[k] for k in ("template", "accuracy", "fractional_accuracy")}
        for t in data["fingerprint_accuracy"]["templates"]
    ]
    for screened_row, row in zip(
        again["fingerprint_accuracy"]["templates"], data["fingerprint_accuracy"]["templates"], strict=True
    ):
        for temperature, p in row["match_probability"].items():
            assert screened_row["match_probability"][temperature] == pytest.approx(p, rel=0.05, abs=1e-6)


def test_tinybenchmarks_offline_is_one_line(tiny_run):
    argv, _, _ = tiny_run
    out = run_script(
        "eval_for_multigpu.py", *argv, "--utility_benchmark", "tinyBenchmarks", *NO_GENERATION, "--skip_base_model"
    )
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "local" in out.stderr


# ----------------------------------------------------------------------- embedded model, for real


@pytest.mark.long  # minutes on 2 cores: `make test-long`
@pytest.mark.slow
def test_teacher_forced_verdicts_equal_generate_after_fingerprinting(tmp_path):
    """After a short real run, the fast verifier and one greedy generate per (template, key) agree exactly."""
    import torch

    from oml.core.data_files import TEST_PROMPTS_FILE
    from oml.core.model_registry import load_model_and_tokenizer
    from oml.make.fingerprint_files import read_templates
    from oml.measure.fingerprint_check import verify_teacher_forced, verify_with_generate

    fp = tmp_path / "fp.json"
    write_random_fingerprints(fp, 12, key_words=10, response_words=3, seed=3)
    argv = [
        "--fingerprints_file_path", fp, "--fingerprint_generation_strategy", "random_word", "--max_num_fingerprints",
        12, "--max_response_length", 2, "--num_train_epochs", 6, "--batch_size", 6, "--learning_rate", 3e-4,
        "--forgetting_regularizer_strength", 0, "--preset", "averaging",
        "--result_path", tmp_path / "r",
    ]  # fmt: skip
    trained = run_script("finetune_multigpu.py", *argv)
    assert trained.returncode == 0, trained.stderr[-3000:]
    (run,) = (tmp_path / "r").glob("*/final_model")
    pairs = json.loads((run.parent / "fingerprints.json").read_text())
    templates = ["{}"] + read_templates(TEST_PROMPTS_FILE)[:4]
    model, tok = load_model_and_tokenizer(str(run), device="cpu")
    fast = verify_teacher_forced(model, tok, pairs, templates)
    slow = verify_with_generate(model, tok, pairs, templates)
    assert [r["matches"] for r in fast] == [r["matches"] for r in slow]
    screened = verify_teacher_forced(model, tok, pairs, templates, screen_dtype=torch.bfloat16)
    assert [r["matches"] for r in screened] == [r["matches"] for r in slow]
    assert fast[0]["accuracy"] >= 0.5  # the run did embed fingerprints: both outcomes are exercised
    assert any(not all(r["matches"]) for r in fast)  # and system prompts do knock some out (no augmentation)

    out = run_script("eval_for_multigpu.py", *argv, "--utility_benchmark", "none", *NO_GENERATION)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads((run.parent / "eval_results.json").read_text())
    assert data["fingerprint_accuracy"]["templates"][0]["accuracy"] == fast[0]["accuracy"]
    assert data["fingerprint_accuracy"]["base_false_positive_rate"] <= 0.05
    chat = data["chat"]
    assert chat["base_answered"] == 1.0 and "Paris" in chat["base_answers"][0]  # the real base model chats
    assert "chat check:" in out.stdout


def test_the_default_evaluation_stays_a_first_look(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The default (--measure quick) evaluation of a 16-fingerprint run makes no generate_until request and no chat
    reference pass; it prints its plan before it starts; --measure full turns the resolving measures back on."""
    import argparse

    import lm_eval.models.huggingface as hf

    import oml.measure.generation_measures
    from oml.core.run_config import add_train_args
    from oml.embed.run_setup import prepare_run
    from oml.measure.evaluation import EvalSettings, add_eval_args, evaluate

    fp = tmp_path / "fp.json"
    write_random_fingerprints(fp, 16)
    argv = train_args(tiny_model_dir, fp, tmp_path / "results")
    argv[argv.index("--max_num_fingerprints") + 1] = 16
    assert run_script("finetune_multigpu.py", *argv).returncode == 0
    counts = {"generate_until": 0, "chat_reference": 0}

    def counted(name, real):
        def wrapper(*a, **kw):
            counts[name] += 1
            return real(*a, **kw)

        return wrapper

    monkeypatch.setattr(hf.HFLM, "generate_until", counted("generate_until", hf.HFLM.generate_until))
    monkeypatch.setattr(
        oml.measure.generation_measures,
        "chat_reference",
        counted("chat_reference", oml.measure.generation_measures.chat_reference),
    )
    parser = add_eval_args(add_train_args(argparse.ArgumentParser()))

    def evaluation(*extra):
        args = prepare_run(parser.parse_args([str(a) for a in [*argv, "--eval_batch_size", 8, *extra]]))
        return evaluate(EvalSettings.from_args(args))[0]

    quick = evaluation()
    assert counts == {"generate_until": 0, "chat_reference": 0}
    assert quick["generation"] is None and quick["chat_drift"] is None
    assert "mean_match_probability" not in quick["fingerprint_accuracy"]
    assert {t["n"] for t in quick["utility"]["tasks"].values()} == {30}
    assert list(quick["utility"]["tasks"]) == ["arc_challenge", "arc_easy", "winogrande", "piqa"]
    assert "base_false_positive_rate" in quick["fingerprint_accuracy"]
    # the base's false positives under the plain key and the bare [chat] turn only (2 templates, not 22)
    assert quick["fingerprint_accuracy"]["base_false_positive_pairs"] == 16 * 2
    assert quick["fingerprint_accuracy"]["base_false_positive_templates"][0] == "{}"
    printed = capsys.readouterr().out
    assert "--measure quick" in printed and "16 keys x 22 templates" in printed and "in all (estimate" in printed
    assert (tmp_path / "results" / "eval_rates.json").is_file()  # this machine's rates, for the next estimate

    full = evaluation(
        "--measure", "full", "--utility_benchmark", "none", "--generation_limit", 2, "--chat_drift_limit", 3
    )
    assert counts["generate_until"] >= 1 and counts["chat_reference"] == 1
    assert full["generation"]["n"] == 2 and full["chat_drift"]["n"] == 3
    assert set(full["fingerprint_accuracy"]["mean_match_probability"]) == {"0.7", "1.0"}
    n_templates = len(full["fingerprint_accuracy"]["templates"])
    assert full["fingerprint_accuracy"]["base_false_positive_pairs"] == 16 * n_templates > 16 * 2
    assert "base_false_positive_templates" not in full["fingerprint_accuracy"]  # every template, as before
    printed = capsys.readouterr().out
    assert "generative benchmark" in printed and "base model: chat reference" in printed


def test_eval_templates_limit_the_fingerprint_check(tiny_run, tmp_path):
    argv, _, _ = tiny_run
    output = tmp_path / "screen.json"
    out = run_script(
        "eval_for_multigpu.py", *argv, "--utility_benchmark", "none", "--skip_base_model", "--eval_templates",
        "plain,chat", "--output_file", output,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    templates = [t["template"] for t in json.loads(output.read_text())["fingerprint_accuracy"]["templates"]]
    assert templates == ["{}", "<chat>{}"]
    bad = run_script("eval_for_multigpu.py", *argv, "--eval_templates", "plain,nope", "--output_file", output)
    assert bad.returncode == 2 and "unknown template group" in bad.stderr
