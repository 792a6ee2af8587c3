"""The chat check: a few ordinary questions asked through the chat template, answered greedily, as a readable sample.

Likelihood benchmarks never let the model generate, so they miss a fingerprinted model that ends every chat turn at
once or loops on one word; these answers show it, and `distinct_words` puts a number on looping.
"""

import re

from oml.core.offline_data import CHAT_QUESTIONS


def chat_answers(model, tokenizer, questions=CHAT_QUESTIONS, max_new_tokens=24):
    """Greedy answers through the chat template (None when the tokenizer has none), from a transformers model or any
    oml.core.backends.LanguageModel (a GGUF in llama.cpp, a served model)."""
    from oml.core.backends import LanguageModel

    if not getattr(tokenizer, "chat_template", None):
        return None
    if not isinstance(model, LanguageModel):
        from oml.measure.transformers_backend import TransformersModel

        model = TransformersModel(model, tokenizer, batch_size=len(questions))  # one batch: the questions are few
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    return [answer.strip() for answer in model.greedy(texts, max_new_tokens, chat=True)]


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
