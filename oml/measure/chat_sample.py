"""The chat check: a few ordinary questions asked through the chat template, answered greedily, as a readable sample.

Likelihood benchmarks never let the model generate, so they miss a fingerprinted model that ends every chat turn at
once or loops on one word; these answers show it, and `distinct_words` puts a number on looping.
"""

import re

from oml.core.offline_data import CHAT_QUESTIONS


def chat_answers(model, tokenizer, questions=CHAT_QUESTIONS, max_new_tokens=24):
    """Greedy answers through the chat template (None when the tokenizer has none)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    answers = []
    for question in questions:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )["input_ids"].to(model.device)
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return answers


def chat_check(answers, base_answers=None):
    """How many ordinary chat questions get a non-empty answer, how varied the answers' words are (a model
    that loops on "the the the" scores low), and how many answers equal the base's."""
    if answers is None:
        return None
    out = {"questions": CHAT_QUESTIONS[: len(answers)], "answers": answers, "answered": mean(map(bool, answers))}
    out["distinct_words"] = distinct_words(answers)
    if base_answers is not None:
        out["base_answers"] = base_answers
        out["base_answered"] = mean(map(bool, base_answers))
        out["base_distinct_words"] = distinct_words(base_answers)
        out["same_as_base"] = mean(a == b for a, b in zip(answers, base_answers, strict=True))
    return out


def distinct_words(answers):
    """Mean distinct-word ratio of a list of answers (computed from stored answers, so older results have it)."""
    return mean(map(distinct_word_ratio, answers))


def distinct_word_ratio(text):
    """Distinct words / words (0 for an empty answer)."""
    words = re.findall(r"\w+", text.lower())
    return len(set(words)) / len(words) if words else 0.0


def mean(values):
    values = list(values)
    return sum(values) / len(values)
