"""One way to ask a model: the LanguageModel interface, its registry, and the one end-of-sequence set.

A backend answers two questions, whatever runs the model (as lm-evaluation-harness puts `hf`, `gguf` and
`local-completions` behind one `LM` class):

    greedy(prompts, max_new_tokens)  the greedy completion text of each prompt (a string, or token ids in the
                                     backend's vocabulary), batched where the backend can; temperature 0
    score(prompt, response)          teacher-forced: per response token, (is it the argmax given the true prefix,
                                     its log-probability), in the backend's tokenization

greedy_with_tokens gives each completion's tokens beside its text (what a greedy check's fractional accuracy counts):
the decoded tokens in transformers and llama.cpp; for an API, its text tokenized by the model's HF tokenizer.

Implementations, each in the lowest layer whose imports it needs:

    "hf"    oml.measure.transformers_backend  a transformers model; its fingerprint verdicts are the batched
                                              teacher-forced pass of oml.measure.fingerprint_check
    "gguf"  oml.attack.gguf_models            a GGUF file in llama.cpp (llama-cpp-python)
    "api"   oml.verify.api_backend            an OpenAI-compatible endpoint; score only where it returns logprobs

    backend = get_backend("gguf", path="model.gguf")
    oml.measure.fingerprint_check.check_fingerprints(backend, pairs, ["{}"])   # the same summary from every backend

`register(name)` files a class under a name; `get_backend` imports a built-in backend's module on first use
(BUILT_IN names where each lives: the registry itself imports nothing above core).
"""

import importlib
from abc import ABC, abstractmethod

from oml.core.errors import UserError

BUILT_IN = {
    "hf": "oml.measure.transformers_backend",
    "gguf": "oml.attack.gguf_models",
    "api": "oml.verify.api_backend",
}
_REGISTRY = {}


def end_of_sequence_ids(generation_config=None, tokenizer=None):
    """The tokens greedy decoding stops at, for every decoder: the generation config's eos_token_id (one id or a
    list) and the tokenizer's EOS token."""
    eos = getattr(generation_config, "eos_token_id", None)
    ids = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def cut_at_end(tokens, eos_ids):
    """(tokens before the first end-of-sequence token, whether there was one)."""
    end = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
    return (list(tokens), False) if end is None else (list(tokens[:end]), True)


class LanguageModel(ABC):
    """A model to ask: greedy completions and teacher-forced scores (see the module docstring)."""

    name = None
    # the HF tokenizer whose chat template builds chat prompts (the GGUF and API backends take the run's own)
    tokenizer = None
    # tokens asked for beyond a response's own length in a greedy check, and the rule its text must pass
    extra_tokens = 0

    @property
    @abstractmethod
    def eos_ids(self):
        """The end-of-sequence set (end_of_sequence_ids) greedy decoding stops at."""

    @abstractmethod
    def greedy_with_tokens(self, prompts, max_new_tokens, chat=False):
        """Per prompt, (greedy completion text, its tokens), without the end token. max_new_tokens: one number, or
        one per prompt. chat: the prompts are rendered chat-template text, which writes its own special tokens."""

    def greedy(self, prompts, max_new_tokens, chat=False):
        """The greedy completion text of each prompt (temperature 0), without the end token."""
        return [text for text, _ in self.greedy_with_tokens(prompts, max_new_tokens, chat)]

    @abstractmethod
    def tokenize(self, text):
        """A response's tokens in this backend's vocabulary (no special tokens added)."""

    @abstractmethod
    def score(self, prompt, response, chat=False):
        """Teacher-forced: [(response token is the argmax, its log-probability)] per response token."""

    def answer_matches(self, answer, response):
        """Does a greedy answer count as the response? Its text starts with the response's text."""
        return answer.startswith(response)

    def close(self):  # noqa: B027  (optional: most backends hold nothing to release)
        """Release what the backend holds (a server connection, a loaded model)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def register(name):
    """Class decorator: file a LanguageModel subclass under `name`."""

    def decorate(cls):
        if not issubclass(cls, LanguageModel):
            raise TypeError(f"{cls.__name__} is not a LanguageModel")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def get_backend(name, **kwargs):
    """An instance of the backend registered as `name`, built from kwargs."""
    if name not in _REGISTRY and name in BUILT_IN:
        importlib.import_module(BUILT_IN[name])
    if name not in _REGISTRY:
        raise UserError(f"unknown model backend {name!r}; choose from {', '.join(sorted({*BUILT_IN, *_REGISTRY}))}")
    return _REGISTRY[name](**kwargs)
