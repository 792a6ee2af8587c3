"""The ledger of revealed keys: results/<hash>/revealed_keys.jsonl, one JSON object per line.

Every key sent to a suspect is revealed, whether or not an answer comes back: the suspect can filter it out
from then on. So a key's line is appended, under a file lock and flushed to disk, *before* its request goes
out, with outcome "sent"; a second line with the result follows once it is known ("match", "no match", or
"error: ..."). Each line has key_index, time, endpoint, outcome (and the suspect's api_base/model on "sent"
lines). A checker killed at any moment therefore leaves every key it sent in the ledger; a key whose line was
cut short by the kill was never sent.

Keys are drawn at random (the system's random source) from those never sent, under the same lock, so two
checkers never draw the same key. Revealed keys are reused only with allow_revealed, and then only after every
unrevealed one.
"""

import json
import os
import random
import time
from pathlib import Path

from filelock import FileLock

from oml.core.errors import UserError

SENT = "sent"
LOW_FRACTION = 0.10


class Ledger:
    def __init__(self, path, num_keys):
        self.path = Path(path)
        self.num_keys = num_keys
        self.lock = FileLock(str(self.path) + ".lock")
        self.rng = random.SystemRandom()

    def entries(self):
        """Every complete line (a line cut short by a kill is skipped: its request never went out)."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and "key_index" in entry:
                out.append(entry)
        return out

    def revealed(self):
        """Indices of every key ever sent."""
        return {e["key_index"] for e in self.entries() if e.get("outcome") == SENT}

    def remaining(self):
        return self.num_keys - len(self.revealed() & set(range(self.num_keys)))

    def reserve(self, k, endpoint, allow_revealed=False, **context):
        """Draw k keys and record them as sent, atomically with respect to other checkers. Returns their indices.

        Raises UserError when fewer than k unrevealed keys remain (unless allow_revealed)."""
        with self.lock:
            revealed = self.revealed()
            fresh = [i for i in range(self.num_keys) if i not in revealed]
            self.rng.shuffle(fresh)
            if len(fresh) < k and not allow_revealed:
                raise UserError(
                    f"only {len(fresh)} of {self.num_keys} keys are unrevealed ({self.path}); "
                    "pass --allow_revealed to reuse revealed keys (a suspect may have filtered them)"
                )
            used = [i for i in range(self.num_keys) if i in revealed]
            self.rng.shuffle(used)
            chosen = (fresh + used)[:k]
            self._append([self._line(i, endpoint, SENT, **context) for i in chosen])
        return chosen

    def record(self, key_index, endpoint, outcome):
        with self.lock:
            self._append([self._line(key_index, endpoint, outcome)])

    def _line(self, key_index, endpoint, outcome, **context):
        entry = {"key_index": key_index, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "endpoint": endpoint}
        entry["outcome"] = outcome
        entry.update({k: v for k, v in context.items() if v is not None})
        return json.dumps(entry, ensure_ascii=False)

    def _append(self, lines):
        """Append whole lines and fsync; a previous line cut short by a kill is ended first, not extended."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            prefix = b""
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    prefix = b"\n"
            f.write(prefix + "".join(line + "\n" for line in lines).encode())
            f.flush()
            os.fsync(f.fileno())
