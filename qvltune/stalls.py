"""Slow training steps ("stalls") and the garbage collector's part in them.

A stall is an optimizer step that took more than ``STALL_FACTOR`` times the median of the steps
before it, its evaluation, save and logging excluded (they are reported on their own). The worker
writes a ``stall`` record for each (the panel shows the last one) with what can explain it: the time
the garbage collector ran during that step, the time it waited for its batches (data loader), and
how many new graphs torch.compile made in it (a recompilation) and the guards whose failure caused
them (Dynamo's own reasons, ``watch_recompiles``).

The GC: Python's cyclic collector is triggered by allocation counts, at any moment of a step, and a
full (generation 2) collection traverses every live object: after a VLM, its tokenizer, DeepSpeed
and the data index are loaded, that is millions of objects and can take seconds, at random steps.
``quiet_gc`` freezes everything alive after the setup (``gc.freeze``: never traversed again, and
shared copy-on-write with the data loader's forked workers), so the collections that still happen
only walk what training made since. torch.compile makes its own long-lived objects at the first step
(FX graphs, guards, generated code: ~155k objects for the tiny model's layers, a full collection of
them 28 ms on the development CPU; more at real size), so ``GcSchedule`` freezes again after every
step that compiled. Between those, it collects every ``GC_EVERY_STEPS`` steps at a step boundary,
outside the timed part of a step, so the young generations stay small: not every log step, since
with one log per step (short runs) a collection per step cost a measurable share of each step.
Automatic collection stays on: data loader workers (forked later) need it. Frozen objects are never
collected, even once unreachable (a batch in a reference cycle alive at a freeze keeps its tensors):
``thaw_gc`` unfreezes and collects them once training ends, before the final model is saved.
"""

from __future__ import annotations

import gc
import logging
import os
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

STALL_FACTOR = 2.0
MIN_HISTORY = 3  # steps before a median is trusted (5 missed a 14.9 s step 5 of an 8B run, 2.7x its median)
WINDOW = 200  # the median is over the last WINDOW steps (a run's pace drifts)
GC_EVERY_STEPS = 50


@dataclass
class StallDetector:
    """``observe(step, seconds)`` -> the stall record's fields when that step was a stall, else None.
    The trainer observes every step from the second: the first (compilation, warm-up) has no
    previous step's end to be timed from, so it is neither a stall nor part of the median."""

    factor: float = STALL_FACTOR
    history: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    stalls: int = 0

    def observe(self, step: int, seconds: float, gc_seconds: float = 0.0) -> dict | None:
        stall = None
        if len(self.history) >= MIN_HISTORY:
            median = statistics.median(self.history)
            if median > 0 and seconds > self.factor * median:
                self.stalls += 1
                stall = {"step": step, "seconds": round(seconds, 3), "median_s": round(median, 3), "ratio": round(seconds / median, 2), "gc_seconds": round(gc_seconds, 3), "count": self.stalls}
        self.history.append(seconds)
        return stall


class GcTimer:
    """Seconds the cyclic collector ran (automatic or not) since the last ``take()``."""

    def __init__(self):
        self.total = 0.0
        self._started: float | None = None
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.total += time.perf_counter() - self._started
            self._started = None

    def take(self) -> float:
        seconds, self.total = self.total, 0.0
        return seconds

    def close(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)


def compiled_graphs() -> int:
    """Graphs torch.compile has produced in this process (Dynamo's counter; 0 before any compile)."""
    import sys

    utils = sys.modules.get("torch._dynamo.utils")  # never imports Dynamo for an uncompiled run
    return int(utils.counters["stats"]["unique_graphs"]) if utils is not None else 0


class RecompileReasons(logging.Handler):
    """The guards whose failure made torch.compile compile again, from Dynamo's ``recompiles`` log
    (e.g. ``GLOBAL_STATE changed: grad_mode`` for the first evaluation, ``tensor 'x' size mismatch at
    index 1`` for a shape a graph did not cover), kept until ``take``n."""

    LOGGERS = ("torch._dynamo.guards.__recompiles", "torch._dynamo.guards.__recompiles_verbose")

    def __init__(self):
        super().__init__()
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # "Recompiling function forward in ...:89\n    triggered by the following guard failure(s):\n    - 0/0: <reason>"
        self.reasons += [line.strip()[2:] for line in record.getMessage().splitlines() if line.strip().startswith("- ")]

    def take(self) -> list[str]:
        reasons, self.reasons = self.reasons, []
        return reasons


_recompiles: RecompileReasons | None = None


def watch_recompiles() -> None:
    """Keep Dynamo's reasons for every recompilation (they also go to train.log). Turns its
    ``recompiles`` log on unless TORCH_LOGS is set: then the user chose the logs (torch ignores
    set_logs under TORCH_LOGS), and the reasons are kept only if they include recompiles."""
    global _recompiles
    if _recompiles is not None:
        return
    if "TORCH_LOGS" not in os.environ:
        try:  # torch._logging is torch's private API: a torch that changed it only loses the log
            import torch._logging

            torch._logging.set_logs(recompiles=True)
        except Exception as e:
            print(f"qvltune: recompilations will not be logged ({type(e).__name__}: {e})", flush=True)
    _recompiles = RecompileReasons()
    for name in RecompileReasons.LOGGERS:
        logging.getLogger(name).addHandler(_recompiles)


def take_recompile_reasons() -> list[str]:
    """The failed guards since the last call ([] when nothing recompiled or nothing is watched)."""
    return _recompiles.take() if _recompiles is not None else []


def quiet_gc() -> None:
    """After the setup, before the first step: collect once and freeze the survivors (see the
    module docstring)."""
    gc.collect()
    gc.freeze()


def thaw_gc() -> float:
    """Training ended: unfreeze what ``quiet_gc`` and ``GcSchedule`` froze and collect it once (what
    became unreachable since, e.g. a batch's tensors in a reference cycle, is freed). Its seconds."""
    gc.unfreeze()
    return collect()


def collect() -> float:
    """One full collection of what training made since the freeze; returns its seconds."""
    started = time.perf_counter()
    gc.collect()
    return time.perf_counter() - started


@dataclass
class GcSchedule:
    """What the collector does at a step boundary; ``after_step`` returns the seconds it took (the
    caller keeps them out of the step's own time). ``graphs`` is ``compiled_graphs()`` now."""

    every: int = GC_EVERY_STEPS
    graphs: int = 0

    def after_step(self, step: int, graphs: int) -> float:
        compiled, self.graphs = graphs > self.graphs, graphs
        if compiled:  # this step compiled: its graphs and guards live as long as the run
            started = time.perf_counter()
            quiet_gc()
            return time.perf_counter() - started
        if step % self.every == 0:
            return collect()
        return 0.0

