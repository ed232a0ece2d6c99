"""Where the time to the first training step goes: one clock shared by ``qvltune train`` and rank 0.

The parent times its own work (its start, the config check, the data check) and hands the marks to
the ranks in ``QVLTUNE_PARENT_PHASES`` (JSON) with the moment it started the launcher. Rank 0 goes
on marking its phases (the launcher, imports, the process group, the processor and data index, the
model, the trainer, DeepSpeed's engine, the first step) and writes them all as one ``phases``
record of metrics.jsonl when the first step ends. The run log, the end summary of ``qvltune train``
and benchmarks/gpu_flow.py show that record.

Torch-free: the parent imports it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

PARENT_ENV = "QVLTUNE_PARENT_PHASES"


def process_started() -> float | None:
    """When this process was created (wall clock, Linux /proc), else None: the command's own
    start-up (Python, imports, the CLI) counts in the time a user waits."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 (starttime): clock ticks since boot, counted after the ") "
        # How long ago that was, on the same clock (CLOCK_BOOTTIME), taken from the wall clock now.
        # Not /proc/stat's btime: whole seconds, so a start up to 1 s too early (measured: 0.8 s of a
        # 0.09 s Python start), and blind to the wall clock's adjustments since boot.
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):  # no /proc, or no CLOCK_BOOTTIME (not Linux)
        return None


@dataclass
class PhaseClock:
    """Named, consecutive phases: ``mark(name)`` closes the phase that ran since the last mark."""

    since: float = field(default_factory=time.time)
    phases: list[tuple[str, float]] = field(default_factory=list)
    started: float | None = None  # when the first phase began (the command)
    parallel: set[str] = field(default_factory=set)  # phases that ran beside the others (``add``)

    def __post_init__(self) -> None:
        if self.started is None:
            self.started = self.since

    def mark(self, name: str, now: float | None = None) -> float:
        now = time.time() if now is None else now
        self.phases.append((name, max(0.0, now - self.since)))
        self.since = now
        return now

    def add(self, name: str, seconds: float) -> None:
        """A phase that ran beside the others (in a thread): listed, not added to the total."""
        self.phases.append((name, seconds))
        self.parallel.add(name)

    def record(self) -> dict[str, Any]:
        """The ``phases`` record's fields."""
        rows = [{"name": n, "seconds": round(s, 3), **({"parallel": True} if n in self.parallel else {})} for n, s in self.phases]
        return {"phases": rows, "to_first_step": round(self.since - self.started, 3)}


def parent_env(clock: PhaseClock, now: float | None = None) -> dict[str, str]:
    """What the parent hands the ranks as it starts the launcher: its phases (closed now) and when."""
    launched = clock.mark("launch (run folder, command)", now)
    return {PARENT_ENV: json.dumps({"started": clock.started, "phases": clock.phases, "launched": launched})}


def worker_clock(module_loaded: float, environ: dict[str, str] | None = None) -> PhaseClock:
    """Rank 0's clock, continuing the parent's (when it was started by ``qvltune train``): the
    launcher phase runs from the parent's launch to this module's first line, the imports from there
    to now."""
    environ = os.environ if environ is None else environ
    try:
        parent = json.loads(environ.get(PARENT_ENV, ""))
        clock = PhaseClock(since=float(parent["started"]), started=float(parent["started"]))
        clock.phases = [(str(n), float(s)) for n, s in parent["phases"]]
        clock.since = float(parent["launched"])
        clock.mark("launcher (rank processes, Python start)", module_loaded)
    except (ValueError, KeyError, TypeError):  # started by hand (launch.sh): from this process on
        clock = PhaseClock(since=module_loaded)
    clock.mark("imports (torch, transformers, qvltune)")
    return clock


def split_first_step(seconds: float, compile_s: float, data_s: float) -> dict[str, float]:
    """The first step's phase in parts: compiling (Dynamo and Inductor, all graphs), waiting for its
    batches (the Trainer's fetches: the data loader's first batches), and the rest (the step's own
    work: its forward and backward, the optimizer step, the first allocations; and the data loader
    starting its workers)."""
    return {"compile_s": round(compile_s, 3), "data_s": round(data_s, 3), "rest_s": round(max(0.0, seconds - compile_s - data_s), 3)}


def format_phases(record: dict[str, Any], width: int = 0) -> str:
    """``time to first step 41.2 s: config check 0.8 · data check 3.1 · ...``, then a line splitting
    the first step and, with compiled layers, one splitting its compile (each indented by two spaces)."""
    parts = []
    for p in record.get("phases", []):
        if p["seconds"] < 0.05 and not p.get("parallel"):
            continue
        parts.append(f"{p['name']} {p['seconds']:.1f}" + (" (in parallel)" if p.get("parallel") else ""))
    line = f"time to first step {record.get('to_first_step', 0):.1f} s: " + " · ".join(parts)
    split = record.get("first_step")
    if split:
        parts = [("compiling", split["compile_s"])] if record.get("compile") else []
        parts += [("waiting for its batches", split["data_s"]), ("the step itself", split["rest_s"])]
        line += "\n  first step: " + " · ".join(f"{name} {s:.1f}" + (" s" if i == 0 else "") for i, (name, s) in enumerate(parts))
    return line + ("\n  " + format_compile(record["compile"]) if record.get("compile") else "")


def format_compile(breakdown: dict[str, Any]) -> str:
    """The first step's compile (``qvltune.compile_cache.compile_breakdown``), one line:
    ``compile: 1 graph; Dynamo tracing 1.2 s · AOTAutograd 2.0 · forward 13.6 · backward 7.7
    (waiting for kernels 11.3) · cache: Inductor 0 of 2, AOTAutograd 0 of 2 hit · 45 kernels, C++
    compiler 17 runs 10.9 s`` (the kernels part from a torch that counts them)."""
    b = breakdown
    graphs = f"{b['graphs']} graph" + ("s" if b["graphs"] != 1 else "")
    runs = f"{b.get('cxx_runs', 0)} run" + ("s" if b.get("cxx_runs") != 1 else "")
    generated = f" · {b['kernels']} kernels, C++ compiler {runs} {b['cxx_s']:.1f} s" if b.get("kernels") is not None else ""
    return (
        f"compile: {graphs}; Dynamo tracing {b['tracing_s']:.1f} s · AOTAutograd {b['aot_s']:.1f} · forward {b['forward_s']:.1f}"
        f" · backward {b['backward_s']:.1f} (waiting for kernels {b['kernels_wait_s']:.1f}) · cache: Inductor {b['fx_hits']} of"
        f" {b['fx_hits'] + b['fx_misses']}, AOTAutograd {b['aot_hits']} of {b['aot_hits'] + b['aot_misses']} hit{generated}"
    )
