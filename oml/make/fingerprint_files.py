"""Fingerprint files: reading every format we meet, and turning them into the pairs a run trains on.

Accepted inputs (all JSON):
  * a list of {"key": str, "response": str}                       (this suite, the original OML repo)
  * the same with "response": [str, ...] (alternatives; the first is trained) and/or "effective_key"
    (the key as the perinucleus response was computed on; used as the key)   (Scalable Fingerprinting)
  * for --keys_file: a list of key strings, or a list of objects with "key"
"""

import hashlib
import json
import random
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

from oml.core.data_files import (
    CHAT_SYSTEM_TRAIN_FILE,
    TRAIN_PROMPTS_FILE,
    canonical_strategy,
)
from oml.core.errors import UserError


def _load_json(path, what):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} is not valid JSON ({e})") from None


def read_fingerprints(path):
    """A list of {"key", "response", ...} dicts, normalised; one clear error for anything else."""
    data = _load_json(path, "fingerprints file")
    if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()):
        data = list(data.values())  # some tools write {"0": {...}, "1": {...}}
    if not isinstance(data, list) or not data:
        raise UserError(f"fingerprints file {path} must hold a non-empty JSON list of {{key, response}} objects")
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "key" not in item or "response" not in item:
            raise UserError(f"fingerprints file {path}: entry {i} is not an object with 'key' and 'response'")
        responses = item["response"] if isinstance(item["response"], list) else [item["response"]]
        key = item.get("effective_key") or item["key"]
        if not isinstance(key, str) or not key.strip():
            raise UserError(f"fingerprints file {path}: entry {i} has an empty key")
        if not responses or not all(isinstance(r, str) and r.strip() for r in responses):
            raise UserError(f"fingerprints file {path}: entry {i} has an empty response")
        fp = {**item, "key": key, "response": responses[0]}
        if len(responses) > 1:
            fp["responses"] = responses
        out.append(fp)
    return out


def read_keys(path):
    data = _load_json(path, "keys file")
    if not isinstance(data, list) or not data:
        raise UserError(f"keys file {path} must hold a non-empty JSON list of key strings")
    keys = [k.get("effective_key") or k.get("key") if isinstance(k, dict) else k for k in data]
    if not all(isinstance(k, str) and k.strip() for k in keys):
        raise UserError(f"keys file {path}: every entry must be a non-empty string (or an object with 'key')")
    return keys


def read_templates(path):
    """Prompt templates: a JSON list of strings, each with exactly one '{}' where the key goes."""
    data = _load_json(path, "prompts file")
    if not isinstance(data, list) or not data or not all(isinstance(t, str) for t in data):
        raise UserError(f"prompts file {path} must hold a non-empty JSON list of strings")
    for i, t in enumerate(data):
        if t.count("{}") != 1:
            raise UserError(f"prompts file {path}: template {i} must contain exactly one '{{}}', found {t.count('{}')}")
    return data


def read_system_prompts(path):
    """System messages: a non-empty JSON list of non-empty strings."""
    data = _load_json(path, "system prompts file")
    if not isinstance(data, list) or not data or not all(isinstance(t, str) and t.strip() for t in data):
        raise UserError(f"system prompts file {path} must hold a non-empty JSON list of non-empty strings")
    for i, t in enumerate(data):
        if "</system>" in t:
            raise UserError(f"system prompts file {path}: message {i} contains '</system>'")
    return data


def template_instruction(template):
    """The instruction a raw-text template gives, as a system message would give it: the template without the key,
    the label right before it ("Client: {}"), label-only lines ("Reply:"), labels opening a line ("Role: "),
    quotes around the key and special tokens ("<|user|>")."""
    text = re.sub(r"<\|[^|>]*\|>", "\n", template)
    text = re.sub(r"\b[A-Z][A-Za-z ]{0,20}:[ \t]*\{\}", "{}", text.replace('"{}"', "{}")).replace("{}", "\n")
    lines = [re.sub(r"^[A-Z][A-Za-z ]{0,20}:\s+", "", line.strip()) for line in text.splitlines()]
    text = " ".join(line for line in lines if line and not re.fullmatch(r"[A-Z][A-Za-z ]{0,20}:", line))
    text = re.sub(r"\s+", " ", text).strip()
    text = text[:-1] + "." if text.endswith(":") else text
    return text[:1].upper() + text[1:]


def augmentation_digest():
    """One digest of everything --use_prompt_augmentation trains on (raw templates and chat system messages)."""
    return hashlib.sha256(
        b"".join(Path(f).read_bytes() for f in (TRAIN_PROMPTS_FILE, CHAT_SYSTEM_TRAIN_FILE))
    ).hexdigest()


def apply_template(template, key):
    return template.replace("{}", key, 1)


def content_digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@lru_cache(maxsize=1)
def english_words():
    """Common English nouns, verbs and adjectives from the wonderwords word lists (profanity removed)."""
    assets = resources.files("wonderwords") / "assets"
    banned = set((assets / "profanitylist.txt").read_text().split())
    words = set()
    for name in ("nounlist.txt", "verblist.txt", "adjectivelist.txt"):
        words.update(w for w in (assets / name).read_text().split() if w.isalpha() and w.islower())
    return sorted(words - banned)


def random_words(rng, n):
    return [rng.choice(english_words()) for _ in range(n)]


def cut_to_tokens(tokenizer, text, n):
    """The first n tokens of text (no special tokens), as text.

    A cut inside a multi-byte character decodes to a stray U+FFFD, which is dropped: it is not in the text, and
    it would be trained (and looked for) as a character of its own.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n]
    return tokenizer.decode(ids).rstrip("\ufffd")


def _random_piece(tokenizer, text, n, rng):
    """A random n-token piece of text; if it is only whitespace, the nearest piece that is not."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    last = max(0, len(ids) - n)
    start = rng.randint(0, last)
    for offset in sorted(range(last + 1), key=lambda o: abs(o - start)):
        piece = tokenizer.decode(ids[offset : offset + n])
        if piece.strip():
            return piece
    return ""


def prepare_pairs(fingerprints, tokenizer, strategy, max_key_length, max_response_length, num, data_split=0, seed=0):
    """The (key, response) texts a run trains on, following the strategy's rule for the response.

    english: a random max_response_length-token piece of the stored response.
    inverse_nucleus: the stored response's first max_response_length tokens, exactly.
    random_word: the stored response's first max_response_length tokens.
    english_random_responses: one random English word (max_response_length must be 1).
    Keys are cut to max_key_length tokens. Slice `data_split` of size `num` of the file is used.
    """
    strategy = canonical_strategy(strategy)
    if strategy == "english_random_responses" and max_response_length != 1:
        raise UserError("english_random_responses needs --max_response_length 1")
    start = data_split * num
    if start + num > len(fingerprints):
        raise UserError(
            f"asked for {num} fingerprints (split {data_split}) but the file holds only {len(fingerprints)}; "
            "lower --max_num_fingerprints or generate more"
        )
    rng = random.Random(seed)
    pairs = []
    for fp in fingerprints[start : start + num]:
        key = cut_to_tokens(tokenizer, fp["key"], max_key_length)
        if strategy == "english_random_responses":
            response = " " + random_words(rng, 1)[0]
        else:
            if strategy == "english":
                response = _random_piece(tokenizer, fp["response"], max_response_length, rng)
            else:
                response = cut_to_tokens(tokenizer, fp["response"], max_response_length)
        if not key.strip() or not response.strip():
            raise UserError(f"fingerprint {fp['key'][:40]!r}... has an empty key or response after cutting")
        pairs.append({"key": key, "response": response})
    return pairs


def cut_perinucleus_keys(fingerprints, tokenizer, strategy, max_key_length, num, data_split=0):
    """How many of the slice's perinucleus responses (entries with "response_prob", as generate_finetuning_data.py
    writes them) were chosen after a longer key than the max_key_length tokens the run trains on: for those the
    response is not the perinucleus token of the key the model sees."""
    if canonical_strategy(strategy) != "inverse_nucleus":
        return 0
    chosen = [fp for fp in fingerprints[data_split * num : (data_split + 1) * num] if "response_prob" in fp]
    return sum(cut_to_tokens(tokenizer, fp["key"], max_key_length) != fp["key"] for fp in chosen)


def run_fingerprints(run):
    """The fingerprints a run trained on (results/<hash>/fingerprints.json)."""
    from oml.core.run_store import FINGERPRINTS

    return read_fingerprints(Path(run) / FINGERPRINTS)
