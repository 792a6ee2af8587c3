"""Atomic file writes, safe appends and computed-once JSON caches: nothing half-written is ever left under its final
name."""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock


def atomic_write_text(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def json_digest(obj):
    """16 hex digits of the sha256 of obj as canonical JSON (sorted keys): equal values, equal digests."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def keyed_path(folder, prefix, key, suffix=".json"):
    """folder/<prefix><json_digest(key)><suffix>: one file per distinct key (a dict of JSON values)."""
    path = Path(folder) / f"{prefix}{json_digest(key)}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def cached_json(path, compute):
    """The JSON object at path; compute() makes it (written atomically) when the file is missing. Concurrent callers
    wait on a file lock, so compute runs once."""
    with FileLock(str(path) + ".lock"):
        if not Path(path).is_file():
            atomic_write_json(path, compute())
        return json.loads(Path(path).read_text())


def append_line_locked(path, line):
    """Append one line; several processes finishing at once never interleave."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"), open(path, "a") as f:
        f.write(line.rstrip("\n") + "\n")


@contextlib.contextmanager
def atomic_directory(final_path):
    """Yield a temporary folder beside final_path; rename it into place only if the block succeeds."""
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final_path.parent, prefix=f".{final_path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if final_path.exists():
            shutil.rmtree(final_path)
        os.replace(tmp, final_path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
