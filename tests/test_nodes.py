"""Several nodes, the pure parts: which node this is (flags, PyTorchJob variables, Slurm), each node's
DeepSpeed command, the Slurm script, and how nodes judge each other from their status files.
(The real two-node runs are in test_multinode.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from qvltune.config import parse_config
from qvltune.errors import UserError
from qvltune.hardware import GpuInfo
from qvltune.nodes import NodeSpec, PeerWatch, hostfile_text, node_from_environment, node_launch, peer_gpus, slurm_first_host, slurm_script, status_path, write_status


def cfg(**launch):
    return parse_config({"name": "x", "model": {"path": "builtin:tiny"}, "data": {"train": "d.jsonl"}, "launch": launch})


def no_scontrol(nodelist):
    return slurm_first_host(nodelist)


@pytest.mark.parametrize(
    "env, flags, expected",
    [
        ({}, {}, None),  # one machine
        ({"MASTER_ADDR": "10.0.0.1", "NODE_RANK": "1", "WORLD_SIZE": "2"}, {}, (2, 1, "10.0.0.1", 29500)),
        ({"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "23456", "RANK": "3", "WORLD_SIZE": "4"}, {}, (4, 3, "10.0.0.1", 23456)),  # PyTorchJob: RANK = pod
        ({"MASTER_ADDR": "m", "PET_NODE_RANK": "0", "PET_NNODES": "2"}, {}, (2, 0, "m", 29500)),  # elastic PyTorchJob
        ({"MASTER_ADDR": "m", "NODE_RANK": "0", "WORLD_SIZE": "1"}, {}, None),  # one node: the ordinary path
        ({"MASTER_ADDR": "m", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, {}, None),  # inside a rank, not a node
        ({}, {"node_rank": 1, "master_addr": "head", "nodes": 3}, (3, 1, "head", 29500)),
        ({"MASTER_ADDR": "from-env"}, {"node_rank": 0, "nodes": 2}, (2, 0, "from-env", 29500)),
        ({"SLURM_JOB_ID": "42", "SLURM_NNODES": "1"}, {}, None),  # a one-node allocation
        (
            {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "gpu[07-08]"},
            {},
            (2, 1, "gpu07", 15000 + 4242),
        ),
        (  # flags win over Slurm
            {"SLURM_JOB_ID": "1", "SLURM_NNODES": "2", "SLURM_STEP_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "a,b"},
            {"node_rank": 0, "master_addr": "x", "nodes": 2},
            (2, 0, "x", 29500),
        ),
    ],
)
def test_which_node_this_is(env, flags, expected, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the node list is read by hand
    node = node_from_environment(cfg(), env, **flags)
    assert (node and (node.nodes, node.node_rank, node.master_addr, node.master_port)) == (expected or None)


@pytest.mark.parametrize(
    "env, flags, message",
    [
        ({"NODE_RANK": "1", "WORLD_SIZE": "2"}, {}, "MASTER_ADDR is not"),
        ({"MASTER_ADDR": "m", "NODE_RANK": "2", "WORLD_SIZE": "2"}, {}, "node rank 2 is not between 0 and 1"),
        ({"MASTER_ADDR": "m", "NODE_RANK": "one", "WORLD_SIZE": "2"}, {}, "NODE_RANK='one' is not a whole number"),
        ({}, {"node_rank": 1, "nodes": 2}, "--node-rank and --master-addr"),
        ({"SLURM_JOB_ID": "7", "SLURM_NNODES": "2"}, {}, "not under srun"),
        ({"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NUM_TASKS": "16", "SLURM_NODEID": "0", "SLURM_STEP_NODELIST": "a"}, {}, "one task per node"),
    ],
)
def test_bad_node_settings_are_one_clear_error(env, flags, message, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UserError, match=message):
        node_from_environment(cfg(), env, **flags)


@pytest.mark.parametrize("nodelist, first", [("gpu[07-09,12],login1", "gpu07"), ("node1,node2", "node1"), ("localhost", "localhost"), ("a-b[001-004]", "a-b001")])
def test_first_host_of_a_slurm_node_list(nodelist, first, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert slurm_first_host(nodelist) == first


def test_each_node_runs_deepspeeds_runner_without_ssh(tmp_path):
    node = NodeSpec(2, 1, "10.1.1.1", 29555, "test")
    argv, env, hostfile = node_launch(cfg(gpus="all"), node, run_dir=tmp_path, gpu_count=8, resume=True)
    assert argv[argv.index("--node_rank") + 1] == "1" and "--no_ssh" in argv
    assert argv[argv.index("--master_addr") + 1] == "10.1.1.1" and argv[argv.index("--master_port") + 1] == "29555"
    assert argv[argv.index("--hostfile") + 1] == str(tmp_path / "nodes" / "hostfile") and argv[-1] == "--resume"
    assert hostfile == "node0 slots=8\nnode1 slots=8\n" == hostfile_text(2, 8)
    # The hostfile is the world DeepSpeed's runner sees: parse it with DeepSpeed itself.
    from deepspeed.launcher.runner import _parse_hostfile

    assert dict(_parse_hostfile(hostfile.splitlines())) == {"node0": 8, "node1": 8}
    _, cpu_env, cpu_hosts = node_launch(cfg(cpu_processes=2), replace(node, node_rank=0), run_dir=tmp_path, gpu_count=0)
    assert cpu_hosts == "node0 slots=2\nnode1 slots=2\n" and "OMP_NUM_THREADS" in cpu_env
    with pytest.raises(UserError, match="device list applies to one node"):
        node_launch(cfg(gpus=[0, 1]), node, run_dir=tmp_path, gpu_count=8)


def test_several_nodes_need_a_way_to_reach_them(tmp_path):
    from qvltune.train import launch_command

    with pytest.raises(UserError, match="--node-rank N --master-addr HOST"):
        launch_command(cfg(nodes=2), 8, False)
    argv, _ = launch_command(cfg(nodes=2, hostfile=str(tmp_path / "hosts")), 8, False)  # the ssh path
    assert "--hostfile" in argv and "--no_ssh" not in argv


def test_peer_watch_names_a_dead_node_and_ignores_an_earlier_attempt(tmp_path):
    node0 = NodeSpec(3, 0, "m", 1, "test")
    write_status(tmp_path, 1, "exited", exit_code=1)  # left by an earlier attempt
    watch = PeerWatch(tmp_path, node0, timeout=30, grace=10)
    assert watch.peers() == [1, 2] and watch.check() is None  # history says nothing about this attempt
    write_status(tmp_path, 1, "running", gpus=[GpuInfo(0, "NVIDIA H200", 10, 5, 5, "9.0", 50, 40)])
    write_status(tmp_path, 2, "running")
    assert watch.check() is None
    (gpu,) = peer_gpus(watch.live)
    assert gpu.node == 1 and gpu.name == "NVIDIA H200"
    write_status(tmp_path, 2, "exited", exit_code=-9)
    assert watch.check() == f"node 2 ({os.uname().nodename}) failed (killed by SIGKILL)"
    write_status(tmp_path, 2, "running")
    now = time.time()
    watch.check(now)
    assert watch.check(now + 29) is None
    assert "node 1" in watch.check(now + 31) and "stopped reporting" in watch.check(now + 31)

    # The other nodes watch node 0 only: its failure, or its end long ago, stops them too.
    watch1 = PeerWatch(tmp_path, replace(node0, node_rank=1), timeout=30, grace=10)
    assert watch1.peers() == [0]
    write_status(tmp_path, 0, "exited", exit_code=1, stopped_for="node 2 (h) failed (killed by SIGKILL)")
    assert watch1.check() == f"node 0 ({os.uname().nodename}) stopped because node 2 (h) failed (killed by SIGKILL)"
    write_status(tmp_path, 0, "exited", exit_code=0)
    now = time.time()
    assert watch1.check(now) is None
    assert "ended" in watch1.check(now + 11)
    assert json.loads(status_path(tmp_path, 0).read_text())["exit_code"] == 0


def test_slurm_script_starts_one_train_per_node_and_resumes(tmp_path):
    config = tmp_path / "qvltune.yaml"
    text = slurm_script(cfg(nodes=2), config_path=config, nodes=2, gpus_per_node=8, python="/opt/venv/bin/python")
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --gpus-per-node=8" in text
    assert "#SBATCH --requeue" in text and "--resume" in text
    assert f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 /opt/venv/bin/python -m qvltune train {config} --resume" in text
    script = tmp_path / "train.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0  # valid bash


def test_print_command_prints_every_nodes_command(tmp_path, demo_data):
    train, _ = demo_data
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"name": "pc", "output_dir": str(tmp_path / "runs"), "model": {"path": "builtin:tiny"}, "data": {"train": str(train)}, "launch": {"cpu_processes": 2}}))
    out = subprocess.run(
        [sys.executable, "-m", "qvltune", "train", str(config), "--print-command", "--nodes", "3", "--master-addr", "10.0.0.5"],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "400"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if "--no_ssh" in line]
    assert [line.split("--node_rank ")[1].split()[0] for line in lines] == ["0", "1", "2"]
    assert all("--master_addr 10.0.0.5" in line for line in lines)
    assert "node2 slots=2" in out.stderr
    assert not (tmp_path / "runs").exists()  # printing launches nothing


def test_node_zeros_panel_shows_every_nodes_gpus(tmp_path):
    from rich.console import Console

    from qvltune.dashboard import DashboardState, render

    write_status(tmp_path, 1, "running", gpus=[GpuInfo(0, "NVIDIA H200", 140 * 2**30, 100 * 2**30, 40 * 2**30, "9.0", 97, 61)])
    watch = PeerWatch(tmp_path / "other", NodeSpec(2, 0, "m", 1, "test"))
    watch.run_dir = tmp_path  # the status appeared after node 0 started
    watch.check()
    state = DashboardState("run")
    state.gpus = [GpuInfo(0, "NVIDIA H200", 140 * 2**30, 120 * 2**30, 20 * 2**30, "9.0", 95, 60)] + peer_gpus(watch.live)
    console = Console(width=120, record=True)
    console.print(render(state))
    text = console.export_text()
    assert "node 1: 0" in text and "40.0/140 GiB" in text and "97%" in text


def test_a_run_folder_the_other_nodes_cannot_see_is_refused(tmp_path, monkeypatch):
    """Rank 0 of a 2-node world that does not see node 1's probe file stops with the fix. (One real
    gloo process stands in for the world: node 1's probe is never written where node 0 looks.)"""
    import torch.distributed as dist

    from qvltune import nodes
    from qvltune.launch import free_port

    monkeypatch.setattr(nodes, "SHARED_CHECK_SECONDS", 1.0)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "CROSS_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        monkeypatch.setenv("CROSS_SIZE", "1")
        nodes.check_shared_run_dir(tmp_path)  # one node: nothing to check
        monkeypatch.setenv("CROSS_SIZE", "2")
        with pytest.raises(UserError, match=r"not shared between the nodes: node 0 cannot see what node\(s\) \[1\]"):
            nodes.check_shared_run_dir(tmp_path)
        assert not list((tmp_path / "nodes").glob("seen-*"))  # probes cleaned up
    finally:
        dist.destroy_process_group()
