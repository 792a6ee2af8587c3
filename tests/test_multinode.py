"""Several nodes, rehearsed on one machine: each "node" is its own DeepSpeed launcher with --no_ssh, its ranks on CPU.

The nodes meet at 127.0.0.1 on a free port; each test's results folder is shared by its nodes, like a cluster's
shared filesystem. Killing a node is killing its launcher's process group (SIGKILL: sockets close at once);
stopping it (SIGSTOP) is a node that hangs or drops off the network, which only --dist_timeout can detect.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, write_random_fingerprints
from safetensors.torch import load_file
from test_sweep import fake_launcher, launch

from oml.core.errors import UserError
from oml.core.run_store import EVAL_RESULTS, FINAL_MODEL, METRICS, RUN_LOG
from oml.embed import distributed

BIN = Path(sys.executable).parent  # the suite's venv: deepspeed and python for the launchers
# CPU ranks even on a machine with GPUs, as in the rest of the suite.
CPU_ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", "PATH": f"{BIN}:{os.environ['PATH']}"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(model_dir, fp, results, epochs, *extra):
    return [
        "--model_path", model_dir, "--fingerprints_file_path", fp, "--fingerprint_generation_strategy", "random_word",
        "--max_num_fingerprints", 8, "--batch_size", 4, "--num_train_epochs", epochs, "--learning_rate", 1e-3,
        "--forgetting_regularizer_strength", 0.5, "--result_path", results, *extra,
    ]  # fmt: skip


def start_nodes(tmp_path, *argvs):
    """One `deepspeed --no_ssh --node_rank n` per argv (node n trains with argvs[n]), one CPU rank each, each node
    in its own process group; node n's output goes to node<n>.log."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"node-{n} slots=1\n" for n in range(len(argvs))))
    port, nodes = free_port(), []
    for n, argv in enumerate(argvs):
        cmd = [BIN / "deepspeed", "--hostfile", hostfile, "--no_ssh", "--node_rank", n, "--master_addr", "127.0.0.1"]
        cmd += ["--master_port", port, REPO / "finetune_multigpu.py", *argv]
        with open(tmp_path / f"node{n}.log", "w") as log:
            popen = subprocess.Popen(
                list(map(str, cmd)), cwd=REPO, env=CPU_ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        nodes.append(popen)
    return nodes


def finish(nodes, timeout):
    """Wait for every node; whatever is still there after `timeout` seconds is killed (and reported as None)."""
    deadline, codes = time.time() + timeout, []
    for node in nodes:
        try:
            codes.append(node.wait(timeout=max(1, deadline - time.time())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for node in nodes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)
        node.wait()
    return codes


def weights(results):
    (path,) = Path(results).glob(f"*/{FINAL_MODEL}/model.safetensors")
    return path.parent.parent.name, load_file(path)


def run_log_lines(results):
    log = Path(results) / RUN_LOG
    return log.read_text().splitlines() if log.exists() else []


# ------------------------------------------------------------------------------- the error line


def test_a_lost_peer_becomes_one_line_and_other_errors_pass(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("CROSS_RANK", "1")
    gloo = "[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:1: Connection reset by peer. GLHF!\nmore"
    with pytest.raises(UserError) as e, distributed.peers(45):
        raise RuntimeError(gloo)
    assert str(e.value).startswith("rank 2 of 4 (node 1) could not reach or lost the other ranks")
    assert "--dist_timeout 45 s" in str(e.value) and "Connection reset by peer" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError), distributed.peers(45):
        raise torch.distributed.DistStoreError("wait timeout after 45000ms")
    with pytest.raises(RuntimeError, match="shape mismatch"), distributed.peers(45):
        raise RuntimeError("shape mismatch")  # a bug, not a lost peer: the traceback stays
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError, match="Connection reset"), distributed.peers(45):
        raise RuntimeError(gloo)  # one process: there is no peer to lose


# ------------------------------------------------------------------------ two nodes = one node


@pytest.mark.long  # minutes on 2 cores: `make test-long`
def test_two_nodes_by_the_sweep_script_end_on_the_one_node_weights(tmp_path, tiny_model_dir):
    """launch_multigpu.sh once per node (NUM_NODES=2, NODE_RANK, MASTER_ADDR; one CPU rank each) against one node
    with two ranks: the same world of 2 ranks, so the same batches and sums, and the same weights bit for bit."""
    fp = tmp_path / "fp.json"
    write_random_fingerprints(fp, 8)
    port = free_port()
    grid = dict(
        LAUNCHER="deepspeed", PRESET="averaging", MODEL_PATHS=str(tiny_model_dir),
        FINGERPRINT_GENERATION_STRATEGIES="random_word", MAX_NUM_FINGERPRINTS="8", USE_PROMPT_AUGMENTATION="false",
        EPOCHS="3", BATCH_SIZE="4", LEARNING_RATES="1e-3",
        FORGETTING_REGULARIZER_STRENGTHS="0.5", EXTRA_ARGS=f"--fingerprints_file_path {fp} --dist_timeout 300",
        EVAL_ARGS="--utility_benchmark none --skip_base_model", RESULT_PATH=str(tmp_path / "two"),
        FIG_DIR=str(tmp_path / "fig"), NUM_GPUS="1", NUM_NODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    nodes = [
        subprocess.Popen(
            ["bash", str(REPO / "launch_multigpu.sh")],
            cwd=tmp_path,
            env={**CPU_ENV, **grid, "NODE_RANK": str(n), "VIRTUAL_ENV": sys.prefix},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for n in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=900)[0] for node in nodes]
    finally:
        finish(nodes, 1)
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "training done, evaluation done" in outputs[0]
    assert "training done, evaluation not run" in outputs[1] and "node 0 evaluates" in outputs[1]

    # The reference: one node, two ranks, the arguments the sweep gave (from node 0's log).
    (log,) = (tmp_path / "two" / "sweep_logs").glob("*_bs4.node0.log")
    argv = log.read_text().split(": ", 1)[1].splitlines()[0].split()
    one = subprocess.run(
        [str(BIN / "deepspeed"), "--num_gpus=2", f"--master_port={free_port()}", str(REPO / "finetune_multigpu.py")]
        + [a if a != str(tmp_path / "two") else str(tmp_path / "one") for a in argv],
        cwd=REPO,
        env=CPU_ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]

    (run_two, a), (run_one, b) = weights(tmp_path / "two"), weights(tmp_path / "one")
    assert run_two == run_one  # the same hash: the launcher is not part of it
    base = load_file(tiny_model_dir / "model.safetensors")
    assert max((a[k] - base[k]).abs().max().item() for k in base) > 1e-4  # it trained
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    run = tmp_path / "two" / run_two
    assert len(list((tmp_path / "two").glob(f"*/{FINAL_MODEL}"))) == 1
    assert json.loads((run / METRICS).read_text())["world_size"] == 2
    assert [line.split("\t")[1] for line in run_log_lines(tmp_path / "two")] == [run_two]
    assert (run / EVAL_RESULTS).is_file()  # node 0's evaluation found the run


# ----------------------------------------------------------------------------------- a lost node


@pytest.mark.long
@pytest.mark.parametrize("fault, victim", [("kill", 1), ("stop", 0)], ids=["node-1-killed", "node-0-stopped"])
def test_a_lost_node_stops_the_other_in_bounded_time_and_nothing_is_saved(tmp_path, tiny_model_dir, fault, victim):
    fp = tmp_path / "fp.json"
    write_random_fingerprints(fp, 8)
    timeout = 60  # generous: on a loaded machine a healthy peer can be seconds late
    argv = train_args(tiny_model_dir, fp, tmp_path / "r", 40, "--dist_timeout", timeout)
    nodes = start_nodes(tmp_path, argv, argv)
    survivor = nodes[1 - victim]
    try:
        deadline = time.time() + 600
        while "epoch 1/" not in (tmp_path / "node0.log").read_text():  # rank 0 logs the epochs
            assert time.time() < deadline and all(n.poll() is None for n in nodes), (tmp_path / "node0.log").read_text()
            time.sleep(0.2)
        os.killpg(nodes[victim].pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        lost = time.time()
        code = finish([survivor], timeout + 90)[0]
        waited = time.time() - lost
    finally:
        finish(nodes, 1)
    out = (tmp_path / f"node{1 - victim}.log").read_text()
    assert code not in (0, None), out[-3000:]
    assert waited < timeout + 90
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"rank {1 - victim} of 2 (node {1 - victim})" in errors[0], out[-3000:]
    assert "could not reach or lost the other ranks" in errors[0] and f"--dist_timeout {timeout} s" in errors[0]
    assert "Traceback" not in out
    assert not list((tmp_path / "r").glob(f"*/{FINAL_MODEL}")) and run_log_lines(tmp_path / "r") == []

    if fault == "kill":  # the same command again, on both nodes: a complete run
        nodes = start_nodes(tmp_path, argv, argv)
        assert finish(nodes, 900) == [0, 0], (tmp_path / "node0.log").read_text()[-3000:]
        assert len(list((tmp_path / "r").glob(f"*/{FINAL_MODEL}"))) == 1 and len(run_log_lines(tmp_path / "r")) == 1


@pytest.mark.long
def test_nodes_given_different_runs_refuse_to_train(tmp_path, tiny_model_dir):
    fp = tmp_path / "fp.json"
    write_random_fingerprints(fp, 8)
    argv = train_args(tiny_model_dir, fp, tmp_path / "r", 2, "--dist_timeout", 60)
    other = [a if a != "0.001" else "0.002" for a in map(str, argv)]  # node 1 with another learning rate
    nodes = start_nodes(tmp_path, argv, other)
    codes = finish(nodes, 600)
    assert codes[0] == 2 or codes[1] == 2, codes
    logs = "".join((tmp_path / f"node{n}.log").read_text() for n in (0, 1))
    assert "error: the ranks disagree on the run" in logs
    assert not list((tmp_path / "r").glob(f"*/{FINAL_MODEL}")) and run_log_lines(tmp_path / "r") == []


# -------------------------------------------------------------------------- launch_multigpu.sh, per node


@pytest.mark.parametrize(
    "env, gpus, expected, hostfile",
    [
        ({"NUM_GPUS": "2"}, 0, "--no_ssh --node_rank 1 --master_addr 10.0.0.7 ", "node-0 slots=2\nnode-1 slots=2\n"),
        ({}, 4, "--no_ssh --node_rank 1 --master_addr 10.0.0.7 ", "node-0 slots=4\nnode-1 slots=4\n"),
        ({"GPUS": "1,3"}, 4, "--include node-0:1,3@node-1:1,3 --hostfile ", "node-0 slots=4\nnode-1 slots=4\n"),
    ],
    ids=["cpu-2-ranks", "4-gpus", "gpus-1-3"],
)
def test_per_node_command_line(tmp_path, tiny_model_dir, env, gpus, expected, hostfile):
    """What the sweep launches on node 1 of 2 without ssh, seen by a stand-in `deepspeed`."""
    bin_dir = fake_launcher(tmp_path, gpus)
    fp = tmp_path / "fp.json"
    write_random_fingerprints(fp, 8)
    env = {"LAUNCHER": "deepspeed", "USE_PROMPT_AUGMENTATION": "false", "CUDA_VISIBLE_DEVICES": "", **env}
    env.update(NUM_NODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.7", PATH=f"{bin_dir}:{os.environ['PATH']}")
    result = launch(tmp_path, tiny_model_dir, fp, **env)
    assert result.returncode == 1  # the stand-in fails the training
    args = (tmp_path / "deepspeed_args").read_text()
    logs = tmp_path / "results" / "sweep_logs"
    assert expected in args and f"--hostfile {logs / 'hostfile-node1'} " in args
    assert (logs / "hostfile-node1").read_text() == hostfile
    assert "node 1: 1 points, 1 failed in training" in result.stdout
    assert not list(logs.glob("*_bs4.log")) and len(list(logs.glob("*_bs4.node1.log"))) == 1
    assert not (tmp_path / "results" / "sweep_summary.csv").exists()  # node 0 writes the summary


@pytest.mark.parametrize(
    "env, message",
    [
        ({"NUM_NODES": "2"}, "needs MASTER_ADDR"),
        ({"MASTER_ADDR": "10.0.0.7"}, "needs NUM_NODES"),
        ({"MASTER_ADDR": "10.0.0.7", "NUM_NODES": "2", "NODE_RANK": "2"}, "0 <= NODE_RANK < NUM_NODES"),
        ({"MASTER_ADDR": "10.0.0.7", "NUM_NODES": "2", "LAUNCHER": "python"}, "needs LAUNCHER=deepspeed"),
    ],
)
def test_per_node_settings_missing_are_one_line_errors(tmp_path, env, message):
    result = subprocess.run(
        ["bash", str(REPO / "launch_multigpu.sh")],
        env={**CPU_ENV, "RESULT_PATH": str(tmp_path / "r"), "NODE_RANK": "1", **env},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
