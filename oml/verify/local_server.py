"""Start a local OpenAI-compatible server for a model, on 127.0.0.1, for tests and benchmarks.

    with local_server("model.gguf") as (api_base, api_model): ...     # llama.cpp (llama-cpp-python's server)
    with local_server("results/<hash>/final_model") as (api_base, api_model): ...   # `transformers serve`

The server is a child process listening on loopback only, on a free port; the block waits (bounded) until
it answers HTTP, and the process is killed when the block ends, whatever happens inside it.
"""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from oml.core.errors import UserError


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model, port, threads=None):
    """(argv, model name to request) for a .gguf file (llama.cpp) or an HF folder (transformers serve)."""
    model = str(model)
    if model.endswith(".gguf"):
        try:
            import llama_cpp.server  # noqa: F401
        except ImportError:
            raise UserError("llama.cpp's server is not installed: pip install 'llama-cpp-python[server]'") from None
        argv = [sys.executable, "-m", "oml.attack.gguf_models", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
                "--model_alias", "suspect", "--n_ctx", "2048", "--verbose", "False"]  # fmt: skip
        if threads:
            argv += ["--n_threads", str(threads), "--n_threads_batch", str(threads)]  # the prompt pass too
        return argv, "suspect"
    cli = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
    if cli is None:
        raise UserError("`transformers serve` is not installed: pip install 'transformers[serving]'")
    argv = [cli, "serve", model, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32"]
    return argv, model


def wait_listening(proc, api_base, timeout, name):
    """Wait (at most timeout s) until the server process proc answers HTTP at api_base; a UserError naming it if it
    exits or does not come up."""
    import httpx

    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise UserError(f"{name} exited with status {proc.returncode}")
        try:
            httpx.get(api_base + "/models", timeout=5)
            return  # any HTTP answer means it listens (`transformers serve` lists models from the hub cache, and
            # answers 500 where there is none)
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise UserError(f"{name} did not come up within {timeout} s")
        time.sleep(0.5)


@contextlib.contextmanager
def local_server(model, port=None, timeout=300, threads=None, log_path=None):
    """Yield (api_base, api_model) of a server for `model` on 127.0.0.1; kill it afterwards."""

    port = port or free_port()
    argv, api_model = server_command(model, port, threads)
    log = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    api_base = f"http://127.0.0.1:{port}/v1"
    try:
        wait_listening(proc, api_base, timeout, f"the server for {model} ({' '.join(argv[:3])})")
        yield api_base, api_model
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait(timeout=30)
        if log_path:
            log.close()
