"""GGUF, the way open models are served: convert an HF folder with llama.cpp's own converter, quantize it with
llama.cpp, load it with llama.cpp (llama-cpp-python) and ask it through the LanguageModel interface (GgufModel).

    export_gguf("results/<hash>/final_model", "model.gguf", "q4_k_m")   # f16 | bf16 | q8_0 | q4_k_m | q4_0
    backend = GgufModel("model.gguf", tokenizer=hf_tokenizer)        # the "gguf" backend of oml.core.backends
    backend.greedy(["The capital of France is"], 8)                 # -> [" Paris..."]
    oml.measure.fingerprint_check.check_fingerprints(backend, pairs, ["{}"])   # summarize's shape, in llama.cpp

Conversion writes f16 (or bf16) with `convert_hf_to_gguf.py`; the quantized types are made from the f16 file by
`llama_model_quantize`, as `llama-quantize` does. Only the model folder goes in: a run keeps its fingerprints beside
final_model/, never inside it, so no key or response can reach the GGUF's metadata.

The converter is not part of the llama-cpp-python wheel; it ships in its source distribution (vendor/llama.cpp:
convert_hf_to_gguf.py with its conversion/ and gguf-py/ folders). `python -m oml.attack.gguf_models install-converter` (run by
`make venv`) unpacks just those into <venv>/share/llama.cpp-convert; $OML_LLAMA_CPP_CONVERT points elsewhere.
"""

import collections
import contextlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from oml.core.backends import LanguageModel, cut_at_end, end_of_sequence_ids, register
from oml.core.errors import UserError

LLAMA_CPP_PYTHON = "0.3.36"  # the converter must come from the same llama.cpp as the runtime
CONVERTER_ENV = "OML_LLAMA_CPP_CONVERT"
CONVERTER_SCRIPT = "convert_hf_to_gguf.py"
# What the converter needs from the source distribution's vendor/llama.cpp/.
CONVERTER_FILES = (CONVERTER_SCRIPT, "conversion/", "gguf-py/", "LICENSE")

# quantization -> (converter --outtype, llama_ftype constant name for llama_model_quantize or None)
GGUF_TYPES = {
    "f16": ("f16", None),
    "bf16": ("bf16", None),
    "q8_0": ("f16", "LLAMA_FTYPE_MOSTLY_Q8_0"),
    "q4_k_m": ("f16", "LLAMA_FTYPE_MOSTLY_Q4_K_M"),
    "q4_0": ("f16", "LLAMA_FTYPE_MOSTLY_Q4_0"),
}


# ------------------------------------------------------------------------------ finding llama.cpp


def require_llama_cpp():
    """The llama_cpp module, or a UserError saying how to install it."""
    try:
        import llama_cpp
        import llama_cpp._logger  # noqa: F401  (installs llama.cpp's log callback, which this logger's level gates)
    except ImportError:
        raise UserError(
            f"llama.cpp is not installed: pip install 'llama-cpp-python[server]=={LLAMA_CPP_PYTHON}' (or make venv)"
        ) from None
    import logging

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's per-tensor chatter stays out
    return llama_cpp


@contextlib.contextmanager
def plain_weight_layouts(llama_cpp):
    """While open, models llama.cpp loads get its extra CPU buffer types off (`use_extra_bufts = False`: no AMX tiles,
    no repacked weights); on exit the previous defaults come back. Built with -march=native on a CPU that reports AMX
    (Sapphire Rapids under a hypervisor here), llama-cpp-python 0.3.36 crashes with a segmentation fault at the first
    decode, whatever the model; with plain layouts the same build answers, and only some matmul speed is given up.
    llama_cpp.Llama has no argument for it, so the defaults it starts from are wrapped for the calls that load a model
    (load_gguf, and the server for its whole life); a model keeps the layouts it was loaded with."""
    low = llama_cpp.llama_cpp
    defaults = low.llama_model_default_params

    def plain_defaults():
        params = defaults()
        params.use_extra_bufts = False
        return params

    low.llama_model_default_params = plain_defaults
    try:
        yield
    finally:
        low.llama_model_default_params = defaults


def default_converter_dir():
    return Path(sys.prefix) / "share" / "llama.cpp-convert"


def converter_script():
    """Path of convert_hf_to_gguf.py ($OML_LLAMA_CPP_CONVERT, else <venv>/share/llama.cpp-convert)."""
    folder = Path(os.environ.get(CONVERTER_ENV) or default_converter_dir())
    script = folder / CONVERTER_SCRIPT
    if not script.is_file() or not (folder / "conversion").is_dir():
        raise UserError(
            f"llama.cpp's converter is not installed at {folder}: run `python -m oml.attack.gguf_models install-converter` "
            f"(make venv does), or set ${CONVERTER_ENV} to a llama.cpp checkout"
        )
    return script


def install_converter(dest=None, sdist=None):
    """Unpack the converter from llama-cpp-python's source distribution into dest (default: the venv's share/).

    sdist: a llama_cpp_python-<version>.tar.gz; without one, pip downloads it (its cache makes that free after the
    package itself was built from it). Returns dest.
    """
    dest = Path(dest or default_converter_dir())
    with tempfile.TemporaryDirectory() as tmp:
        if sdist is None:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
            cmd += [f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp]
            if subprocess.run(cmd).returncode:
                raise UserError(f"could not download llama-cpp-python=={LLAMA_CPP_PYTHON}'s source distribution")
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
        os.chmod(staging, 0o755)
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                parts = member.name.split("/", 3)  # llama_cpp_python-X/vendor/llama.cpp/<rest>
                if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"]:
                    continue
                rest = parts[3]
                if not any(rest == f or (f.endswith("/") and rest.startswith(f)) for f in CONVERTER_FILES):
                    continue
                if member.isfile():
                    member.name = rest
                    tar.extract(member, staging, filter="data")
        if not (staging / CONVERTER_SCRIPT).is_file():
            raise UserError(f"{sdist} holds no vendor/llama.cpp/{CONVERTER_SCRIPT}")
        if dest.exists():
            import shutil

            shutil.rmtree(dest)
        os.replace(staging, dest)
    return dest


# ------------------------------------------------------------------------------ export


@contextlib.contextmanager
def captured_c_output():
    """Keep what C code writes to stdout/stderr (llama.cpp logs a line per tensor) off the terminal: yield a dict whose
    "text" holds it once the block ends."""
    captured = {"text": ""}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "llama.log"
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        with open(path, "wb") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            try:
                yield captured
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                for fd in saved:
                    os.close(fd)
        captured["text"] = path.read_text(errors="replace")


def export_gguf(hf_dir, out_path, quantization="q8_0", threads=None, log_fn=print):
    """Convert the HF folder to GGUF with llama.cpp's converter and quantize it with llama.cpp.

    Written under a temporary name and renamed, so out_path exists only when complete. Returns
    {"quantization", "seconds_convert", "seconds_quantize", "bytes"}.
    """
    if quantization not in GGUF_TYPES:
        raise UserError(f"unknown GGUF type {quantization!r}; choose from {', '.join(GGUF_TYPES)}")
    from oml.core.model_registry import local_path

    hf_dir, out_path = Path(local_path(str(hf_dir))), Path(out_path)  # the embedded model's id names its folder
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"{hf_dir} is not a Hugging Face model folder (no config.json)")
    outtype, ftype_name = GGUF_TYPES[quantization]
    llama_cpp = require_llama_cpp() if ftype_name else None
    script = converter_script()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=out_path.parent, prefix=f".{out_path.name}."))
    try:
        converted = tmp_dir / f"model-{outtype}.gguf"
        t0 = time.time()
        proc = subprocess.run(
            [sys.executable, str(script), str(hf_dir), "--outfile", str(converted), "--outtype", outtype],
            capture_output=True,
            text=True,
        )
        if proc.returncode or not converted.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise UserError(f"llama.cpp's converter failed on {hf_dir}: {tail[0]}")
        seconds_convert = time.time() - t0
        t0 = time.time()
        final = converted
        if ftype_name:
            final = tmp_dir / f"model-{quantization}.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, ftype_name)
            params.nthread = threads or os.cpu_count() or 1
            log_fn(f"quantizing to {quantization} with llama.cpp")
            with captured_c_output() as log:
                failed = llama_cpp.llama_model_quantize(str(converted).encode(), str(final).encode(), params)
            if failed:
                tail = log["text"].strip().splitlines()[-1:] or ["no output"]
                raise UserError(f"llama.cpp could not quantize {converted.name} to {quantization}: {tail[0]}")
            fallbacks = collections.Counter(re.findall(r"falling back to\s+(\w+)", log["text"]))
            if fallbacks:  # one line instead of llama.cpp's line per tensor
                kinds = ", ".join(f"{n} to {kind}" for kind, n in fallbacks.most_common())
                log_fn(f"llama.cpp: {sum(fallbacks.values())} tensors fell back ({kinds}): rows not divisible by 256")
        seconds_quantize = time.time() - t0
        os.replace(final, out_path)
    finally:
        import shutil

        shutil.rmtree(tmp_dir, ignore_errors=True)
    return {
        "quantization": quantization,
        "seconds_convert": seconds_convert,
        "seconds_quantize": seconds_quantize,
        "bytes": out_path.stat().st_size,
    }


def gguf_metadata(path):
    """{key: value} of a GGUF file's metadata (strings and numbers; arrays shortened to their length)."""
    from gguf import GGUFReader

    out = {}
    for name, field in GGUFReader(str(path)).fields.items():
        try:
            value = field.contents()
        except Exception:  # a type contents() does not decode
            value = None
        out[name] = value if not isinstance(value, list) else f"<{len(value)} items>"
    return out


# ------------------------------------------------------------------------------ running it in llama.cpp


def load_gguf(path, n_ctx=2048, threads=None, seed=0):
    """A llama_cpp.Llama over the GGUF file, quiet, on the CPU threads given (default: OMP_NUM_THREADS, as torch
    takes it, else all: llama.cpp's threads spin while they wait, so more threads than free cores slows it badly).
    The prompt (batch) pass gets the same threads: llama-cpp-python's own default there is every core, which made a
    fingerprint check 2.2–4.3× slower per key on a busy 2-core machine (bench/bench_gguf_threads.py)."""
    llama_cpp = require_llama_cpp()
    if not Path(path).is_file():
        raise UserError(f"no GGUF file at {path}")
    threads = threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count()
    with plain_weight_layouts(llama_cpp):
        return llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            seed=seed,
            logits_all=False,
            verbose=False,
        )


def prompt_tokens(llm, text, chat=False):
    """llama.cpp's tokens for a prompt: special tokens written in the text are parsed (as HF tokenizers do); BOS is
    added where the model asks for it, except for chat-formatted text, whose template writes its own."""
    return llm.tokenize(text.encode("utf-8"), add_bos=not chat, special=True)


def greedy_tokens(llm, tokens, max_tokens, eos_ids=None):
    """Greedy continuation of the token list, at most max_tokens, stopping after an end-of-sequence token (eos_ids,
    default llama.cpp's EOS)."""
    eos_ids = eos_ids or {llm.token_eos()}
    out = []
    if max_tokens <= 0:
        return out
    for token in llm.generate(tokens, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        out.append(token)
        if token in eos_ids or len(out) >= max_tokens:
            break
    return out


@register("gguf")
class GgufModel(LanguageModel):
    """A GGUF file in llama.cpp behind oml.core.backends' LanguageModel interface (one prompt at a time: llama-cpp-python
    decodes one sequence per context).

    tokenizer: the model's HF tokenizer, for chat-template prompts and the end-of-sequence set. A greedy fingerprint
    check asks for 2 tokens beyond the response's own count, so a different tokenization of the same text still
    counts, and matches when the completion text starts with the response text."""

    extra_tokens = 2

    def __init__(self, path=None, llm=None, tokenizer=None, n_ctx=2048, threads=None):
        self.llm = llm if llm is not None else load_gguf(path, n_ctx=n_ctx, threads=threads)
        self.tokenizer = tokenizer

    @property
    def eos_ids(self):
        return end_of_sequence_ids(tokenizer=self.tokenizer) | {self.llm.token_eos()}

    def prompt_tokens(self, prompt, chat=False):
        return list(prompt) if isinstance(prompt, list) else prompt_tokens(self.llm, prompt, chat)

    def tokenize(self, text):
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def greedy_with_tokens(self, prompts, max_new_tokens, chat=False):
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else max_new_tokens
        out = []
        for prompt, limit in zip(prompts, limits, strict=True):
            tokens = self.prompt_tokens(prompt, chat)
            generated, _ = cut_at_end(greedy_tokens(self.llm, tokens, limit, self.eos_ids), self.eos_ids)
            text = self.llm.detokenize(generated, prev_tokens=tokens).decode("utf-8", errors="replace")
            out.append((text, generated))
        return out

    def score(self, prompt, response, chat=False):
        """Teacher-forced, one response token at a time (the context keeps the last position's logits only)."""
        import numpy as np

        llama_cpp = require_llama_cpp()
        tokens, response_ids = self.prompt_tokens(prompt, chat), self.tokenize(response)
        n_vocab = self.llm.n_vocab()
        self.llm.reset()
        self.llm.eval(tokens)
        out = []
        for token in response_ids:
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(n_vocab,))
            logits = logits.astype(np.float64)
            top = logits.max()
            log_prob = logits[token] - top - np.log(np.exp(logits - top).sum())
            out.append((int(logits.argmax()) == token, float(log_prob)))
            self.llm.eval([token])
        self.llm.reset()
        return out

    def close(self):
        self.llm.close()


def main(argv=None):
    """python -m oml.attack.gguf_models install-converter [SDIST] | export HF_DIR OUT.gguf TYPE | serve LLAMA_CPP_SERVER_ARGS..."""
    from oml.core.errors import run_cli

    argv = sys.argv[1:] if argv is None else argv

    def run():
        if argv[:1] == ["install-converter"] and len(argv) <= 2:
            dest = install_converter(sdist=argv[1] if len(argv) == 2 else None)
            print(f"llama.cpp's converter installed in {dest}")
        elif argv[:1] == ["serve"]:  # llama_cpp.server with the suite's plain weight layouts
            llama_cpp = require_llama_cpp()
            from llama_cpp.server.__main__ import main as serve

            sys.argv = ["llama_cpp.server", *argv[1:]]
            with plain_weight_layouts(llama_cpp):
                serve()
        elif argv[:1] == ["export"] and len(argv) == 4:
            info = export_gguf(argv[1], argv[2], argv[3])
            print(f"wrote {argv[2]} ({info['bytes'] / 2**20:.1f} MiB)")
        else:
            raise UserError(
                "usage: python -m oml.attack.gguf_models install-converter [SDIST] | export HF_DIR OUT.gguf TYPE | serve ARGS..."
            )

    run_cli(run)


if __name__ == "__main__":
    main()
