"""Two nodes simulated on this machine: two ``qvltune train`` processes (node ranks 0 and 1, one rank
each, gloo, master 127.0.0.1 / localhost), each starting its own DeepSpeed runner without ssh.

One reference run (one node, two processes) serves every comparison; the two-node runs go through
the two no-ssh ways clusters start jobs: the PyTorchJob environment variables only (ZeRO-2), and the
Slurm script ``qvltune init --nodes N`` writes, run through a stand-in ``srun`` that starts both
nodes here (ZeRO-3). The ZeRO-3 run loses node 1's rank to SIGKILL after its first checkpoint: node 0
names node 1 and stops, nothing is left running, and the requeued script resumes it to the
reference's loss curve.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qvltune.config import load_config
from qvltune.launch import free_port
from qvltune.metrics import read_all
from qvltune.nodes import slurm_script
from test_training import write_config as training_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).parents[1]

# A stand-in for Slurm's srun (which cannot run here): like srun inside an allocation, it starts the
# command once per node with that node's SLURM_* step variables (all on this machine) and exits
# with the first non-zero exit code.
FAKE_SRUN = """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do
  SLURM_STEP_ID=0 SLURM_STEP_NUM_NODES=$SLURM_NNODES SLURM_STEP_NUM_TASKS=$SLURM_NNODES SLURM_NODEID=$i SLURM_PROCID=$i \\
  SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST "$@" > "$FAKE_SRUN_LOGS/node$i.out" 2> "$FAKE_SRUN_LOGS/node$i.err" &
  pids+=($!)
done
code=0
for p in "${pids[@]}"; do wait "$p" || { c=$?; [ $code -eq 0 ] && code=$c; }; done
exit $code
"""


def write_config(tmp_path: Path, demo_data, name: str, stage: int, processes: int) -> Path:
    """The training tests' tiny run, as the mixed strategy for 6 steps with a checkpoint every 3."""
    return training_config(tmp_path, demo_data, name, strategy="mixed", optim={"per_device_batch": 2, "max_steps": 6},
                           schedule={"eval_steps": 100, "save_steps": 3}, deepspeed={"stage": stage}, launch={"cpu_processes": processes})


def losses(run_dir: Path) -> dict[int, float]:
    """{step: loss}; a step logged again after a resume counts with its last value."""
    return {r["step"]: r["loss"] for r in read_all(run_dir / "metrics.jsonl") if r["kind"] == "train"}


def train_cmd(config: Path) -> list[str]:
    return [sys.executable, "-m", "qvltune", "train", str(config), "--no-live"]


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "NODE_RANK", "PET_"))}
    # Two "nodes" share 2 cores: one thread per rank (as the one-node run of two processes gets).
    return {**env, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])}


def workers_of(run_dir: Path) -> list[tuple[int, dict[str, str]]]:
    """(pid, environment) of every training rank of this run still alive on this machine."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            if b"qvltune.worker" not in cmd or str(run_dir).encode() not in cmd:
                continue
            env = dict(item.split("=", 1) for item in (proc / "environ").read_bytes().decode(errors="replace").split("\0") if "=" in item)
            out.append((int(proc.name), env))
        except OSError:
            continue
    return out


def slurm_port() -> int:
    """A free port that a Slurm job id maps to (nodes take 15000 + job id % 20000)."""
    import random
    import socket

    for port in random.sample(range(20000, 35000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


def assert_same_curve(got: dict[int, float], ref: dict[int, float]) -> None:
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-4), (step, got, ref)  # equal to 5 digits


def test_two_nodes_train_like_one_and_a_node_that_dies_is_named_then_resumed(tmp_path, demo_data, tiny_model_dir):
    # The reference: one node, two processes.
    reference = write_config(tmp_path, demo_data, "one-node", stage=2, processes=2)
    result = subprocess.run(train_cmd(reference), capture_output=True, text=True, timeout=900, env=base_env())
    assert result.returncode == 0, result.stdout + result.stderr
    ref = losses(load_config(reference).run_dir)

    # No ssh, the PyTorchJob way: the environment variables alone say which node each process is.
    config = write_config(tmp_path, demo_data, "env-z2", stage=2, processes=1)
    port = str(free_port())
    procs = [
        subprocess.Popen(train_cmd(config), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**base_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NODE_RANK": str(k), "WORLD_SIZE": "2"})
        for k in (1, 0)  # node 1 first: it waits for node 0 to prepare the run folder
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    run_dir = load_config(config).run_dir
    assert_same_curve(losses(run_dir), ref)
    steps = [r["step"] for r in read_all(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == sorted(set(steps))  # only rank 0 of node 0 writes metrics
    assert next(r for r in read_all(run_dir / "metrics.jsonl") if r["kind"] == "start")["world_size"] == 2
    assert "node 1 of 2" in outs[0][1] and "node 0 of 2" in outs[1][1]
    assert (run_dir / "nodes" / "node-1.log").exists() and (run_dir / "final").exists()

    # Slurm: the script `qvltune init --nodes 2` writes, through a stand-in srun, ZeRO-3.
    config = write_config(tmp_path, demo_data, "slurm-z3", stage=3, processes=1)
    run_dir = load_config(config).run_dir
    bin_dir, logs = tmp_path / "bin", tmp_path / "slurm-logs"
    bin_dir.mkdir()
    logs.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    script = tmp_path / "train.sbatch"
    script.write_text(slurm_script(load_config(config), config_path=config, nodes=2, gpus_per_node=0, python=sys.executable))
    job_port = slurm_port()
    slurm_env = {
        **base_env(),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_SRUN_LOGS": str(logs),
        "SLURM_JOB_ID": str(job_port - 15000),  # the nodes derive the master port from the job id
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "localhost",
    }
    job = subprocess.Popen(["bash", str(script)], env=slurm_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 900
    while time.time() < deadline and not (run_dir / "checkpoint-3" / "qvltune-complete").exists():
        time.sleep(0.1)
    node1 = [pid for pid, env in workers_of(run_dir) if env.get("CROSS_RANK") == "1"]
    assert node1, "node 1's rank is not running"
    for pid in node1:
        os.kill(pid, signal.SIGKILL)
    job.communicate(timeout=240)
    assert job.returncode != 0
    err0, err1 = (logs / "node0.err").read_text(), (logs / "node1.err").read_text()
    assert "training failed: node 1" in err0 and "killed by SIGKILL" in err0, err0
    assert "node 1 of 2: local rank 0 (killed by SIGKILL) on node 1" in err1, err1
    # Node 0 names the rank that failed first from every node's records in the shared run folder
    # (its own ranks, which fell on the broken collective or were stopped, are not the cause).
    end = [r for r in read_all(run_dir / "metrics.jsonl") if r["kind"] == "end"]
    assert len(end) == 1 and end[0]["status"] == "rank_failed", end
    assert (end[0]["node"], end[0]["rank"], end[0]["local_rank"], end[0]["signal"], end[0]["exit_code"]) == (1, 1, 0, "SIGKILL", 137), end
    assert workers_of(run_dir) == []  # nothing left running
    assert not (run_dir / "final").exists()

    # Requeued: the same script continues from the last complete checkpoint.
    job = subprocess.run(["bash", str(script)], env=slurm_env, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, (logs / "node0.err").read_text() + (logs / "node1.err").read_text()
    assert "resumed" in (logs / "node0.out").read_text().lower() or read_all(run_dir / "metrics.jsonl")
    starts = [r for r in read_all(run_dir / "metrics.jsonl") if r["kind"] == "start"]
    assert starts[-1]["resumed_from"].endswith("checkpoint-3")
    assert_same_curve(losses(run_dir), ref)  # ZeRO-3 over two nodes, killed and resumed == ZeRO-2 on one
    assert (run_dir / "final" / "adapter_model.safetensors").exists()
