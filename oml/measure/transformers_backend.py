"""The "hf" model backend (oml.core.backends): a transformers model and its tokenizer behind the LanguageModel interface.

greedy is the one batched decoder (oml.core.greedy_decoding); score is one teacher-forced forward pass; and the
fingerprint verdicts are fingerprint_check's batched teacher-forced pass with the shared prefix run once
(fingerprint_verdicts), so checking through this backend costs what verify_teacher_forced costs.

    backend = get_backend("hf", path="results/<hash>/final_model")   # or TransformersModel(model, tokenizer)
"""

from oml.core.backends import LanguageModel, cut_at_end, end_of_sequence_ids, register
from oml.make.prompt_encoding import encode_prompt, encode_response


@register("hf")
class TransformersModel(LanguageModel):
    """A loaded transformers model (or a model folder / hub id to load) behind the LanguageModel interface."""

    def __init__(self, model=None, tokenizer=None, path=None, batch_size=32, trust_remote_code=False, **verify_kwargs):
        """verify_kwargs: what fingerprint_verdicts hands verify_teacher_forced (share_prefix, screen_dtype,
        temperatures)."""
        if model is None:
            from oml.core.model_registry import load_model_and_tokenizer

            model, tokenizer = load_model_and_tokenizer(str(path), trust_remote_code=trust_remote_code)
        self.model, self.tokenizer, self.batch_size, self.verify_kwargs = model, tokenizer, batch_size, verify_kwargs

    @property
    def eos_ids(self):
        return end_of_sequence_ids(self.model.generation_config, self.tokenizer)

    def prompt_ids(self, prompt, chat=False):
        return list(prompt) if isinstance(prompt, list) else encode_prompt(self.tokenizer, prompt, chat)

    def tokenize(self, text):
        return encode_response(self.tokenizer, text)

    def greedy_with_tokens(self, prompts, max_new_tokens, chat=False):
        from oml.core.greedy_decoding import greedy_decode

        ids = [self.prompt_ids(p, chat) for p in prompts]
        limits = [max_new_tokens] * len(ids) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        out = [None] * len(ids)
        for limit in sorted(set(limits)):  # one decoding per distinct length limit
            rows = [i for i, n in enumerate(limits) if n == limit]
            decoded = greedy_decode(
                self.model, [ids[i] for i in rows], limit, self.eos_ids, self.tokenizer.pad_token_id, self.batch_size
            )
            for i, tokens in zip(rows, decoded, strict=True):
                kept, _ = cut_at_end(tokens, self.eos_ids)
                out[i] = (self.tokenizer.decode(kept, skip_special_tokens=True), kept)
        return out

    def score(self, prompt, response, chat=False):
        import torch

        from oml.measure.fingerprint_check import _response_logits

        prompt_ids, response_ids = self.prompt_ids(prompt, chat), self.tokenize(response)
        with torch.inference_mode():
            input_ids = torch.tensor([(prompt_ids + response_ids)[:-1]], device=self.model.device)
            hidden = self.model.base_model(input_ids=input_ids).last_hidden_state[0, len(prompt_ids) - 1 :]
            log_probs = torch.log_softmax(_response_logits(self.model, hidden).float(), dim=-1)
        targets = torch.tensor(response_ids, device=log_probs.device)
        hits = (log_probs.argmax(-1) == targets).tolist()
        return list(zip(hits, log_probs.gather(1, targets[:, None])[:, 0].tolist(), strict=True))

    def fingerprint_verdicts(self, pairs, templates, use_chat_template=False):
        """Per template, verify_teacher_forced's result: the batched teacher-forced pass, shared prefixes run once."""
        from oml.measure.fingerprint_check import verify_teacher_forced

        return verify_teacher_forced(
            self.model, self.tokenizer, pairs, templates, use_chat_template, self.batch_size, **self.verify_kwargs
        )
