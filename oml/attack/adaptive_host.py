"""The adaptive host: serving-time filters that someone serving a fingerprinted model runs in front of it to hide where
the model comes from, their measurement, and a small OpenAI-compatible server that runs them.

Threat model. The host holds the fingerprinted weights (and the public base model they were made from), serves them
through an API, and knows this suite's method but not its keys: fingerprints are (key, response) pairs fine-tuned in,
checked by sending keys and reading the greedy answer's first tokens (oml.verify.suspect_check). The host does not change the
weights; it changes what the server does with a request:

    confidence    a logits processor: at a step where the model's top token has probability above τ (or, with
                  --entropy, where the next-token entropy is below a threshold), the tokens above τ (the top token) are
                  taken out and the answer continues from the remaining tokens renormalised (greedy: the next best
                  token). A perinucleus fingerprint's one-token response trained to probability ≈ 1 after its key is
                  such an overconfident output; ordinary answers rarely are. --first_token_only acts at the answer's
                  first token only. τ is on the model's own (temperature 1) distribution, whatever the request's
                  temperature.
    input_filter  the prompt's perplexity under the served model or a second small model (--filter_model): prompts
                  above --threshold are refused (an empty answer, finish_reason "stop"; nothing is rewritten).
                  Keys made of rare words have high perplexity; real users' questions mostly do not.
    base_detect   the host also holds the public base model: at the first answer position it compares the two
                  next-token distributions (KL(p_served ‖ p_base), or the log ratio of the served top token's
                  probability under the two) and answers a query above --threshold with the base model instead.

What the server scores: on the completions route the prompt as sent (the raw prompt, a chat template's text
included); on the chat route the last user message (input_filter) and the chat-templated prompt (base_detect).

    python -m oml.attack.adaptive_host serve --model results/<hash>/final_model --filter confidence --tau 0.99 --port 8001
    python -m oml.attack.adaptive_host serve --model FOLDER --base HF_ID --filter base_detect --threshold 2.0 --port 8001
    python -m oml.attack.adaptive_host serve --model FOLDER --filter none --host_temperature 0.7 --host_top_p 0.9
    python -m oml.attack.adaptive_host roc --run <hash> --filter input_filter [--filter_model PATH] [--real_prompts 500]
    python -m oml.attack.adaptive_host roc --run <hash> --filter base_detect [--base MODEL]
    python -m oml.attack.adaptive_host roc --run <hash> --filter confidence      # the first-token τ grid in one pass
    python -m oml.attack.adaptive_host roc --run <hash> --filter input_filter --keys_file FILE --max_keys 256
    python -m oml.attack.adaptive_host roc --model FOLDER --filter input_filter --keys_file FILE --output_file OUT

`roc` scores the run's keys (or --keys_file's, --max_keys of them) (positives) and real user prompts (negatives: the offline QA questions of oml.core.offline_data
and oml.measure.chat_sample's questions, formatted the way keys are sent on the route), writes the scores, the ROC curve, its AUC
and the share of keys kept (not flagged) at the thresholds that flag 1% and 5% of real prompts to
results/<hash>/host/roc-<filter>-<endpoint>[-keys-<file>][-n<N>].json (or --output_file), and prints a table. For confidence the score
is the served model's top probability at the first answer position, and a τ grid gives, for every τ from one
forward pass per prompt, the share of keys whose first token still comes out and of real prompts whose first answer
token changes (the confidence filter with --first_token_only, greedy).

The server (make_server/serving) is stdlib http.server on 127.0.0.1 only: GET /v1/models, POST /v1/completions and
/v1/chat/completions; greedy at temperature 0, else sampled (temperature, top_p, seed per request), or, with
--host_temperature T [--host_top_p P], every answer sampled at T and P whatever the request asks (a deployer that
samples; the seed stays the request's; the filter's logits processor acts before sampling); max_tokens capped
(--max_tokens_cap), request bodies capped, one generation at a time. check_fingerprints.py can be pointed at it.
The same Host object answers locally (Host.answer), which is how attack_fingerprints.py --attack host_* measures.
"""

import argparse
import contextlib
import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from oml.core.errors import UserError, run_cli
from oml.core.stage_settings import settings_from_args
from oml.make.key_perplexity import log_perplexity, real_prompts

FILTERS = ("none", "confidence", "input_filter", "base_detect")
BASE_SCORES = ("kl", "ratio")
DROP_RATES = (0.01, 0.05)  # shares of real prompts flagged at which the share of keys kept is reported
MAX_BODY = 1 << 20  # bytes of one request body
MAX_SCORED_TOKENS = 512  # the prompt's tokens an input filter scores
HOST_DIR = "host"

# Filter settings shared by `serve` and attack_fingerprints.py's host attacks.
FILTER_ARGS = [
    (["--tau"], dict(type=float, default=0.99, metavar="T",
                     help="confidence: tokens above this probability are not emitted; in (0, 1)")),
    (["--entropy"], dict(type=float, default=None, metavar="H",
                         help="confidence: act (take out the top token) where the next-token entropy, in nats, is "
                              "below H instead of where the top probability is above τ")),
    (["--first_token_only"], dict(action="store_true", help="confidence: act at the answer's first token only")),
    (["--threshold"], dict(type=float, default=None, metavar="X",
                           help="input_filter: refuse prompts of perplexity above X; base_detect: answer with the "
                                "base where the score is above X")),
    (["--filter_model"], dict(default=None, metavar="PATH",
                              help="input_filter: score perplexity under this model (default: the served model)")),
    (["--base_score"], dict(default="kl", metavar="kl|ratio",
                            help="base_detect: KL(p_served ‖ p_base) at the first answer position (kl), or the log "
                                 "ratio of the served top token's probability to the base's (ratio)")),
]  # fmt: skip

SERVE_ARGS = [
    (["--model"], dict(required=True, metavar="FOLDER", help="the model to serve (an HF folder or hub id)")),
    (["--base"], dict(default=None, metavar="MODEL", help="base_detect: the public base model")),
    (["--filter"], dict(default="none", metavar="|".join(FILTERS), help="the filter in front of the model")),
    (["--port"], dict(type=int, default=8001)),
    (["--model_name"], dict(default="host", help="the model name the server answers to")),
    (["--max_tokens_cap"], dict(type=int, default=256, help="at most this many tokens per answer")),
    (["--trust_remote_code"], dict(action="store_true")),
]  # fmt: skip

# How the host decodes, whatever the request asks (a deployer that samples every answer); unset: the request decides.
DECODING_ARGS = [
    (["--host_temperature"], dict(type=float, default=None, metavar="T",
                                  help="sample every answer at temperature T (> 0), whatever the request's temperature "
                                       "(0 included); default: the request decides (greedy at 0)")),
    (["--host_top_p"], dict(type=float, default=None, metavar="P",
                            help="with --host_temperature: sample from the top-p nucleus, P in (0, 1] (default 1)")),
]  # fmt: skip

ROC_ARGS = [
    (["--run"], dict(default=None, metavar="HASH",
                     help="the run whose keys are scored (and whose model and chat template are used); may be left "
                          "out with --keys_file and --model")),
    (["--result_path"], dict(default="results/")),
    (["--filter"], dict(required=True, metavar="confidence|input_filter|base_detect")),
    (["--model"], dict(default=None, metavar="FOLDER", help="the served model (default: the run's final_model)")),
    (["--keys_file"], dict(default=None, metavar="FILE",
                           help="score this file's keys instead of the run's (any fingerprints or keys file the "
                                "suite reads: other strategies, another model's natural keys)")),
    (["--max_keys"], dict(type=int, default=None, metavar="N", help="score the first N keys only")),
    (["--base"], dict(default=None, metavar="MODEL", help="base_detect: the base model (default: the run's)")),
    (["--endpoint"], dict(default="completions", metavar="completions|chat",
                          help="format keys and real prompts as this route sends them")),
    (["--real_prompts"], dict(type=int, default=500, help="offline QA questions (plus oml.measure.chat_sample's 8) as real prompts")),
    (["--seed"], dict(type=int, default=0, help="which QA questions (oml.core.offline_data's seeded order)")),
    (["--output_file"], dict(default=None, help="write the JSON here (default: results/<hash>/host/roc-...json)")),
    (["--trust_remote_code"], dict(action="store_true")),
]  # fmt: skip


def add_arguments(parser, spec):
    from oml.core.run_config import add_arguments as add

    return add(parser, spec)


@dataclass(frozen=True)
class FilterSettings:
    """One serving-time filter and its settings (FILTER_ARGS), as `serve`, `roc` and the host attacks take them."""

    name: str  # one of FILTERS
    tau: float
    entropy: float | None
    first_token_only: bool
    threshold: float | None
    filter_model: str | None
    base_score: str  # one of BASE_SCORES

    @classmethod
    def from_args(cls, args, name=None):
        """The filter flags of parsed arguments; name: the filter (default --filter)."""
        return settings_from_args(cls, args, name=name if name is not None else args.filter)


@dataclass(frozen=True)
class HostDecoding:
    """How the host samples every answer (DECODING_ARGS), whatever the request asks; host_temperature None: the
    request's temperature, top_p and seed decide."""

    host_temperature: float | None
    host_top_p: float | None

    @classmethod
    def from_args(cls, args):
        return settings_from_args(cls, args)

    def request(self, temperature, top_p):
        """(temperature, top_p) an answer is decoded with, given the request's."""
        if self.host_temperature is None:
            return temperature, top_p
        return self.host_temperature, 1.0 if self.host_top_p is None else self.host_top_p


REQUEST_DECIDES = HostDecoding(None, None)


def check_decoding(settings):
    """Every check on HostDecoding: T > 0 and finite, 0 < P <= 1, and P only with T."""
    t, p = settings.host_temperature, settings.host_top_p
    if t is not None and not (math.isfinite(t) and t > 0):
        raise UserError(f"--host_temperature must be a finite number above 0, got {t}")
    if p is not None and not 0 < p <= 1:  # NaN fails too
        raise UserError(f"--host_top_p must be within (0, 1], got {p}")
    if p is not None and t is None:
        raise UserError("--host_top_p needs --host_temperature (the host samples every answer at that temperature)")


def check_filter(settings):
    """Every check on a filter's settings that needs no model."""
    if settings.name not in FILTERS:
        raise UserError(f"unknown filter {settings.name!r}; choose from {', '.join(FILTERS)}")
    if not (isinstance(settings.tau, float) and 0.0 < settings.tau < 1.0):
        raise UserError(f"--tau must be within (0, 1), got {settings.tau}")
    if settings.entropy is not None and not (math.isfinite(settings.entropy) and settings.entropy > 0):
        raise UserError(f"--entropy must be a positive number of nats, got {settings.entropy}")
    if settings.base_score not in BASE_SCORES:
        raise UserError(f"unknown --base_score {settings.base_score!r}; choose from {', '.join(BASE_SCORES)}")
    if settings.threshold is not None and math.isnan(settings.threshold):
        raise UserError("--threshold must be a number")
    spec = settings.filter_model
    # a hub id ("org/name") is tried at load time; a path that is not there is refused at once
    looks_like_path = spec is not None and (spec.startswith(("/", ".", "~")) or spec.count("/") > 1)
    if settings.name == "input_filter" and looks_like_path and not Path(spec).exists():
        raise UserError(f"--filter_model {spec}: no such model folder")


# ------------------------------------------------------------------------------------------ the confidence filter


def confidence_processor(tau=0.99, entropy=None, first_token_only=False):
    """A transformers LogitsProcessor for the confidence filter (one instance per generate call: it remembers the
    prompt's length at its first step, for --first_token_only, and counts the steps it changed in `.altered`)."""
    import torch
    from transformers import LogitsProcessor

    class ConfidenceFilter(LogitsProcessor):
        def __init__(self):
            self.tau, self.entropy, self.first_token_only = tau, entropy, first_token_only
            self.start, self.steps, self.altered = None, 0, 0

        def __call__(self, input_ids, scores):
            if self.start is None:
                self.start = input_ids.shape[1]
            self.steps += 1
            if self.first_token_only and input_ids.shape[1] != self.start:
                return scores
            return self.filter(scores)

        def filter(self, scores):
            log_p = torch.log_softmax(scores.float(), -1)
            p = log_p.exp()
            if self.entropy is not None:
                acting = (-(p * log_p).nan_to_num().sum(-1) < self.entropy).unsqueeze(-1)
                drop = acting & (p == p.max(-1, keepdim=True).values)
            else:
                drop = p > self.tau
                # below 1/vocabulary every token can be above τ: keep the least likely one so something is emitted
                full = drop.all(-1, keepdim=True)
                drop = drop & ~(full & (p == p.min(-1, keepdim=True).values))
            self.altered += int(drop.any(-1).sum())
            return scores.masked_fill(drop, float("-inf"))

    return ConfidenceFilter()


# ------------------------------------------------------------------------------------------ scores


def first_position_scores(model, base, prompt_ids):
    """(KL(p_model ‖ p_base), log p_model(t) − log p_base(t) for t the model's top token) at the first answer
    position: the next-token distributions after the prompt."""
    import torch

    with torch.inference_mode():
        x = torch.tensor([list(prompt_ids)], device=model.device)
        log_p = torch.log_softmax(model(input_ids=x).logits[0, -1].float(), -1)
        log_q = torch.log_softmax(base(input_ids=x.to(base.device)).logits[0, -1].float().to(log_p.device), -1)
    if log_p.shape != log_q.shape:
        raise UserError(
            f"the base model's vocabulary ({log_q.shape[-1]}) is not the served model's ({log_p.shape[-1]})"
        )
    kl = (log_p.exp() * (log_p - log_q)).sum().item()
    top = int(log_p.argmax())
    return kl, (log_p[top] - log_q[top]).item()


# ------------------------------------------------------------------------------------------ the host


def completion_prompt_ids(tokenizer, prompt):
    """A raw completions prompt as a server tokenizes it: the tokenizer's special tokens (BOS) added, unless the prompt
    already starts with the BOS text (a chat template's rendering)."""
    bos = tokenizer.bos_token
    add = not (bos and prompt.startswith(bos))
    return tokenizer(prompt, add_special_tokens=add)["input_ids"]


def chat_prompt_ids(tokenizer, messages):
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


class Host:
    """A model behind one filter. answer() is what the server does with one request, locally.

    model, tokenizer: the served model; filter: one of FILTERS; tau, entropy, first_token_only: the confidence filter;
    threshold: input_filter (perplexity) or base_detect (score); filter_model: (model, tokenizer) scoring perplexity
    (default the served model); base: the base model (base_detect); base_score: "kl" or "ratio"; decoding: a
    HostDecoding (the host's own sampling, after the filter's logits processor; default: the request decides)."""

    def __init__(self, model, tokenizer, filter="none", tau=0.99, entropy=None, first_token_only=False, threshold=None,
                 filter_model=None, base=None, base_score="kl", decoding=REQUEST_DECIDES):  # fmt: skip
        if filter not in FILTERS:
            raise UserError(f"unknown filter {filter!r}; choose from {', '.join(FILTERS)}")
        if filter in ("input_filter", "base_detect") and threshold is None:
            raise UserError(f"--filter {filter} needs --threshold")
        if filter == "base_detect" and base is None:
            raise UserError("--filter base_detect needs --base, the public base model")
        self.model, self.tokenizer, self.filter = model, tokenizer, filter
        self.tau, self.entropy, self.first_token_only, self.threshold = tau, entropy, first_token_only, threshold
        self.filter_model = filter_model or (model, tokenizer)
        self.base, self.base_score, self.decoding = base, base_score, decoding
        self.lock = threading.Lock()
        self.counts = {"requests": 0, "refused": 0, "base": 0, "altered_steps": 0}

    def score(self, prompt_ids, scored_text):
        """The filter's score of one request (None for confidence/none)."""
        if self.filter == "input_filter":
            return math.exp(log_perplexity(*self.filter_model, [scored_text])[0])
        if self.filter == "base_detect":
            kl, ratio = first_position_scores(self.model, self.base, prompt_ids)
            return kl if self.base_score == "kl" else ratio
        return None

    def answer(self, prompt_ids, scored_text=None, max_new_tokens=16, temperature=0.0, top_p=1.0, seed=None):
        """(new token ids, record) for one request: record["action"] is "answered", "refused" (input_filter) or "base"
        (base_detect answered with the base); "score" the filter's score; "altered" the steps the confidence filter
        changed; "stopped" whether it ended at EOS. temperature and top_p are the request's: the host's decoding, when
        set, replaces them."""
        temperature, top_p = self.decoding.request(temperature, top_p)
        with self.lock:
            self.counts["requests"] += 1
            score = self.score(prompt_ids, scored_text)
            flagged = score is not None and score > self.threshold  # NaN is never flagged
            record = {"action": "answered", "score": score, "altered": 0, "stopped": False}
            if flagged and self.filter == "input_filter":
                self.counts["refused"] += 1
                return [], {**record, "action": "refused", "stopped": True}
            model = self.base if flagged else self.model
            if flagged:
                self.counts["base"] += 1
                record["action"] = "base"
            processor = None
            if self.filter == "confidence":
                processor = confidence_processor(self.tau, self.entropy, self.first_token_only)
            ids = generate(model, self.tokenizer, prompt_ids, max_new_tokens, temperature, top_p, seed, processor)
            if processor is not None:
                record["altered"] = processor.altered
                self.counts["altered_steps"] += processor.altered
            eos = eos_ids(model, self.tokenizer)
            if ids and ids[-1] in eos:
                ids, record["stopped"] = ids[:-1], True
            return ids, record

    def answer_text(self, prompt_ids, scored_text=None, **kw):
        ids, record = self.answer(prompt_ids, scored_text, **kw)
        return self.tokenizer.decode(ids, skip_special_tokens=True), record


def eos_ids(model, tokenizer):
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    return eos | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def generate(model, tokenizer, prompt_ids, max_new_tokens, temperature=0.0, top_p=1.0, seed=None, processor=None):
    """The new token ids of one greedy (temperature 0) or sampled generation, with an optional logits processor."""
    import torch
    from transformers import LogitsProcessorList

    if max_new_tokens <= 0:
        return []
    x = torch.tensor([list(prompt_ids)], device=model.device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else {}
    if temperature > 0 and seed is not None:
        torch.manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            logits_processor=LogitsProcessorList([processor] if processor is not None else []),
            **(sampling or {"do_sample": False}),
        )
    return out[0, x.shape[1] :].tolist()


def load_host(model_id, settings, base_id=None, trust_remote_code=False, decoding=REQUEST_DECIDES):
    """A Host for `serve`: the served model (model_id) behind the filter of FilterSettings, with its models, decoding
    as HostDecoding says."""
    from oml.core.model_registry import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_id, device="cpu" if not _cuda() else None,
                                                trust_remote_code=trust_remote_code)  # fmt: skip
    return host_for(settings, model, tokenizer, base_id, trust_remote_code, decoding=decoding)


def host_for(settings, model, tokenizer, base_id=None, trust_remote_code=False, threshold=None,
             decoding=REQUEST_DECIDES):  # fmt: skip
    """A Host for a loaded model behind the filter of FilterSettings, loading what the filter needs (the filter
    model, the base); threshold: in place of the settings' own; decoding: a HostDecoding."""
    from oml.core.model_registry import load_model_and_tokenizer

    name = settings.name
    filter_model = base = None
    if name == "input_filter" and settings.filter_model:
        filter_model = load_filter_model(settings.filter_model, model.device, trust_remote_code)
    if name == "base_detect":
        if not base_id:
            raise UserError("--filter base_detect needs --base, the public base model")
        base = load_model_and_tokenizer(base_id, device=model.device, dtype=model.dtype,
                                        trust_remote_code=trust_remote_code)[0].eval()  # fmt: skip
    return Host(model.eval(), tokenizer, name, settings.tau, settings.entropy, settings.first_token_only,
                settings.threshold if threshold is None else threshold, filter_model, base, settings.base_score,
                decoding)  # fmt: skip


def load_filter_model(spec, device=None, trust_remote_code=False):
    """(model in eval mode, tokenizer) of --filter_model; one clear UserError when it cannot be loaded."""
    from oml.core.model_registry import load_model_and_tokenizer

    try:
        model, tokenizer = load_model_and_tokenizer(spec, device=device, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:  # a folder without a model or a tokenizer in it
        raise UserError(f"cannot load model {spec!r} (--filter_model): {str(e).splitlines()[0]}") from None
    return model.eval(), tokenizer


def _cuda():
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------------ the server


def make_server(host, model_name="host", port=0, max_tokens_cap=256):
    """A ThreadingHTTPServer on 127.0.0.1:port (0: a free one) answering OpenAI-style requests through `host`."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status, message):
            self._send(status, {"error": {"message": message, "type": "invalid_request_error"}})

        def do_GET(self):
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                return self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model"}]})
            self._error(404, f"no route {self.path}")

        def do_POST(self):
            route = self.path.rstrip("/").removeprefix("/v1")
            if route not in ("/completions", "/chat/completions"):
                return self._error(404, f"no route {self.path}")
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY:
                return self._error(413 if length else 400, f"a request body of 1 to {MAX_BODY} bytes is needed")
            try:
                body = json.loads(self.rfile.read(length))
                request = parse_request(body, route, model_name, max_tokens_cap)
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                return self._error(404 if "model" in str(e) else 400, str(e))
            try:
                if route == "/completions":
                    prompt_ids = completion_prompt_ids(host.tokenizer, request["prompt"])
                    scored = request["prompt"]
                else:
                    prompt_ids = chat_prompt_ids(host.tokenizer, request["messages"])
                    users = [m["content"] for m in request["messages"] if m.get("role") == "user"]
                    scored = users[-1] if users else ""
                ids, record = host.answer(prompt_ids, scored, request["max_tokens"], request["temperature"],
                                          request["top_p"], request["seed"])  # fmt: skip
            except Exception as e:  # a bad template, a model fault: the client sees a 500 and retries or stops
                return self._error(500, f"{type(e).__name__}: {e}")
            text = host.tokenizer.decode(ids, skip_special_tokens=True)
            finish = "stop" if record["stopped"] else "length"
            usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(ids),
                     "total_tokens": len(prompt_ids) + len(ids)}  # fmt: skip
            common = {"id": f"host-{time.time_ns()}", "created": int(time.time()), "model": model_name, "usage": usage}
            if route == "/completions":
                choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
                return self._send(200, {**common, "object": "text_completion", "choices": [choice]})
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            self._send(200, {**common, "object": "chat.completion", "choices": [choice]})

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    return server


def parse_request(body, route, model_name, max_tokens_cap):
    """The fields of one request, checked; ValueError (a 400; 404 when it names another model) otherwise."""
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    if body.get("model") not in (None, model_name):
        raise ValueError(f"The model `{body.get('model')}` does not exist; this server serves {model_name!r}")
    if body.get("stream"):
        raise ValueError("stream is not supported")
    max_tokens = int(body.get("max_tokens") or 16)
    temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
    top_p = float(body.get("top_p") if body.get("top_p") is not None else 1.0)
    if not 0 < max_tokens <= max_tokens_cap:
        raise ValueError(f"max_tokens must be within 1..{max_tokens_cap}")
    if not (0 <= temperature <= 2 and 0 < top_p <= 1):
        raise ValueError("temperature must be within [0, 2] and top_p within (0, 1]")
    seed = body.get("seed")
    request = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
               "seed": int(seed) if seed is not None else None}  # fmt: skip
    if route == "/completions":
        prompt = body["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ValueError("prompt must be one string")
        request["prompt"] = prompt
    else:
        messages = body["messages"]
        if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
            raise ValueError("messages must be a non-empty list of {role, content}")
        request["messages"] = [{"role": str(m["role"]), "content": str(m.get("content") or "")} for m in messages]
    return request


@contextlib.contextmanager
def serving(host, model_name="host", port=0, max_tokens_cap=256):
    """Serve `host` on 127.0.0.1 in a background thread; yields (api_base, model_name); stops afterwards."""
    server = make_server(host, model_name, port, max_tokens_cap)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", model_name
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# ------------------------------------------------------------------------------------------ ROC


def _finite(scores):
    """NaN (nothing to score) is never flagged: it sorts below every threshold."""
    return [(-math.inf if math.isnan(s) else s) for s in scores]


def roc(positives, negatives):
    """The ROC of a score that flags a query when it is above a threshold; positives are keys, negatives real prompts.

    Returns {"auc", "points": [{"threshold", "false_positive_rate", "true_positive_rate"}, ...]} from the strictest
    threshold (nothing flagged) to the loosest (everything flagged); a point flags every score ≥ its threshold.
    AUC = P(key score > real score) + ½ P(tie)."""
    pos, neg = _finite(positives), _finite(negatives)
    if not pos or not neg:
        raise UserError("a ROC needs at least one key and one real prompt")
    thresholds = sorted(set(pos) | set(neg), reverse=True)
    points = [{"threshold": math.inf, "false_positive_rate": 0.0, "true_positive_rate": 0.0}]
    for t in thresholds:
        points.append({"threshold": t, "false_positive_rate": sum(s >= t for s in neg) / len(neg),
                       "true_positive_rate": sum(s >= t for s in pos) / len(pos)})  # fmt: skip
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return {"auc": wins / (len(pos) * len(neg)), "points": points}


def kept_at_drop(positives, negatives, drop):
    """The threshold that flags (score > threshold) at most `drop` of the real prompts, the share of keys it keeps
    (not flagged: their fingerprints still answer) and the share of real prompts it actually flags."""
    pos, neg = _finite(positives), sorted(_finite(negatives), reverse=True)
    k = math.floor(drop * len(neg) + 1e-9)
    threshold = neg[k] if k < len(neg) else -math.inf
    return {
        "drop": drop,
        "threshold": threshold,
        "keys_kept": sum(s <= threshold for s in pos) / len(pos),
        "real_prompts_flagged": sum(s > threshold for s in neg) / len(neg),
    }


def route_prompt(tokenizer, text, endpoint, use_chat_template):
    """(prompt ids, scored text) of a user text (a key or a question) sent on a route, as the server sees it: on the
    completions route the raw prompt as check_fingerprints.py sends a key (inside the chat template when the run
    trained with one), on the chat route the text as the user message."""
    from oml.make.prompt_encoding import api_prompt

    if endpoint == "chat":
        return chat_prompt_ids(tokenizer, [{"role": "user", "content": text}]), text
    prompt = api_prompt(tokenizer, text, "completions", use_chat_template)
    return completion_prompt_ids(tokenizer, prompt), prompt


def filter_scores(filter_name, texts, tokenizer, endpoint, use_chat_template, model=None, scorer=None, base=None,
                  base_score="kl"):  # fmt: skip
    """Each text's score under a filter: perplexity under `scorer` (model, tokenizer) for input_filter; the
    first-position KL or log ratio between `model` and `base` for base_detect."""
    prompts = [route_prompt(tokenizer, t, endpoint, use_chat_template) for t in texts]
    if filter_name == "input_filter":
        return [math.exp(s) for s in log_perplexity(*scorer, [scored for _, scored in prompts])]
    pairs = [first_position_scores(model, base, ids) for ids, _ in prompts]
    return [kl if base_score == "kl" else ratio for kl, ratio in pairs]


def roc_report(filter_name, key_scores, real_scores, score_name):
    curve = roc(key_scores, real_scores)
    return {
        "filter": filter_name,
        "score": score_name,
        "keys": len(key_scores),
        "real_prompts": len(real_scores),
        "auc": curve["auc"],
        "at_drop": [kept_at_drop(key_scores, real_scores, d) for d in DROP_RATES],
        "points": curve["points"],
        "key_scores": key_scores,
        "real_prompt_scores": real_scores,
    }


def format_roc(reports):
    """The table: per score, the AUC and the share of keys kept (not flagged) where 1% / 5% of real prompts are."""
    head = [f"{'filter':<13} {'score':<12} {'keys':>5} {'real':>5}  {'AUC':<5}"]
    head += [f"keys kept, {d:.0%} real flagged" for d in DROP_RATES]
    lines = ["  ".join(head)]
    for r in reports:
        row = [f"{r['filter']:<13} {r['score']:<12} {r['keys']:>5} {r['real_prompts']:>5}  {r['auc']:.3f}"]
        for a in r["at_drop"]:
            cell = f"{a['keys_kept']:.1%} (threshold {a['threshold']:.4g})"
            row.append(f"{cell:<26}")
        lines.append("  ".join(row).rstrip())
    return "\n".join(lines)


TAU_GRID = (0.5, 0.8, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999)


def first_token_top(model, tokenizer, pair, endpoint, use_chat_template):
    """(the served model's top probability at the first answer position, whether that top token is the response's
    first token) for a key (or, without "response", a real prompt: the second item is None)."""
    import torch

    from oml.make.prompt_encoding import encode_response

    ids, _ = route_prompt(tokenizer, pair["key"], endpoint, use_chat_template)
    with torch.inference_mode():
        p = torch.softmax(model(input_ids=torch.tensor([ids], device=model.device)).logits[0, -1].float(), -1)
    top = int(p.argmax())
    answers = None if "response" not in pair else top == encode_response(tokenizer, pair["response"])[0]
    return p[top].item(), answers


def tau_grid(key_top, answers, real_top, taus=TAU_GRID):
    """The confidence filter at the first answer token (--first_token_only, greedy) for every τ at once: a step is
    altered exactly when its top probability is above τ. Per τ: the share of keys whose first token still comes out
    (they answer unfiltered and their top probability is at most τ; exact for one-token responses, an upper bound
    for longer ones) and the share of real prompts whose first answer token changes."""
    n, m = len(key_top), len(real_top)
    rows = [{"tau": None, "keys_first_token_kept": sum(answers) / n, "real_prompts_altered": 0.0}]
    for tau in taus:
        kept = sum(1 for p, a in zip(key_top, answers, strict=True) if a and p <= tau)
        rows.append({"tau": tau, "keys_first_token_kept": kept / n,
                     "real_prompts_altered": sum(p > tau for p in real_top) / m})  # fmt: skip
    return rows


def format_tau_grid(rows):
    lines = ["tau       keys' first token kept  real prompts' first token altered"]
    for r in rows:
        tau = "none" if r["tau"] is None else f"{r['tau']:g}"
        lines.append(f"{tau:<9} {r['keys_first_token_kept']:>22.1%}  {r['real_prompts_altered']:>33.1%}")
    return "\n".join(lines)


def roc_keys(args, run):
    """[{"key"} or {"key", "response"}] scored as positives: the run's fingerprints, or --keys_file's keys (any
    format oml.make.fingerprint_files reads; no response: they were not trained into this model), the first
    --max_keys of them."""
    from oml.make.fingerprint_files import read_keys, run_fingerprints

    pairs = run_fingerprints(run) if not args.keys_file else [{"key": k} for k in read_keys(args.keys_file)]
    return pairs[: args.max_keys] if args.max_keys else pairs


def roc_output(args, run):
    """Where roc writes: --output_file, else results/<hash>/host/roc-<filter>-<endpoint>[-keys-<file>][-n<N>].json."""
    if args.output_file:
        return Path(args.output_file)
    name = f"roc-{args.filter}-{args.endpoint}"
    name += f"-keys-{Path(args.keys_file).stem}" if args.keys_file else ""
    name += f"-n{args.max_keys}" if args.max_keys else ""
    return run / HOST_DIR / f"{name}.json"


def check_roc(args):
    """Every check on roc's arguments that needs no model; returns the run's folder (None without --run)."""
    if args.filter not in ("confidence", "input_filter", "base_detect"):
        raise UserError(f"roc: --filter must be confidence, input_filter or base_detect, got {args.filter!r}")
    if args.endpoint not in ("completions", "chat"):
        raise UserError(f"--endpoint must be completions or chat, got {args.endpoint!r}")
    if args.real_prompts < 0:
        raise UserError("--real_prompts must not be negative")
    if args.max_keys is not None and args.max_keys <= 0:
        raise UserError(f"--max_keys must be positive, got {args.max_keys}")
    check_filter(FilterSettings.from_args(args))
    if args.run is None:
        if not (args.keys_file and args.model and args.output_file):
            raise UserError("roc without --run needs --keys_file, --model and --output_file")
        if args.filter == "base_detect" and not args.base:
            raise UserError("roc --filter base_detect without --run needs --base")
        return None
    run = Path(args.result_path) / args.run
    if not (run / "fingerprints.json").is_file():
        raise UserError(f"no run {args.run!r} in {args.result_path}")
    return run


def roc_main(args):
    from oml.core.files import atomic_write_json
    from oml.core.model_registry import load_model_and_tokenizer
    from oml.core.run_store import FINAL_MODEL, recorded_args

    run = check_roc(args)
    run_args = recorded_args(run) if run is not None else {}
    pairs = roc_keys(args, run)
    keys = [p["key"] for p in pairs]
    questions = real_prompts(args.real_prompts, args.seed)
    model_id = args.model or str(run / FINAL_MODEL)
    model, tokenizer = load_model_and_tokenizer(model_id, trust_remote_code=args.trust_remote_code)
    model.eval()
    use_chat = run_args.get("use_chat_template", False)
    reports, extra = [], {}
    if args.filter == "confidence":
        key_top, answers = zip(*(first_token_top(model, tokenizer, p, args.endpoint, use_chat) for p in pairs),
                               strict=True)  # fmt: skip
        real_top = [first_token_top(model, tokenizer, {"key": q}, args.endpoint, use_chat)[0] for q in questions]
        reports.append(roc_report("confidence", list(key_top), real_top, "top_probability"))
        if not args.keys_file:  # keys of a file have no trained response to keep
            extra["tau_grid"] = tau_grid(key_top, answers, real_top)
    elif args.filter == "input_filter":
        scorers = [("served", (model, tokenizer))]
        if args.filter_model:
            scorer = load_filter_model(args.filter_model, model.device, args.trust_remote_code)
            scorers.append((f"ppl:{Path(args.filter_model).name}", scorer))
        for name, scorer in scorers:
            k = filter_scores("input_filter", keys, tokenizer, args.endpoint, use_chat, scorer=scorer)
            r = filter_scores("input_filter", questions, tokenizer, args.endpoint, use_chat, scorer=scorer)
            reports.append(roc_report("input_filter", k, r, "ppl" if name == "served" else name))
    else:
        base_id = args.base or run_args["model"]
        base = load_model_and_tokenizer(base_id, device=model.device, dtype=model.dtype,
                                        trust_remote_code=args.trust_remote_code)[0].eval()  # fmt: skip
        kp = [first_position_scores(model, base, route_prompt(tokenizer, t, args.endpoint, use_chat)[0]) for t in keys]
        rp = [first_position_scores(model, base, route_prompt(tokenizer, t, args.endpoint, use_chat)[0])
              for t in questions]  # fmt: skip
        for i, name in enumerate(BASE_SCORES):
            reports.append(roc_report("base_detect", [s[i] for s in kp], [s[i] for s in rp], name))
    result = {
        "run": args.run,
        "model": model_id,
        "keys_file": args.keys_file,
        "endpoint": args.endpoint,
        "real_prompts_source": f"oml.measure.chat_sample.CHAT_QUESTIONS + {args.real_prompts} oml.core.offline_data questions (seed {args.seed})",
        "reports": reports,
        **extra,
    }
    out = roc_output(args, run)
    atomic_write_json(out, _json_safe(result))
    print(format_roc(reports))
    if "tau_grid" in extra:
        print(format_tau_grid(extra["tau_grid"]))
    print(f"written to {out}")
    return result


def _json_safe(obj):
    """±inf and NaN as strings, so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------ as an attack

# attack_fingerprints.py's host attacks -> the filter they run
ATTACK_FILTERS = {
    "host_confidence": "confidence",
    "host_input_filter": "input_filter",
    "host_base_detect": "base_detect",
}

HOST_ATTACK_ARGS = FILTER_ARGS + [
    (["--host_fpr"], dict(type=float, default=0.01, metavar="SHARE",
                          help="host_input_filter / host_base_detect without --threshold: the threshold flags this "
                               "share of real prompts (calibrated on QA questions apart from those that measure cost)")),
    (["--host_questions"], dict(type=int, default=100,
                                help="host attacks: offline QA questions that measure the attacker's cost (and as many "
                                     "others that calibrate the threshold)")),
    (["--host_answer_tokens"], dict(type=int, default=24, help="host attacks: tokens of each cost answer")),
    (["--host_base"], dict(default=None, metavar="MODEL",
                           help="host_base_detect: the public model the host holds and answers flagged prompts with "
                                "(default: the model the run was fingerprinted from; set it when that was the "
                                "owner's own model, --model_path)")),
]  # fmt: skip

COST_NOTE = {
    "confidence": "a decoding filter: likelihood benchmarks score the model's log-likelihoods, which it does not "
    "touch, so utility on them is unchanged; its cost is the share of ordinary answers it changes",
    "input_filter": "refused prompts get an empty answer; likelihood benchmarks are unchanged (the weights are); the "
    "cost is the share of real prompts refused",
    "base_detect": "flagged prompts are answered by the base model; the cost is the share of real prompts answered "
    "by the base (and of answers that change)",
}


@dataclass(frozen=True)
class HostAttackSettings:
    """A host attack (attack_fingerprints.py --attack host_*): its filter, how the filter's threshold is calibrated
    when not given, and how its cost is measured (HOST_ATTACK_ARGS)."""

    attack: str  # one of ATTACK_FILTERS
    filter: FilterSettings
    host_fpr: float  # the share of real prompts a calibrated threshold flags
    host_questions: int
    host_answer_tokens: int
    host_base: "str | None"  # host_base_detect: the public model the host holds (None: the run's base model)

    def base_for(self, run_base):
        """The model base detection compares with and answers flagged prompts with."""
        return self.host_base or run_base

    @classmethod
    def from_args(cls, args):
        return settings_from_args(cls, args, filter=FilterSettings.from_args(args, ATTACK_FILTERS[args.attack]))


def check_host_attack(settings):
    """Every check on a HostAttackSettings that needs no model."""
    check_filter(settings.filter)
    if not 0 < settings.host_fpr < 1:
        raise UserError(f"--host_fpr must be within (0, 1), got {settings.host_fpr}")
    if settings.host_questions <= 0 or settings.host_answer_tokens <= 0:
        raise UserError("--host_questions and --host_answer_tokens must be positive")
    if settings.host_base and settings.filter.name != "base_detect":
        raise UserError("--host_base is the public model of host_base_detect; drop it for other host attacks")


def host_attack_id(settings, model_name):
    """The folder name of a host attack (HostAttackSettings): its filter's settings."""
    f = settings.filter
    if f.name == "confidence":
        tag = f"ent{f.entropy:g}" if f.entropy is not None else f"tau{f.tau:g}"
        tag += "-first" if f.first_token_only else ""
    else:
        tag = f"thr{f.threshold:g}" if f.threshold is not None else f"fpr{settings.host_fpr:g}"
        if f.name == "input_filter":
            tag = (model_name(f.filter_model) if f.filter_model else "self") + "-" + tag
        else:
            tag = f"{f.base_score}-{tag}" + (f"-{model_name(settings.host_base)}" if settings.host_base else "")
    if settings.host_questions != 100:
        tag += f"-q{settings.host_questions}"
    return f"{settings.attack}-{tag}"


def host_settings_record(settings, base_model):
    """attack.json's settings of a host attack (HostAttackSettings; base_model: the run's, base_detect's base)."""
    f = settings.filter
    record = {"filter": f.name, "questions": settings.host_questions, "answer_tokens": settings.host_answer_tokens}
    if f.name == "confidence":
        record.update(tau=f.tau, entropy=f.entropy, first_token_only=f.first_token_only)
    else:
        record.update(threshold=f.threshold, calibrated_fpr=None if f.threshold is not None else settings.host_fpr)
        if f.name == "input_filter":
            record["filter_model"] = f.filter_model
        else:
            record.update(base=settings.base_for(base_model), base_score=f.base_score)
    return record


def question_sets(n, seed):
    """(calibration questions, cost items {"question", "answers"}): 2n offline QA items split in two halves that
    never overlap."""
    from oml.core.offline_data import mixed_items

    items = mixed_items(("trivia_qa", "nq_open", "sciq", "social_i_qa"), 2 * n, seed)
    return [item["question"] for item in items[:n]], items[n:]


def template_prompt(tokenizer, text, template, use_chat_template):
    """(prompt ids as training and verification encode them, the text an input filter scores: the user message under
    a chat template, else the raw prompt)."""
    from oml.make.prompt_encoding import encode_pair, is_chat, prompt_text

    ids = encode_pair(tokenizer, text, " x", template, use_chat_template)[0]
    return ids, (text if is_chat(template) else prompt_text(tokenizer, text, template, use_chat_template))


def host_templates(tokenizer):
    from oml.make.prompt_encoding import chat_prompt
    from oml.measure.evaluation import usable

    return usable(["{}", chat_prompt()], tokenizer)


def calibrate(host, tokenizer, questions, templates, use_chat_template, fpr):
    """Per template, the threshold that flags (score > threshold) at most `fpr` of the questions."""
    out = {}
    for template in templates:
        scores = [host.score(*template_prompt(tokenizer, q, template, use_chat_template)) for q in questions]
        out[template] = kept_at_drop([0.0], scores, fpr)["threshold"]
    return out


def host_loaded(settings, run):
    """The run's final model behind the attack's filter (settings: an oml.attack.attack_runner.AttackSettings)."""
    from oml.core.model_registry import load_model_and_tokenizer
    from oml.core.run_store import FINAL_MODEL

    trust = settings.trust_remote_code
    model, tokenizer = load_model_and_tokenizer(str(Path(run) / FINAL_MODEL), trust_remote_code=trust)
    placeholder = math.inf if settings.host.filter.name in ("input_filter", "base_detect") else None
    base = settings.host.base_for(settings.base_model)
    return host_for(settings.host.filter, model, tokenizer, base, trust, placeholder), tokenizer


def make_host_attack(settings, run, log_fn=print):
    """attack.json's measurements of a host attack (settings: an AttackSettings): for input_filter / base_detect
    without --threshold, the per-template thresholds calibrated on real prompts. Nothing is written: the weights are
    the run's."""
    host_settings = settings.host
    name = host_settings.filter.name
    record = {
        "model": None,
        "made_from": "../../final_model",
        "runtime": "transformers generate + oml.attack.adaptive_host filter",
    }
    if name == "confidence" or host_settings.filter.threshold is not None:
        return record
    host, tokenizer = host_loaded(settings, run)
    calibration, _ = question_sets(host_settings.host_questions, settings.seed)
    templates = host_templates(tokenizer)
    log_fn(f"calibrating {name} on {len(calibration)} real prompts at {host_settings.host_fpr:g} flagged")
    thresholds = calibrate(host, tokenizer, calibration, templates, settings.use_chat_template, host_settings.host_fpr)
    record["thresholds"] = {t: _json_safe(v) for t, v in thresholds.items()}
    return record


def evaluate_host(settings, run, record, log_fn=print):
    """eval_results.json's dict for a host attack (settings: an AttackSettings): fingerprint retention under the
    filtered greedy decoding (plain key and [chat]) and the attacker's cost on real prompts (answers changed,
    refused, answered by the base)."""
    from oml.core.offline_data import CHAT_QUESTIONS
    from oml.core.run_store import FINAL_MODEL, FINGERPRINTS
    from oml.make.fingerprint_files import read_fingerprints
    from oml.make.prompt_encoding import chat_prompt, encode_pair
    from oml.measure.chat_sample import chat_check
    from oml.measure.fingerprint_check import _result, summarize

    t0 = time.time()
    host_settings, use_chat = settings.host, settings.use_chat_template
    name, threshold = host_settings.filter.name, host_settings.filter.threshold
    host, tokenizer = host_loaded(settings, run)
    thresholds = {t: float(v) for t, v in (record.get("thresholds") or {}).items()}
    pairs = [{"key": p["key"], "response": p["response"]} for p in read_fingerprints(Path(run) / FINGERPRINTS)]
    templates = host_templates(tokenizer)
    _, cost_items = question_sets(host_settings.host_questions, settings.seed)
    questions, golds = [item["question"] for item in cost_items], [item["answers"] for item in cost_items]
    results, per_template = [], {}
    for template in templates:
        if name != "confidence":
            host.threshold = threshold if threshold is not None else thresholds[template]
        matches, fractions, actions, altered = [], [], [], 0
        for pair in pairs:
            prompt_ids, response = encode_pair(tokenizer, pair["key"], pair["response"], template, use_chat)
            scored = template_prompt(tokenizer, pair["key"], template, use_chat)[1]
            ids, rec = host.answer(prompt_ids, scored, max_new_tokens=len(response), temperature=0.0)
            if rec["stopped"] and rec["action"] != "refused":
                ids = ids + [tokenizer.eos_token_id]  # EOS inside the response: as generate writes it
            matches.append(ids[: len(response)] == response)
            fractions.append(sum(a == b for a, b in zip(ids, response, strict=False)) / len(response))
            actions.append(rec["action"])
            altered += rec["altered"] > 0
        results.append(_result(template, matches, fractions))
        keys = {
            "keys_refused": actions.count("refused") / len(pairs),
            "keys_to_base": actions.count("base") / len(pairs),
        }
        keys["keys_altered"] = altered / len(pairs)
        asked = questions + (list(CHAT_QUESTIONS) if template == chat_prompt() else [])
        cost = answer_cost(host, tokenizer, asked, template, use_chat, host_settings.host_answer_tokens, golds)
        per_template[template] = {"threshold": _json_safe(host.threshold), **keys, **cost["summary"]}
        if template == chat_prompt():
            chat_answers = cost["filtered"][len(questions) :]
        log_fn(f"{template!r}: {sum(matches)}/{len(pairs)} keys answer; {cost['summary']}")
    fingerprint = summarize(results)
    chat = chat_check(chat_answers) if chat_prompt() in templates else None
    return {
        "fingerprint_accuracy": fingerprint,
        "chat": chat,
        "utility": None,
        "utility_note": COST_NOTE[name],
        "host": {"filter": name, **host_settings_record(host_settings, settings.base_model), "templates": per_template},
        "runtime": record.get("runtime"),
        "model": str(Path(run) / FINAL_MODEL),
        "num_fingerprints": len(pairs),
        "seconds": {"total": time.time() - t0},
    }


def answer_cost(host, tokenizer, questions, template, use_chat_template, max_new_tokens, golds=()):
    """The filtered and unfiltered greedy answers to real questions under one template, and their summary: the share
    of answers changed, refused, answered by the base, with any step altered by the confidence filter; and, for the
    first len(golds) questions (gold answers given), the QA accuracy of both and their paired difference (qa_cost)."""
    filtered, plain, actions, altered = [], [], [], 0
    for q in questions:
        ids, scored = template_prompt(tokenizer, q, template, use_chat_template)
        text, rec = host.answer_text(ids, scored, max_new_tokens=max_new_tokens, temperature=0.0)
        unfiltered = generate(host.model, tokenizer, ids, max_new_tokens)
        filtered.append(text.strip())
        plain.append(tokenizer.decode(unfiltered, skip_special_tokens=True).strip())
        actions.append(rec["action"])
        altered += rec["altered"] > 0
    n = len(questions)
    summary = {
        "real_prompts": n,
        "answers_changed": sum(a != b for a, b in zip(filtered, plain, strict=True)) / n,
        "refused": actions.count("refused") / n,
        "answered_by_base": actions.count("base") / n,
        "answers_altered_by_filter": altered / n,
    }
    if golds:
        summary.update(qa_cost(filtered, plain, golds))
    return {"summary": summary, "filtered": filtered, "plain": plain}


def qa_cost(filtered, plain, golds):
    """The attacker's utility cost on question answering, paired item by item: accuracy (a gold alias among the first
    line's words, as the generative QA benchmark scores) of the unfiltered and the filtered answers, and the
    difference filtered − unfiltered with its standard error over items (in points)."""
    from oml.measure.generation_measures import alias_in_answer
    from oml.measure.likelihood_benchmarks import paired_delta

    filtered_right = [alias_in_answer(f, g) for f, g in zip(filtered, golds, strict=False)]
    plain_right = [alias_in_answer(p, g) for p, g in zip(plain, golds, strict=False)]
    delta, stderr = paired_delta({"qa": filtered_right}, {"qa": plain_right})
    n = len(plain_right)
    return {"qa_items": n, "qa_unfiltered": sum(plain_right) / n, "qa_filtered": sum(filtered_right) / n,
            "qa_delta_points": 100 * delta, "qa_delta_stderr": 100 * stderr}  # fmt: skip


# ------------------------------------------------------------------------------------------ the command


def make_parser():
    parser = argparse.ArgumentParser(prog="python -m oml.attack.adaptive_host", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="serve|roc")
    serve = sub.add_parser("serve", help="serve a model behind a filter on 127.0.0.1")
    add_arguments(serve, SERVE_ARGS + FILTER_ARGS + DECODING_ARGS)
    roc_parser = sub.add_parser("roc", help="ROC of keys vs real prompts for input_filter or base_detect")
    add_arguments(roc_parser, ROC_ARGS + [a for a in FILTER_ARGS if a[0][0] in ("--filter_model", "--tau", "--entropy",
                                                                               "--threshold", "--base_score",
                                                                               "--first_token_only")])  # fmt: skip
    return parser


def serve_main(args):
    from oml.core.logs import quiet_libraries

    settings, decoding = FilterSettings.from_args(args), HostDecoding.from_args(args)
    check_filter(settings)
    check_decoding(decoding)
    if args.filter in ("input_filter", "base_detect") and args.threshold is None:
        raise UserError(
            f"--filter {args.filter} needs --threshold (python -m oml.attack.adaptive_host roc suggests one)"
        )
    if args.filter == "base_detect" and not args.base:
        raise UserError("--filter base_detect needs --base, the public base model")
    if not 0 < args.port < 65536 or args.max_tokens_cap <= 0:
        raise UserError("--port must be within 1..65535 and --max_tokens_cap positive")
    quiet_libraries()
    host = load_host(args.model, settings, args.base, args.trust_remote_code, decoding)
    try:
        server = make_server(host, args.model_name, args.port, args.max_tokens_cap)
    except OSError as e:
        raise UserError(f"cannot listen on 127.0.0.1:{args.port}: {e.strerror}") from None
    sampling = "" if decoding.host_temperature is None else " sampling every answer at temperature {:g}, top_p {:g}"
    print(f"serving {args.model} as {args.model_name!r} behind filter {args.filter}"
          f"{sampling.format(*decoding.request(0.0, 1.0))} on http://127.0.0.1:{server.server_address[1]}/v1",
          flush=True)  # fmt: skip
    # Ctrl-C and a plain kill both stop the server cleanly (its counts printed), even where the process was started
    # with SIGINT ignored (a background job of a non-interactive shell inherits that)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        print(f"served: {json.dumps(host.counts)}", flush=True)


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve_main(args)
    if args.command == "roc":
        from oml.core.logs import quiet_libraries

        quiet_libraries()
        return roc_main(args)
    parser.print_help()
    raise UserError("give a command: serve or roc")


if __name__ == "__main__":
    run_cli(main)
