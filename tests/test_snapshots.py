"""What a user reads, pinned: the plan, the training panel in each of its states, and --help, at 80
and 160 columns (fixed-width Rich capture consoles, no terminal needed).

A snapshot is the exact text in tests/snapshots/. After an intended change, regenerate them with
``QVLTUNE_UPDATE_SNAPSHOTS=1 python -m pytest tests/test_snapshots.py`` and read the diff. Besides
the exact text, every snapshot must fit its width (no line longer) and, for the panel and the plan,
fit a 24-line terminal at 80 columns.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from qvltune.cli import app
from qvltune.dashboard import DashboardState, render
from qvltune.estimate_inputs import DatasetSummary, Machine
from qvltune.hardware import GpuInfo
from qvltune.model_stats import model_stats, resolve_model_config
from qvltune.plan import Answers, make_plan

SNAPSHOTS = Path(__file__).parent / "snapshots"
WIDTHS = (80, 160)


def check_snapshot(name: str, text: str, width: int, max_lines: int | None = None) -> None:
    too_wide = [line for line in text.splitlines() if len(line) > width]
    assert not too_wide, f"{name}: lines wider than {width}: {too_wide}"
    if max_lines is not None:
        assert len(text.splitlines()) <= max_lines, f"{name}: {len(text.splitlines())} lines, more than {max_lines}:\n{text}"
    path = SNAPSHOTS / f"{name}.txt"
    if os.environ.get("QVLTUNE_UPDATE_SNAPSHOTS"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no snapshot {path}: run with QVLTUNE_UPDATE_SNAPSHOTS=1 once and check it"
    assert text == path.read_text(), f"{name} changed (QVLTUNE_UPDATE_SNAPSHOTS=1 to accept):\n{text}"


def capture(width: int, draw) -> str:
    console = Console(width=width, file=io.StringIO(), record=True, color_system=None, force_terminal=False, highlight=False)
    draw(console)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines()) + "\n"


# ----------------------------------------------------------------------------------------------
# The plan (what `qvltune init` prints before asking to write the files)

TINY_DATA = DatasetSummary(records=100, p50=34, p99=47, longest=47, mean=34.25, tokens=3425, image_tokens=2400, max_images_per_record=1, suggested_max_seq_length=256, trained_tokens=300)
SHORT = DatasetSummary(records=3000, p50=300, p99=500, longest=520, mean=310.0, tokens=930_000, image_tokens=600_000, max_images_per_record=1, suggested_max_seq_length=768, trained_tokens=60_000)
CPU = Machine(None, 24 * 1024**3, 0, 1, 24 * 1024**3, None, False)
H200x8 = Machine("NVIDIA H200", 143771 * 1024**2, 8, 1, 2048 * 1024**3, 989.0)


def _plan(kind: str):
    from qvltune.catalog import builtin_config

    if kind == "tiny":
        answers = Answers(model="builtin:tiny", data="/data/train.jsonl")
        return make_plan(answers, CPU, model_stats(resolve_model_config("builtin:tiny")[0]), TINY_DATA), "builtin:tiny config.json", TINY_DATA
    answers = Answers(model="Qwen/Qwen3-VL-8B-Instruct", data="/data/train.jsonl", domain_shift=True)
    return make_plan(answers, H200x8, model_stats(builtin_config("8B")), SHORT), "built-in config of Qwen3-VL-8B", SHORT


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("kind", ["tiny", "8b"])
def test_plan(kind, width):
    from qvltune.cli.init import render_compact

    plan, source, data = _plan(kind)
    text = capture(width, lambda c: render_compact(plan, source, data, c))
    # the plan with the prompt below it fits an 80x24 terminal
    check_snapshot(f"plan-{kind}-{width}", text, width, max_lines=20)


# ----------------------------------------------------------------------------------------------
# The training panel in each state

T0 = 1_000_000.0


def _records(upto: int, max_steps: int = 45, every: int = 5):
    out = [{"kind": "start", "time": T0 + 20, "world_size": 1, "device": "cpu", "padding": 0.021}]
    for step in range(every, upto + 1, every):
        out.append({"kind": "train", "time": T0 + 20 + 2 * step, "step": step, "max_steps": max_steps, "epoch": step / 9, "loss": 2.0 / (1 + step / 10),
                    "lr": 2e-3 * (1 - step / max_steps), "grad_norm": 1.5 - step / 100, "tokens_per_s": 5000.0 + step, "samples_per_s": 60.0})
    return out


def _state(name: str) -> tuple[DashboardState, float]:
    state = DashboardState("demo", started=T0)
    if name == "starting":
        state.begin("starting DeepSpeed", T0)
        state.apply({"kind": "phase", "time": T0 + 9, "name": "loading the model"})
        return state, T0 + 21
    if name == "running":
        for r in _records(20):
            state.apply(r)
        state.apply({"kind": "checkpoint", "time": T0 + 61, "step": 20, "path": "qvltune-demo/runs/demo/checkpoint-20"})
        return state, T0 + 66
    if name == "evaluating":
        for r in _records(20):
            state.apply(r)
        state.apply({"kind": "phase", "time": T0 + 61, "name": "evaluating", "step": 20})
        return state, T0 + 64
    if name == "interrupted":
        for r in _records(20):
            state.apply(r)
        state.apply({"kind": "checkpoint", "time": T0 + 62, "step": 22, "path": "qvltune-demo/runs/demo/checkpoint-22"})
        state.apply({"kind": "end", "time": T0 + 63, "status": "interrupted", "step": 22, "epoch": 2.44, "message": "stopped on request; checkpoint saved", "last_checkpoint": "qvltune-demo/runs/demo/checkpoint-22"})
        return state, T0 + 63
    if name == "resumed":
        # `train --resume`: the parent reads the earlier attempt's records (qvltune.train.resume_state),
        # then tails this attempt's, starting with its start record
        import json
        import tempfile
        from types import SimpleNamespace

        from qvltune.train import resume_state

        earlier = [*_records(20), {"kind": "end", "time": T0 + 63, "status": "interrupted", "step": 22, "message": "stopped on request; checkpoint saved", "last_checkpoint": "qvltune-demo/runs/demo/checkpoint-22"}]
        with tempfile.TemporaryDirectory() as tmp:
            metrics = Path(tmp) / "metrics.jsonl"
            metrics.write_text("".join(json.dumps(r) + "\n" for r in earlier))
            state, tailer = resume_state(SimpleNamespace(name="demo"), metrics)
            assert tailer.read_new() == []  # the earlier lines are not printed again
        state.started = T0 + 100
        state.begin("starting DeepSpeed", T0 + 100)
        before_start = capture(80, lambda c: c.print(render(state, now=T0 + 101)))
        assert "interrupted" not in before_start and "stopped on request" not in before_start, before_start
        state.apply({"kind": "start", "time": T0 + 120, "world_size": 1, "device": "cpu", "padding": 0.021, "resumed_from": "qvltune-demo/runs/demo/checkpoint-22"})
        return state, T0 + 125
    if name == "finished":
        for r in _records(45):
            state.apply(r)
        state.apply({"kind": "eval", "time": T0 + 111, "step": 45, "eval_loss": 0.31, "eval_ppl": 1.36})
        state.apply({"kind": "end", "time": T0 + 115, "status": "completed", "step": 45, "epoch": 5.0, "train_loss": 0.9, "message": "45 steps, final model saved", "last_checkpoint": "qvltune-demo/runs/demo/checkpoint-45"})
        return state, T0 + 115
    if name == "stalled":
        # A step over 2x the median (qvltune.stalls), while checkpoint-25 is written in the background.
        for r in _records(25):
            state.apply(r)
        state.apply({"kind": "checkpoint", "time": T0 + 62, "step": 20, "path": "qvltune-demo/runs/demo/checkpoint-20", "seconds": 0.4, "background_seconds": 2.1})
        state.apply({"kind": "phase", "time": T0 + 70, "name": "saving checkpoint-25", "step": 25})
        state.apply({"kind": "save", "time": T0 + 71, "step": 25, "path": "qvltune-demo/runs/demo/checkpoint-25", "seconds": 0.5})
        state.apply({"kind": "stall", "time": T0 + 68, "step": 24, "seconds": 6.2, "median_s": 0.41, "ratio": 15.1, "gc_seconds": 0.0, "count": 1})
        return state, T0 + 76
    if name == "gpus":
        for r in _records(20):
            state.apply(r)
        state.gpus = [GpuInfo(i, "NVIDIA H200", 141 << 30, 80 << 30, 61 << 30, "9.0", 97, 61) for i in range(2)]
        return state, T0 + 66
    raise ValueError(name)


STATES = ["starting", "running", "evaluating", "interrupted", "resumed", "finished", "gpus", "stalled"]


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", STATES)
def test_panel(name, width):
    state, now = _state(name)
    text = capture(width, lambda c: c.print(render(state, now=now)))
    check_snapshot(f"panel-{name}-{width}", text, width, max_lines=24)


def test_a_new_start_record_clears_what_the_earlier_attempt_left():
    state = DashboardState("demo", started=T0)
    for r in _records(20):
        state.apply(r)
    state.apply({"kind": "end", "time": T0 + 63, "status": "interrupted", "step": 22, "message": "stopped on request; checkpoint saved", "hint": "resume"})
    state.apply({"kind": "start", "time": T0 + 120, "world_size": 1, "resumed_from": "runs/demo/checkpoint-22"})
    assert (state.status, state.hint, state.step) == ("training", None, 22) and state.message == "resuming from checkpoint-22 (step 22 of 45)"


def test_panel_states_say_what_is_happening():
    """The facts behind the snapshots, stated once (so a snapshot update cannot quietly drop them)."""
    text = {name: capture(80, lambda c, n=name: c.print(render(*_state(n)))) for name in STATES}
    assert "loading the model ... 0:12" in text["starting"]
    assert "· evaluating" in text["evaluating"] and "evaluating ... 0:03" in text["evaluating"]
    assert "· training (resumed)" in text["resumed"] and "resuming from checkpoint-22 (step 22 of 45)" in text["resumed"]
    assert "interrupted" not in text["resumed"] and "stopped on request" not in text["resumed"]
    resumed, _ = _state("resumed")
    assert resumed.max_steps == 45 and resumed.losses  # the earlier attempt's curve stays on the panel
    assert "· interrupted" in text["interrupted"] and "checkpoint-22" in text["interrupted"]
    assert "step 45/45" in text["finished"] and "epoch 5.00" in text["finished"] and "· completed" in text["finished"]
    assert "ETA -" not in text["running"]
    assert "stall: 1, the last at step 24: 6.2 s, 15.1x the median step (0.41 s)" in text["stalled"]
    assert "last checkpoint: qvltune-demo/runs/demo/checkpoint-20" in text["stalled"] and "writing checkpoint-25 in the background" in text["stalled"]
    assert "saving" not in text["stalled"]  # training goes on while the checkpoint is written


# ----------------------------------------------------------------------------------------------
# --help

COMMANDS = ["", "doctor", "check-data", "init", "estimate", "train", "merge", "predict", "eval", "demo"]


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("command", COMMANDS)
def test_help(command, width):
    result = CliRunner().invoke(app, [*command.split(), "--help"], prog_name="qvltune", env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    text = "\n".join(line.rstrip() for line in result.output.splitlines()) + "\n"
    assert "<bool>" not in text and "<str>" not in text and "…" not in text
    check_snapshot(f"help-{command or 'qvltune'}-{width}", text, width)
