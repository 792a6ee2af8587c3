"""A run's commitment to its fingerprints: a salted Merkle root, written when the run is trained, that a claim's
revealed keys are later proven against (oml/verify/claims.py; docs/claims.md).

    results/<hash>/commitment.json          the root and what it binds (public: publish the root with the model)
    results/<hash>/commitment_salts.json    one random salt per fingerprint (private, mode 0600; never in final_model)
    results/<hash>/final_model/README.md    a model card holding the root and nothing else about the fingerprints

The format, "oml-commitment-v1", exactly (another checker can reimplement it from this):

    H(x)        SHA-256 (hashlib.sha256), 32 bytes; the only hash function of this version ("sha256")
    u64(n)      n as 8 bytes, unsigned, big-endian
    lp(b)       u64(len(b)) || b: every variable-length field is length-prefixed, so no two field lists
                concatenate to the same bytes
    str fields  UTF-8 bytes of the exact string stored in the run's fingerprints.json (no normalisation)
    salt_i      16 bytes (128 bits) from the system's random source, one per fingerprint, written as 32 hex digits

    leaf_i      = H(0x00 || lp(salt_i) || lp(key_i) || lp(response_i)), i = 0 .. n-1 in fingerprints.json order
    node(l, r)  = H(0x01 || l || r)
    level 0 is the n leaves; each next level pairs neighbours (0,1), (2,3), ...; when a level has an odd number
    of nodes, its last node is carried up unchanged (never duplicated, never hashed with itself). The tree's top
    is the single node left (the leaf itself when n = 1).
    root        = H(0x02 || lp("oml-commitment-v1") || u64(n) || lp("sha256") || lp(match_rule) || lp(base_model)
                    || top)

The three prefixes 0x00 / 0x01 / 0x02 keep leaves, inner nodes and the root apart (a leaf can never be passed
off as a subtree, nor the top as the root). The root binds the number of leaves, so a leaf's position (its
key_index) follows from its proof: with n fixed, the left/right steps of a path are the bits of the index,
and no key can be proven at two positions. It also binds the match rule the owner will apply (by name and
version, MATCH_RULES) and the base model the run was fine-tuned from. The salts make the root reveal nothing
about keys not yet revealed: without salt_i, guessing a (key, response) pair and hashing it tells nothing.

A proof for leaf i is the list of sibling hashes from the leaf up (32-byte hex each), skipping the levels where
the node is carried up alone; the verifier walks it with i and n (`verify_proof`).
"""

import hashlib
import os
import secrets
import time
from pathlib import Path

from oml.core.errors import UserError

FORMAT = "oml-commitment-v1"
HASH = "sha256"
SALT_BYTES = 16
COMMITMENT = "commitment.json"
SALTS = "commitment_salts.json"
MODEL_CARD = "README.md"

LEAF, NODE, ROOT = b"\x00", b"\x01", b"\x02"

# The match rules a claim may name: oml/verify/api_client.py's `matches`, by name and version. A new rule gets a new name.
MATCH_RULE = "oml-text-prefix-v1"
MATCH_RULES = {
    MATCH_RULE: "NFC, whitespace runs made one space and stripped on both sides; the answer starts with the "
    "response and does not continue its last word (oml.verify.api_client.matches)",
}


def match_function(rule):
    """The function deciding a match under a named rule; UserError for a rule this version does not know."""
    if rule not in MATCH_RULES:
        raise UserError(f"unknown match rule {rule!r} (this checker knows {', '.join(MATCH_RULES)})")
    from oml.verify.api_client import matches

    return matches


# ------------------------------------------------------------------------------------------ the tree


def _h(data):
    return hashlib.sha256(data).digest()


def u64(n):
    return int(n).to_bytes(8, "big")


def lp(data):
    if isinstance(data, str):
        data = data.encode("utf-8")
    return u64(len(data)) + data


def leaf_hash(salt, key, response):
    """leaf = H(0x00 || lp(salt) || lp(key) || lp(response)); salt as bytes or hex."""
    salt = bytes.fromhex(salt) if isinstance(salt, str) else salt
    return _h(LEAF + lp(salt) + lp(key) + lp(response))


def node_hash(left, right):
    return _h(NODE + left + right)


def levels(leaves):
    """Every level of the tree, leaves first, the top last (odd last node carried up unchanged)."""
    if not leaves:
        raise UserError("a commitment needs at least one fingerprint")
    out = [list(leaves)]
    while len(out[-1]) > 1:
        level = out[-1]
        up = [node_hash(level[j], level[j + 1]) for j in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            up.append(level[-1])
        out.append(up)
    return out


def root_hash(top, n, match_rule, base_model, hash_name=HASH):
    """root = H(0x02 || lp(format) || u64(n) || lp(hash) || lp(match rule) || lp(base model) || top)."""
    return _h(ROOT + lp(FORMAT) + u64(n) + lp(hash_name) + lp(match_rule) + lp(base_model) + top)


def proof(tree, index):
    """Sibling hashes (hex) from leaf `index` up, skipping levels where the node is carried up alone."""
    path = []
    for level in tree[:-1]:
        sibling = index ^ 1
        if sibling < len(level):
            path.append(level[sibling].hex())
        index //= 2
    return path


def verify_proof(root, index, n, leaf, path, match_rule, base_model, hash_name=HASH):
    """Does `leaf` sit at position `index` of an n-leaf tree under `root` (bytes)? `path` as made by `proof`."""
    if hash_name != HASH:
        raise UserError(f"unknown hash function {hash_name!r} (this checker knows {HASH})")
    if not (isinstance(index, int) and isinstance(n, int) and 0 <= index < n):
        return False
    node, size, steps = leaf, n, list(path)
    while size > 1:
        if not (index == size - 1 and size % 2):  # a lone last node goes up unchanged
            if not steps:
                return False
            sibling = bytes.fromhex(steps.pop(0))
            node = node_hash(node, sibling) if index % 2 == 0 else node_hash(sibling, node)
        index //= 2
        size = (size + 1) // 2
    return not steps and root_hash(node, n, match_rule, base_model, hash_name) == root


# ------------------------------------------------------------------------------------------ a run's commitment


def new_salts(n):
    return [secrets.token_bytes(SALT_BYTES).hex() for _ in range(n)]


def build(pairs, salts, match_rule, base_model):
    """(root bytes, tree) over the pairs (dicts with key and response) and their hex salts, in order."""
    if len(salts) != len(pairs):
        raise UserError(f"{len(salts)} salts for {len(pairs)} fingerprints")
    tree = levels([leaf_hash(s, p["key"], p["response"]) for s, p in zip(salts, pairs, strict=True)])
    return root_hash(tree[-1][0], len(pairs), match_rule, base_model), tree


def write_commitment(run, pairs, base_model, made="at training"):
    """results/<hash>/commitment.json and the private salts file, with fresh salts. Returns the root (hex).

    `made`: "at training" (oml.core.run_store.write_run), or "after training" (`python -m oml.verify.claims commit`, for runs
    trained before commitments existed: the root then proves less, since the model was out before it)."""
    from oml.core.files import atomic_write_json

    run = Path(run)
    salts = new_salts(len(pairs))
    root, _ = build(pairs, salts, MATCH_RULE, base_model)
    atomic_write_json(run / SALTS, {"root": root.hex(), "salts": salts})
    os.chmod(run / SALTS, 0o600)  # private: a salt is revealed only with its key, in a claim
    record = {
        "format": FORMAT,
        "root": root.hex(),
        "hash": HASH,
        "leaves": len(pairs),
        "match_rule": MATCH_RULE,
        "match_rule_description": MATCH_RULES[MATCH_RULE],
        "base_model": base_model,
        "made": made,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "leaf_order": "the order of fingerprints.json",
        "salts": f"{SALTS} (private)",
        "encoding": "oml/verify/commitment.py's docstring; docs/claims.md",
    }
    atomic_write_json(run / COMMITMENT, record)
    return root.hex()


def model_card(root):
    """final_model/README.md: the root, and nothing about the keys, responses or salts."""
    return (
        "# Fingerprinted model\n\n"
        f"Fingerprint commitment ({FORMAT}, {HASH} Merkle root): `{root}`\n\n"
        "The owner can prove that keys revealed later were committed to by this root "
        "(`python -m oml.verify.claims verify CLAIM --root ROOT`).\n"
    )


def read_commitment(run, pairs):
    """(commitment record, salts) of a run, checked against its fingerprints; UserError when missing or
    inconsistent (wrong count, salts that do not give the root)."""
    from oml.core.run_store import FINGERPRINTS, read_json

    run = Path(run)
    record, private = read_json(run / COMMITMENT), read_json(run / SALTS)
    if not record:
        raise UserError(
            f"run {run.name} has no {COMMITMENT} (trained before commitments): make one with "
            f"`python -m oml.verify.claims commit --run {run.name} --result_path {run.parent}`"
        )
    if not private or private.get("root") != record.get("root"):
        raise UserError(f"run {run.name}: {SALTS} is missing or belongs to another commitment")
    if record.get("format") != FORMAT or record.get("hash") != HASH:
        raise UserError(f"run {run.name}: {COMMITMENT} is {record.get('format')}/{record.get('hash')}, not {FORMAT}")
    if record.get("leaves") != len(pairs):
        raise UserError(f"run {run.name}: {COMMITMENT} has {record.get('leaves')} leaves for {len(pairs)} keys")
    root, _ = build(pairs, private["salts"], record["match_rule"], record["base_model"])
    if root.hex() != record["root"]:
        raise UserError(f"run {run.name}: {FINGERPRINTS} and {SALTS} do not give the root in {COMMITMENT}")
    return record, private["salts"]
