"""The start-up clock shared by ``qvltune train`` and rank 0 (qvltune.phases): pure parts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qvltune.phases import PARENT_ENV, PhaseClock, format_phases, parent_env, process_started, split_first_step, worker_clock


def test_the_worker_continues_the_parents_clock():
    parent = PhaseClock(since=100.0)
    parent.mark("qvltune start (CLI, config, GPUs)", 101.0)
    parent.mark("config check", 101.5)
    parent.mark("data check and index", 104.0)
    env = parent_env(parent, 104.2)
    clock = worker_clock(110.0, env)  # the worker module's first line ran at 110
    clock.mark("process group and arguments", clock.since + 1.0)
    record = clock.record()
    names = [p["name"] for p in record["phases"]]
    assert names[:4] == ["qvltune start (CLI, config, GPUs)", "config check", "data check and index", "launch (run folder, command)"]
    assert names[4].startswith("launcher") and names[5].startswith("imports") and names[6] == "process group and arguments"
    seconds = {p["name"]: p["seconds"] for p in record["phases"]}
    assert seconds["data check and index"] == 2.5
    assert seconds[names[4]] == pytest.approx(110.0 - 104.2)
    # Consecutive phases: they add up to the whole wait, from the command's start.
    assert abs(sum(seconds.values()) - record["to_first_step"]) < 1e-2
    assert record["to_first_step"] == round(clock.since - 100.0, 3)


def test_without_the_parent_the_clock_starts_at_the_worker():
    clock = worker_clock(time.time() - 2.0, {PARENT_ENV: "not json"})
    assert [n for n, _ in clock.phases] == ["imports (torch, transformers, qvltune)"]
    assert 1.9 < clock.phases[0][1] < 5


def test_parallel_phases_are_listed_not_summed_and_the_line_is_readable():
    clock = PhaseClock(since=0.0)
    clock.mark("model load", 10.0)
    clock.add("data index (beside the model load)", 4.0)
    clock.mark("first step (compiling)", 40.0)
    record = clock.record()
    assert sum(p["seconds"] for p in record["phases"] if not p.get("parallel")) == record["to_first_step"]
    assert record["to_first_step"] == 40.0
    line = format_phases(record)
    assert line == "time to first step 40.0 s: model load 10.0 · data index (beside the model load) 4.0 (in parallel) · first step (compiling) 30.0"
    # The first step split: its compile and its wait for batches, the rest is the step's own work.
    record["first_step"] = split_first_step(30.0, compile_s=21.5, data_s=4.0)
    assert record["first_step"] == {"compile_s": 21.5, "data_s": 4.0, "rest_s": 4.5}
    assert format_phases(record).splitlines()[1:] == ["  first step: waiting for its batches 4.0 s · the step itself 4.5"]
    record["compile"] = {"graphs": 1, "tracing_s": 1.5, "aot_s": 2.0, "forward_s": 14.0, "backward_s": 4.0, "kernels_wait_s": 9.0,
                         "fx_hits": 0, "fx_misses": 2, "aot_hits": 0, "aot_misses": 1}
    assert format_phases(record).splitlines()[1:] == [
        "  first step: compiling 21.5 s · waiting for its batches 4.0 · the step itself 4.5",
        "  compile: 1 graph; Dynamo tracing 1.5 s · AOTAutograd 2.0 · forward 14.0 · backward 4.0 (waiting for kernels 9.0) · cache: Inductor 0 of 2, AOTAutograd 0 of 1 hit",
    ]
    record["compile"].update(kernels=45, cxx_runs=17, cxx_s=10.86)
    assert format_phases(record).splitlines()[2].endswith("AOTAutograd 0 of 1 hit · 45 kernels, C++ compiler 17 runs 10.9 s")
    record["compile"].update(cxx_runs=1, cxx_s=0.16)
    assert format_phases(record).splitlines()[2].endswith(" · 45 kernels, C++ compiler 1 run 0.2 s")
    record["compile"].update(kernels=None)  # a torch that does not count them: nothing said, not "0 kernels"
    assert format_phases(record).splitlines()[2].endswith("AOTAutograd 0 of 1 hit")


def test_process_started_is_when_this_process_was_started():
    """The command's own start-up (Python, imports) counts from the process's creation: within a
    clock tick of it, not up to a second early (whole-second boot time) or late."""
    started = process_started()
    assert started is not None and started <= time.time() and time.time() - started < 24 * 3600
    code = "import time; now = time.time(); from qvltune.phases import process_started; print(process_started(), now)"
    for _ in range(3):
        before = time.time()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
        child_started, first_line = map(float, out.stdout.split())
        assert before - 0.03 <= child_started <= first_line, (before, child_started, first_line)
