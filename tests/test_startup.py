"""Time to the first step (issue 21): what ``qvltune train`` overlaps and cuts before the ranks train,
and what each cut must keep -- the data check before any rank reads the data, DeepSpeed's own
launcher with the arguments its runner would give it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import write_image, write_jsonl
from qvltune.config import parse_config
from qvltune.data_ready import DATA_READY, PENDING_ENV, mark_data_ready, wait_for_data
from qvltune.errors import UserError
from qvltune.launch import build_launch, master_port_of, one_node_launch


# ----------------------------------------------------------------------------------------------
# DeepSpeed's launcher without its runner (one node)


def runner_command(argv: list[str], monkeypatch, devices: int = 8) -> list[str]:
    """The command DeepSpeed's own runner starts for ``argv`` (its ``main``, with the process start
    captured). ``devices``: what its accelerator counts (a GPU machine cannot exist here)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.launcher import runner

    started = []

    class Captured:
        returncode = 0

        def __init__(self, cmd, env=None, **kwargs):
            started.append(cmd)

        def wait(self):
            return 0

    monkeypatch.setattr(runner.subprocess, "Popen", Captured)
    monkeypatch.setattr(get_accelerator(), "device_count", lambda: devices)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    prefix = 1 if argv[0].endswith("deepspeed") else 3
    runner.main(argv[prefix:])
    return started[0]


@pytest.mark.parametrize(
    "launch, gpu_count, visible, resume",
    [
        ({"cpu_processes": 2}, 0, None, False),  # CPU ranks
        ({"gpus": "all"}, 4, None, True),  # every GPU, --resume passed on to the ranks
        ({"gpus": [0, 2]}, 4, None, False),  # some GPUs
        ({"gpus": "all"}, 2, "1,3", False),  # within CUDA_VISIBLE_DEVICES
    ],
)
def test_the_direct_launch_is_what_deepspeeds_runner_would_start(tmp_path, monkeypatch, launch, gpu_count, visible, resume):
    cfg = parse_config({"name": "x", "model": {"path": "builtin:tiny"}, "data": {"train": "d.jsonl"}, "launch": launch})
    argv, _ = build_launch(cfg, run_dir=tmp_path, gpu_count=gpu_count, resume=resume, master_port=29777, visible_devices=visible)
    direct = one_node_launch(argv)
    assert direct is not None and "deepspeed.launcher.launch" in direct
    assert direct == runner_command(argv, monkeypatch)
    # The run's shared-memory buffers are found by this port after the run (remove_shm_buffers).
    assert master_port_of(direct) == master_port_of(argv) == 29777


def test_commands_that_need_the_runner_keep_it(tmp_path):
    cfg = parse_config({"name": "x", "model": {"path": "builtin:tiny"}, "data": {"train": "d.jsonl"}, "launch": {"hostfile": "hosts", "nodes": 2}})
    argv, _ = build_launch(cfg, run_dir=tmp_path, gpu_count=8, master_port=29777)
    assert one_node_launch(argv) is None  # several nodes over ssh: the runner's job
    assert one_node_launch(["torchrun", "--nproc_per_node", "2", "x.py"]) is None


# ----------------------------------------------------------------------------------------------
# The data check beside the launcher


def pending(pid: int | None = None) -> dict[str, str]:
    return {PENDING_ENV: str(pid or os.getpid())}


def test_a_rank_waits_for_this_attempts_data_never_an_earlier_ones(tmp_path, demo_data):
    from qvltune.train import prepare_folder

    cfg = parse_config({"name": "r", "output_dir": str(tmp_path / "runs"), "model": {"path": "builtin:tiny"}, "data": {"train": str(demo_data[0])}})
    rd = cfg.run_dir
    rd.mkdir(parents=True)
    (rd / "data_index.json").write_text('{"earlier": "attempt"}')  # what an earlier attempt left
    mark_data_ready(rd, 9.0)
    prepare_folder(cfg, resume=True)
    assert not (rd / DATA_READY).exists() and not (rd / "data_index.json").exists()
    got = []
    waiter = threading.Thread(target=lambda: got.append(wait_for_data(rd, pending(), poll=0.01)), daemon=True)
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive(), "a rank went on before this attempt's check was done"
    mark_data_ready(rd, 1.25)
    waiter.join(5)
    assert got == [1.25]
    assert wait_for_data(rd, {}) is None  # started by hand: nothing to wait for


def test_a_rank_stops_waiting_when_qvltune_train_is_gone(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    got = []

    def wait():
        try:
            wait_for_data(tmp_path, pending(int(gone)), poll=0.01)
        except UserError as e:
            got.append(e.message)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    waiter.join(5)
    assert got and "ended before it finished checking the data" in got[0]


RANK_STAND_IN = """
import sys, time
from pathlib import Path
from qvltune.data_ready import wait_for_data
wait_for_data(Path(sys.argv[1]))
Path(sys.argv[1], "rank-read-the-data").write_text("yes")
time.sleep(60)
"""


def test_a_failed_data_check_stops_the_ranks_already_started(tmp_path, monkeypatch):
    """The launcher starts before the check: when the check fails, its error is the run's, and the
    ranks are stopped before any of them reads the data. (The launched command is a stand-in rank
    running the real wait: DeepSpeed itself is started by the slow suite.)"""
    from qvltune import train as train_mod

    data = tmp_path / "data"
    image = write_image(data / "a.png")
    write_jsonl(data / "train.jsonl", [
        {"image": image.name, "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]},
        {"image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "blue"}]},
    ])
    cfg = parse_config({
        "name": "bad", "output_dir": str(tmp_path / "runs"), "model": {"path": "builtin:tiny"},
        "data": {"train": str(data / "train.jsonl"), "eval_split": 0.0, "index_cache": False}, "launch": {"cpu_processes": 1},
        "optim": {"bf16": False, "optimizer": "adamw_torch"},
    })
    rd = cfg.run_dir
    monkeypatch.setattr(train_mod, "launch_command", lambda *a, **k: ([sys.executable, "-c", RANK_STAND_IN, str(rd)], {"PYTHONPATH": os.pathsep.join(sys.path)}))
    with pytest.raises(UserError) as e:
        train_mod.run_training(cfg, resume=False, live=False, gpus=[])
    assert "train.jsonl:2" in e.value.message and "missing.png" in e.value.message
    deadline = time.time() + 15
    while time.time() < deadline and any(str(rd) in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])):
        time.sleep(0.2)
    assert not any(str(rd) in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])), "the launched rank is still running"
    assert not (rd / "rank-read-the-data").exists() and not (rd / DATA_READY).exists()


@pytest.mark.slow
def test_a_bad_record_stops_a_run_whose_deepspeed_already_started(tmp_path, demo_data):
    """The whole command: DeepSpeed is launched before the data check ends; a record whose image is
    missing is still the run's one clear error (exit 1, file and line), and no rank is left."""
    from test_faults import no_workers_left
    from test_training import run_dir, train, write_config

    data = tmp_path / "data"
    images = [write_image(data / f"{i}.png", (64, 48), (i * 20, 0, 0)) for i in range(12)]
    records = [{"image": p.name, "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": f"red {i}"}]} for i, p in enumerate(images)]
    records[6]["image"] = "gone.png"
    write_jsonl(data / "train.jsonl", records)
    config = write_config(tmp_path, demo_data, "late-bad", data={"train": str(data / "train.jsonl"), "eval": None})
    result = train(config)
    rd = run_dir(config)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "train.jsonl:7" in result.stderr and "gone.png" in result.stderr and "Traceback" not in result.stderr
    assert "deepspeed.launcher.launch" in (rd / "launch.sh").read_text()  # it had been launched
    assert no_workers_left(rd) and not (rd / "data_index.json").exists()
