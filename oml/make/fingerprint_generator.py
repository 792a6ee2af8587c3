"""Making fingerprints: keys and responses in English, in random words, or perinucleus responses.

english       keys and responses are two independent samples from a generator model, each asked for a short
              paragraph that begins with a random English word (or a random vocabulary token, or nothing).
random words  keys and responses are strings of random English words.
perinucleus   (inverse_nucleus) the response to a key is a token just outside the base model's p-nucleus for
              the next token: plausible, but not what the model would say. Longer responses continue greedily.

--key_perplexity_band LO,HI (a defence against a host that refuses odd prompts, oml/attack/adaptive_host.py's input_filter) keeps
only keys whose perplexity under the base model (the perinucleus model, else the English generator) lies between the
LO and HI quantiles of real prompts' perplexities (oml.measure.chat_sample's questions and 500 offline QA questions); generated keys
are drawn again (at most BAND_ROUNDS rounds) until there are enough, keys from --keys_file are only filtered.

--min_response_ratio ρ (perinucleus; a defence against a host that compares the served model with the public base,
adaptive_host's base_detect) keeps only the keys whose chosen response has at least ρ times the probability of the
base's top token after the key: a near-tie, which a fingerprint can win with a small change of the base's next-token
distribution (finetune's --fingerprint_edit). Each perinucleus entry records "top_prob", the top token's probability.
"""

import math
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from oml.core.backends import cut_at_end, end_of_sequence_ids
from oml.core.data_files import DEFAULT_FINGERPRINT_FILES, STRATEGY_SYNONYMS
from oml.core.errors import UserError
from oml.core.files import atomic_write_json
from oml.core.greedy_decoding import greedy_decode
from oml.core.model_registry import EMBEDDED, load_model_and_tokenizer
from oml.make.fingerprint_files import cut_to_tokens, english_words, random_words, read_keys
from oml.make.prompt_encoding import encode_prompt, prompt_text

RESPONSE_STRATEGIES = ("independent", "inverse_nucleus")  # and the synonym perinucleus (STRATEGY_SYNONYMS)
FIRST_TOKEN_STRATEGIES = ("word", "tokenizer", "none")
TOP_K = 50  # english sampling draws from the 50 likeliest tokens (the transformers default), then temperature
MAX_EMPTY_ROUNDS = 20  # give up when this many generation batches in a row bring no usable new text
BAND_REAL_PROMPTS = (
    500  # --key_perplexity_band: offline QA questions (plus oml.measure.chat_sample's) that set the band
)

# generate_finetuning_data.py's arguments (flags, argparse kwargs): the original's names, with aliases.
GENERATE_ARGS = [
    (["--key_length"], dict(type=int, default=32, help="tokens per key (words with --random_word_generation)")),
    (["--response_length"], dict(type=int, default=32, help="tokens (or words) per response")),
    (["--num_backdoors", "--num_fingerprints"], dict(type=int, default=8192, dest="num_backdoors",
                                                     help="how many fingerprints (at most the number of keys in --keys_file)")),
    (["--batch_size"], dict(type=int, default=128, help="prompts per generation or forward pass")),
    (["--key_response_strategy"], dict(default="independent",
                                       help="independent | inverse_nucleus (perinucleus): how responses are made")),
    (["--model_used"], dict(default=EMBEDDED, help="generator for English text: hub id or local folder")),
    (["--random_word_generation"], dict(action="store_true", help="random English words instead of a model")),
    (["--keys_file"], dict(default=None, help="JSON list of keys (strings or objects with 'key') to use")),
    (["--output_file_path"], dict(default=None,
                                  help="default: generated_data/fingerprints-{english,random_word,perinucleus}.json")),
    (["--seed"], dict(type=int, default=42)),
    (["--temperature"], dict(type=float, default=1.0, help="sampling temperature for English text")),
    (["--first_token_strategy"], dict(default="word", help="word | tokenizer | none: what each English text begins with")),
    (["--use_chat_template"], dict(action="store_true", help="ask the generator through its chat template")),
    (["--inverse_nucleus_model"], dict(default=EMBEDDED, help="base model whose perinucleus is used")),
    (["--nucleus_p"], dict(type=float, default=0.8, help="probability mass of the nucleus")),
    (["--nucleus_k"], dict(type=int, default=3, help="the response is drawn from the k tokens after the nucleus")),
    (["--min_response_ratio"], dict(type=float, default=None, metavar="ρ",
                                    help="perinucleus: keep only keys whose response has at least ρ times the "
                                         "probability of the base's top token (near-ties; e.g. 0.4 with --nucleus_p "
                                         "0.01 --nucleus_k 1: the runner-up word token); 0 < ρ ≤ 1")),
    (["--key_perplexity_band"], dict(default=None, metavar="LO,HI",
                                     help="keep only keys whose perplexity under the base model lies between these "
                                          "quantiles of real prompts' perplexities, e.g. 0.05,0.95")),
    (["--overwrite"], dict(action="store_true", help="replace an existing output file")),
    (["--trust_remote_code"], dict(action="store_true")),
]  # fmt: skip


def add_generate_args(parser):
    from oml.core.run_config import add_arguments

    return add_arguments(parser, GENERATE_ARGS)


def parse_generate_args(argv):
    """generate_finetuning_data.py's arguments from a list of words (as the sweep calls the generator in-process)."""
    import argparse

    return add_generate_args(argparse.ArgumentParser(prog="generate_finetuning_data.py")).parse_args(argv)


# ---------------------------------------------------------------- perinucleus selection (pure)


def perinucleus_candidates(probs, p, k, is_allowed=None):
    """The token ids a perinucleus response is drawn from, given one next-token distribution.

    Sort by probability; the nucleus is the smallest top set whose mass reaches p. The candidates are the
    first k tokens after it that is_allowed accepts (disallowed ones are skipped, widening the window).
    The nucleus holds at least the top token, so the likeliest token is never a candidate.
    """
    probs = torch.as_tensor(probs, dtype=torch.float64).flatten()
    order = torch.argsort(probs, descending=True, stable=True)
    mass = torch.cumsum(probs[order], 0)
    nucleus_size = min(int(torch.searchsorted(mass, torch.tensor([p], dtype=torch.float64))) + 1, len(order))
    candidates = []
    for token in order[nucleus_size:].tolist():
        if is_allowed is None or is_allowed(token):
            candidates.append(token)
            if len(candidates) == k:
                break
    return candidates


def word_token_filter(tokenizer):
    """is_allowed for perinucleus: the token's text is alphanumeric and reads back as that same one token."""
    special = set(tokenizer.all_special_ids)
    cache = {}

    def is_allowed(token):
        if token not in cache:
            text = tokenizer.decode([token])
            cache[token] = (
                token not in special
                and text.strip().isalnum()
                and tokenizer(text, add_special_tokens=False)["input_ids"] == [token]
            )
        return cache[token]

    return is_allowed


# ---------------------------------------------------------------- text helpers


def random_word_texts(rng, n, length):
    return [" ".join(random_words(rng, length)) for _ in range(n)]


def random_start(rng, strategy, tokenizer):
    """What one English generation must begin with: a random word, a random vocabulary word-token, or nothing."""
    if strategy == "word":
        return upper_first(rng.choice(english_words()))
    if strategy == "tokenizer":
        for _ in range(10_000):  # word-initial alphabetic tokens only: " river" yes, "ing" or "<|im_end|>" no
            token = rng.randrange(len(tokenizer))
            text, piece = tokenizer.decode([token]), tokenizer.convert_ids_to_tokens(token) or ""
            word_initial = text.startswith(" ") or piece[:1] in ("\u0120", "\u2581")  # GPT-2 and SentencePiece marks
            if word_initial and text.strip().isalpha() and len(text.strip()) > 1:
                return upper_first(text.strip())
        raise UserError("--first_token_strategy tokenizer: found no word-like tokens in the vocabulary")
    return ""


def upper_first(word):
    return word[:1].upper() + word[1:]


def english_prompt(tokenizer, start, use_chat_template):
    """The generator's prompt; the reply is made to begin with `start` by writing it after the request."""
    request = (
        f'Write a short paragraph that begins with the word "{start}".'
        if start
        else "Write a short paragraph about anything."
    )
    if use_chat_template:
        return prompt_text(tokenizer, request, use_chat_template=True) + start
    return f"{request}\n\n{start}"


# ---------------------------------------------------------------- generation with a model


@torch.no_grad()
def english_texts(
    model,
    tokenizer,
    n,
    length,
    rng,
    batch_size=128,
    temperature=1.0,
    first_token_strategy="word",
    use_chat_template=False,
    desc="english",
):
    """n distinct sampled texts of length//2 to length tokens, each its own generation from its own prompt."""
    if use_chat_template and not tokenizer.chat_template:
        raise UserError("--use_chat_template: the generator's tokenizer has no chat template")
    shortest = max(1, length // 2)
    texts, seen, empty_rounds = [], set(), 0
    bar = tqdm(total=n, desc=desc, unit="text")
    while len(texts) < n:
        starts = [random_start(rng, first_token_strategy, tokenizer) for _ in range(min(batch_size, n - len(texts)))]
        prompts = [english_prompt(tokenizer, s, use_chat_template) for s in starts]
        continuations = sample_continuations(model, tokenizer, prompts, length, temperature, use_chat_template)
        new = 0
        for start, continuation in zip(starts, continuations, strict=True):
            text = cut_to_tokens(tokenizer, (start + continuation).strip(), length).strip()
            n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if shortest <= n_tokens <= length and text not in seen:
                seen.add(text)
                texts.append(text)
                new += 1
        bar.update(new)
        empty_rounds = 0 if new else empty_rounds + 1
        if empty_rounds == MAX_EMPTY_ROUNDS:
            raise UserError(
                f"the generator produced no new text of {shortest} to {length} tokens in "
                f"{MAX_EMPTY_ROUNDS} batches; try --use_chat_template, another --model_used or a higher --temperature"
            )
    bar.close()
    return texts


def sample_continuations(model, tokenizer, prompts, length, temperature, use_chat_template):
    """One sampled continuation (text, special tokens dropped) of up to `length` tokens per prompt."""
    batch = [encode_prompt(tokenizer, p, use_chat_template) for p in prompts]
    out = generate_batch(model, tokenizer, batch, length, do_sample=True, temperature=temperature, top_k=TOP_K)
    return tokenizer.batch_decode(out, skip_special_tokens=True)


def generate_batch(model, tokenizer, sequences, max_new_tokens, **generate_kwargs):
    """model.generate over token-id lists padded on the left; returns the new tokens only (the whole output object,
    with .sequences cut to the new tokens, when generate_kwargs ask for a dict)."""
    input_ids, attention_mask = pad(sequences, tokenizer.pad_token_id, left=True)
    out = model.generate(
        input_ids=input_ids.to(model.device),
        attention_mask=attention_mask.to(model.device),
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        **generate_kwargs,
    )
    if generate_kwargs.get("return_dict_in_generate"):
        out.sequences = out.sequences[:, input_ids.shape[1] :]
        return out
    return out[:, input_ids.shape[1] :]


def pad(sequences, pad_id, left):
    """Lists of ids -> (input_ids, attention_mask), padded on the left (for generation) or on the right."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


@torch.no_grad()
def next_token_probs(model, sequences, pad_id):
    """Next-token distributions after each sequence (lists of ids), float32 on the CPU, one forward pass.

    Right padding keeps every real token at its own position; the distribution is read at the last real one.
    """
    input_ids, attention_mask = pad(sequences, pad_id, left=False)
    logits = model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device)).logits
    last = torch.tensor([len(s) - 1 for s in sequences], device=logits.device)
    return torch.softmax(logits[torch.arange(len(sequences), device=logits.device), last].float(), dim=-1).cpu()


def greedy_continuations(model, tokenizer, sequences, n_tokens):
    """Greedy continuations of n_tokens after each sequence, with each chosen token's probability, in one batch.

    A continuation stops early at an end-of-sequence token (oml.core.backends.end_of_sequence_ids), not kept.
    """
    eos = end_of_sequence_ids(model.generation_config, tokenizer)
    decoded = greedy_decode(model, sequences, n_tokens, eos, tokenizer.pad_token_id, len(sequences), True)
    results = []
    for tokens, probs in decoded:
        kept, _ = cut_at_end(tokens, eos)
        results.append((kept, probs[: len(kept)]))
    return results


def perinucleus_fingerprints(
    model,
    tokenizer,
    keys,
    key_length,
    response_length,
    rng,
    nucleus_p=0.8,
    nucleus_k=3,
    batch_size=128,
    min_response_ratio=None,
):
    """For each key: {"key", "effective_key", "response", "response_prob", "top_prob"} with a perinucleus first
    token; with min_response_ratio ρ, only the keys whose response has at least ρ·top_prob (the rest are dropped)."""
    is_allowed = word_token_filter(tokenizer)
    fingerprints = []
    for start in tqdm(range(0, len(keys), batch_size), desc="perinucleus", unit="batch"):
        batch_keys = keys[start : start + batch_size]
        effective = [cut_to_tokens(tokenizer, key, key_length) for key in batch_keys]
        prompts = [encode_prompt(tokenizer, prompt_text(tokenizer, key)) for key in effective]
        firsts, first_probs, top_probs, kept = [], [], [], []
        for i, (key, probs) in enumerate(zip(effective, next_token_probs(model, prompts, tokenizer.pad_token_id),
                                             strict=True)):  # fmt: skip
            candidates = perinucleus_candidates(probs, nucleus_p, nucleus_k, is_allowed)
            if not candidates:
                raise UserError(f"no token outside the {nucleus_p} nucleus for key {key[:40]!r}...; lower --nucleus_p")
            token = rng.choice(candidates)
            top = probs.max().item()
            if min_response_ratio is not None and probs[token].item() < min_response_ratio * top:
                continue
            kept.append(i)
            firsts.append(token)
            first_probs.append(probs[token].item())
            top_probs.append(top)
        batch_keys, effective, prompts = ([x[i] for i in kept] for x in (batch_keys, effective, prompts))
        if not kept:
            continue
        if response_length > 1:
            rests = greedy_continuations(
                model, tokenizer, [p + [t] for p, t in zip(prompts, firsts, strict=True)], response_length - 1
            )
        else:
            rests = [([], [])] * len(firsts)
        for key, eff, token, prob, top, (rest, rest_probs) in zip(
            batch_keys, effective, firsts, first_probs, top_probs, rests, strict=True
        ):
            response_prob = prob if response_length == 1 else [prob, *rest_probs]
            fingerprints.append(
                {
                    "key": key,
                    "effective_key": eff,
                    "response": tokenizer.decode([token, *rest]),
                    "response_prob": response_prob,
                    "top_prob": top,
                }
            )
    return fingerprints


# ---------------------------------------------------------------- the whole run


def default_output_path(strategy, random_word_generation):
    if strategy == "inverse_nucleus":
        return DEFAULT_FINGERPRINT_FILES["inverse_nucleus"]
    return DEFAULT_FINGERPRINT_FILES["random_word" if random_word_generation else "english"]


def check_args(args):
    """Everything that can be wrong with the command line, found before any model is loaded."""
    strategy = STRATEGY_SYNONYMS.get(args.key_response_strategy, args.key_response_strategy)
    if strategy not in RESPONSE_STRATEGIES:
        raise UserError(
            f"unknown --key_response_strategy {args.key_response_strategy!r}; choose independent or inverse_nucleus "
            "(perinucleus)"
        )
    for name in ("key_length", "response_length", "num_backdoors", "batch_size", "nucleus_k"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if not 0 < args.nucleus_p < 1:
        raise UserError(f"--nucleus_p must be between 0 and 1 (exclusive), got {args.nucleus_p}")
    if args.temperature <= 0:
        raise UserError(f"--temperature must be positive, got {args.temperature}")
    ratio = args.min_response_ratio
    if ratio is not None:
        if not 0 < ratio <= 1:
            raise UserError(f"--min_response_ratio must be within (0, 1], got {ratio}")
        if strategy != "inverse_nucleus":
            raise UserError(
                "--min_response_ratio selects perinucleus responses: add --key_response_strategy perinucleus"
            )
    if args.first_token_strategy not in FIRST_TOKEN_STRATEGIES:
        raise UserError(
            f"unknown --first_token_strategy {args.first_token_strategy!r}; choose from {', '.join(FIRST_TOKEN_STRATEGIES)}"
        )
    output = Path(args.output_file_path or default_output_path(strategy, args.random_word_generation))
    if output.is_dir():
        raise UserError(f"--output_file_path {output} is a folder; give a file name")
    if output.exists() and not args.overwrite:
        raise UserError(f"{output} already exists; pass --overwrite to replace it or choose --output_file_path")
    args.band = parse_band(getattr(args, "key_perplexity_band", None))
    keys = read_keys(args.keys_file)[: args.num_backdoors] if args.keys_file else None
    return strategy, output, keys


def parse_band(text):
    """'0.05,0.95' -> (0.05, 0.95); None stays None."""
    if text is None:
        return None
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--key_perplexity_band must be two quantiles LO,HI such as 0.05,0.95, got {text!r}") from None
    if not 0 <= lo < hi <= 1:
        raise UserError(f"--key_perplexity_band needs 0 <= LO < HI <= 1, got {text!r}")
    return lo, hi


def generate(args):
    """Run generate_finetuning_data.py: make the fingerprints args describe and write them; returns the path."""
    strategy, output, keys = check_args(args)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    n = len(keys) if keys else args.num_backdoors
    if keys and n < args.num_backdoors:
        print(f"{args.keys_file} holds {n} keys: making {n} fingerprints")

    models = {}

    def model(model_id):
        if model_id not in models:
            models[model_id] = load_model_and_tokenizer(model_id, trust_remote_code=args.trust_remote_code)
        return models[model_id]

    english = dict(
        batch_size=args.batch_size,
        temperature=args.temperature,
        first_token_strategy=args.first_token_strategy,
        use_chat_template=args.use_chat_template,
    )

    def make_keys(m):
        if args.random_word_generation:
            return random_word_texts(rng, m, args.key_length)
        return english_texts(*model(args.model_used), m, args.key_length, rng, desc="keys", **english)

    from_file = keys is not None
    if keys is None:
        keys = make_keys(n)
    if args.band:
        from oml.make.key_perplexity import keys_in_band, log_perplexity, real_prompts

        scorer = model(args.inverse_nucleus_model if strategy == "inverse_nucleus" else args.model_used)
        real = log_perplexity(*scorer, real_prompts(BAND_REAL_PROMPTS, args.seed))
        keys, info = keys_in_band(keys, lambda texts: log_perplexity(*scorer, texts), real, args.band, n,
                                  None if from_file else make_keys)  # fmt: skip
        print(f"kept {info['kept']} of {info['seen']} keys with perplexity within [{math.exp(info['low']):.3g}, "
              f"{math.exp(info['high']):.3g}] (quantiles {args.band[0]:g}-{args.band[1]:g} of real prompts)")  # fmt: skip
        if not keys:
            raise UserError("--key_perplexity_band: no key of --keys_file lies within the band")
        n = len(keys)

    if strategy == "inverse_nucleus":
        fingerprints = perinucleus_fingerprints(
            *model(args.inverse_nucleus_model),
            keys,
            args.key_length,
            args.response_length,
            rng,
            nucleus_p=args.nucleus_p,
            nucleus_k=args.nucleus_k,
            batch_size=args.batch_size,
            min_response_ratio=args.min_response_ratio,
        )
        if args.min_response_ratio is not None:
            print(
                f"kept {len(fingerprints)} of {len(keys)} keys whose response has at least {args.min_response_ratio:g} "
                "times the top token's probability"
            )
            if not fingerprints:
                raise UserError("--min_response_ratio: no key has a response that close to the top token; lower it")
    else:
        if args.random_word_generation:
            responses = random_word_texts(rng, n, args.response_length)
        else:
            responses = english_texts(
                *model(args.model_used), n, args.response_length, rng, desc="responses", **english
            )
        fingerprints = [{"key": k, "response": r} for k, r in zip(keys, responses, strict=True)]

    atomic_write_json(output, fingerprints)
    print(f"wrote {len(fingerprints)} fingerprints to {output}")
    return output
