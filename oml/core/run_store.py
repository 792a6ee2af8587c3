"""A run's folder, results/<hash>/, and the run log results/all_run_logs.txt: where every file lives, writing
the run record, reading runs back, and the command line that names a run.

    results/all_run_logs.txt            one line per finished run: time, hash, hashed arguments (JSON)
    results/<hash>/
        fingerprinting_config.json      the hashed arguments, every argument, library versions
        fingerprints.json               the (key, response) pairs the run trained on (never inside final_model)
        metrics.json                    training time, losses, memory
        train_log.txt                   the training log
        commitment.json                 salted Merkle root of the fingerprints (oml/verify/commitment.py); the root is also
                                        final_model/README.md's one fact about them
        commitment_salts.json           the commitment's salts (private; revealed one by one in claims)
        final_model/                    a plain HF folder; written last, so its existence means the run is complete
        eval_results.json               eval_for_multigpu.py's results
        attacks/<attack-id>/            attack_fingerprints.py: attack.json, final_model/ or model.gguf, eval_results.json
        reference_match_rates.json      per-key match rate p0 of reference models (check_fingerprints.py)
        revealed_keys.jsonl             keys sent to a suspect model, one JSON line each (check_fingerprints.py)
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

from oml.core.errors import UserError
from oml.core.files import append_line_locked, atomic_directory, atomic_write_json
from oml.core.run_config import HASHED, TRAIN_ARGS, hashed_config

RUN_LOG = "all_run_logs.txt"
CONFIG = "fingerprinting_config.json"
FINGERPRINTS = "fingerprints.json"
METRICS = "metrics.json"
TRAIN_LOG = "train_log.txt"
FINAL_MODEL = "final_model"
EVAL_RESULTS = "eval_results.json"
ATTACKS = "attacks"
ATTACK = "attack.json"  # an attack's settings and measurements, in attacks/<attack-id>/
GGUF_MODEL = "model.gguf"  # an attack's model when it is a GGUF file
REFERENCE_RATES = "reference_match_rates.json"
REVEALED_KEYS = "revealed_keys.jsonl"


def attack_dir(run, attack_id):
    return Path(run) / ATTACKS / attack_id


# ------------------------------------------------------------------------------ writing a run


def write_run(identity, arguments, pairs, metrics, model, tokenizer, versions, card=None):
    """The run record of a RunIdentity in its folder (arguments: every argument, as config_record keeps them), final
    model last (under a temporary name, then renamed, with the model card `card` if given), then its run-log line."""
    run = identity.folder
    atomic_write_json(run / FINGERPRINTS, pairs)
    atomic_write_json(run / CONFIG, config_record(identity, arguments, versions))
    atomic_write_json(run / METRICS, metrics)
    save_model(model, tokenizer, run / FINAL_MODEL, card=card)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    append_line_locked(
        Path(identity.result_path) / RUN_LOG,
        f"{stamp}\t{identity.config_hash}\t" + json.dumps(identity.hashed, sort_keys=True),
    )


def save_model(model, tokenizer, final_dir, card=None):
    """A standard HF folder (weights, config, tokenizer, generation config, optional README.md), written atomically."""
    model.config._name_or_path = ""
    with atomic_directory(final_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if card:
            (tmp / "README.md").write_text(card)


def config_record(identity, arguments, versions):
    """fingerprinting_config.json: the run's hash, its hashed arguments, every argument (a mapping; the launcher's
    local_rank left out) and the library versions."""
    return {
        "config_hash": identity.config_hash,
        "hashed": dict(identity.hashed),
        "args": {k: v for k, v in sorted(arguments.items()) if k != "local_rank"},
        "versions": versions,
    }


# ------------------------------------------------------------------------------ reading runs


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_run_log(result_path):
    """(hash, hashed config) for every run recorded in results/all_run_logs.txt."""
    path = Path(result_path) / RUN_LOG
    runs = []
    if path.is_file():
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 3:
                runs.append((parts[1], json.loads(parts[2])))
    return runs


@dataclass(frozen=True)
class RunIdentity:
    """The run a command's flags name: where runs are stored, its hash and its hashed arguments (to name the closest
    recorded runs when it is missing). Built once from finalized arguments (from_args); find_run looks it up."""

    result_path: str
    config_hash: str
    hashed: dict

    @classmethod
    def from_args(cls, args):
        return cls(result_path=args.result_path, config_hash=args.config_hash, hashed=hashed_config(args))

    @property
    def folder(self):
        """results/<hash>/, whether or not the run exists."""
        return Path(self.result_path) / self.config_hash


def closest_runs(identity, k=3):
    """Recorded runs with the fewest differing hashed arguments from a RunIdentity's: [(hash, {arg: (theirs, yours)})]."""
    mine = identity.hashed
    scored = []
    for run_hash, theirs in read_run_log(identity.result_path):
        diff = {n: (theirs.get(n), mine.get(n)) for n in HASHED if theirs.get(n) != mine.get(n)}
        scored.append((len(diff), run_hash, diff))
    return [(h, d) for _, h, d in sorted(scored, key=lambda s: s[0])[:k]]


def find_run(identity):
    """results/<hash>/ of a RunIdentity, or a UserError naming the closest recorded runs and their commands."""
    run = identity.folder
    if (run / FINAL_MODEL).is_dir():
        return run
    lines = [f"no fingerprinted model matches these arguments (looked for {run / FINAL_MODEL})"]
    for run_hash, diff in closest_runs(identity):
        shown = ", ".join(f"{n}: {theirs!r} there, {yours!r} here" for n, (theirs, yours) in diff.items())
        lines.append(f"  closest run {run_hash} differs in {shown}")
        config = read_json(Path(identity.result_path) / run_hash / CONFIG)
        if config:
            lines.append(f"    its command: {run_command(config['args'], 'eval_for_multigpu.py')}")
    if len(lines) == 1:
        lines.append("  no runs are recorded in " + str(Path(identity.result_path) / RUN_LOG))
    raise UserError("\n".join(lines))


def read_run(run):
    """{"hash", "dir", "config", "eval", "metrics"}: the run's JSON files (None where missing)."""
    run = Path(run)
    return {
        "hash": run.name,
        "dir": run,
        "config": read_json(run / CONFIG),
        "eval": read_json(run / EVAL_RESULTS),
        "metrics": read_json(run / METRICS),
    }


def find_runs(result_path):
    """Every trained run under result_path (folders with a fingerprinting_config.json), oldest first."""
    dirs = [p.parent for p in Path(result_path).glob(f"*/{CONFIG}")]
    return [read_run(d) for d in sorted(dirs, key=lambda d: d.stat().st_mtime)]


def finished_runs(result_path):
    """Run folders with a final model, oldest first."""
    return sorted(
        (p.parent for p in Path(result_path).glob(f"*/{FINAL_MODEL}")), key=lambda r: (r / FINAL_MODEL).stat().st_mtime
    )


def short_model(model):
    return model.split(":")[-1].rstrip("/").split("/")[-1]


# ------------------------------------------------------------------------------ the command that names a run

# Arguments a run records that are derived (not flags), or that never name a run.
_DERIVED = {"model", "fingerprints_digest", "augmentation_prompts_digest", "benign_rows_recipe", "config_hash"}


def run_command(stored_args, script="eval_for_multigpu.py"):
    """`python <script> ...` with every hashed flag of a run, from its stored arguments (fingerprinting_config.json's
    "args"): the same command finds the same run. The model goes as --model_path, the data file as
    --fingerprints_file_path (their digests are hashed), and --result_path keeps the folder."""
    words = ["python", script, "--model_path", stored_args["model"]]
    hashed_flags = set(HASHED) - _DERIVED | {"fingerprints_file_path", "result_path"}
    for flags, spec in TRAIN_ARGS:
        name = spec.get("dest") or flags[0].lstrip("-")
        if name not in hashed_flags or name not in stored_args:
            continue
        value = stored_args[name]
        if spec.get("action") == "store_true":
            if value:
                words.append(flags[0])
        elif value is not None:
            words += [flags[0], _shell_word(str(value))]
    return " ".join(words)


def _shell_word(text):
    import shlex

    return shlex.quote(text)


def recorded_args(run):
    """The arguments a run was trained with, from its fingerprinting_config.json."""
    config = read_json(Path(run) / CONFIG)
    if not config:
        raise UserError(f"run {run} has no readable {CONFIG}")
    return config["args"]
