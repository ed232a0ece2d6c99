"""The whole run's wall clock around the estimator's steady time: start-up, first step, saves, evals.

``qvltune.estimate`` gives the time of the training steps at an assumed share of the GPUs' peak. What a user waits for
is more: the start-up (checks, launcher, imports, loading the weights), the first step (compiling
the decoder layers, unless the compile cache already holds them: qvltune.compile_cache), the time
training waits for each checkpoint (a host copy of the trained state with background writes,
qvltune.checkpoint_writer; the whole write and sync without), and the evaluations (forward only:
the share of a training step's FLOPs its forward is, ``eval_cost``). Pure.

The constants are rates measured on an H200 machine (benchmarks/RESULTS.md, issue 21 and the
real-size flow) and are stated with every figure as assumptions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from qvltune.config import RunConfig
from qvltune.step_flops import Part, total

# Start-up besides the weights: the CLI, the ranks' start and imports, the process group, the run
# config and the Trainer's arguments (CUDA start), the strategy and adapters, DeepSpeed's engine;
# the data check runs beside them. Measured on an H200 (benchmarks/RESULTS.md, "The 2B and 8B
# epochs"): 18-20 s before the first step less the weights' load, 2B and 8B mixed (the second run
# of the same folder also removes the first's, 1-3 s).
STARTUP_FIXED_S = 20.0
WEIGHTS_LOAD_BPS = 2.0e9  # safetensors from a local disk, cold page cache (bytes/s)
# What the first step costs beyond a steady one: torch.compile of the decoder layers (one graph for
# every layer, dynamic shapes) and the first launch of every kernel. The same runs: 20.5 s at 2B and
# 27.5 s at 8B with an empty compile cache; 6.0 and 5.6 s with the cache a first run filled.
COMPILE_COLD_S = 25.0
COMPILE_WARM_FRACTION = 0.25
# Device -> host copy of the trained state into the reused pinned buffers (2B mixed on an H200: 2.4
# GB in 0.15-0.2 s); the first save also allocates and pins them (2.0-2.1 s for the same bytes).
# Past the pinning cap (qvltune.host_buffers: a quarter of the node's RAM over its ranks) the
# buffers are pageable and copies slower (~1 GB/s measured before): not modelled, so a state larger
# than that share is underestimated here.
HOST_COPY_BPS = 12.0e9
FIRST_SAVE_BPS = 1.2e9
DISK_WRITE_BPS = 0.55e9  # torch.save + fsync beside training (the same runs: 2.4 GB in 3.6-4.5 s)
OPTIMIZER_BYTES = 12  # fp32 master weight + two Adam moments per trained parameter
WEIGHT_BYTES = 2  # bf16 trained weights (the adapter / module states)
# After the last step and its checkpoint's background write: the final model (the adapter and the
# processor), the ranks' exit and the command's end. The 2B and 8B runs: 0.5-0.9 s to the worker's
# return, then 21 s of exit handlers and 2.5 s of the command's end, both cut since (the loaders'
# workers stopped, no interpreter finalization): a prediction until measured.
FINISH_S = 4.0


@dataclass
class WallClock:
    steady_s: float
    startup_s: float
    compile_cold_s: float
    compile_warm_s: float
    saves: int
    save_blocking_s: float  # per save: the time training waits
    save_background_s: float  # per save: written beside training (0 when saves are synchronous)
    evals: int
    eval_s: float  # per evaluation
    assumptions: list[str] = field(default_factory=list)
    first_save_extra_s: float = 0.0  # the first save's longer wait (it pins the reused host buffers)
    finish_s: float = FINISH_S  # after the last step: its checkpoint's write ends, the final model, the exit

    def total(self, cached: bool = False) -> float:
        first = self.compile_warm_s if cached else self.compile_cold_s
        saves = self.saves * self.save_blocking_s + (self.first_save_extra_s if self.saves else 0.0)
        return self.steady_s + self.startup_s + first + saves + self.evals * self.eval_s + self.finish_s

    def ratio(self, cached: bool = False) -> float:
        """Whole run / steady steps (issue 21's target: <= 1.3)."""
        return self.total(cached) / self.steady_s if self.steady_s else math.inf


def eval_cost(parts: list[Part]) -> float:
    """An evaluation's compute per token as a share of a training step's (qvltune.step_flops): the
    forward of the model and its adapters (and a DPO run's reference), no backward and no
    checkpointed recompute. From ~1/4 (full training, checkpointed) to ~1/2 (LoRA without it)."""
    steps = total(parts)
    return sum(p.forward for p in parts if p.kind != "recompute") / steps if steps else 0.0


def trained_state_bytes(trainable_params: int, world_size: int) -> float:
    """Bytes one rank writes per checkpoint: its partition of the optimizer state (ZeRO-1..3 split
    it over the ranks) and, on rank 0, the trained weights."""
    return trainable_params * OPTIMIZER_BYTES / max(1, world_size) + trainable_params * WEIGHT_BYTES


def wall_clock(cfg: RunConfig, est, total_params: int, steps: int) -> WallClock | None:
    """The run's wall clock, from an ``estimate.Estimate`` with a steady time; None without one."""
    if est.seconds_per_epoch is None:
        return None
    epochs = cfg.optim.epochs or 1.0
    steady = est.seconds_per_epoch * epochs
    total_steps = max(1, int(steps * epochs)) if steps else 1
    s = cfg.schedule
    # Every save_steps / eval_steps steps, and at the last step if it is not one of those (the
    # Trainer's DefaultFlowCallback).
    saves = math.ceil(total_steps / s.save_steps) if s.save_steps else 0
    evaluating = bool(cfg.data.eval or cfg.data.eval_split)
    evals = math.ceil(total_steps / s.eval_steps) if evaluating else 0
    eval_share = cfg.data.eval_split if cfg.data.eval_split and not cfg.data.eval else 0.05
    eval_s = est.seconds_per_epoch * eval_share * eval_cost(est.step_parts) if evaluating else 0.0
    state = trained_state_bytes(est.trainable_params, est.world_size)
    write = state / DISK_WRITE_BPS
    if s.async_save:
        blocking, background, first_extra = state / HOST_COPY_BPS, write, state / FIRST_SAVE_BPS - state / HOST_COPY_BPS
    else:
        blocking, background, first_extra = write, 0.0, 0.0
    compile_cold = COMPILE_COLD_S if cfg.optim.compile else 0.0
    startup = STARTUP_FIXED_S + total_params * WEIGHT_BYTES / WEIGHTS_LOAD_BPS
    notes = [
        f"start-up: {STARTUP_FIXED_S:.0f} s + the weights at {WEIGHTS_LOAD_BPS / 1e9:g} GB/s",
        (f"first step: ~{COMPILE_COLD_S:.0f} s of torch.compile, ~{COMPILE_COLD_S * COMPILE_WARM_FRACTION:.0f} s with the compile cache of an earlier run" if cfg.optim.compile else "first step: not compiled"),
        f"the end: the last checkpoint's write, then ~{FINISH_S:.0f} s for the final model and the exit",
        f"checkpoints: {state / 1e9:,.1f} GB per rank; " + ("a host copy at {:g} GB/s ({:g} GB/s the first, which pins its buffers), written at {:g} GB/s beside training".format(HOST_COPY_BPS / 1e9, FIRST_SAVE_BPS / 1e9, DISK_WRITE_BPS / 1e9) if s.async_save else f"written at {DISK_WRITE_BPS / 1e9:g} GB/s while training waits (schedule.async_save: false)"),
    ]
    # The last checkpoint's background write has nothing left to hide under: the run waits for it.
    finish = FINISH_S + (background if saves else 0.0)
    return WallClock(steady, startup, compile_cold, compile_cold * COMPILE_WARM_FRACTION, saves, blocking, background, evals, eval_s, notes, first_extra, finish)


def steps_per_epoch(cfg: RunConfig, est) -> int | None:
    """Optimizer steps of one epoch from the estimate's workload (tokens per epoch / per step)."""
    wl = est.workload
    if not wl.tokens_per_epoch or not wl.tokens:
        return None
    per_step = wl.tokens * cfg.optim.grad_accum * max(1, est.world_size)
    return max(1, math.ceil(wl.tokens_per_epoch / per_step))
