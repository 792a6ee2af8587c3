"""The one batched greedy decoder for a transformers model: prompts (token ids) sorted by length into batches, padded
on the left with an attention mask, decoded with the KV cache by model.generate, every row stopped at the
end-of-sequence set (oml.core.backends.end_of_sequence_ids).

    greedy_decode(model, prompts, 32, eos_ids, pad_id)  # per prompt: new tokens, the end token included if one came

Rows are independent (left padding, masked), so a prompt's answer does not depend on its batch beyond floating-point
rounding; batch_size=1 reproduces one generate call per prompt exactly.
"""

from oml.core.errors import UserError


def greedy_decode(
    model, prompts, max_new_tokens, eos_ids, pad_id=None, batch_size=32, with_probabilities=False, desc=None
):
    """Per prompt (a list of token ids), the greedy new tokens, up to and including the first token of eos_ids (all
    max_new_tokens of them when none came). with_probabilities: per prompt (tokens, [each token's probability]),
    the softmax of the model's raw logits at each step."""
    import torch
    from tqdm import tqdm

    if not all(prompts):
        raise UserError("greedy decoding needs a non-empty prompt for every row")
    eos = sorted(eos_ids)
    pad = pad_id if pad_id is not None else (eos[0] if eos else 0)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    out = [None] * len(prompts)
    batches = range(0, len(order), batch_size)
    with torch.inference_mode():
        for start in tqdm(batches, desc=desc, unit="batch", disable=None if desc else True):
            chunk = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.tensor([[pad] * (width - len(prompts[i])) + list(prompts[i]) for i in chunk])
            mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk])
            generated = model.generate(
                input_ids=ids.to(model.device),
                attention_mask=mask.to(model.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=eos or None,
                return_dict_in_generate=with_probabilities,
                output_logits=with_probabilities,
            )
            new = (generated.sequences if with_probabilities else generated)[:, width:]
            if with_probabilities:  # each chosen token's probability, step by step (never all distributions at once)
                probs = torch.stack(
                    [
                        torch.softmax(lg.float(), -1).gather(1, new[:, j : j + 1])
                        for j, lg in enumerate(generated.logits)
                    ],
                    dim=1,
                )[..., 0].cpu()
            for row, i in enumerate(chunk):
                tokens = new[row].tolist()
                end = next((j + 1 for j, t in enumerate(tokens) if t in eos_ids), len(tokens))
                out[i] = (tokens[:end], probs[row, :end].tolist()) if with_probabilities else tokens[:end]
    return out
