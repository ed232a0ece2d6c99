"""Stalls (a step over 2x the running median) and the garbage collector's control (qvltune.stalls)."""

from __future__ import annotations

import gc
import json
import time
import weakref

import pytest

from qvltune.dashboard import format_line
from qvltune.stalls import MIN_HISTORY, GcSchedule, GcTimer, StallDetector, collect, quiet_gc, thaw_gc


def test_a_step_over_twice_the_median_is_a_stall():
    d = StallDetector()
    for step in range(2, 2 + MIN_HISTORY):
        assert d.observe(step, 1.0 + 0.01 * step) is None
    assert d.observe(10, 2.0) is None  # under 2x the median (~1.04 s)
    stall = d.observe(11, 18.0, gc_seconds=0.25)
    assert stall == {"step": 11, "seconds": 18.0, "median_s": 1.035, "ratio": 17.39, "gc_seconds": 0.25, "count": 1}
    assert d.observe(12, 1.0) is None and d.observe(13, 9.0)["count"] == 2
    assert format_line({"kind": "stall", **stall}) == "stall: 1, the last at step 11: 18.0 s, 17.4x the median step (1.03 s); GC 0.2 s of it"


def test_no_stall_is_called_before_the_median_is_trusted():
    d = StallDetector()
    assert [d.observe(s, t) for s, t in enumerate([1.0, 30.0, 1.0], 2)] == [None] * 3


class SlowCollection(GcSchedule):
    """The collection at a step boundary takes its time (a full one after a compile: seconds at 8B)."""

    def after_step(self, step: int, graphs: int) -> float:
        time.sleep(0.3)
        return 0.3


def test_the_trainer_compares_the_fifth_step_and_times_steps_without_the_collection_between_them(tmp_path):
    """Step 5 of an 8B cold run took 2.7x its median and went unreported: the first step (compiling)
    has no start to be timed from, and the detector dropped the second as if it were the first. A
    step's time is from the previous step's end, after the collection between them, which is
    therefore in neither step (it was subtracted again: a step after a long collection read short)."""
    from types import SimpleNamespace

    from qvltune.metrics import MetricsWriter
    from qvltune.trainer import make_callback

    callback = make_callback(tmp_path, MetricsWriter(tmp_path / "metrics.jsonl"), None, None, SimpleNamespace(nan_policy="stop"))
    callback.trainer = SimpleNamespace(data_wait=0.0)
    callback.gc_schedule = SlowCollection()
    args = SimpleNamespace(device="cpu")
    callback._time_step(args, SimpleNamespace(global_step=1))  # the compiling first step's end
    for step, seconds in ((2, 0.55), (3, 0.56), (4, 0.55), (5, 1.49)):
        callback.last_step_end -= seconds  # the step took this long
        callback._time_step(args, SimpleNamespace(global_step=step))
    assert list(callback.stall_detector.history) == pytest.approx([0.55, 0.56, 0.55, 1.49], abs=0.02)
    stall = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"stall"' in line]
    assert [(r["step"], r["ratio"]) for r in stall] == [(5, pytest.approx(2.71, abs=0.05))]


def test_quiet_gc_takes_the_setup_out_of_every_later_collection():
    timer = GcTimer()
    try:
        setup = [[i] for i in range(200_000)]  # a model's, tokenizer's and index's long-lived objects
        tracked = len(gc.get_objects())
        quiet_gc()
        assert gc.isenabled() and gc.get_freeze_count() >= len(setup)
        assert len(gc.get_objects()) < tracked - len(setup)  # what a full collection walks from now on
        for _ in range(1000):  # garbage cycles made by training
            a = []
            a.append(a)
        timer.take()
        seconds = collect()
        assert seconds > 0 and gc.get_count()[0] < 100 and timer.take() > 0
    finally:
        gc.unfreeze()
        timer.close()


def test_the_stall_line_names_what_explains_it():
    line = format_line({"kind": "stall", "step": 40, "seconds": 18.0, "median_s": 6.0, "ratio": 3.0, "gc_seconds": 0.0, "data_wait_s": 11.5, "new_graphs": 2, "count": 3})
    assert line == "stalls: 3, the last at step 40: 18.0 s, 3.0x the median step (6.00 s); waited 11.5 s for data; 2 recompilation(s)"


def test_what_a_compile_makes_is_frozen_and_collections_wait_for_their_step():
    schedule = GcSchedule(every=50)
    try:
        quiet_gc()
        compiled = [[i] for i in range(100_000)]  # torch.compile's graphs, guards and code: alive for the run
        assert len(gc.get_objects()) >= len(compiled)
        schedule.after_step(1, graphs=4)  # the first step compiled four graphs
        assert len(gc.get_objects()) < 1_000  # no later collection walks them
        more = [[i] for i in range(10_000)]  # a step that made no graph: nothing frozen, no collection yet
        frozen = gc.get_freeze_count()
        assert schedule.after_step(2, graphs=4) == 0.0
        # Not frozen: still in the generations a collection walks. (The freeze count alone is no
        # test: a frozen object that dies leaves it, so it can fall while the step runs.)
        assert len(gc.get_objects()) >= len(more) and gc.get_freeze_count() <= frozen
        assert schedule.after_step(50, graphs=4) > 0  # the regular collection, at a step boundary
        schedule.after_step(51, graphs=5)  # a recompilation: frozen again
        assert gc.get_freeze_count() >= frozen + len(more)
    finally:
        gc.unfreeze()


def test_a_batch_in_a_reference_cycle_frozen_at_a_compiling_step_is_freed_at_the_runs_end():
    """Objects a step made that are still alive at a freeze (the step compiled) are never collected
    while frozen, even once unreachable: a batch in a reference cycle would keep its tensors for the
    run. thaw_gc (training's end, before the final save) frees them."""

    class Batch:  # a batch that refers to itself (e.g. through a hook or a closure)
        pass

    schedule = GcSchedule(every=50)
    try:
        quiet_gc()
        batch = Batch()
        batch.self = batch
        alive = weakref.ref(batch)
        schedule.after_step(1, graphs=3)  # the step compiled: everything alive is frozen, the batch too
        del batch
        schedule.after_step(50, graphs=3)  # the regular collection does not reach it
        gc.collect()
        assert alive() is not None
        thaw_gc()
        assert alive() is None
    finally:
        gc.unfreeze()


def test_the_data_loaders_workers_are_stopped_when_training_ends():
    """Persistent workers live as long as their loader; told nothing, torch's exit handler waits 5 s
    for each before it kills it (21 s at the end of an 8B run on the H200). close_data_loaders stops
    them, for the Accelerator's loaders and the Trainer's cached eval loaders alike."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader

    from qvltune.training_data import close_data_loaders

    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    train = accelerator.prepare(DataLoader(list(range(64)), batch_size=2, num_workers=2, persistent_workers=True))  # as the Trainer's
    evals = DataLoader(list(range(64)), batch_size=2, num_workers=2, persistent_workers=True)
    next(iter(train)), next(iter(evals))  # mid-epoch: the workers are busy prefetching
    owners = [train.base_dataloader, evals]  # the Accelerator's wrapper passes reads through to the loader it wraps
    workers = [w for loader in owners for w in loader._iterator._workers]
    assert len(workers) == 4 and all(w.is_alive() for w in workers)
    trainer = SimpleNamespace(accelerator=accelerator, _eval_dataloaders={"eval": evals})
    assert close_data_loaders(trainer) == 2
    assert not any(w.is_alive() for w in workers) and all(loader._iterator is None for loader in owners)


def test_the_reported_rate_leaves_out_the_evals_and_saves_since_the_last_record(tmp_path):
    """10 s since the last train record, 6 s of them an eval and 1 s a save: 30,000 tokens were
    trained in 3 s, 10,000 tok/s (not 3,000, which the panel showed after every eval)."""
    from types import SimpleNamespace

    from qvltune.data.packing import BatchStats
    from qvltune.metrics import MetricsWriter
    from qvltune.trainer import make_callback

    callback = make_callback(tmp_path, MetricsWriter(tmp_path / "metrics.jsonl"), None, None, SimpleNamespace(nan_policy="stop"))
    callback.trainer = SimpleNamespace(stats=BatchStats(0, 0, 0, 0), eval_seconds=6.0, save_seconds=1.0)
    args, state = SimpleNamespace(device="cpu"), SimpleNamespace(global_step=20, max_steps=40, epoch=0.5)
    callback.last_time = time.time() - 10.0
    callback.on_log(args, state, None, logs={"eval_loss": 1.0})
    callback.on_save(args, state, None)
    callback.trainer.stats = BatchStats(30_000, 30_000, 40, 9_000)
    callback.on_log(args, state, None, logs={"loss": 1.0})
    train = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"train"' in line][-1]
    assert train["tokens_per_s"] == pytest.approx(10_000, rel=0.01) and train["samples_per_s"] == pytest.approx(40 / 3, rel=0.01)
    callback.trainer.stats = BatchStats(60_000, 60_000, 80, 18_000)
    callback.last_time = time.time() - 3.0  # the next interval: no eval, no save
    callback.on_log(args, state, None, logs={"loss": 1.0})
    train = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"train"' in line][-1]
    assert train["tokens_per_s"] == pytest.approx(10_000, rel=0.01)  # what was left out is not left out again


def test_a_recompilation_is_named_by_the_guard_that_failed():
    """Dynamo's own reason for compiling again is kept for the stall record and the panel's line."""
    import torch

    from qvltune.stalls import take_recompile_reasons, watch_recompiles

    watch_recompiles()
    take_recompile_reasons()
    f = torch.compile(lambda x: (x * 2).sin(), dynamic=True, backend="eager")
    x = torch.randn(8, requires_grad=True)
    f(x)
    assert take_recompile_reasons() == []  # the first compile is no recompilation
    with torch.no_grad():  # as the first evaluation after training steps
        f(x)
    reasons = take_recompile_reasons()
    assert any("grad_mode" in r for r in reasons) and take_recompile_reasons() == []
    record = {"step": 5, "seconds": 14.9, "median_s": 5.5, "ratio": 2.7, "count": 1, "new_graphs": 1, "recompiled": reasons}
    assert format_line({"kind": "stall", **record}).endswith(f"1 recompilation(s) ({reasons[0][:80]})")


def test_the_evaluations_own_graph_is_not_blamed_on_the_next_step(tmp_path):
    """The first evaluation compiles its own graph (no gradients). A slow step after it is a stall,
    but not a recompilation: neither the new graph nor Dynamo's reason for it is counted there."""
    from types import SimpleNamespace

    import torch

    from qvltune.metrics import MetricsWriter
    from qvltune.stalls import take_recompile_reasons, watch_recompiles
    from qvltune.trainer import make_callback

    watch_recompiles()
    callback = make_callback(tmp_path, MetricsWriter(tmp_path / "metrics.jsonl"), None, None, SimpleNamespace(nan_policy="stop"))
    callback.trainer = SimpleNamespace(eval_seconds=2.0, data_wait=0.0)
    args = SimpleNamespace(device="cpu")
    f = torch.compile(lambda x: (x * 3).cos(), dynamic=True, backend="eager")
    x = torch.randn(8, requires_grad=True)
    f(x)  # the training graph, at the first step
    callback._time_step(args, SimpleNamespace(global_step=1))
    for _ in range(MIN_HISTORY + 1):  # steps of 1 s
        callback.last_step_end = time.time() - 1.0
        callback._time_step(args, SimpleNamespace(global_step=2))
    with torch.no_grad():  # the evaluation compiles its graph
        f(x)
    callback.on_log(args, SimpleNamespace(global_step=8), None, logs={"eval_loss": 1.0})
    callback.last_step_end = time.time() - 5.0 - callback.between_steps  # a 5 s step after it
    callback._time_step(args, SimpleNamespace(global_step=9))
    stall = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"stall"' in line][-1]
    assert stall["step"] == 9 and stall["new_graphs"] == 0 and stall["recompiled"] == []
    assert take_recompile_reasons() == []
