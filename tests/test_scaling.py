"""The scaling model: time per step on N GPUs x M nodes from one GPU's rate (qvltune.scaling), its
validation against the multi-GPU runs on record (benchmarks/scaling_validation.py) and
``qvltune estimate``'s step line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from qvltune.scaling import Network, StepInputs, compute_rate_from_run, step_time

REPO = Path(__file__).parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

H200 = Network.for_gpu("NVIDIA H200")
STEP = StepInputs(rate=10_000, tokens_per_micro=8192, micro_batches=2, total_params=8_000_000_000, trained_params=8_000_000_000, stage=2, gathers=72)


def test_one_gpu_is_the_measured_rate():
    t = step_time(STEP, 1, 1, H200)
    assert t.tokens_per_s == pytest.approx(10_000) and t.efficiency == pytest.approx(1.0) and t.communication == 0


def test_communication_follows_the_zero_stage_and_the_network():
    eight = step_time(STEP, 8, 1, H200)
    sixteen = step_time(STEP, 8, 2, H200)
    slow = step_time(STEP, 8, 2, Network.for_gpu("NVIDIA H200", inter_gbs=25))  # 2 x 100 GbE
    assert eight.communication < sixteen.communication < slow.communication
    assert slow.exposed > sixteen.exposed and slow.efficiency < sixteen.efficiency <= eight.efficiency
    # ZeRO-3 gathers every parameter in the forward and the backward: more traffic than ZeRO-2.
    z3 = step_time(replace(STEP, stage=3), 8, 2, H200)
    assert z3.communication > sixteen.communication and z3.overhead > sixteen.overhead
    # ... and pays its hooks on one GPU too (world size 1 still gathers).
    assert step_time(replace(STEP, stage=3), 1, 1, H200).tokens_per_s < 10_000
    # A PCIe machine has no NVLink.
    assert Network.for_gpu("NVIDIA L40S").intra_gbs == 25.0 and Network.for_gpu("NVIDIA A100-SXM4-80GB").intra_gbs == 300.0


def test_compiled_layers_hide_zero3_hooks_behind_long_enough_micro_batches():
    """Eager, ZeRO-3's hooks add to the step on one GPU; compiled, they cost only what outlasts the
    hidden share of a micro-batch's GPU time (none for long rows, the leftover for short ones)."""
    from qvltune.scaling import COMPILED_HOOK_HIDING, GATHER_SECONDS

    z3 = replace(STEP, stage=3)  # 8,192 tokens at 10k tok/s: 0.82 s of GPU time per micro-batch
    hooks = 2 * z3.gathers * GATHER_SECONDS  # forward + backward, 72 gathers: 0.31 s per micro-batch
    assert step_time(z3, 1, 1, H200).overhead == pytest.approx(2 * hooks)
    assert step_time(replace(z3, compiled=True), 1, 1, H200).overhead == 0
    short = replace(z3, compiled=True, tokens_per_micro=1024)  # 0.10 s of GPU time: mostly not hidden
    assert step_time(short, 1, 1, H200).overhead == pytest.approx(2 * (hooks - COMPILED_HOOK_HIDING * 0.1024))


def test_the_model_inverted_gives_back_the_rate():
    measured = step_time(STEP, 2, 1, H200).tokens_per_s
    assert compute_rate_from_run(measured, STEP, 2, 1, H200) == pytest.approx(10_000, rel=1e-6)


def test_every_run_of_the_current_code_is_within_15_percent():
    """The 2-GPU runs and the one-GPU compiled ZeRO-3 runs: those the model was not fitted on are
    predictions; the fitted constants must be what the fitting runs give (so the table in RESULTS.md
    is reproducible)."""
    import scaling_validation as sv

    from qvltune import scaling

    rows, constants = sv.validation()
    current = [r for r in rows if "since replaced" not in r["note"]]
    assert len(current) >= 10 and sum(not r["fitted"] for r in current) >= 5
    assert sum(r["gpus"] == 1 for r in current) == 3  # 8B full (fitted), 8B mixed, 2B mixed
    for r in current:
        assert abs(r["error"]) <= 0.15, r
    for name, value in constants.items():
        assert getattr(scaling, name) == pytest.approx(value, rel=0.02), name


def test_estimate_prints_the_step_on_gpus_by_nodes(tmp_path, demo_data):
    train, _ = demo_data
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"name": "e", "model": {"path": "Qwen/Qwen3-VL-8B-Instruct"}, "data": {"train": str(train), "max_seq_length": 8192, "packing": True},
                                  "strategy": "mixed", "optim": {"grad_accum": 1, "bf16": True}, "deepspeed": {"stage": 2}}))  # fmt: skip
    cmd = [sys.executable, "-m", "qvltune", "estimate", str(config), "--gpu", "H200", "--gpu-count", "8", "--no-data", "--json", "--tokens-per-s", "11382"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    one = json.loads(subprocess.run(cmd, capture_output=True, text=True, env=env).stdout)["scaling"]
    two = json.loads(subprocess.run(cmd + ["--nodes", "2", "--internode-gbs", "25"], capture_output=True, text=True, env=env).stdout)["scaling"]
    assert one["world_size"] == 8 and two["world_size"] == 16 and one["rate_1gpu"] == 11382
    assert two["inter_gbs"] == 25 and not two["inter_default"] and two["exposed"] > one["exposed"]
    assert two["tokens_per_s"] < 2 * one["tokens_per_s"]
