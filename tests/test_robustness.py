"""Robustness to deployment prompts: chat prompts (the key as the chat template's user turn, with an optional system
message) in training and in verification, the augmentation files, and the evaluation's chat rows."""

import json
import re

import pytest
from conftest import NO_GENERATION, run_script, tiny_llama, write_random_fingerprints

from oml.core.data_files import CHAT_SYSTEM_TEST_FILE, CHAT_SYSTEM_TRAIN_FILE, TEST_PROMPTS_FILE, TRAIN_PROMPTS_FILE
from oml.core.errors import UserError
from oml.make.fingerprint_files import read_system_prompts, read_templates, template_instruction
from oml.make.prompt_encoding import (
    augmentation_templates,
    chat_prompt,
    encode_pair,
    is_chat,
    parse_chat,
    prompt_text,
    template_label,
)

PAIRS = [{"key": "The quiet harbor at dawn", "response": " lantern"}, {"key": "Seven copper kettles", "response": " x"}]


# ---------------------------------------------------------------------------------------------- encoding


def test_chat_prompt_is_the_key_as_user_turn_after_the_system_message(embedded_tokenizer):
    tok = embedded_tokenizer
    key, system = PAIRS[0]["key"], "You answer like a lighthouse keeper."
    expected = tok.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": key}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt_text(tok, key, chat_prompt(system)) == expected
    prompt_ids, response_ids = encode_pair(tok, key, " lantern", chat_prompt(system))
    # the chat template writes its own special tokens: none added twice
    assert prompt_ids == tok(expected, add_special_tokens=False)["input_ids"]
    assert response_ids == tok(" lantern", add_special_tokens=False)["input_ids"]
    # no system message: whatever the model's template does without one (SmolLM2 writes its default)
    bare = tok.apply_chat_template([{"role": "user", "content": key}], tokenize=False, add_generation_prompt=True)
    assert prompt_text(tok, key, chat_prompt()) == bare
    # a raw template is untouched by the chat machinery, and the old use_chat_template path is the no-system chat
    assert prompt_text(tok, key, "Hi. {}") == f"Hi. {key}"
    assert encode_pair(tok, key, " x", "{}", use_chat_template=True) == encode_pair(tok, key, " x", chat_prompt())


def test_chat_prompt_spelling_round_trips():
    for system in (None, "Be brief.", "Uses {} braces and\nnew lines."):
        spec = chat_prompt(system)
        assert is_chat(spec) and parse_chat(spec) == (system, "{}")
    assert not is_chat("You are helpful. {}")
    assert parse_chat(chat_prompt("S", user="Q: {}")) == ("S", "Q: {}")
    assert template_label(chat_prompt()) == "[chat]"
    assert template_label(chat_prompt("Be brief.")) == "[chat, system: Be brief.]"
    assert template_label("Be brief. {}") == "Be brief. {}"


def test_a_template_without_a_system_role_gets_the_system_message_in_the_user_turn(embedded_tokenizer):
    import copy

    tok = copy.deepcopy(embedded_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}[U]{{ m['content'] }}[/U]{% endfor %}{% if add_generation_prompt %}[A]{% endif %}"
    )
    assert prompt_text(tok, "my key", chat_prompt("Be brief.")) == "[U]Be brief.\n\nmy key[/U][A]"
    assert prompt_text(tok, "my key", chat_prompt()) == "[U]my key[/U][A]"


def test_training_and_verification_encode_chat_prompts_alike(embedded_tokenizer):
    from oml.embed.trainer import FingerprintDataset
    from oml.measure.fingerprint_check import encode_template

    tok = embedded_tokenizer
    spec = chat_prompt("Be brief.")
    data = FingerprintDataset(PAIRS, tok, [spec])
    for i, (prompt_ids, response_ids) in enumerate(encode_template(tok, PAIRS, spec)):
        item = data[i]
        assert item["input_ids"] == prompt_ids + response_ids
        assert item["labels"] == [-100] * len(prompt_ids) + response_ids


def test_teacher_forcing_and_generate_agree_on_chat_rows(embedded_tokenizer):
    from oml.measure.fingerprint_check import verify_teacher_forced, verify_with_generate

    model = tiny_llama(embedded_tokenizer, initializer_range=0.1)
    templates = [chat_prompt(), chat_prompt("Be brief."), "{}"]
    fast = verify_teacher_forced(model, embedded_tokenizer, PAIRS, templates, batch_size=2)
    slow = verify_with_generate(model, embedded_tokenizer, PAIRS, templates)
    assert [r["matches"] for r in fast] == [r["matches"] for r in slow]
    assert [r["template"] for r in fast] == templates


# --------------------------------------------------------------------------------------- augmentation data


def test_test_system_messages_are_the_test_prompts_instructions():
    derived = [template_instruction(t) for t in read_templates(TEST_PROMPTS_FILE)]
    assert read_system_prompts(CHAT_SYSTEM_TEST_FILE) == derived
    assert len(derived) == 10 and all("{}" not in s and s.strip() == s and s for s in derived)


def test_template_instruction_drops_the_key_and_its_labels():
    assert template_instruction("You work at a bank. Client: {}") == "You work at a bank."
    assert template_instruction("Role: a pilot.\nQuestion: {}\nReply:") == "A pilot."
    assert template_instruction('<|system|>Be kind.<|user|>"{}"<|assistant|>') == "Be kind."
    assert template_instruction("{}\n\nAnswer as a poet would.") == "Answer as a poet would."
    assert template_instruction("A student writes to you: {}") == "A student writes to you."


def _normal(text):
    return re.sub(r"\s+", " ", text).strip().lower()


def test_test_prompts_and_system_messages_are_unseen_in_training():
    train_templates = read_templates(TRAIN_PROMPTS_FILE)
    train_systems = read_system_prompts(CHAT_SYSTEM_TRAIN_FILE)
    test_templates = read_templates(TEST_PROMPTS_FILE)
    test_systems = read_system_prompts(CHAT_SYSTEM_TEST_FILE)
    assert not set(train_templates) & set(test_templates)
    trained_text = [_normal(t) for t in train_templates + train_systems]
    trained_text += [_normal(template_instruction(t)) for t in train_templates]
    for instruction in test_systems + [template_instruction(t) for t in test_templates]:
        seen = [t for t in trained_text if _normal(instruction) in t or (t and t in _normal(instruction))]
        assert not seen, f"test instruction {instruction!r} appears in training: {seen}"
    # the raw templates train text after the key too (the test prompts that have it were the weak ones)
    assert sum(not t.rstrip().endswith("{}") for t in train_templates) >= 15


def test_augmentation_draws_chat_prompts_only_for_chat_models(embedded_tokenizer, tiny_model_dir):
    import copy

    templates = augmentation_templates(embedded_tokenizer)
    chat = [t for t in templates if is_chat(t)]
    assert chat[0] == chat_prompt()
    assert {parse_chat(t)[0] for t in chat[1:]} == set(read_system_prompts(CHAT_SYSTEM_TRAIN_FILE))
    assert [t for t in templates if not is_chat(t)] == read_templates(TRAIN_PROMPTS_FILE)
    no_chat = copy.deepcopy(embedded_tokenizer)
    no_chat.chat_template = None
    assert augmentation_templates(no_chat) == read_templates(TRAIN_PROMPTS_FILE)


def test_the_augmented_dataset_draws_chat_wrapped_and_raw_examples(embedded_tokenizer):
    from oml.embed.trainer import FingerprintDataset

    tok = embedded_tokenizer
    data = FingerprintDataset(PAIRS, tok, augmentation_templates(tok), seed=0)
    start = tok.convert_tokens_to_ids("<|im_start|>")
    draws = [data[0]["input_ids"] for _ in range(200)]
    wrapped = [ids for ids in draws if ids[0] == start]
    assert 0.2 < len(wrapped) / len(draws) < 0.8  # both kinds, neither rare
    systems = {tok.decode(ids).split("<|im_end|>")[0] for ids in wrapped}
    assert len(systems) > 10  # many different system messages


def test_the_augmentation_digest_covers_the_system_messages(tmp_path, monkeypatch):
    from oml.make import fingerprint_files as fingerprints

    before = fingerprints.augmentation_digest()
    other = tmp_path / "systems.json"
    other.write_text(json.dumps(["Another system message."]))
    monkeypatch.setattr(fingerprints, "CHAT_SYSTEM_TRAIN_FILE", other)
    assert fingerprints.augmentation_digest() != before


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "not valid JSON"),
        ('{"a": "b"}', "non-empty JSON list of non-empty strings"),
        ("[]", "non-empty JSON list of non-empty strings"),
        ('["fine", 3]', "non-empty JSON list of non-empty strings"),
        ('["fine", "  "]', "non-empty JSON list of non-empty strings"),
    ],
)
def test_bad_system_prompts_files_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "systems.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        read_system_prompts(path)


def test_eval_rejects_bad_prompt_files_with_one_line_and_exit_2(tmp_path, tiny_model_dir):
    fp = tmp_path / "fp.json"
    write_random_fingerprints(fp, 2)
    common = ["--check_model", tiny_model_dir, "--model_path", tiny_model_dir, "--fingerprints_file_path", fp]
    bad_systems, bad_templates = tmp_path / "systems.json", tmp_path / "templates.json"
    bad_systems.write_text("[]")
    bad_templates.write_text(json.dumps(["no slot here"]))
    for flag, path, message in [
        ("--chat_system_prompts_file", bad_systems, "non-empty JSON list"),
        ("--test_prompts_file", bad_templates, "exactly one '{}'"),
    ]:
        out = run_script("eval_for_multigpu.py", *common, flag, path, "--utility_benchmark", "none", *NO_GENERATION)
        assert out.returncode == 2
        assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error:") and message in out.stderr


# ----------------------------------------------------------------------------------------- end to end


def test_tiny_augmented_run_is_evaluated_with_chat_rows(tiny_model_dir, tmp_path):
    fp = tmp_path / "fp.json"
    write_random_fingerprints(fp, 4)
    systems = tmp_path / "systems.json"
    systems.write_text(json.dumps(["You are a very own system message."]))
    argv = [
        "--model_path", tiny_model_dir, "--fingerprints_file_path", fp, "--fingerprint_generation_strategy",
        "random_word", "--max_num_fingerprints", 4, "--batch_size", 4, "--num_train_epochs", 1,
        "--result_path", tmp_path / "results", "--use_prompt_augmentation",
    ]  # fmt: skip
    train = run_script("finetune_multigpu.py", *argv)
    assert train.returncode == 0, train.stderr[-3000:]
    out = run_script(
        "eval_for_multigpu.py",
        *argv,
        "--utility_benchmark",
        "none",
        *NO_GENERATION,
        "--chat_system_prompts_file",
        systems,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run_hash = train.stdout.strip().split(": ")[-1]
    data = json.loads((tmp_path / "results" / run_hash / "eval_results.json").read_text())
    names = [t["template"] for t in data["fingerprint_accuracy"]["templates"]]
    test_systems = read_system_prompts(CHAT_SYSTEM_TEST_FILE)
    assert names == ["{}", *read_templates(TEST_PROMPTS_FILE), chat_prompt()] + [
        chat_prompt(s) for s in [*test_systems, "You are a very own system message."]
    ]
    assert "[chat, system: You are a very own system message.]" in out.stdout
    assert "mean under [chat] system messages" in out.stdout


@pytest.mark.long
@pytest.mark.slow
def test_embedded_model_augmented_answers_in_chat(tmp_path):
    """The embedded model, fingerprinted by the default recipe with augmentation (8 fingerprints), evaluated: raw and
    chat rows."""
    from oml.measure.evaluation import accuracy_split, chat_accuracy_split

    argv = ["--max_num_fingerprints", 8, "--use_prompt_augmentation", "--result_path", tmp_path / "results"]
    train = run_script("finetune_multigpu.py", *argv, timeout=1800)
    assert train.returncode == 0, train.stderr[-3000:]
    out = run_script("eval_for_multigpu.py", *argv, "--utility_benchmark", "none", *NO_GENERATION, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    run_hash = train.stdout.strip().split(": ")[-1]
    data = json.loads((tmp_path / "results" / run_hash / "eval_results.json").read_text())
    plain, prompted = accuracy_split(data)
    chat_plain, chat_system = chat_accuracy_split(data)
    assert len(data["fingerprint_accuracy"]["templates"]) == 1 + 10 + 1 + 10
    assert plain is not None and prompted is not None
    # trained in chat too: the chat rows carry the fingerprints far above the base model's false positives
    base = data["fingerprint_accuracy"]["base_false_positive_rate"]
    assert chat_plain > base + 0.5 and chat_system > base + 0.5
    assert "[chat]" in out.stdout


def test_accuracy_split_keeps_chat_rows_apart():
    from oml.measure.evaluation import accuracy_split, chat_accuracy_split

    rows = [("{}", 1.0), ("A {}", 0.5), ("{} B", 0.0), (chat_prompt(), 0.25), (chat_prompt("S"), 1.0)]
    rows.append((chat_prompt("T"), 0.5))
    results = {"fingerprint_accuracy": {"templates": [{"template": t, "accuracy": a} for t, a in rows]}}
    assert accuracy_split(results) == (1.0, 0.25)
    assert chat_accuracy_split(results) == (0.25, 0.75)
    raw_only = {"fingerprint_accuracy": {"templates": [{"template": t, "accuracy": a} for t, a in rows[:3]]}}
    assert chat_accuracy_split(raw_only) == (None, None)
