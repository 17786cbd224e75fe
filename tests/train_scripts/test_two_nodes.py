"""A simulated 2-node job on this machine: two `accelerate launch --num_machines 2 --machine_rank 0|1` on
127.0.0.1, one process each, train_pixcell with fsdp.strategy HYBRID_SHARD (shard inside a node, replicate
across nodes). One node is killed mid-run (SIGKILL, then the other, as a scheduler ends the job); the same two
commands again resume from the last complete checkpoint and finish, repeating the lost steps bit for bit."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from diffusion.checkpoints import latest_checkpoint

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny" / "pixcell_tiny_256.py")
SCRIPT = str(REPO / "train_scripts" / "train_pixcell.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(work: Path, data: Path, port: int, steps: int) -> list[subprocess.Popen]:
    # the launcher as a module of this interpreter: no console script (whose shebang names one venv path)
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    nodes = []
    for rank in (0, 1):
        cmd = [
            *accelerate,
            "--multi_gpu",
            "--num_machines",
            "2",
            "--machine_rank",
            str(rank),
            "--num_processes",
            "2",
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(port),
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            SCRIPT,
            TINY,
            "--work-dir",
            str(work),
            "--data-root",
            str(data),
            "--report-to",
            "none",
            "--cfg-options",
            "fsdp.enabled=True",
            "fsdp.strategy='HYBRID_SHARD'",
            f"max_steps={steps}",
            "save_every_steps=3",
            "log_every_steps=1",
        ]
        log = open(work.parent / f"node{rank}.log", "a")
        nodes.append(
            subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )
    return nodes


def kill(node: subprocess.Popen) -> None:
    """SIGKILL a node: the launcher and its training process (torch's elastic agent starts the workers in
    sessions of their own, so a process-group kill would leave them running: as a scheduler does, kill all)."""
    launcher = psutil.Process(node.pid)
    for proc in [*launcher.children(recursive=True), launcher]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    node.wait()


def test_two_nodes_train_lose_a_node_and_resume(tmp_path, real_features):
    work = tmp_path / "run"
    work.mkdir()
    log = work / "train.log"
    # Long enough a run that the kill comes mid-way; the resumed run stops at 12 (max_steps may change on resume).
    nodes = start_nodes(work, real_features, free_port(), steps=60)
    deadline = time.monotonic() + 300
    while not (log.is_file() and "step 4/60" in log.read_text()):
        assert all(n.poll() is None for n in nodes), (tmp_path / "node0.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the 2-node run did not reach step 4"
        time.sleep(0.05)
    kill(nodes[1])
    time.sleep(1.0)  # the surviving node stalls (or fails) in its next collective; the job is ended
    kill(nodes[0])
    first = log.read_text()
    assert "fsdp: HYBRID_SHARD over mesh (2, 1)" in first
    assert json.loads((work / "env.json").read_text())["world_size"] == 2  # two real processes
    saved = int(latest_checkpoint(work).name.split("-")[1])
    assert 3 <= saved < 12

    nodes = start_nodes(work, real_features, free_port(), steps=12)
    for i, n in enumerate(nodes):
        assert n.wait(timeout=300) == 0, (tmp_path / f"node{i}.log").read_text()[-3000:]
    text = log.read_text()
    assert f"resumed from {latest_checkpoint(work).parent / f'checkpoint-{saved:07d}'}" in text
    assert latest_checkpoint(work).name == "checkpoint-0000012"
    assert not list((work / "checkpoints").glob(".checkpoint-*"))
    assert len(list((latest_checkpoint(work) / "shards").glob("*.distcp"))) == 2
    # The steps that ran after the checkpoint and before the kill ran again after the resume, with the same
    # losses (a constant learning rate: max_steps 60 or 12 gives the same schedule).
    before = {int(k): v for k, v in re.findall(r"step (\d+)/60 loss ([0-9.]+)", first)}
    after = {int(k): v for k, v in re.findall(r"step (\d+)/12 loss ([0-9.]+)", text[len(first) :])}
    assert sorted(after) == list(range(saved + 1, 13))
    lost = [s for s in before if s > saved]
    assert all(before[s] == after[s] for s in lost), (before, after)
    assert lost or max(before) == saved
