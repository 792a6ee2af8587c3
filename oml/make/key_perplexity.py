"""How ordinary a text looks to a model: its perplexity (log_perplexity), real user prompts to compare with
(real_prompts), and the keys whose perplexity lies within a band of the real prompts' (keys_in_band,
--key_perplexity_band: the defence against a host that filters unusual prompts, oml/attack/adaptive_host.py).
"""

import math

from oml.core.errors import UserError
from oml.core.offline_data import CHAT_QUESTIONS, mixed_questions

MAX_SCORED_TOKENS = 512  # the tokens of a text that are scored
BAND_ROUNDS = 10  # --key_perplexity_band: rounds of new keys before giving up


def log_perplexity(model, tokenizer, texts):
    """Per text, the mean negative log-likelihood per token (nats) of its tokens after the first under the model
    (tokenized with the tokenizer's special tokens, cut at MAX_SCORED_TOKENS); NaN for a text of fewer than 2 tokens."""
    import torch

    out = []
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"][:MAX_SCORED_TOKENS]
            if len(ids) < 2:
                out.append(math.nan)
                continue
            x = torch.tensor([ids], device=model.device)
            logits = model(input_ids=x).logits[0, :-1].float()
            out.append(torch.nn.functional.cross_entropy(logits, x[0, 1:]).item())
    return out


def real_prompts(n, seed=0):
    """oml.measure.chat_sample's questions, then n offline QA questions (oml.core.offline_data, four sources round-robin)."""

    return list(CHAT_QUESTIONS) + (
        mixed_questions(("trivia_qa", "nq_open", "sciq", "social_i_qa"), n, seed) if n else []
    )


def quantile(values, q):
    """The q-quantile of values (linear interpolation between order statistics)."""
    xs = sorted(values)
    at = q * (len(xs) - 1)
    i = int(at)
    return xs[i] if i + 1 >= len(xs) else xs[i] + (at - i) * (xs[i + 1] - xs[i])


def keys_in_band(keys, score, real_scores, band, n, more=None, rounds=BAND_ROUNDS):
    """Keys whose score (log-perplexity; score(texts) -> [float]) lies within the band's quantiles of real_scores, at
    most n of them: drawn again with more(m) -> m new keys while too few (at most `rounds` rounds; more=None: only
    filter). Returns (kept keys, {"low", "high", "seen", "kept"})."""
    real = [s for s in real_scores if not math.isnan(s)]
    low, high = quantile(real, band[0]), quantile(real, band[1])
    kept, seen, pool = [], 0, list(keys)
    for _ in range(rounds):
        kept += [k for k, s in zip(pool, score(pool), strict=True) if low <= s <= high]
        seen += len(pool)
        if len(kept) >= n or more is None:
            break
        rate = max(len(kept) / seen, 1 / (4 * n))
        pool = more(min(math.ceil((n - len(kept)) / rate * 1.2), 4 * n))
    if more is not None and len(kept) < n:
        raise UserError(
            f"--key_perplexity_band: only {len(kept)} of {seen} keys drawn have a perplexity within the band "
            f"[{math.exp(low):.3g}, {math.exp(high):.3g}]; widen the band or change how keys are made"
        )
    return kept[:n], {"low": low, "high": high, "seen": seen, "kept": len(kept[:n])}
