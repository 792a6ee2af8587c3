"""The "api" model backend (oml.core.backends): a model served behind an OpenAI-compatible endpoint.

greedy: temperature-0 requests through oml.verify.api_client.Client (retries, a bounded thread pool); a greedy
fingerprint check matches by the API's own rule (api_client.matches), asking for the response's length in the run's
tokenizer plus extra_tokens, as the suspect check does. score (teacher-forced): only where the completions route
returns logprobs of the prompt itself (echo + logprobs, as llama.cpp's server and vLLM do); otherwise a UserError
says so. Token counts and the end-of-sequence set come from the model's HF tokenizer, the vocabulary in its weights.

    with get_backend("api", api_base="http://127.0.0.1:8000/v1", model="suspect", tokenizer=tok) as backend: ...
"""

from oml.core.backends import LanguageModel, end_of_sequence_ids, register
from oml.core.errors import UserError
from oml.verify.api_client import ApiError, Client, matches

LOGPROBS_TOP = 5  # alternatives asked for per position when scoring


@register("api")
class ApiModel(LanguageModel):
    """An OpenAI-compatible endpoint behind the LanguageModel interface."""

    def __init__(
        self,
        api_base,
        model,
        tokenizer=None,
        endpoint="completions",
        extra_tokens=0,
        shifted_logprobs=False,
        **client_kwargs,
    ):
        """client_kwargs: what api_client.Client takes besides these (api_key_env, system_prompt, timeout, retries,
        concurrency, extra_body). shifted_logprobs: see score."""
        self.client = Client(api_base, model, endpoint, temperature=0.0, **client_kwargs)
        self.tokenizer, self.extra_tokens, self.shifted_logprobs = tokenizer, extra_tokens, shifted_logprobs

    @property
    def eos_ids(self):
        return end_of_sequence_ids(tokenizer=self.tokenizer)

    def tokenize(self, text):
        from oml.make.prompt_encoding import encode_response

        if self.tokenizer is None:
            raise UserError("counting tokens for an API backend needs the model's HF tokenizer (tokenizer=...)")
        return encode_response(self.tokenizer, text)

    def greedy_with_tokens(self, prompts, max_new_tokens, chat=False):
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if any(not isinstance(p, str) for p in prompts):
            raise UserError("an API backend takes prompts as text, not token ids")
        answers = self.client.complete_many(prompts, limits)
        failed = next((a.error for a in answers if a.error), None)
        if failed:
            raise ApiError(failed)
        return [(a.text, self.tokenize(a.text) if self.tokenizer is not None else None) for a in answers]

    def answer_matches(self, answer, response):
        return matches(answer, response)

    def score(self, prompt, response, chat=False):
        """Teacher-forced from the server's logprobs of prompt + response (echo): at each position whose text starts
        at or after the prompt's end, (the token is the top alternative, its log-probability, None where the server
        did not report it). The server tokenizes the joined text (the completions route takes text), so where a
        BPE merge crosses the prompt/response boundary ("zinc" + "certainty") its positions are not the response's
        own tokens. shifted_logprobs (the constructor's): the server reports at position i the distribution after
        token i rather than before it, as llama-cpp-python's server (0.3.x) does."""
        if self.client.endpoint != "completions":
            raise UserError("teacher-forced scoring through an API needs the completions route")
        text = prompt + response
        lp = self.client.echo_logprobs(text, LOGPROBS_TOP)
        tokens, tops = lp["tokens"], lp["top_logprobs"]
        out = []
        for i, offset in enumerate(lp["text_offset"]):
            if not len(prompt) <= offset < len(text):
                continue
            if self.shifted_logprobs:
                top = (tops[i - 1] or {}) if i else {}  # also holds the previous token: it is never above the top
                log_prob = top.get(tokens[i])
            else:
                top, log_prob = tops[i] or {}, lp["token_logprobs"][i]
            if not top:
                raise ApiError(f"{self.client.api_base} gave no alternatives at position {i} of the scored text")
            out.append((max(top, key=top.get) == tokens[i], None if log_prob is None else float(log_prob)))
        return out

    def close(self):
        self.client.close()
