"""The fault suite: crashes, bad data, full disks, OOM, NaN, dead ranks — nothing lost, every failure
explained. Faults that cannot be produced on demand here (a full disk, a GPU out of memory, a rank
crashing) are injected by tests/faults/sitecustomize.py; everything else is the real thing."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import write_image, write_jsonl
from qvltune.launch import master_port_of, remove_shm_buffers
from qvltune.metrics import read_all
from test_training import losses, run_dir, train, write_config

pytestmark = pytest.mark.slow
FAULTS = str(Path(__file__).parent / "faults")


def faulty_env(fault: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([FAULTS, os.environ.get("PYTHONPATH", "")]), "QVLTUNE_TEST_FAULT": fault, "COLUMNS": "200", **extra}


def run_with(config: Path, fault: str, *args: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qvltune", "train", str(config), "--no-live", *args], capture_output=True, text=True, timeout=timeout, env=faulty_env(fault, **env))


def launched_port(rd: Path) -> int:
    """The master port of the command the run recorded in launch.sh."""
    return master_port_of(shlex.split((rd / "launch.sh").read_text().splitlines()[-1]))


def no_workers_left(rd: Path, timeout: float = 20.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] and ("qvltune.worker" in " ".join(p.info["cmdline"]) or "qvltune.rank" in " ".join(p.info["cmdline"])) and str(rd) in " ".join(p.info["cmdline"])]
        if not alive:
            return True
        time.sleep(0.5)
    return False


SECTIONS = {"optim": {"max_steps": 8, "per_device_batch": 2}, "schedule": {"log_steps": 1, "eval_steps": 100, "save_steps": 2}, "data": {"packing": True}}


def test_kill_9_mid_checkpoint_then_resume_matches_uninterrupted(tmp_path, demo_data):
    reference = write_config(tmp_path, demo_data, "ref", **SECTIONS)
    assert train(reference).returncode == 0
    ref = losses(reference)

    config = write_config(tmp_path, demo_data, "crash", **SECTIONS)
    rd = run_dir(config)
    # Saves are made slow, so the kill lands while checkpoint-4's files exist but before it is marked complete.
    proc = subprocess.Popen([sys.executable, "-m", "qvltune", "train", str(config), "--no-live"], env=faulty_env("slow_save:4"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not ((rd / "checkpoint-4").exists() and not (rd / "checkpoint-4" / "qvltune-complete").exists()):
        time.sleep(0.05)
    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in family:  # a machine crash: everything dies at once, no handler runs
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    # A real crash also empties /dev/shm (it is RAM); the simulated one leaves the killed ranks'
    # DeepSpeed buffers behind, so remove them as the reboot would.
    remove_shm_buffers(launched_port(rd))
    assert (rd / "checkpoint-4").exists() and not (rd / "checkpoint-4" / "qvltune-complete").exists(), "the kill was meant to land mid-save"
    assert (rd / "checkpoint-2" / "qvltune-complete").exists()
    assert no_workers_left(rd)

    result = train(config, "--resume")
    assert result.returncode == 0, result.stdout + result.stderr
    start = [r for r in read_all(rd / "metrics.jsonl") if r["kind"] == "start"][-1]
    assert start["resumed_from"].endswith("checkpoint-2")  # the half-written checkpoint-4 is never picked
    assert losses(config)[8] == pytest.approx(ref[8], rel=1e-4)


def test_killing_qvltune_train_itself_leaves_no_rank_behind(tmp_path, demo_data):
    """kill -9 of the parent only (a lost SSH session, an OOM-killed shell): the guard sees it, the
    ranks checkpoint and stop, nothing keeps running, and DeepSpeed's /dev/shm buffers are gone."""
    config = write_config(tmp_path, demo_data, "orphan", optim={"max_steps": 200, "per_device_batch": 2}, schedule={"log_steps": 1, "save_steps": 1000})
    rd = run_dir(config)
    proc = subprocess.Popen([sys.executable, "-m", "qvltune", "train", str(config), "--no-live"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not [r for r in read_all(rd / "metrics.jsonl") if r["kind"] == "train"]:
        time.sleep(0.2)
    port = launched_port(rd)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert no_workers_left(rd, timeout=90)
    assert [p for p in rd.glob("checkpoint-*") if (p / "qvltune-complete").exists()], "the ranks saved before stopping"
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_sigterm_to_the_parent_saves_and_exits_cleanly(tmp_path, demo_data):
    config = write_config(tmp_path, demo_data, "term", optim={"max_steps": 30, "per_device_batch": 2}, schedule={"log_steps": 1, "save_steps": 100})
    rd = run_dir(config)
    proc = subprocess.Popen([sys.executable, "-m", "qvltune", "train", str(config), "--no-live"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not [r for r in read_all(rd / "metrics.jsonl") if r["kind"] == "train"]:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # what a scheduler sends
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, out + err
    assert [p for p in rd.glob("checkpoint-*") if (p / "qvltune-complete").exists()]
    assert no_workers_left(rd)


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_image_deleted_after_the_check(tmp_path, policy):
    images = [write_image(tmp_path / "data" / f"{i}.png", (64, 48), (i * 20, 0, 0)) for i in range(12)]
    data = write_jsonl(tmp_path / "data" / "train.jsonl", [{"image": p.name, "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": f"red {i}"}]} for i, p in enumerate(images)])
    config = write_config(tmp_path, (data, data), f"bad-{policy}", data={"train": str(data), "eval": None, "on_bad_sample": policy}, optim={"max_steps": 6, "per_device_batch": 2}, schedule={"save_steps": 100})
    rd = run_dir(config)
    proc = subprocess.Popen([sys.executable, "-m", "qvltune", "train", str(config), "--no-live"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (rd / "data_index.json").exists():
        time.sleep(0.02)
    images[5].unlink()  # checked, then gone before training reads it
    out, err = proc.communicate(timeout=300)
    if policy == "error":
        assert proc.returncode == 1, out + err
        assert "train.jsonl:6" in err and "image not found" in err and "on_bad_sample: skip" in err and "Traceback" not in err
    else:
        assert proc.returncode == 0, out + err
        skipped = (rd / "skipped.jsonl").read_text()
        assert '"line": 6' in skipped and "training" in skipped
        assert (rd / "final" / "adapter_model.safetensors").exists()


def test_disk_full_at_save_keeps_the_previous_checkpoint(tmp_path, demo_data):
    config = write_config(tmp_path, demo_data, "full-disk", **SECTIONS)
    result = run_with(config, "enospc:4")
    rd = run_dir(config)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "cannot write checkpoint-4: No space left on device" in result.stderr
    assert "checkpoint-2" in result.stderr and "Traceback" not in result.stderr
    assert (rd / "checkpoint-2" / "qvltune-complete").exists() and not (rd / "checkpoint-4").exists()
    assert no_workers_left(rd)


def test_out_of_memory_is_explained(tmp_path, demo_data):
    config = write_config(tmp_path, demo_data, "oom", optim={"max_steps": 6, "per_device_batch": 4, "gradient_checkpointing": False})
    result = run_with(config, "oom:3")
    assert result.returncode == 1, result.stdout + result.stderr
    err = result.stderr
    assert "GPU out of memory at step 3" in err and "per_device_batch: 2" in err and "gradient_checkpointing: true" in err and "qvltune estimate" in err
    assert "Traceback" not in err


def test_compile_failure_is_one_line_with_the_switch_to_turn_it_off(tmp_path, demo_data):
    config = write_config(tmp_path, demo_data, "compile-fail", optim={"max_steps": 3, "compile": True})
    result = run_with(config, "compile_fail:0")
    assert result.returncode == 1, result.stdout + result.stderr
    err = result.stderr
    assert "torch.compile failed at step 1" in err and "triton" in err and "optim.compile: false" in err
    assert "Traceback" not in err
    end = [r for r in read_all(run_dir(config) / "metrics.jsonl") if r["kind"] == "end"]
    assert end and end[-1]["status"] == "compile_failed"


def test_nan_loss_stops_at_that_step_and_names_the_last_good_checkpoint(tmp_path, demo_data):
    config = write_config(tmp_path, demo_data, "nan", **SECTIONS)
    result = run_with(config, "nan:5")
    rd = run_dir(config)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "loss became NaN/inf at step 5" in result.stderr and "checkpoint-4" in result.stderr
    assert not (rd / "checkpoint-6").exists() and not (rd / "final").exists()  # nothing newer is saved


def test_nan_policy_skip_step_skips_the_update_and_carries_on(tmp_path, demo_data):
    config = write_config(tmp_path, demo_data, "nan-skip", optim={**SECTIONS["optim"], "nan_policy": "skip_step", "max_skipped_steps": 2}, schedule=SECTIONS["schedule"], data=SECTIONS["data"])
    result = run_with(config, "nan:5")
    rd = run_dir(config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "step 5: non-finite loss, update skipped (1 of at most 2)" in result.stdout
    records = read_all(rd / "metrics.jsonl")
    trained = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    assert all(trained[s] == trained[s] for s in range(1, 9))  # the logged loss stays readable (no NaN)
    assert records[-1]["skipped_steps"] == 1
    from safetensors.torch import load_file

    assert all(t.isfinite().all() for t in load_file(str(rd / "final" / "adapter_model.safetensors")).values())


def test_a_dying_rank_is_named_and_leaves_no_orphans(tmp_path, demo_data):
    config = write_config(tmp_path, demo_data, "die", launch={"cpu_processes": 2}, optim={"max_steps": 6})
    result = run_with(config, "die:3", HF_TOKEN="hf_abcdefghijklmnopqrstuvwxyz0123456789")
    rd = run_dir(config)
    # Rank 1 exits with 17; rank 0 follows within milliseconds (1, on the broken collective, or
    # stopped by the launcher's teardown), and DeepSpeed's launcher exits with whichever code it polls
    # first. The ranks' own records (qvltune.rank) name rank 1 and its 17, every time.
    assert result.returncode == 17, result.stdout + result.stderr
    assert "training failed: rank 1 (exit code 17);" in result.stderr, result.stderr
    assert "rank 0 (" not in result.stderr.split("last lines of")[0]
    end = [r for r in read_all(rd / "metrics.jsonl") if r["kind"] == "end"]
    assert len(end) == 1 and end[0]["status"] == "rank_failed", end
    assert (end[0]["rank"], end[0]["node"], end[0]["exit_code"], end[0]["signal"]) == (1, 0, 17, None), end
    records = {r["rank"]: r for r in map(json.loads, [p.read_text() for p in (rd / "ranks").glob("node0-rank*.json")])}
    assert sorted(records) == [0, 1] and records[1]["exit_code"] == 17 and records[1]["received"] is None
    # Rank 0 is a consequence: stopped by the teardown (a signal received) or failed after rank 1.
    assert records[0]["received"] is not None or records[0]["ended"] > records[1]["ended"], records
    assert "--resume" in result.stderr
    assert no_workers_left(rd)
    # No secret ends up in what qvltune printed or wrote.
    for text in [result.stdout, result.stderr] + [p.read_text(errors="ignore") for p in rd.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".yaml", ".log", ".sh", ".txt")]:
        assert "hf_abcdefghijklmnopqrstuvwxyz0123456789" not in text
