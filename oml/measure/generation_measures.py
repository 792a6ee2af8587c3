"""Generation measures: what fingerprinting costs a model where it writes text, paired against its base model.

Likelihood benchmarks never let a model generate. Two measures here do, both on questions that ship offline
(oml.core.offline_data) and both paired with the base model on the same items:

- The generative benchmark (evaluate_generation): open-domain questions (TriviaQA rc.wikipedia.nocontext or NQ-open,
  validation) answered greedily through lm-eval's own `generate_until` machinery, through the chat template when
  the tokenizer has one, and scored per item by exact match: the answer (up to its first line break), normalized
  as SQuAD does (lower case, no punctuation, no articles, single spaces), equals one of the normalized answer
  aliases. A chat model that answers in sentences scores low on exact match, so each item also records
  `alias_in_answer` (some alias appears in the answer as whole words), reported beside it.
- Chat drift (chat_reference, chat_drift): the base model answers a few hundred mixed questions greedily through
  the chat template (once per base model, cached); then the fingerprinted model reads those answers in one
  teacher-forced pass, and the drift is the mean over answer tokens of KL(base || model) between the two
  next-token distributions, plus the share of answers the model's greedy decoding would write identically (the
  argmax at every answer position, the stop token included, is the base's token: exact, as in oml.measure.fingerprint_check).

Both models are never in memory together. The base side of the KL is therefore stored: at each answer position its
TOP_K most likely tokens and the log-mass of all the others, and the KL is taken between the two distributions
coarse-grained to those TOP_K tokens plus one bucket for the rest. By the data-processing inequality this is a
lower bound on the full KL, exact when the base puts no mass outside its top TOP_K; the reference records the mean
mass it leaves out (`base_tail_mass`), so the gap can be judged.
"""

import math
import os
import re
import string
import tempfile
import time
from functools import partial

from oml.core.errors import UserError
from oml.core.files import cached_json, keyed_path

GENERATION_BENCHMARKS = ("trivia_qa", "nq_open")
# Bump when prompts, items or scoring change: cached base results then miss.
GENERATION_VERSION = 1
GENERATION_DEFAULTS = dict(benchmark="trivia_qa", limit=200, seed=1234, max_gen_toks=16)
CHAT_DRIFT_DEFAULTS = dict(limit=200, seed=4321, max_new_tokens=48, top_k=64)
CHAT_DRIFT_SOURCES = ("trivia_qa", "nq_open", "sciq", "social_i_qa")

# Three fixed demonstrations (written here, not taken from the data) that ask for a short answer.
PROMPT = (
    "Answer each question with a short answer, a few words at most.\n\n"
    "Question: What is the capital of Italy?\nAnswer: Rome\n\n"
    "Question: Who wrote the play Hamlet?\nAnswer: William Shakespeare\n\n"
    "Question: In which year did the First World War end?\nAnswer: 1918\n\n"
    "Question: {question}\nAnswer:"
)


def check_limit(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive number of items, not {value!r}")
    return value


# ---------------------------------------------------------------- exact match


def normalize_answer(text):
    """SQuAD's normalization: lower case, punctuation removed, articles removed, whitespace collapsed."""
    text = text.lower()
    text = "".join(c for c in text if c not in string.punctuation and c not in "‘’“”")
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def first_line(text):
    return text.strip().split("\n", 1)[0] if text.strip() else ""


def exact_match(prediction, aliases):
    """Does the prediction's first line, normalized, equal one of the normalized aliases (empty ones ignored)?"""
    answer = normalize_answer(first_line(prediction))
    return bool(answer) and answer in {normalize_answer(a) for a in aliases} - {""}


def alias_in_answer(prediction, aliases):
    """Does some normalized alias appear in the normalized first line as a run of whole words?"""
    answer = f" {normalize_answer(first_line(prediction))} "
    return any(f" {a} " in answer for a in {normalize_answer(a) for a in aliases} - {""})


# ---------------------------------------------------------------- the generative benchmark through lm-eval


def _custom_dataset(benchmark, limit, seed, **_metadata):
    import datasets

    from oml.core.offline_data import qa_items

    return datasets.DatasetDict(test=datasets.Dataset.from_list(qa_items(benchmark, limit, seed)))


def _doc_to_text(doc):
    return PROMPT.format(question=doc["question"])


def _doc_to_target(doc):
    return doc["answers"][0]


def _process_results(doc, results):
    prediction = results[0]
    return {
        "exact_match": float(exact_match(prediction, doc["answers"])),
        "alias_in_answer": float(alias_in_answer(prediction, doc["answers"])),
    }


def generation_task_config(benchmark, limit, seed, max_gen_toks):
    """The lm-eval task config (a dict, as a task YAML would give) of the generative benchmark."""
    return dict(
        task=f"gen_{benchmark}",
        custom_dataset=partial(_custom_dataset, benchmark, limit, seed),
        output_type="generate_until",
        test_split="test",
        doc_to_text=_doc_to_text,
        doc_to_target=_doc_to_target,
        generation_kwargs=dict(until=["\n"], do_sample=False, temperature=0.0, max_gen_toks=max_gen_toks),
        process_results=_process_results,
        metric_list=[
            dict(metric="exact_match", aggregation="mean", higher_is_better=True),
            dict(metric="alias_in_answer", aggregation="mean", higher_is_better=True),
        ],
        metadata=dict(version=GENERATION_VERSION),
    )


def uses_chat_template(tokenizer):
    return bool(getattr(tokenizer, "chat_template", None))


def check_generation_settings(benchmark, limit, max_gen_toks=GENERATION_DEFAULTS["max_gen_toks"]):
    if benchmark not in GENERATION_BENCHMARKS:
        raise UserError(
            f"unknown generation benchmark {benchmark!r}; choose from {', '.join(GENERATION_BENCHMARKS)} or none"
        )
    check_limit("the generation limit", limit)
    check_limit("max_gen_toks", max_gen_toks)


def evaluate_generation(model, tokenizer, batch_size=32, **settings):
    """Greedy answers to `limit` questions of `benchmark`, scored by exact match, on an already-loaded model.

    settings: benchmark, limit, seed, max_gen_toks (GENERATION_DEFAULTS for what is not given).
    Returns {"benchmark", "metric": "exact_match", "score", "alias_in_answer", "n", "chat_template",
    "per_item": {"exact_match": [...], "alias_in_answer": [...]} in item order, "examples" (the first 5),
    "settings", "seconds"}.
    """
    from lm_eval.tasks import TaskManager

    from oml.measure.likelihood_benchmarks import _run_harness

    unknown = set(settings) - set(GENERATION_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown generation settings: {sorted(unknown)}")
    settings = {**GENERATION_DEFAULTS, **settings}
    check_generation_settings(settings["benchmark"], settings["limit"], settings["max_gen_toks"])
    start = time.time()
    chat = uses_chat_template(tokenizer)
    config = generation_task_config(**settings)
    results = _run_harness(
        model, tokenizer, [config], TaskManager(include_defaults=False), batch_size, settings["seed"], chat
    )
    samples = sorted(results["samples"][config["task"]], key=lambda s: s["doc_id"])
    per_item = {m: [float(s[m]) for s in samples] for m in ("exact_match", "alias_in_answer")}
    n = len(samples)
    return {
        "benchmark": f"{settings['benchmark']} (validation, greedy, exact match against the aliases)",
        "metric": "exact_match",
        "score": sum(per_item["exact_match"]) / n,
        "alias_in_answer": sum(per_item["alias_in_answer"]) / n,
        "n": n,
        "chat_template": chat,
        "per_item": per_item,
        "examples": [
            {"question": s["doc"]["question"], "answer": first_line(_response(s)), "aliases": s["doc"]["answers"][:5]}
            for s in samples[:5]
        ],
        "settings": settings,
        "seconds": round(time.time() - start, 1),
    }


def _response(sample):
    resps = sample.get("filtered_resps") or sample.get("resps")
    while isinstance(resps, list):
        resps = resps[0] if resps else ""
    return resps


def pair_generation(result, base):
    """Add the base's scores and the paired deltas (model minus base, fractions) to a generation result."""
    from oml.measure.likelihood_benchmarks import paired_delta

    if result["settings"] != base["settings"]:
        raise ValueError("the model and the base were asked different questions")
    result["base_score"] = base["score"]
    result["base_alias_in_answer"] = base["alias_in_answer"]
    for metric, prefix in (("exact_match", ""), ("alias_in_answer", "alias_in_answer_")):
        delta, stderr = paired_delta({metric: result["per_item"][metric]}, {metric: base["per_item"][metric]})
        result[f"{prefix}delta"], result[f"{prefix}delta_stderr"] = delta, stderr
    return result


# ---------------------------------------------------------------- base results, cached


def generation_cache_path(cache_dir, kind, model_id, settings, suffix):
    from oml.measure.likelihood_benchmarks import model_key

    key = {"kind": kind, **model_key(model_id), "version": GENERATION_VERSION, **settings}
    return keyed_path(cache_dir, f"{kind}-", key, suffix), key


def base_generation_path(model_id, cache_dir, **settings):
    """(cache file, key) of the base model's generation result for these settings (defaults filled in)."""
    return generation_cache_path(cache_dir, "generation", model_id, {**GENERATION_DEFAULTS, **settings}, ".json")


def chat_reference_path(model_id, cache_dir, **settings):
    """(cache file, key) of the base model's chat reference for these settings (defaults filled in)."""
    return generation_cache_path(cache_dir, "chat-reference", model_id, {**CHAT_DRIFT_DEFAULTS, **settings}, ".pt")


def base_generation_cached(model_id, load_fn, cache_dir, batch_size=32, **settings):
    """The base model's generation result, computed once per (model_id, settings) and kept as JSON in cache_dir.

    load_fn() -> (model, tokenizer) is called only when nothing is cached; concurrent callers wait on a file lock.
    """
    settings = {**GENERATION_DEFAULTS, **settings}
    path, key = base_generation_path(model_id, cache_dir, **settings)
    return cached_json(
        path,
        lambda: {"model_id": str(model_id), "key": key, **evaluate_generation(*load_fn(), batch_size, **settings)},
    )


# ---------------------------------------------------------------- chat drift


def prompt_ids(tokenizer, question):
    """The question as the model sees it in a chat turn (or as a plain "Question: ... Answer:" without a template)."""
    if uses_chat_template(tokenizer):
        return list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=True
            )["input_ids"]
        )
    return tokenizer(f"Question: {question}\nAnswer:")["input_ids"]


def greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size=32):
    """Greedy answer token ids per prompt (ids), up to and including the first stop token. Batched, left-padded."""
    from oml.core.backends import end_of_sequence_ids
    from oml.core.greedy_decoding import greedy_decode

    eos = end_of_sequence_ids(model.generation_config, tokenizer)
    return greedy_decode(model, prompts, max_new_tokens, eos, tokenizer.pad_token_id, batch_size, desc="base answers")


def _answer_log_probs(model, rows, batch_size):
    """Per batch of (prompt, answer) rows: the model's log-softmax at each answer position given the true prefix,
    yielded as (row indices, per-row [answer length, vocab] float32 tensors). One teacher-forced pass, no decoding.
    """
    import torch

    from oml.measure.fingerprint_check import _response_logits

    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        inputs = [(rows[i][0] + rows[i][1])[:-1] for i in chunk]  # right-padded: trailing pads are seen by nobody
        width = max(len(x) for x in inputs)
        input_ids = torch.tensor([x + [0] * (width - len(x)) for x in inputs], device=model.device)
        hidden = model.base_model(input_ids=input_ids).last_hidden_state
        positions = [
            (b, p)
            for b, i in enumerate(chunk)
            for p in range(len(rows[i][0]) - 1, len(rows[i][0]) + len(rows[i][1]) - 1)
        ]
        b_idx, p_idx = (torch.tensor(x, device=model.device) for x in zip(*positions, strict=True))
        log_probs = torch.log_softmax(_response_logits(model, hidden[b_idx, p_idx]).float(), dim=-1)
        yield chunk, log_probs.split([len(rows[i][1]) for i in chunk])


def chat_reference(model, tokenizer, batch_size=32, **settings):
    """The base model's side of chat drift: its greedy answers and, at each answer position, its top_k log-probs.

    settings: limit, seed, max_new_tokens, top_k (CHAT_DRIFT_DEFAULTS for what is not given). Returns a dict of
    lists and tensors (see chat_drift); "self_agreement" is the share of answers the base's own teacher-forced
    argmax reproduces (1 unless batched generation and the teacher-forced pass round a near-tie differently).
    """
    import torch
    from tqdm import tqdm

    from oml.core.offline_data import mixed_questions

    settings = {**CHAT_DRIFT_DEFAULTS, **settings}
    check_limit("the chat drift limit", settings["limit"])
    start = time.time()
    questions = mixed_questions(CHAT_DRIFT_SOURCES, settings["limit"], settings["seed"])
    prompts = [prompt_ids(tokenizer, q) for q in questions]
    answers = greedy_answers(model, tokenizer, prompts, settings["max_new_tokens"], batch_size)
    rows = list(zip(prompts, answers, strict=True))
    k = min(settings["top_k"], model.get_output_embeddings().weight.shape[0])
    top_lp, top_ix, log_tail, agree = [None] * len(rows), [None] * len(rows), [None] * len(rows), [None] * len(rows)
    with torch.inference_mode(), tqdm(total=-(-len(rows) // batch_size), desc="base log-probs", disable=None) as bar:
        for chunk, per_row in _answer_log_probs(model, rows, batch_size):
            for i, lp in zip(chunk, per_row, strict=True):
                values, indices = lp.topk(k, dim=-1)
                top_lp[i], top_ix[i] = values.cpu(), indices.to(torch.int32).cpu()
                log_tail[i] = lp.scatter(1, indices, float("-inf")).logsumexp(-1).cpu()
                agree[i] = bool((lp.argmax(-1).cpu() == torch.tensor(rows[i][1])).all())
            bar.update(1)
    return {
        "settings": settings,
        "questions": questions,
        "prompts": prompts,
        "answers": answers,
        "answer_texts": [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers],
        "top_log_probs": torch.cat(top_lp),
        "top_indices": torch.cat(top_ix),
        "log_tail": torch.cat(log_tail),
        "self_agreement": sum(agree) / len(agree),
        "seconds": round(time.time() - start, 1),
    }


def chat_reference_cached(model_id, load_fn, cache_dir, batch_size=32, **settings):
    """chat_reference for a base model, computed once per (model_id, settings) and kept in cache_dir (torch.save).

    load_fn() -> (model, tokenizer) is called only when nothing is cached; the caller releases what it loaded.
    """
    import torch
    from filelock import FileLock

    settings = {**CHAT_DRIFT_DEFAULTS, **settings}
    check_limit("the chat drift limit", settings["limit"])
    path, key = chat_reference_path(model_id, cache_dir, **settings)
    with FileLock(str(path) + ".lock"):
        if not path.is_file():
            model, tokenizer = load_fn()
            reference = {
                "model_id": str(model_id),
                "key": key,
                **chat_reference(model, tokenizer, batch_size, **settings),
            }
            del model
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            try:
                torch.save(reference, tmp)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return torch.load(path, weights_only=True)


def chat_drift(model, reference, batch_size=32):
    """KL(base || model) per answer token over the base's greedy answers, and the share of identical answers.

    One teacher-forced pass of `model` over the reference's prompts and answers. Returns {"kl" (mean over all
    answer tokens, in nats), "kl_stderr" (answers as the independent units, ratio estimator), "same_as_base",
    "n" (answers), "tokens", "top_k", "base_tail_mass", "base_self_agreement", "seconds"}.
    """
    import torch
    from tqdm import tqdm

    start = time.time()
    rows = list(zip(reference["prompts"], reference["answers"], strict=True))
    lengths = [len(a) for a in reference["answers"]]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    kl_sums, same = [0.0] * len(rows), [False] * len(rows)
    with torch.inference_mode(), tqdm(total=-(-len(rows) // batch_size), desc="chat drift", disable=None) as bar:
        for chunk, per_row in _answer_log_probs(model, rows, batch_size):
            for i, lm in zip(chunk, per_row, strict=True):
                span = slice(offsets[i], offsets[i + 1])
                lb = reference["top_log_probs"][span].to(lm.device)
                ix = reference["top_indices"][span].to(lm.device).long()
                tail_b = reference["log_tail"][span].to(lm.device)
                lm_k = lm.gather(1, ix)
                tail_m = lm.scatter(1, ix, float("-inf")).logsumexp(-1)
                kl = (lb.exp() * (lb - lm_k)).sum(-1) + torch.where(
                    tail_b > float("-inf"), tail_b.exp() * (tail_b - tail_m), torch.zeros_like(tail_b)
                )
                kl_sums[i] = kl.sum().item()
                same[i] = bool((lm.argmax(-1).cpu() == torch.tensor(rows[i][1])).all())
            bar.update(1)
    n, tokens = len(rows), sum(lengths)
    mean_kl = sum(kl_sums) / tokens
    mean_len = tokens / n
    # Ratio estimator: answers are independent, tokens within one are not.
    residuals = [s - mean_kl * m for s, m in zip(kl_sums, lengths, strict=True)]
    stderr = math.sqrt(sum(r * r for r in residuals) / (n * (n - 1))) / mean_len if n > 1 else 0.0
    return {
        "kl": mean_kl,
        "kl_stderr": stderr,
        "same_as_base": sum(same) / n,
        "n": n,
        "tokens": tokens,
        "top_k": reference["settings"]["top_k"],
        "max_new_tokens": reference["settings"]["max_new_tokens"],
        "base_tail_mass": reference["log_tail"].exp().mean().item(),
        "base_self_agreement": reference["self_agreement"],
        "seconds": round(time.time() - start, 1),
    }
