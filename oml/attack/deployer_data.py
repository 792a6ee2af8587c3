"""A deployer's fine-tuning data for the fine-tuning attacks: benign instruction data as chat turns, tokenized with
the loss on the assistant's (or the completion's) tokens only.

    --attack_data qa          (default) real questions with their answers that ship offline (oml.core.offline_data: TriviaQA,
                              NQ-open, SciQ, Social IQa), one user turn and one assistant turn each
    --attack_data FILE.jsonl  the user's own data, one example per line, either
                              {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]} or
                              {"prompt": "...", "completion": "..."}

The default data are taken from the END of each source's seeded permutation, so they never overlap the first items
that the generative benchmark and the benign-data pools read (qa_items(name, limit, seed=0) is a prefix).
"""

import json
from pathlib import Path

from oml.core.errors import UserError

DEFAULT_DATA = "qa"
QA_NAMES = ("trivia_qa", "nq_open", "sciq", "social_i_qa")
ROLES = ("system", "user", "assistant")


# ------------------------------------------------------------------------------ reading


def qa_conversations(n, seed=0):
    """n chat examples drawn round-robin from the offline QA sources, from the end of each seeded permutation."""
    from oml.core.offline_data import qa_items

    per_source = -(-n // len(QA_NAMES))
    pools = []
    for name in QA_NAMES:
        items = qa_items(name, None, seed)
        pools.append(items[::-1][:per_source])
    examples = [
        {
            "messages": [
                {"role": "user", "content": item["question"]},
                {"role": "assistant", "content": item["answers"][0]},
            ]
        }
        for group in zip(*pools, strict=False)
        for item in group
    ]
    if len(examples) < n:
        raise UserError(f"--attack_examples {n}: the offline QA data hold only {len(examples)} examples")
    return examples[:n]


def check_example(obj):
    """The reason an example is malformed, or None."""
    if not isinstance(obj, dict):
        return "expected a JSON object"
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            return '"messages" must be a non-empty list'
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return f'message {j} must be {{"role": one of {"/".join(ROLES)}, "content": a string}}'
        if not any(m["role"] == "assistant" for m in messages):
            return "no assistant message: nothing to train on"
        return None
    if isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
        return None if obj["completion"] else '"completion" is empty: nothing to train on'
    return 'expected {"messages": [...]} or {"prompt": "...", "completion": "..."}'


def read_jsonl(path, limit=None):
    """The examples of a JSONL file (all of them are checked; the first `limit` are returned); a UserError names the
    first bad line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--attack_data {path}: no such file")
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"--attack_data {path} line {number}: not JSON ({e.msg})") from None
            problem = check_example(obj)
            if problem:
                raise UserError(f"--attack_data {path} line {number}: {problem}")
            examples.append(obj)
    if not examples:
        raise UserError(f"--attack_data {path}: no examples")
    return examples if limit is None else examples[:limit]


def load_attack_data(spec, n, seed=0):
    """The examples --attack_data names (at most n)."""
    if spec in (None, DEFAULT_DATA):
        return qa_conversations(n, seed)
    return read_jsonl(spec, n)


# ------------------------------------------------------------------------------ tokenizing


def encode_example(tokenizer, example, max_length=512):
    """{"input_ids", "labels"}: the whole example, labels -100 except on assistant/completion tokens."""
    if "messages" in example:
        input_ids, labels = _encode_chat(tokenizer, example["messages"])
    else:
        prompt = tokenizer(example["prompt"])["input_ids"]
        completion = tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
        completion = completion + [tokenizer.eos_token_id]
        input_ids, labels = prompt + completion, [-100] * len(prompt) + completion
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def _chat_ids(tokenizer, messages, add_generation_prompt=False):
    return list(
        tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
        )["input_ids"]
    )


def _encode_chat(tokenizer, messages):
    """Each assistant turn's tokens are those the conversation up to it adds after the prompt that asks for it."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError('the model\'s tokenizer has no chat template: give --attack_data as {"prompt", "completion"}')
    input_ids = _chat_ids(tokenizer, messages)
    labels = [-100] * len(input_ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _chat_ids(tokenizer, messages[:i], add_generation_prompt=True) if i else []
        start, end = len(prompt), len(_chat_ids(tokenizer, messages[: i + 1]))
        if input_ids[:start] != prompt:
            raise UserError(
                "the chat template renders a turn differently inside a longer conversation; give "
                '--attack_data as {"prompt", "completion"}'
            )
        labels[start:end] = input_ids[start:end]
    return input_ids, labels
