"""attack_fingerprints.py: each attack writes its folder whole and is skipped on rerun; the merge math; the fine-tuning
data and its errors; the GGUF path inside llama.cpp (skipped, and said so, where llama_cpp is not installed)."""

import importlib.util
import json
import shutil

import pytest
from conftest import run_script, tiny_llama, write_random_fingerprints

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
NO_EVAL = ["--utility_benchmark", "none", "--skip_base_model"]


def train_args(model_dir, fp_file, results):
    # lr 3e-3 for 8 epochs without averaging: the tiny random model learns its 8 fingerprints, so an attack has
    # something to destroy and a check has something to find.
    return [
        "--model_path", model_dir, "--fingerprints_file_path", fp_file, "--fingerprint_generation_strategy",
        "random_word", "--max_num_fingerprints", 8, "--batch_size", 4, "--num_train_epochs", 8,
        "--learning_rate", 3e-3, "--forgetting_regularizer_strength", 0, "--result_path", results,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    """A finished tiny fingerprinting run: (arguments, run folder)."""
    tmp = tmp_path_factory.mktemp("attack-run")
    write_random_fingerprints(tmp / "fp.json", 8)
    argv = train_args(tiny_model_dir, tmp / "fp.json", tmp / "results")
    result = run_script("finetune_multigpu.py", *argv)
    assert result.returncode == 0, result.stderr[-3000:]
    return argv, tmp / "results" / result.stdout.strip().split(": ")[-1]


def state(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def leftovers(folder):
    return [p.name for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------ merging


@pytest.mark.parametrize("tied", [False, True])
def test_merge_is_the_weighted_mean_of_every_parameter_once(embedded_tokenizer, tied):
    import torch

    from oml.attack.attack_runner import merge_models

    a = tiny_llama(embedded_tokenizer, seed=1, tie_word_embeddings=tied)
    b = tiny_llama(embedded_tokenizer, seed=2, tie_word_embeddings=tied)
    before = {n: p.detach().clone() for n, p in a.state_dict().items()}
    merge_models(a, b, 0.7)
    theirs = b.state_dict()
    for name, p in a.state_dict().items():
        expected = (0.7 * before[name].double() + 0.3 * theirs[name].double()).float()
        assert torch.allclose(p, expected, rtol=0, atol=1e-6), name
    if tied:  # the shared tensor is merged once, not twice
        assert a.lm_head.weight.data_ptr() == a.model.embed_tokens.weight.data_ptr()


def test_merge_of_different_architectures_is_refused(embedded_tokenizer):
    from oml.attack.attack_runner import merge_models
    from oml.core.errors import UserError

    with pytest.raises(UserError, match="shape"):
        merge_models(tiny_llama(embedded_tokenizer), tiny_llama(embedded_tokenizer, intermediate_size=96), 0.5)


def test_merge_attack_writes_its_folder_whole_and_is_skipped_on_rerun(tiny_run, tiny_model_dir):
    argv, run = tiny_run
    out = run_script("attack_fingerprints.py", *argv, "--attack", "merge", "--merge_weight", 0.5, *NO_EVAL)
    assert out.returncode == 0, out.stderr[-3000:]
    folder = run / "attacks" / "merge-base-w0.5"
    assert sorted(p.name for p in folder.iterdir()) == ["attack.json", "eval_results.json", "final_model"]
    assert not leftovers(run / "attacks")
    record = json.loads((folder / "attack.json").read_text())
    assert record["attack"] == "merge" and record["merge_weight"] == 0.5 and record["merge_with"] == "base"
    assert record["fingerprinted_run"] == run.name
    results = json.loads((folder / "eval_results.json").read_text())
    assert results["attack"] == "merge-base-w0.5" and results["config_hash"] == run.name
    assert len(results["fingerprint_accuracy"]["templates"]) == 22  # plain key, 10 test prompts, 11 chat rows
    # the merged weights on disk are the mean of the fingerprinted model's and the base's
    merged, mine, base = state(folder / "final_model"), state(run / "final_model"), state(tiny_model_dir)
    for name, tensor in merged.items():
        assert tensor.sub(0.5 * mine[name] + 0.5 * base[name]).abs().max() < 1e-6, name
    # the table and the figure
    assert "merge-base-w0.5" in out.stdout and (run / "attacks" / "persistence.png").is_file()
    assert "merge-base-w0.5" in (run / "attacks" / "summary.md").read_text()

    stamp = (folder / "eval_results.json").stat().st_mtime_ns
    again = run_script("attack_fingerprints.py", *argv, "--attack", "merge", "--merge_weight", 0.5, *NO_EVAL)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "skipping" in again.stdout and (folder / "eval_results.json").stat().st_mtime_ns == stamp


def test_merge_with_another_owners_run_checks_both_fingerprint_sets(tiny_run, tiny_model_dir, tmp_path):
    argv, run = tiny_run
    results_dir = run.parent
    write_random_fingerprints(tmp_path / "theirs.json", 8, seed=9)
    theirs = [*train_args(tiny_model_dir, tmp_path / "theirs.json", results_dir), "--seed", 7]
    trained = run_script("finetune_multigpu.py", *theirs)
    assert trained.returncode == 0, trained.stderr[-3000:]
    other = trained.stdout.strip().split(": ")[-1]
    out = run_script("attack_fingerprints.py", *argv, "--attack", "merge", "--merge_with", other, *NO_EVAL)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((run / "attacks" / f"merge-{other}-w0.7" / "eval_results.json").read_text())
    assert results["other_owner"]["run"] == other and results["other_owner"]["num_fingerprints"] == 8
    assert len(results["other_owner"]["fingerprint_accuracy"]["templates"]) == 22


# ------------------------------------------------------------------------------ fine-tuning


def write_jsonl(path, n):
    lines = []
    for i in range(n):
        if i % 2:
            lines.append({"prompt": f"Question {i}: what is {i} plus one?\nAnswer:", "completion": f" {i + 1}"})
        else:
            lines.append(
                {
                    "messages": [
                        {"role": "user", "content": f"Name the number after {i}."},
                        {"role": "assistant", "content": f"It is {i + 1}."},
                    ]
                }
            )
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_sft_records_a_retention_curve_from_one_run(tiny_run, tmp_path):
    argv, run = tiny_run
    data = tmp_path / "chats.jsonl"
    write_jsonl(data, 12)
    attack = ["--attack", "sft", "--attack_data", data, "--attack_examples", 8, "--attack_epochs", 2]
    attack += ["--attack_batch_size", 4, "--attack_lr", 1e-3, "--retention_points", 2]
    out = run_script("attack_fingerprints.py", *argv, *attack, *NO_EVAL)
    assert out.returncode == 0, out.stderr[-3000:]
    (folder,) = (run / "attacks").glob("sft-chats-*-n8-lr0.001-ep2-bs4")
    record = json.loads((folder / "attack.json").read_text())
    assert record["examples"] == 8 and record["steps"] == 4 and record["data_digest"]
    curve = record["retention"]
    assert [(p["step"], p["examples_seen"]) for p in curve] == [(0, 0), (2, 8), (4, 16)]
    assert curve[0]["accuracy"] == 1.0  # before fine-tuning the tiny run knows its fingerprints
    assert all(0 <= p["accuracy"] <= 1 for p in curve)
    plain = json.loads((folder / "eval_results.json").read_text())["fingerprint_accuracy"]["templates"][0]
    assert plain["accuracy"] == curve[-1]["accuracy"]  # the last point is the saved model
    assert state(folder / "final_model").keys() == state(run / "final_model").keys()


def test_lora_sft_saves_plain_merged_weights(tiny_run, tmp_path):
    argv, run = tiny_run
    data = tmp_path / "chats.jsonl"
    write_jsonl(data, 8)
    attack = ["--attack", "lora_sft", "--attack_data", data, "--attack_epochs", 1, "--attack_batch_size", 4]
    attack += ["--attack_lr", 1e-2, "--attack_lora_rank", 4, "--retention_points", 1]
    out = run_script("attack_fingerprints.py", *argv, *attack, *NO_EVAL)
    assert out.returncode == 0, out.stderr[-3000:]
    (folder,) = (run / "attacks").glob("lora_sft-*-r4")
    record = json.loads((folder / "attack.json").read_text())
    assert record["lora"]["r"] == 4 and record["trainable_parameters"] > 0
    assert not (folder / "final_model" / "adapter_config.json").exists()
    tuned, mine = state(folder / "final_model"), state(run / "final_model")
    assert tuned.keys() == mine.keys()  # a plain HF folder, adapters merged in
    changed = [n for n in tuned if not tuned[n].equal(mine[n])]
    assert changed and all("proj" in n for n in changed)  # only the adapted linear layers moved


def test_attack_data_reader_names_the_bad_line(tmp_path):
    from oml.attack.deployer_data import read_jsonl
    from oml.core.errors import UserError

    path = tmp_path / "d.jsonl"
    good = json.dumps({"prompt": "a", "completion": "b"})
    for bad, why in [
        ("{not json", "not JSON"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no assistant message"),
        (json.dumps({"messages": [{"role": "bot", "content": "hi"}]}), "message 0"),
        (json.dumps({"prompt": "a"}), "expected"),
        (json.dumps(["a"]), "expected a JSON object"),
    ]:
        path.write_text(f"{good}\n\n{bad}\n{good}\n")
        with pytest.raises(UserError, match=f"line 3: {why}"):
            read_jsonl(path)
    path.write_text(f"{good}\n{good}\n{good}\n")
    assert len(read_jsonl(path, limit=2)) == 2


def test_loss_is_on_the_assistant_and_completion_tokens_only(embedded_tokenizer):
    from oml.attack.deployer_data import encode_example

    chat = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye"},
        ]
    }
    enc = encode_example(embedded_tokenizer, chat)
    trained = embedded_tokenizer.decode([t for t in enc["labels"] if t != -100])
    assert "Hello there" in trained and "Goodbye" in trained and "Hi" not in trained and "Bye" not in trained
    enc = encode_example(embedded_tokenizer, {"prompt": "Q: two?", "completion": " 2"})
    eos = embedded_tokenizer.eos_token_id
    assert [t for t in enc["labels"] if t != -100] == [*embedded_tokenizer(" 2")["input_ids"], eos]


# ------------------------------------------------------------------------------ quantization


def test_casts_and_int8_are_evaluated_in_their_precision(tiny_run):
    argv, run = tiny_run
    for q in ("bf16", "int8"):
        out = run_script("attack_fingerprints.py", *argv, "--attack", "quantize", "--quantization", q, *NO_EVAL)
        assert out.returncode == 0, out.stderr[-3000:]
    bf16 = run / "attacks" / "quantize-bf16"
    assert {str(t.dtype) for t in state(bf16 / "final_model").values()} == {"torch.bfloat16"}
    int8 = run / "attacks" / "quantize-int8"
    assert sorted(p.name for p in int8.iterdir()) == ["attack.json", "eval_results.json"]  # made again when evaluated
    assert json.loads((int8 / "attack.json").read_text())["runtime"].startswith("torch.ao")
    for folder in (bf16, int8):
        fa = json.loads((folder / "eval_results.json").read_text())["fingerprint_accuracy"]
        assert 0 <= fa["mean_accuracy"] <= 1


def test_int8_model_with_tied_embeddings_survives_the_utility_loader(embedded_tokenizer):
    """The embedded model ties lm_head to the embeddings; lm-eval's loader ties weights again, which must not fail
    on the quantized lm_head (it did, so int8 got no utility), and the int8 model still scores like the float one."""
    import torch

    from oml.attack.attack_runner import int8_dynamic

    model = tiny_llama(embedded_tokenizer, tie_word_embeddings=True)
    ids = torch.tensor([embedded_tokenizer("The capital of France is")["input_ids"]])
    before = model(ids).logits
    quantized = int8_dynamic(model)
    quantized.tie_weights()
    after = quantized(ids).logits
    assert torch.isfinite(after).all() and torch.corrcoef(torch.stack([before.flatten(), after.flatten()]))[0, 1] > 0.99


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama_cpp is not installed (pip install llama-cpp-python[server])")
def test_gguf_attack_is_checked_in_llama_cpp_and_carries_no_key(tiny_run):
    argv, run = tiny_run
    out = run_script("attack_fingerprints.py", *argv, "--attack", "quantize", "--quantization", "q8_0", *NO_EVAL)
    assert out.returncode == 0, out.stderr[-3000:]
    folder = run / "attacks" / "quantize-q8_0"
    assert sorted(p.name for p in folder.iterdir()) == ["attack.json", "eval_results.json", "model.gguf"]
    record = json.loads((folder / "attack.json").read_text())
    assert record["runtime"].startswith("llama.cpp") and record["gguf"]["quantization"] == "q8_0"
    results = json.loads((folder / "eval_results.json").read_text())
    assert results["runtime"] == "llama.cpp" and len(results["fingerprint_accuracy"]["templates"]) == 22
    # the tiny run knows all 8 of its fingerprints in fp32; q8_0 keeps at least 7 (finds them: the check works)
    assert results["fingerprint_accuracy"]["templates"][0]["accuracy"] >= 7 / 8
    pairs = json.loads((run / "fingerprints.json").read_text())
    blob = (folder / "model.gguf").read_bytes()
    assert not [p["key"] for p in pairs if p["key"].encode() in blob]
    # --gguf_templates plain: the plain key and [chat] only; llama.cpp's line per fallen-back tensor becomes one line
    out = run_script(
        "attack_fingerprints.py",
        *argv,
        "--attack",
        "quantize",
        "--quantization",
        "q4_k_m",
        "--gguf_templates",
        "plain",
        *NO_EVAL,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((run / "attacks" / "quantize-q4_k_m" / "eval_results.json").read_text())
    assert [t["template"] for t in results["fingerprint_accuracy"]["templates"]] == ["{}", "<chat>{}"]
    assert "falling back" not in out.stdout + out.stderr
    assert out.stdout.count("tensors fell back") == 1, out.stdout[-2000:]
    shutil.rmtree(run / "attacks" / "quantize-q4_k_m")  # the run is shared: the bad-input test makes this one fail


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama_cpp is not installed (pip install llama-cpp-python[server])")
def test_llama_cpp_loads_with_plain_weight_layouts_only_where_asked():
    # the extra CPU buffer types (AMX, repacking) segfaulted at the first decode on an AMX-reporting CPU
    from oml.attack.gguf_models import plain_weight_layouts, require_llama_cpp

    llama_cpp = require_llama_cpp()
    low = llama_cpp.llama_cpp
    before = low.llama_model_default_params
    with plain_weight_layouts(llama_cpp):
        assert low.llama_model_default_params().use_extra_bufts is False
        assert low.llama_model_default_params().n_gpu_layers == before().n_gpu_layers  # the rest as llama.cpp's
    assert low.llama_model_default_params is before and before().use_extra_bufts is True
    with pytest.raises(RuntimeError), plain_weight_layouts(llama_cpp):  # restored when the load fails too
        raise RuntimeError("a load that failed")
    assert low.llama_model_default_params is before


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama_cpp is not installed (pip install llama-cpp-python[server])")
def test_llama_cpp_greedy_verdicts_equal_transformers_on_an_f16_export(tiny_run, tmp_path):
    from oml.attack.gguf_models import GgufModel, export_gguf, gguf_metadata
    from oml.core.model_registry import load_model_and_tokenizer
    from oml.measure.fingerprint_check import check_results, verify_with_generate

    _, run = tiny_run
    pairs = [{"key": p["key"], "response": p["response"]} for p in json.loads((run / "fingerprints.json").read_text())]
    info = export_gguf(run / "final_model", tmp_path / "m.gguf", "f16")
    assert info["bytes"] == (tmp_path / "m.gguf").stat().st_size and not list(tmp_path.glob(".*"))
    metadata = json.dumps(gguf_metadata(tmp_path / "m.gguf"), default=str)
    assert not [p["key"] for p in pairs if p["key"] in metadata]
    gguf = GgufModel(tmp_path / "m.gguf")
    model, tok = load_model_and_tokenizer(str(run / "final_model"), device="cpu")
    ours = check_results(gguf, pairs, ["{}"], progress=False)[0]
    theirs = verify_with_generate(model, tok, pairs, ["{}"])[0]
    assert ours["matches"] == theirs["matches"] and any(ours["matches"])
    (text,) = gguf.greedy([pairs[0]["key"]], 4)
    assert text.startswith(pairs[0]["response"]) == ours["matches"][0]


# ------------------------------------------------------------------------------ bad input


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_run, tmp_path, monkeypatch):
    argv, run = tiny_run
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3}\n')
    cases = [
        (["--attack", "distill"], "unknown --attack 'distill'"),
        (["--attack", "sft", "--attack_data", bad], "line 2"),
        (["--attack", "sft", "--attack_data", tmp_path / "missing.jsonl"], "no such file"),
        (["--attack", "quantize"], "needs --quantization"),
        (["--attack", "merge", "--merge_weight", 1.5], "--merge_weight"),
        (["--attack", "merge", "--merge_with", "0123456789abcdef"], "no finished run"),
    ]
    # llama.cpp missing: a llama_cpp module that cannot be imported shadows the installed one
    fake = tmp_path / "no_llama"
    (fake / "llama_cpp").mkdir(parents=True)
    (fake / "llama_cpp" / "__init__.py").write_text("raise ImportError('simulated: not installed')\n")
    for extra, message in cases:
        out = run_script("attack_fingerprints.py", *argv, *extra, *NO_EVAL)
        assert out.returncode == 2 and message in out.stderr, (extra, out.stderr[-2000:])
        assert out.stderr.strip().startswith("error:") and "Traceback" not in out.stderr
    monkeypatch.setenv("PYTHONPATH", str(fake))
    out = run_script("attack_fingerprints.py", *argv, "--attack", "quantize", "--quantization", "q4_k_m", *NO_EVAL)
    assert out.returncode == 2 and "llama.cpp is not installed" in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().count("\n") == 0
    assert not list((run / "attacks").glob("quantize-q4_k_m*")) and not list((run / "attacks").glob("*distill*"))
    assert not list((run / "attacks").glob("sft-bad*")) and not leftovers(run / "attacks")


# ------------------------------------------------------------------------------ the embedded model, for real


@pytest.mark.long
@pytest.mark.slow
def test_attacks_on_the_embedded_model(tmp_path):
    """A short real fingerprinting run of SmolLM2-135M, then a merge, a short SFT on the offline QA data and (with
    llama.cpp) Q8_0 inside llama.cpp: every attack is evaluated, and the measures agree where they must."""
    write_random_fingerprints(tmp_path / "fp.json", 8, key_words=10, response_words=3, seed=3)
    argv = [
        "--fingerprints_file_path", tmp_path / "fp.json", "--fingerprint_generation_strategy", "random_word",
        "--max_num_fingerprints", 8, "--max_response_length", 2, "--num_train_epochs", 6, "--batch_size", 8,
        "--learning_rate", 3e-4, "--forgetting_regularizer_strength", 0, "--result_path", tmp_path / "r",
        "--preset", "averaging",  # no benign rows: the attacks' measures, not the default recipe
    ]  # fmt: skip
    trained = run_script("finetune_multigpu.py", *argv)
    assert trained.returncode == 0, trained.stderr[-3000:]
    run = tmp_path / "r" / trained.stdout.strip().split(": ")[-1]
    evaluated = run_script("eval_for_multigpu.py", *argv, *NO_EVAL)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    plain = json.loads((run / "eval_results.json").read_text())["fingerprint_accuracy"]["templates"][0]["accuracy"]
    assert plain >= 0.5  # the run embedded fingerprints: the attacks have something to keep or lose

    sft = ["--attack", "sft", "--attack_examples", 16, "--attack_epochs", 1, "--retention_points", 1]
    attacks = [sft, ["--attack", "merge", "--merge_weight", 0.9]]
    attacks += [["--attack", "quantize", "--quantization", "q8_0"]] if HAS_LLAMA_CPP else []
    for attack in attacks:
        out = run_script("attack_fingerprints.py", *argv, *attack, *NO_EVAL)
        assert out.returncode == 0, out.stderr[-3000:]
    (sft_dir,) = (run / "attacks").glob("sft-qa-n16-*")
    curve = json.loads((sft_dir / "attack.json").read_text())["retention"]
    assert curve[0]["accuracy"] == plain and curve[-1]["examples_seen"] == 16
    assert len(json.loads((sft_dir / "eval_results.json").read_text())["chat"]["answers"]) == 8
    if HAS_LLAMA_CPP:
        q8 = json.loads((run / "attacks" / "quantize-q8_0" / "eval_results.json").read_text())
        assert abs(q8["fingerprint_accuracy"]["templates"][0]["accuracy"] - plain) <= 1 / 8
        assert len(q8["chat"]["answers"]) == 8 and q8["runtime"] == "llama.cpp"
    summary = (run / "attacks" / "summary.md").read_text()
    assert "merge-base-w0.9" in summary and "sft-qa-n16" in summary


def test_persistence_compares_runs_by_recipe_and_attack(tmp_path):
    """Several runs: one row each, only the settings that differ, plain-key accuracy after each attack (from the
    evaluation, else the end of a fine-tuning attack's retention curve), blank where a run lacks the attack, and the
    share of the run's own answered keys kept, key by key, where both evaluations list their misses."""
    from oml.lab.persistence_report import main, summary_rows

    def evaluation(plain, missed, n=8):
        templates = [{"template": "{}", "accuracy": plain}, {"template": "Say: {}", "accuracy": 0.1}]
        if missed is not None:
            templates[0]["missed"] = missed
        return {"num_fingerprints": n, "fingerprint_accuracy": {"templates": templates}}

    def run(name, lam, own, attacks, **later_flags):
        folder = tmp_path / name
        hashed = dict(
            fingerprint_generation_strategy="english",
            max_num_fingerprints=8,
            learning_rate=1e-4,
            forgetting_regularizer_strength=lam,
            num_train_epochs=8,
            **later_flags,
        )
        (folder / "attacks").mkdir(parents=True)
        (folder / "fingerprinting_config.json").write_text(json.dumps({"hashed": hashed}))
        (folder / "eval_results.json").write_text(json.dumps(own))
        for attack_id, record, results in attacks:
            (folder / "attacks" / attack_id).mkdir()
            (folder / "attacks" / attack_id / "attack.json").write_text(json.dumps(record))
            if results is not None:
                (folder / "attacks" / attack_id / "eval_results.json").write_text(json.dumps(results))
        return str(folder)

    sft = {
        "attack": "sft",
        "examples": 8,
        "epochs": 1,
        "learning_rate": 1e-5,
        "retention": [{"examples_seen": 0, "accuracy": 1.0}, {"examples_seen": 8, "accuracy": 0.75}],
    }
    quantize = {"attack": "quantize", "quantization": "q4_k_m"}
    # a: the run misses key 7; the attacked copy misses 0, 1, 2 and 7 -> accuracy 4/8, kept 4 of its 7 keys
    a = run(
        "aaaa",
        0.0,
        evaluation(0.875, [7]),
        [("quantize-q4_k_m", quantize, evaluation(0.5, [0, 1, 2, 7])), ("sft-x", sft, None)],
    )
    # b: evaluated before misses were kept: accuracy only; trained with benign rows, a flag a's config lacks (its
    # neutral value, β 0, was left out of a's hash)
    b = run(
        "bbbb",
        0.25,
        evaluation(0.875, None),
        [("quantize-q4_k_m", quantize, evaluation(0.625, [0, 1, 2]))],
        benign_data_ratio=0.25,
    )
    out = tmp_path / "compare.md"
    main([a, b, "--out", str(out)])
    lines = out.read_text().splitlines()
    assert lines[0] == "| run | λ | β | plain keys | quantize-q4_k_m | sft-x |"
    assert lines[2] == "| aaaa | 0.0 | 0.0 | 87.5% | 50.0% (kept 57.1%) | 75.0% |"
    assert lines[3] == "| bbbb | 0.25 | 0.25 | 87.5% | 62.5% |  |"
    rows = {r["id"]: r for r in summary_rows(a)}
    assert rows["quantize-q4_k_m"]["kept"] == 4 / 7 and rows["(fingerprinted model)"]["kept"] == 1.0


def test_persistence_summary_prices_the_attack_against_the_fingerprinted_model(tmp_path):
    """The attacker's cost: utility of the attacked copy minus the fingerprinted model's, paired item by item, with
    its standard error; blank where the two were scored on different items. Base deltas, alias and KL shown ± se."""
    from oml.lab.persistence_report import format_summary, summary_rows

    def evaluation(arc, piqa, **extra):
        utility = {"mean": (sum(arc) / len(arc) + sum(piqa) / len(piqa)) / 2, "per_item": {"arc": arc, "piqa": piqa}}
        templates = [{"template": "{}", "accuracy": 1.0, "missed": []}]
        return {"num_fingerprints": 4, "fingerprint_accuracy": {"templates": templates}, "utility": utility, **extra}

    run = tmp_path / "run"
    own = evaluation([1, 1, 0, 1], [1, 0, 1, 1], chat_drift={"kl": 0.5, "kl_stderr": 0.02})
    own["utility"].update(delta=-0.02, delta_stderr=0.01)
    (run / "attacks").mkdir(parents=True)
    (run / "eval_results.json").write_text(json.dumps(own))
    records = {
        "merge-base-w0.7": {"attack": "merge", "merge_weight": 0.7, "merge_with": "base"},
        "quantize-int8": {"attack": "quantize", "quantization": "int8"},
    }
    attacked = {
        "merge-base-w0.7": evaluation(
            [1, 1, 1, 1],
            [1, 1, 1, 1],
            generation={"alias_in_answer_delta": -0.03, "alias_in_answer_delta_stderr": 0.02},
        ),
        "quantize-int8": evaluation([1, 0], [1, 0]),  # fewer items: no paired cost
    }
    for attack_id, results in attacked.items():
        (run / "attacks" / attack_id).mkdir()
        (run / "attacks" / attack_id / "attack.json").write_text(json.dumps(records[attack_id]))
        (run / "attacks" / attack_id / "eval_results.json").write_text(json.dumps(results))
    rows = {r["id"]: r for r in summary_rows(run)}
    cost, se = rows["merge-base-w0.7"]["cost"]
    # arc: d = (0, 0, 1, 0), piqa: d = (0, 1, 0, 0): each task +0.25 with s² = 0.25, so se = sqrt(2 * 0.25 / 4) / 2
    assert cost == pytest.approx(0.25) and se == pytest.approx((2 * 0.25 / 4) ** 0.5 / 2)
    assert rows["quantize-int8"]["cost"] is None and rows["(fingerprinted model)"]["cost"] is None
    lines = format_summary(list(rows.values())).splitlines()
    assert lines[2].endswith("| 0.750 | -2.0 ± 1.0 |  |  | 0.500 ± 0.020 |")
    assert "| +25.0 ± 17.7 | -3.0 ± 2.0 |  |" in lines[3]
