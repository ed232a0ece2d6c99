"""The whole run's wall clock around the steady time (qvltune.wallclock): what the compile cache and
background checkpoint writes change."""

from __future__ import annotations

import pytest

from qvltune.catalog import builtin_config
from qvltune.config import parse_config
from qvltune.estimate import estimate
from qvltune.estimate_inputs import Machine, Workload
from qvltune.model_stats import model_stats
from qvltune.units import GiB
from qvltune.wallclock import COMPILE_COLD_S, COMPILE_WARM_FRACTION, DISK_WRITE_BPS, FINISH_S, FIRST_SAVE_BPS, HOST_COPY_BPS, eval_cost, trained_state_bytes, wall_clock

H200 = Machine("NVIDIA H200", 140 * GiB, 1, 1, 256 * GiB, 989.0, True)


def _clock(steps=31, **schedule):
    cfg = parse_config({
        "name": "x", "model": {"path": "Qwen/Qwen3-VL-8B-Instruct"}, "data": {"train": "x.jsonl", "eval_split": 0.05, "packing": True, "max_seq_length": 16384},
        "strategy": "mixed", "optim": {"epochs": 1, "per_device_batch": 1, "grad_accum": 4, "compile": True},
        "schedule": {"save_steps": 10, "eval_steps": 10, **schedule},
    })
    stats = model_stats(builtin_config("8B"))
    wl = Workload(tokens=16384, image_tokens=4096, rows=1, tokens_per_epoch=2_000_000, attended_tokens=800, label_share=0.3)
    est = estimate(cfg, stats, H200, wl)
    return wall_clock(cfg, est, stats.total, steps=steps), est


def test_background_saves_cost_a_host_copy_and_the_cache_cuts_the_first_step():
    clock, est = _clock()
    state = trained_state_bytes(est.trainable_params, 1)
    assert state == est.trainable_params * 14  # fp32 master + 2 moments + bf16 weights, one rank
    assert clock.saves == 4 and clock.evals == 4  # steps 10, 20, 30 and 31, the end (an eval at the end too)
    assert clock.save_blocking_s == pytest.approx(state / HOST_COPY_BPS) and clock.save_background_s == pytest.approx(state / DISK_WRITE_BPS)
    assert clock.first_save_extra_s == pytest.approx(state / FIRST_SAVE_BPS - state / HOST_COPY_BPS)  # the first save pins its buffers
    assert clock.compile_cold_s == COMPILE_COLD_S and clock.compile_warm_s == pytest.approx(COMPILE_COLD_S * COMPILE_WARM_FRACTION)
    assert clock.total(cached=True) == pytest.approx(clock.total() - (clock.compile_cold_s - clock.compile_warm_s))
    assert clock.steady_s == est.seconds_per_epoch and clock.ratio() == pytest.approx(clock.total() / clock.steady_s)
    assert clock.finish_s == pytest.approx(FINISH_S + state / DISK_WRITE_BPS)  # the last checkpoint's write is waited for

    sync, _ = _clock(async_save=False)
    assert sync.save_blocking_s == pytest.approx(state / DISK_WRITE_BPS) and sync.save_background_s == sync.first_save_extra_s == 0
    assert sync.finish_s == FINISH_S
    assert sync.total() - clock.total() == pytest.approx(3 * state / DISK_WRITE_BPS - 3 * state / HOST_COPY_BPS - state / FIRST_SAVE_BPS)


def test_the_optimizer_state_is_split_over_the_ranks():
    assert trained_state_bytes(1000, 4) == 1000 * 12 / 4 + 1000 * 2


def test_the_last_step_saves_and_evaluates_once_and_an_evaluation_costs_a_forward():
    """The Trainer evaluates and saves every eval_steps / save_steps steps, and at the last step
    only if that is not already one of them; an evaluation computes the forward of a training step:
    no backward, no checkpointed recompute (mixed at 8B, checkpointed: a bit over a quarter)."""
    clock, est = _clock(steps=30)
    assert clock.saves == 3 and clock.evals == 3  # steps 10, 20 and 30
    parts = {p.name: p for p in est.step_parts}
    forward = sum(p.forward for name, p in parts.items() if not name.startswith("recomputed"))
    assert "recomputed forward (checkpointing)" in parts and eval_cost(est.step_parts) == pytest.approx(forward / sum(p.flops for p in parts.values()))
    assert 0.25 < eval_cost(est.step_parts) < 0.4
    assert clock.eval_s == pytest.approx(est.seconds_per_epoch * 0.05 * eval_cost(est.step_parts))
