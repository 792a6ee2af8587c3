"""Fingerprint verification: does the model answer each key with its response, under each prompt template?

Two ways to ask, with the same verdicts:
  * verify_with_generate: the reference. One model.generate per (template, key); slow.
  * verify_teacher_forced: one batched forward pass over prompt + response. Greedy decoding writes the
    response r_1..r_n exactly when, for every j, argmax p(. | prompt, r_1..r_{j-1}) is r_j, so the argmax
    at each response position, given the true prefix, decides the greedy verdict without decoding.
    One subtlety of generate is kept: it stops at an EOS token, so a response with EOS before its last
    token can never come out whole.

Both return, per template, {"template", "accuracy", "fractional_accuracy", "matches": [bool per pair]}.
accuracy is the share of pairs whose response comes out exactly. fractional_accuracy is the mean over
pairs of the share of response tokens that match: for teacher forcing, positions whose argmax given the
true prefix is the response token; for generate, positions where the generated token equals the
response token. The two agree for 1-token responses; for longer ones teacher forcing is the kinder
measure (a miss at position j does not spoil the positions after it).

Verdicts agree up to floating-point rounding: a batched pass adds the same numbers in a different
order than generate does, which can only flip a near-tie between the top two logits. generate's logits
processors (repetition_penalty and the like, if a generation config sets them) are not modelled.

Where the speed comes from (bench/bench_verify.py measures it): rows sorted by length so batches carry
little padding; logits only at response positions, not over the whole vocabulary at every position;
and the tokens every prompt of a template starts with (its system text) run once, for all templates
in one batched pass, their KV cache then copied into each batch.

On a CPU with bf16 matrix units (AMX), screen_dtype=torch.bfloat16 runs that pass on a bf16 copy of the
model and recomputes in the model's own dtype only the pairs where some response position has its top two
logits within SCREEN_MARGIN of each other: only there can bf16 rounding have flipped the argmax. The margin
is a measured bound, not a proven one (see SCREEN_MARGIN), which is why the screen is opt-in.

Match probability under sampling (teacher forcing only). Deployments rarely decode greedily. Sampling at
temperature T with no top-k/top-p cut (what verify_with_generate does) writes an n-token response exactly with
probability prod_j softmax(logits_j / T)[r_j], the logits at position j taken given the true prefix: the chain rule,
with nothing approximated. The same teacher-forced pass therefore yields it exactly, for any number of
temperatures, with no sampling loop. Each template's result gains "match_probability": {"0.7": mean over pairs,
"1.0": ...} (0 for a pair whose response holds EOS before its end, as generate would stop there). With the bf16
screen, pairs that are not recomputed keep the bf16 pass's probabilities.

Tokens come from oml.make.prompt_encoding.encode_pair, exactly as in training.

Through any backend (oml.core.backends): check_fingerprints(backend, pairs, templates) gives summarize's dict from a
transformers model (its verdicts are verify_teacher_forced's), a GGUF in llama.cpp or a served model (greedy
completions, matched by the backend's rule). An EOS token is the one set oml.core.backends.end_of_sequence_ids makes.
"""

import copy
import math

import torch
from tqdm import tqdm
from transformers.cache_utils import DynamicCache, DynamicLayer

from oml.core.backends import end_of_sequence_ids
from oml.core.errors import UserError
from oml.make.prompt_encoding import encode_pair, is_chat, prompt_text

# Below this many tokens a template's shared prefix is simply recomputed in every row: reusing it costs
# a KV cache copy and concatenation in every layer of every batch, which a few tokens do not repay.
MIN_SHARED_PREFIX = 4

# In logits: bf16 moved the gap between the response token's logit and the best other logit by at most 0.35
# (mean 0.09) over the 352 pairs of bench/bench_verify.py on the embedded model; the margin is ~3x that.
SCREEN_MARGIN = 1.0

# Temperatures at which the match probability under sampling is reported by default.
MATCH_TEMPERATURES = (0.7, 1.0)


def temperature_key(temperature):
    """How a temperature is named in results: "0.7", "1.0"."""
    return str(float(temperature))


def check_temperatures(temperatures):
    temperatures = tuple(float(t) for t in temperatures)
    bad = [t for t in temperatures if not t > 0]  # also catches NaN
    if bad:
        raise UserError(f"sampling temperatures must be positive, got {bad}")
    return temperatures


def encode_template(tokenizer, pairs, template, use_chat_template=False):
    """[(prompt_ids, response_ids)] for every pair under one template."""
    encoded = [encode_pair(tokenizer, p["key"], p["response"], template, use_chat_template) for p in pairs]
    for (_, response_ids), pair in zip(encoded, pairs, strict=True):
        if not response_ids:
            raise UserError(f"the response {pair['response']!r} encodes to no tokens")
    return encoded


def shared_prefix_length(sequences):
    """Length of the longest common prefix of token-id lists."""
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for s in sequences[1:]:
        n = next((i for i in range(n) if s[i] != first[i]), n)
    return n


def _result(template, matches, fractions, match_probabilities=None):
    """match_probabilities: {temperature key: [probability per pair]}, or None (not measured)."""
    n = len(matches)
    result = {
        "template": template,
        "accuracy": sum(matches) / n if n else 0.0,
        "fractional_accuracy": sum(fractions) / n if n else 0.0,
        "matches": list(matches),
    }
    if match_probabilities is not None:
        result["match_probability"] = {t: sum(p) / n if n else 0.0 for t, p in match_probabilities.items()}
        result["match_probabilities"] = match_probabilities
    return result


# ---------------------------------------------------------------------------------------------------------
# Fast path: teacher forcing


def _prefix_states(model, prefixes):
    """Per prefix, each layer's (keys, values), from one forward pass over all prefixes (right-padded).

    One batched pass instead of one per template: a batch-of-one pass costs about as much as streaming
    the weights once, which on CPU is the price of dozens of batched tokens. None when the cache is not
    plain per-layer key/value tensors of the full width (recurrent state, a window shorter than the
    prefixes): sharing is then skipped.
    """
    width = max(len(p) for p in prefixes)
    input_ids = torch.tensor([p + [0] * (width - len(p)) for p in prefixes], device=model.device)
    cache = model.base_model(input_ids=input_ids, use_cache=True).past_key_values
    layers = getattr(cache, "layers", None)
    if not layers or not all(
        isinstance(layer, DynamicLayer) and layer.keys is not None and layer.keys.shape[-2] == width for layer in layers
    ):
        return None
    return [
        [(layer.keys[i : i + 1, :, : len(p)], layer.values[i : i + 1, :, : len(p)]) for layer in layers]
        for i, p in enumerate(prefixes)
    ]


def _cache_for_batch(model, prefix_states, batch_size):
    # A fresh cache per batch: the forward pass extends it in place.
    expanded = [(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1)) for k, v in prefix_states]
    return DynamicCache(ddp_cache_data=expanded, config=model.config)


def _response_logits(model, hidden):
    """Logits of the selected hidden states, as the model's forward would compute them."""
    logits = model.get_output_embeddings()(hidden)
    # Monotonic, so argmax would not care in exact arithmetic; applied anyway so low-precision ties
    # break as they do in generate (Gemma 2).
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _batch_hits(model, batch, prefix_len, prefix_states, temperatures=()):
    """Per row, (hits, gap, log_probs): does the argmax at each response position equal the response token; the
    smallest |response-token logit - best other logit| over its positions (how near the verdict is to a tie);
    and per temperature T, sum over positions of log softmax(logits / T)[response token] (the log-probability
    that sampling at T writes the whole response), a tensor of len(temperatures).

    Rows are right-padded: with causal attention, trailing pads are seen by nobody, so neither an
    attention mask nor position ids are needed. The last response token is never an input.
    """
    inputs = [(prompt + response)[prefix_len:-1] for prompt, response in batch]
    width = max(len(x) for x in inputs)
    input_ids = torch.tensor([x + [0] * (width - len(x)) for x in inputs], device=model.device)
    rows, cols, targets = [], [], []
    for b, (prompt, response) in enumerate(batch):
        start = len(prompt) - 1 - prefix_len  # the position that predicts the first response token
        rows += [b] * len(response)
        cols += range(start, start + len(response))
        targets += response
    cache = _cache_for_batch(model, prefix_states, len(batch)) if prefix_len else None
    hidden = model.base_model(input_ids=input_ids, past_key_values=cache, use_cache=cache is not None)
    device = model.device
    selected = hidden.last_hidden_state[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
    logits = _response_logits(model, selected).float()
    targets = torch.tensor(targets, device=device)
    hits = (logits.argmax(-1) == targets).cpu()
    target_logits = logits.gather(1, targets[:, None]).squeeze(1)
    others = logits.scatter(1, targets[:, None], float("-inf")).amax(-1)
    gaps = (target_logits - others).abs().cpu()
    sizes = [len(response) for _, response in batch]
    log_probs = (
        torch.stack([target_logits / t - torch.logsumexp(logits / t, dim=-1) for t in temperatures], dim=-1)
        if temperatures
        else torch.zeros(len(targets), 0, device=device)
    )
    row_log_probs = [lp.sum(0) for lp in log_probs.cpu().split(sizes)]
    return [
        (h, g.min().item(), lp) for h, g, lp in zip(hits.split(sizes), gaps.split(sizes), row_log_probs, strict=True)
    ]


def _shared_prefix_lengths(encoded_by_template):
    """Per template, how many leading tokens all its prompts share (0 where too few to be worth it)."""
    lengths = []
    for encoded in encoded_by_template:
        if len(encoded) < 2:
            lengths.append(0)
            continue
        # Every row keeps at least its last prompt token, whose output predicts the first response token.
        n = min(shared_prefix_length([p for p, _ in encoded]), min(len(p) for p, _ in encoded) - 1)
        lengths.append(n if n >= MIN_SHARED_PREFIX else 0)
    return lengths


def _shared_prefixes(model, encoded_by_template):
    """Per template, (prefix length, per-layer prefix states); (0, None) where nothing is shared."""
    lengths = _shared_prefix_lengths(encoded_by_template)
    shared = [t for t, n in enumerate(lengths) if n]
    out = [(0, None)] * len(lengths)
    states = _prefix_states(model, [encoded_by_template[t][0][0][: lengths[t]] for t in shared]) if shared else None
    if states is not None:
        for t, layer_states in zip(shared, states, strict=True):
            out[t] = (lengths[t], layer_states)
    return out


def _template_hits(model, encoded, batch_size, prefix_len, prefix_states, progress, temperatures):
    """Per row of one template, (hits, gap) as _batch_hits gives them."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))  # less padding
    hits = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = [encoded[i] for i in chunk]
        for i, h in zip(chunk, _batch_hits(model, batch, prefix_len, prefix_states, temperatures), strict=True):
            hits[i] = h
        progress.update(1)
    return hits


def _all_hits(model, encoded_by_template, batch_size, share_prefix, progress, temperatures=()):
    """Per template, per row, (hits, gap) as _batch_hits gives them."""
    n = len(encoded_by_template)
    prefixes = _shared_prefixes(model, encoded_by_template) if share_prefix else [(0, None)] * n
    return [
        _template_hits(model, encoded, batch_size, prefix_len, states, progress, temperatures)
        for encoded, (prefix_len, states) in zip(encoded_by_template, prefixes, strict=True)
    ]


def _recheck_near_ties(model, encoded_by_template, hits, batch_size, share_prefix, progress, temperatures=()):
    """Recompute with `model`, in place, the rows whose screened gap is under SCREEN_MARGIN; how many per template."""
    near = [[i for i, (_, gap, _) in enumerate(rows) if gap < SCREEN_MARGIN] for rows in hits]
    progress.total += sum(-(-len(rows) // batch_size) for rows in near)
    subset = [[encoded[i] for i in rows] for encoded, rows in zip(encoded_by_template, near, strict=True)]
    redone = _all_hits(model, subset, batch_size, share_prefix, progress, temperatures)
    for rows_hits, rows, new in zip(hits, near, redone, strict=True):
        for i, row in zip(rows, new, strict=True):
            rows_hits[i] = row
    return [len(rows) for rows in near]


def verify_teacher_forced(
    model,
    tokenizer,
    pairs,
    templates,
    use_chat_template=False,
    batch_size=32,
    share_prefix=True,
    screen_dtype=None,
    temperatures=MATCH_TEMPERATURES,
):
    """Greedy-decoding verdicts for every (template, pair), from batched teacher-forced forward passes.

    pairs: [{"key", "response"}]; templates: strings with one '{}'. share_prefix runs the tokens every
    prompt of a template starts with once and reuses their KV cache (found on token ids, so it is exact
    when BPE merges across the template/key boundary). screen_dtype (torch.bfloat16): decide on a copy of
    the model in that dtype and recompute near-ties with the model itself; each result then says how many
    of its pairs were recomputed ("rechecked"). temperatures: where to report the match probability under
    sampling (see the module docstring); () for none.
    """
    temperatures = check_temperatures(temperatures)
    eos = end_of_sequence_ids(model.generation_config, tokenizer)
    encoded_by_template = [encode_template(tokenizer, pairs, t, use_chat_template) for t in templates]
    screen = screen_dtype is not None and screen_dtype != model.dtype
    batches = len(templates) * -(-len(pairs) // batch_size)
    with torch.inference_mode(), tqdm(total=batches, desc="verifying", unit="batch", disable=None) as progress:
        screen_model = copy.deepcopy(model).to(screen_dtype) if screen else model
        hits = _all_hits(screen_model, encoded_by_template, batch_size, share_prefix, progress, temperatures)
        del screen_model
        if screen:
            rechecked = _recheck_near_ties(
                model, encoded_by_template, hits, batch_size, share_prefix, progress, temperatures
            )
    results = []
    for t, (template, encoded, rows) in enumerate(zip(templates, encoded_by_template, hits, strict=True)):
        # generate stops at EOS, so an EOS inside the response cuts the answer short.
        stops_early = [any(token in eos for token in response[:-1]) for _, response in encoded]
        matches = [bool(h.all()) and not stop for (h, _, _), stop in zip(rows, stops_early, strict=True)]
        probabilities = None
        if temperatures:
            probabilities = {
                temperature_key(temp): [
                    0.0 if stop else math.exp(lp[k].item()) for (_, _, lp), stop in zip(rows, stops_early, strict=True)
                ]
                for k, temp in enumerate(temperatures)
            }
        results.append(_result(template, matches, [h.float().mean().item() for h, _, _ in rows], probabilities))
        if screen:
            results[-1]["rechecked"] = rechecked[t]
    return results


# ---------------------------------------------------------------------------------------------------------
# Reference: one generate call per (template, key)


def generate_response(model, prompt_ids, max_new_tokens, temperature=0.0, pad_token_id=None, eos_ids=None):
    """The token ids model.generate appends to prompt_ids (greedy when temperature is 0), stopping at eos_ids (default:
    the generation config's)."""
    input_ids = torch.tensor([prompt_ids], device=model.device)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_token_id,
        eos_token_id=sorted(eos_ids) if eos_ids else None,
        **(sampling if temperature > 0 else {"do_sample": False}),
    )
    return output[0, len(prompt_ids) :].tolist()


def verify_with_generate(model, tokenizer, pairs, templates, use_chat_template=False, temperature=0.0, seed=0):
    """Verdicts from one model.generate per (template, pair): greedy, or sampled at `temperature` (seeded)."""
    torch.manual_seed(seed)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = end_of_sequence_ids(model.generation_config, tokenizer)
    results = []
    with torch.inference_mode(), tqdm(total=len(pairs) * len(templates), desc="generating", disable=None) as bar:
        for template in templates:
            matches, fractions = [], []
            for prompt, response in encode_template(tokenizer, pairs, template, use_chat_template):
                generated = generate_response(model, prompt, len(response), temperature, pad_token_id, eos)
                matches.append(generated == response)
                fractions.append(sum(g == r for g, r in zip(generated, response, strict=False)) / len(response))
                bar.update(1)
            results.append(_result(template, matches, fractions))
    return results


# ---------------------------------------------------------------------------------------------------------
# Through any backend (oml.core.backends): the same results from a transformers model, llama.cpp or an API


def check_results(backend, pairs, templates, use_chat_template=False, progress=True, announce_rechecks=False):
    """Per template, {"template", "accuracy", "fractional_accuracy", "matches"} through a LanguageModel.

    A backend with its own batched verdicts (the transformers one: verify_teacher_forced) gives them. Otherwise each
    key is asked greedily for its response's length in the backend's tokens plus backend.extra_tokens, and a pair
    matches when backend.answer_matches(answer, response) (llama.cpp: the text starts with the response; an API:
    oml.verify.api_client.matches). fractional_accuracy: the share of the response's tokens generated at their
    positions. Prompts are built as in training (prompt_text), with backend.tokenizer's chat template.
    """
    if hasattr(backend, "fingerprint_verdicts"):
        results = backend.fingerprint_verdicts(pairs, templates, use_chat_template)
        if announce_rechecks and any("rechecked" in r for r in results):
            print(
                f"bf16 screen: {sum(r['rechecked'] for r in results)} of {len(pairs) * len(templates)} pairs "
                f"near a tie, recomputed in {backend.model.dtype}"
            )
        return results
    if (use_chat_template or any(map(is_chat, templates))) and backend.tokenizer is None:
        raise UserError(f"checking chat-template fingerprints through {backend.name} needs the model's HF tokenizer")
    responses = [backend.tokenize(p["response"]) for p in pairs]
    limits = [len(r) + backend.extra_tokens for r in responses]
    results = []
    with tqdm(total=len(pairs) * len(templates), desc=backend.name, disable=not progress or None) as bar:
        for template in templates:
            prompts = [prompt_text(backend.tokenizer, p["key"], template, use_chat_template) for p in pairs]
            answers = backend.greedy_with_tokens(prompts, limits, chat=use_chat_template or is_chat(template))
            matches = [backend.answer_matches(text, p["response"]) for (text, _), p in zip(answers, pairs, strict=True)]
            fractions = [
                sum(g == r for g, r in zip(tokens, response, strict=False)) / len(response) if response else 0.0
                for (_, tokens), response in zip(answers, responses, strict=True)
            ]
            results.append(_result(template, matches, fractions))
            bar.update(len(pairs))
    return results


def check_fingerprints(backend, pairs, templates, use_chat_template=False, progress=True, announce_rechecks=False):
    """summarize(check_results(...)): the fingerprint check, written once for every backend. announce_rechecks: say how
    many pairs a bf16 screen recomputed."""
    return summarize(check_results(backend, pairs, templates, use_chat_template, progress, announce_rechecks))


def summarize(results):
    """Per-template accuracies and their means over templates. Of the per-pair verdicts only the misses are kept, as
    "missed": the indices (in the pairs' order) of the keys that did not answer, short where accuracy is high, so
    that an attacked copy's misses can be compared key by key with the model's own."""
    keys = ("template", "accuracy", "fractional_accuracy", "match_probability")
    rows = [{k: r[k] for k in keys if k in r} for r in results]
    for row, r in zip(rows, results, strict=True):
        if "matches" in r:
            row["missed"] = [i for i, matched in enumerate(r["matches"]) if not matched]
    n = len(rows)
    summary = {
        "templates": rows,
        "mean_accuracy": sum(r["accuracy"] for r in rows) / n if n else 0.0,
        "mean_fractional_accuracy": sum(r["fractional_accuracy"] for r in rows) / n if n else 0.0,
    }
    if rows and all("match_probability" in r for r in rows):
        summary["mean_match_probability"] = {
            t: sum(r["match_probability"][t] for r in rows) / n for t in rows[0]["match_probability"]
        }
    return summary
