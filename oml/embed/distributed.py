"""Several ranks, one or several nodes: a bounded wait for peers, one run for all ranks, a clear error on a lost node.

A launcher (deepspeed, torchrun) starts one process per rank and sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT;
with several nodes, each node's launcher starts its own ranks (over ssh from a hostfile, or one command per node
with --no_ssh). Every rank must train the same run, and a node that dies or stops answering must not leave the
others waiting for ever: every wait for a peer (start-up, each collective) gives up after --dist_timeout seconds,
and the error a rank then gets becomes one line naming the cause. Nothing is saved then: global rank 0 writes
final_model and the run-log line only after training returns.
"""

import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from oml.core.errors import UserError

# What gloo says when a peer's connection drops or a wait runs out (torch raises a plain RuntimeError for these).
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Timed out waiting", "Socket Timeout")


def launched():
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def where():
    """This process's place, e.g. 'rank 1 of 2 (node 1)'; the node is known when DeepSpeed's launcher started us."""
    node = os.environ.get("CROSS_RANK")
    return f"rank {os.environ.get('RANK', '0')} of {os.environ.get('WORLD_SIZE', '1')}" + (
        f" (node {node})" if node is not None else ""
    )


def init(timeout_s):
    """Join the process group on CPU ranks with a bounded wait (the Trainer's CPU path would wait 30 min).

    On GPUs the Trainer joins it with TrainingArguments(ddp_timeout=...) instead. No-op in a single process.
    """
    if not launched() or torch.cuda.is_available() or dist.is_initialized():
        return
    with peers(timeout_s):
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))


def check_same_run(config_hash):
    """Every rank must train the same run: one node given other arguments or another fingerprints file would
    otherwise train a model nobody asked for, stored under rank 0's hash."""
    hashes = [None] * dist.get_world_size()
    dist.all_gather_object(hashes, config_hash)
    if len(set(hashes)) > 1:
        raise UserError(
            f"the ranks disagree on the run (config hashes by rank: {', '.join(hashes)}): start every node with the "
            "same arguments and the same fingerprints file"
        )


def wait_for_all(timeout_s):
    """The last step of a run on every rank: return once rank 0 has saved (or failed to)."""
    if dist.is_available() and dist.is_initialized():
        with peers(timeout_s, "rank 0 may have failed while saving: look for final_model in node 0's results"):
            dist.barrier()


def lost_peer(error):
    return isinstance(error, dist.DistError) or any(s in str(error) for s in PEER_LOST)


@contextmanager
def peers(timeout_s, consequence="nothing was saved, rerun the same command on every node"):
    """Turn a lost or silent peer into one UserError line (the launcher then stops this node's other ranks)."""
    try:
        yield
    except RuntimeError as e:
        if not launched() or not lost_peer(e):
            raise
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{where()} could not reach or lost the other ranks (master {os.environ.get('MASTER_ADDR')}:"
            f"{os.environ.get('MASTER_PORT')}): a node died, was stopped or did not answer within --dist_timeout "
            f"{timeout_s} s; {consequence} ({cause[:300]})"
        ) from e


def bound_all_groups(timeout_s):
    """Give every process group the timeout: DeepSpeed makes its own groups (ZeRO's data-parallel group), and
    torch gives a new group its 30 min (gloo) or 10 min (NCCL) default, not the main group's timeout."""
    from torch.distributed.distributed_c10d import _set_pg_timeout, _world

    for group in list(_world.pg_map):
        if dist.get_rank(group) >= 0:  # a group this rank belongs to
            _set_pg_timeout(timedelta(seconds=timeout_s), group)


class Peers(TrainerCallback):
    """Once every rank has joined and DeepSpeed has made its groups: bound every wait, and check the run."""

    def __init__(self, config_hash, timeout_s):
        self.config_hash, self.timeout_s = config_hash, timeout_s

    def on_train_begin(self, args, state, control, **kwargs):
        if dist.is_available() and dist.is_initialized():
            bound_all_groups(self.timeout_s)
            check_same_run(self.config_hash)
