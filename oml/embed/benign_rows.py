"""Benign rows: the base model's own behaviour, mixed into fingerprint training (--benign_data_ratio) so that training
on them pulls the model toward itself.

Two kinds, half the pool each:
  * chat: real questions that ship offline (oml.core.offline_data.mixed_questions: TriviaQA, NQ-open, SciQ, Social IQa) asked
    through the base model's chat template and answered by the *base* model, greedily (up to CHAT_TOKENS tokens,
    with its end-of-turn token when it ends by itself). Skipped when the tokenizer has no chat template.
  * text: plain-text continuations, as Scalable Fingerprinting mixes in: the first words of SciQ's science passages,
    continued greedily by the base model for TEXT_TOKENS tokens.

The pool is generated once per base model (progress bar) and cached under the cache directory
(oml.core.model_registry.cache_dir()/benign/), keyed by a digest of the model's files (weights, config, tokenizer), so another
path to the same model reuses it and a changed model never does. Concurrent processes (two DeepSpeed ranks, two
sweeps) wait on a file lock; one generates. The run hash takes what determines the rows, not the rows: the recipe
below and the model's digest (`benign_rows_recipe`, computed in seconds), so naming a run never generates the pool;
training, which does, records the digest of the rows themselves in the run's metrics.json (`benign_rows_digest`).
The loss covers the responses only, like a fingerprint's.

    pool = benign_pool("embedded:SmolLM2-135M-Instruct")  # {"digest", "rows": [{"kind", "prompt", "response",
                                                          #   "ended"}], ...}
    encode_benign(tokenizer, row) -> (prompt_ids, response_ids)
"""

import hashlib
import json
import os
from pathlib import Path

from oml.core.errors import UserError

QA_NAMES = ("trivia_qa", "nq_open", "sciq", "social_i_qa")
POOL_CHAT = 256  # rows of each kind; a run cycles through the pool, reshuffled each cycle
POOL_TEXT = 256
CHAT_TOKENS = 48
TEXT_TOKENS = 32
TEXT_PROMPT_WORDS = 12
GENERATE_BATCH = 32
# Bump when anything above or the way rows are made changes: cached pools then miss.
RECIPE_VERSION = 1


def recipe():
    """The settings that, with the model, determine the pool's rows (the questions' order is seeded with 0)."""
    return {
        "version": RECIPE_VERSION,
        "qa": list(QA_NAMES),
        "chat": POOL_CHAT,
        "text": POOL_TEXT,
        "chat_tokens": CHAT_TOKENS,
        "text_tokens": TEXT_TOKENS,
        "text_prompt_words": TEXT_PROMPT_WORDS,
    }


# ------------------------------------------------------------------------------ the model's content


MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".jinja")


def model_folder(model_id):
    """The local folder holding a model: the converted embedded model, a local path, or a hub snapshot."""
    from oml.core.model_registry import local_path

    path = Path(local_path(model_id))
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:
        raise UserError(
            f"--benign_data_ratio needs the model {model_id!r} on this machine (a local folder or a downloaded "
            "hub snapshot) to generate its benign rows"
        ) from None


def model_digest(model_id):
    """sha256 over the model's files (name, content); file digests are memoised by (path, size, mtime)."""
    from oml.core.files import atomic_write_json
    from oml.core.model_registry import cache_dir

    folder = model_folder(model_id)
    memo_path = cache_dir() / "file_digests.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, json.JSONDecodeError):
        memo = {}
    total, changed = hashlib.sha256(), False
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(MODEL_FILE_SUFFIXES))
    if not files:
        raise UserError(f"the model folder {folder} holds no model files")
    for path in files:
        real = path.resolve()
        stat = real.stat()
        key = f"{real}:{stat.st_size}:{stat.st_mtime_ns}"
        if key not in memo:
            h = hashlib.sha256()
            with open(real, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
            memo[key], changed = h.hexdigest(), True
        total.update(f"{path.name}\0{memo[key]}\n".encode())
    if changed:  # entries of files that no longer exist (deleted folders, temporary models) are dropped
        memo = {k: v for k, v in memo.items() if os.path.exists(k.rsplit(":", 2)[0])}
        atomic_write_json(memo_path, memo)
    return total.hexdigest()


# ------------------------------------------------------------------------------ the pool


def rows_digest(rows):
    return hashlib.sha256(json.dumps(rows, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def pool_path(digest):
    from oml.core.model_registry import cache_dir

    return cache_dir() / "benign" / f"{digest[:24]}-v{RECIPE_VERSION}.json"


def benign_pool(model_id, trust_remote_code=False):
    """The cached pool of benign rows for this model, generated on first use."""
    from filelock import FileLock

    from oml.core.files import atomic_write_json

    path = pool_path(model_digest(model_id))
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        pool = _read_pool(path)
        if pool is None:
            rows = generate_rows(model_id, trust_remote_code)
            pool = {"model": model_id, "recipe": recipe(), "digest": rows_digest(rows), "rows": rows}
            atomic_write_json(path, pool)
    return pool


def _read_pool(path):
    try:
        pool = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if pool.get("recipe") != recipe() or rows_digest(pool.get("rows", [])) != pool.get("digest"):
        return None
    return pool


def text_prompts(n):
    """The first words of n SciQ science passages (those long enough), in a fixed order."""
    from oml.core.offline_data import load_split

    prompts = []
    for support in load_split("sciq/none/validation")["support"]:
        words = support.split()
        if len(words) >= 2 * TEXT_PROMPT_WORDS:
            prompts.append(" ".join(words[:TEXT_PROMPT_WORDS]))
        if len(prompts) == n:
            return prompts
    raise UserError(f"SciQ holds only {len(prompts)} passages long enough for benign text prompts, {n} needed")


def generate_rows(model_id, trust_remote_code=False):
    """The base model's greedy answers (chat) and continuations (text), as rows."""
    from oml.core.logs import quiet_libraries
    from oml.core.model_registry import load_model_and_tokenizer
    from oml.core.offline_data import mixed_questions

    quiet_libraries()
    model, tok = load_model_and_tokenizer(model_id, trust_remote_code=trust_remote_code)
    model.eval()
    rows = []
    if getattr(tok, "chat_template", None):
        questions = mixed_questions(QA_NAMES, POOL_CHAT, seed=0)
        prompts = [encode_benign(tok, {"kind": "chat", "prompt": q, "response": ""})[0] for q in questions]
        outputs = _greedy(model, tok, prompts, CHAT_TOKENS, "benign chat answers")
        for question, (ids, ended) in zip(questions, outputs, strict=True):
            rows.append({"kind": "chat", "prompt": question, "response": tok.decode(ids), "ended": ended})
    texts = text_prompts(POOL_TEXT)
    outputs = _greedy(model, tok, [encode_benign(tok, {"kind": "text", "prompt": t, "response": ""})[0] for t in texts],
                      TEXT_TOKENS, "benign text continuations")  # fmt: skip
    for text, (ids, ended) in zip(texts, outputs, strict=True):
        rows.append({"kind": "text", "prompt": text, "response": tok.decode(ids), "ended": ended})
    rows = [r for r in rows if r["response"].strip()]
    if not rows:
        raise UserError(f"the model {model_id} answered none of the benign prompts")
    del model
    return rows


def _greedy(model, tok, prompts, max_new_tokens, desc):
    """[(new token ids without the end token, ended by an end token)] for each prompt, left-padded batches."""
    from oml.core.backends import cut_at_end, end_of_sequence_ids
    from oml.core.greedy_decoding import greedy_decode

    eos = end_of_sequence_ids(model.generation_config, tok)
    answers = greedy_decode(model, prompts, max_new_tokens, eos, tok.pad_token_id, GENERATE_BATCH, desc=desc)
    return [cut_at_end(tokens, eos) for tokens in answers]


# ------------------------------------------------------------------------------ rows as tokens


def encode_benign(tokenizer, row):
    """(prompt_ids, response_ids) of a benign row; a chat answer that ended by itself keeps its end token."""
    from oml.make.prompt_encoding import encode_pair

    chat = row["kind"] == "chat"
    prompt_ids, response_ids = encode_pair(tokenizer, row["prompt"], row["response"], "{}", use_chat_template=chat)
    if row.get("ended"):
        response_ids = response_ids + [end_token_id(tokenizer, chat)]
    return prompt_ids, response_ids


def end_token_id(tokenizer, chat):
    """The token a chat turn ends with (e.g. <|im_end|>), else EOS."""
    if chat:
        probe = tokenizer.apply_chat_template([{"role": "assistant", "content": "x"}], tokenize=False)
        for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
            if token in probe and tokenizer.convert_tokens_to_ids(token) is not None:
                return tokenizer.convert_tokens_to_ids(token)
    return tokenizer.eos_token_id


def rows_recipe_digest(model_id):
    """sha256 of the pool's recipe and the model's digest: the rows follow from them. Reads (and memoises) the model's
    file digests; generates nothing."""
    source = {"recipe": recipe(), "model_digest": model_digest(model_id)}
    return hashlib.sha256(json.dumps(source, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def rows_recipe_for(model_id, benign_data_ratio):
    """The benign rows' entry of the run hash (None without benign rows)."""
    return rows_recipe_digest(model_id) if benign_data_ratio else None
