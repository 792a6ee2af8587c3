"""Asking a served model for a fingerprint's response through an OpenAI-compatible API, and the match rule.

Routes (`endpoint`):
  * "completions": POST {api_base}/completions, {"prompt": <the key as trained>} -> choices[0].text
  * "chat":        POST {api_base}/chat/completions, the key as the user message (after an optional system
                   message) -> choices[0].message.content
Requests are greedy (temperature 0) and ask for `max_tokens` tokens: the response's length in the run's own
tokenizer (the suspect's vocabulary is the one in the weights, so the same tokens come back), plus
--extra_tokens when the server may tokenize differently.

Faults: timeouts, connection errors, HTTP 429 and 5xx are retried with exponential backoff (honouring a short
Retry-After), at most `retries` times; anything else (401/403, an unknown model, a malformed answer, a fault
that outlasts its retries) is an ApiError: one clear line, raised only after the answers already received are
handed back, so the caller can record them. The API key is read from an environment variable, sent as a
Bearer header, and never printed or stored.

The match rule (`matches`): the served text is compared with the response as *text*, so it does not depend
on how the server tokenized it. Both are normalised: Unicode NFC, every run of whitespace becomes one space,
leading and trailing whitespace dropped (servers and chat templates differ in the leading space they keep). The
answer matches when its normalised text starts with the normalised response and does not go on with more
letters or digits of the response's last word ("Paris" does not match "Parisian"; it matches "Paris.", "Paris
is" and "Paris"). Case and punctuation count. An empty response never matches. `generated_matches` applies the
same rule to local greedy generation, which is how p0 is measured on reference models.
"""

import contextlib
import os
import random
import re
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor

from oml.core.errors import UserError

ENDPOINTS = {"completions": "/completions", "chat": "/chat/completions"}
RETRY_STATUS = {429, 500, 502, 503, 504}
MAX_RETRY_AFTER = 30.0


class ApiError(UserError):
    """The server cannot answer usefully (refused, unauthorised, unknown model, malformed answers): one line."""


# ------------------------------------------------------------------------------------------ the match rule


def normalize(text):
    """NFC, whitespace runs collapsed to one space, stripped."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFC", text or "")).strip()


def matches(answer, response):
    """Does the served answer start with the response, whole (see the module docstring)?"""
    answer, response = normalize(answer), normalize(response)
    if not response or not answer.startswith(response):
        return False
    rest = answer[len(response) :]
    return not (rest and rest[0].isalnum() and response[-1].isalnum())


# ------------------------------------------------------------------------------------------ the client


class Answer:
    """One request's outcome: `text` when the server answered, else `error` (a short reason)."""

    def __init__(self, text=None, error=None):
        self.text, self.error = text, error


class Client:
    """A small OpenAI-compatible client: one route, greedy requests, retries, a bounded thread pool."""

    def __init__(
        self,
        api_base,
        model,
        endpoint="completions",
        api_key_env="OPENAI_API_KEY",
        system_prompt=None,
        timeout=60.0,
        retries=3,
        backoff=0.5,
        concurrency=4,
        temperature=0.0,
        extra_body=None,
    ):
        """extra_body: fields added to every request (a server's own sampling options, e.g. llama.cpp's
        {"repeat_penalty": 1.0}); never needed for an OpenAI-compatible greedy request."""
        import httpx

        if endpoint not in ENDPOINTS:
            raise UserError(f"unknown --endpoint {endpoint!r}; choose from {', '.join(ENDPOINTS)}")
        self.api_base = api_base.rstrip("/")
        self.model, self.endpoint, self.system_prompt = model, endpoint, system_prompt
        self.retries, self.backoff, self.temperature = retries, backoff, temperature
        self.extra_body = dict(extra_body or {})
        self.concurrency = max(1, concurrency)
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(api_key_env) if api_key_env else None
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.http = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=self.concurrency),
        )
        self._httpx = httpx

    def close(self):
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- requests

    def body(self, prompt, max_tokens):
        body = {"model": self.model, "max_tokens": max_tokens, "temperature": self.temperature, "stream": False}
        body.update(self.extra_body)
        if self.temperature == 0:
            body["top_p"] = 1.0
        if self.endpoint == "completions":
            body["prompt"] = prompt
        else:
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            body["messages"] = messages + [{"role": "user", "content": prompt}]
        return body

    def check_reachable(self):
        """GET {api_base}/models before any key goes out: a refused connection or a refused API key stops here.

        A server without the route, or whose list lacks our model, is not an error (some load models on demand)."""
        try:
            r = self.http.get(self.api_base + "/models")
        except self._httpx.HTTPError as e:
            raise ApiError(self._transport_message(e)) from None
        if r.status_code in (401, 403):
            raise ApiError(self._status_message(r))

    def served_models(self):
        try:
            r = self.http.get(self.api_base + "/models")
            return [m.get("id") for m in r.json().get("data", [])]
        except Exception:
            return None

    def complete(self, prompt, max_tokens):
        """The served text for one prompt; raises ApiError on a fatal fault or when retries run out."""
        url = self.api_base + ENDPOINTS[self.endpoint]
        body = self.body(prompt, max_tokens)
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                r = self.http.post(url, json=body)
            except (self._httpx.TimeoutException, self._httpx.TransportError) as e:
                if last:
                    raise ApiError(self._transport_message(e)) from None
                self._sleep(attempt)
                continue
            if r.status_code in RETRY_STATUS and not last:
                self._sleep(attempt, r.headers.get("retry-after"))
                continue
            if r.status_code != 200:
                raise ApiError(self._status_message(r))
            return self._text(r)
        raise AssertionError("unreachable")

    def echo_logprobs(self, text, top=1):
        """The completions route's logprobs over `text` itself (echo, `top` alternatives per position): {"tokens",
        "token_logprobs", "top_logprobs", "text_offset"}. ApiError when the server does not return them."""
        body = {**self.body(text, 1), "prompt": text, "echo": True, "logprobs": top}
        body.pop("messages", None)
        try:
            r = self.http.post(self.api_base + ENDPOINTS["completions"], json=body)
        except self._httpx.HTTPError as e:
            raise ApiError(self._transport_message(e)) from None
        if r.status_code != 200:
            raise ApiError(self._status_message(r))
        try:
            logprobs = r.json()["choices"][0]["logprobs"]
            fields = {k: logprobs[k] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        except (ValueError, KeyError, IndexError, TypeError):
            fields = None
        if not fields or not fields["tokens"] or fields["top_logprobs"] is None:
            raise ApiError(
                f"{self.api_base} returns no logprobs of the prompt (echo + logprobs on the completions route), so "
                "teacher-forced scoring is not available through it; check by greedy completions instead"
            )
        return fields

    def complete_many(self, prompts, max_tokens):
        """Answers for several prompts, at most `concurrency` in flight. Returns [Answer] in order: every request
        gets its Answer (text or error), so none is lost when another fails."""

        def one(args):
            prompt, n = args
            try:
                return Answer(text=self.complete(prompt, n))
            except ApiError as e:
                return Answer(error=str(e))

        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(prompts)))) as pool:
            return list(pool.map(one, zip(prompts, max_tokens, strict=True)))

    # ---- helpers

    def _sleep(self, attempt, retry_after=None):
        delay = self.backoff * 2**attempt * (1 + 0.25 * random.random())
        if retry_after:
            with contextlib.suppress(ValueError):
                delay = max(delay, min(float(retry_after), MAX_RETRY_AFTER))
        time.sleep(delay)

    def _text(self, r):
        try:
            data = r.json()
            choice = data["choices"][0]
            text = choice["text"] if self.endpoint == "completions" else choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise ApiError(f"{self.api_base} answered with malformed JSON: {r.text[:120]!r}") from None
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise ApiError(f"{self.api_base} answered with a non-text completion: {str(text)[:120]!r}")
        return text

    def _transport_message(self, e):
        if isinstance(e, self._httpx.TimeoutException):
            return (
                f"{self.api_base} did not answer in time ({type(e).__name__}); raise --api_timeout or check the server"
            )
        if isinstance(e, self._httpx.ConnectError):
            return f"cannot connect to {self.api_base} (connection refused or no such host): is the server running?"
        return f"request to {self.api_base} failed: {type(e).__name__}: {e}"

    def _status_message(self, r):
        detail = _error_detail(r)
        if r.status_code in (401, 403):
            return (
                f"{self.api_base} refused the API key (HTTP {r.status_code}): set a valid key in the API key variable"
            )
        if r.status_code in (400, 404, 422) and "model" in detail.lower():
            served = self.served_models()
            listed = f"; it serves: {', '.join(map(str, served))}" if served else ""
            return f"{self.api_base} does not know model {self.model!r} (HTTP {r.status_code}: {detail}){listed}"
        if r.status_code == 404:
            return f"{self.api_base}{ENDPOINTS[self.endpoint]} not found (HTTP 404): wrong --api_base or --endpoint?"
        if r.status_code in RETRY_STATUS:
            return f"{self.api_base} kept failing (HTTP {r.status_code} after {self.retries} retries): {detail}"
        return f"{self.api_base} answered HTTP {r.status_code}: {detail}"


def _error_detail(r):
    try:
        data = r.json()
        err = data.get("error", data) if isinstance(data, dict) else data
        text = err.get("message", err) if isinstance(err, dict) else err
        text = str(text or data.get("detail", ""))
    except Exception:
        text = r.text
    return " ".join(str(text).split())[:160]
