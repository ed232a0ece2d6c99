"""The live panel is a pure render of its state (checked on a fixed-width console), and the
metrics file is the only interface between worker and dashboard."""

from __future__ import annotations

import json

from rich.console import Console

from qvltune.dashboard import DashboardState, format_line, render, sparkline
from qvltune.hardware import GpuInfo
from qvltune.metrics import MetricsTailer, MetricsWriter


def capture(renderable, width=100) -> str:
    console = Console(width=width, record=True, color_system=None, force_terminal=False)
    console.print(renderable)
    return console.export_text()


def test_render_shows_everything_a_run_needs():
    state = DashboardState("demo", started=1000.0)
    records = [
        {"kind": "start", "time": 1000.0, "world_size": 2, "device": "NVIDIA H200", "padding": 0.013},
        {"kind": "train", "time": 1010.0, "step": 10, "max_steps": 100, "epoch": 0.1, "loss": 2.5, "lr": 1e-4, "grad_norm": 1.2, "tokens_per_s": 25000.0, "samples_per_s": 30.0, "mfu": 0.41, "mem_peak_gb": 55.0},
        {"kind": "train", "time": 1020.0, "step": 20, "max_steps": 100, "epoch": 0.2, "loss": 1.5, "lr": 9e-5, "grad_norm": 0.9, "tokens_per_s": 26000.0, "samples_per_s": 31.0, "mfu": 0.42, "mem_peak_gb": 55.0},
        {"kind": "eval", "time": 1021.0, "step": 20, "eval_loss": 1.7, "eval_ppl": 5.47},
        {"kind": "checkpoint", "time": 1022.0, "step": 20, "path": "runs/demo/checkpoint-20"},
    ]
    for r in records:
        state.apply(r)
    state.gpus = [GpuInfo(i, "NVIDIA H200", 141 << 30, 80 << 30, 61 << 30, "9.0", 97, 61) for i in range(2)]
    text = capture(render(state, now=1030.0))
    for expected in ("step 20/100", "epoch 0.20", "1.5000", "1.7000 (ppl 5.47)", "9.00e-05", "0.900", "26,000 tok/s", "42.0%", "1.3%", "runs/demo/checkpoint-20", "NVIDIA H200", "61.0/141 GiB", "97%", "ETA 1:20", "elapsed 0:30"):
        assert expected in text, (expected, text)
    assert text.count("NVIDIA H200") == 2  # every GPU


def test_render_before_any_metrics_and_after_failure():
    state = DashboardState("x", started=0.0)
    assert "starting" in capture(render(state, now=5.0))
    state.apply({"kind": "end", "status": "nan", "step": 7, "message": "loss became NaN/inf at step 7"})
    text = capture(render(state, now=6.0))
    assert "nan" in text and "loss became NaN/inf at step 7" in text


def test_format_line_and_sparkline():
    line = format_line({"kind": "train", "step": 5, "max_steps": 10, "epoch": 0.5, "loss": 1.23456, "lr": 1e-3, "grad_norm": 2.0, "tokens_per_s": 1234.5, "mfu": None})
    assert line == "step 5/10 epoch 0.50 loss 1.2346 lr 1.00e-03 grad_norm 2.000 tok/s 1,234"
    assert format_line({"kind": "nothing"}) is None
    assert sparkline([3, 2, 1]) == "█▅▁" and sparkline([]) == ""  # 0.5 rounds up to the 5th of 8 levels


def test_metrics_writer_and_tailer_only_complete_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer, tailer = MetricsWriter(path), MetricsTailer(path)
    assert tailer.read_new() == []
    writer.write("train", step=1, loss=2.0)
    with open(path, "a") as f:
        f.write('{"kind": "train", "step": 2')  # a line still being written
    got = tailer.read_new()
    assert [r["step"] for r in got] == [1]
    with open(path, "a") as f:
        f.write(', "loss": 1.0}\n')
    assert [r["step"] for r in tailer.read_new()] == [2]
    assert json.loads(path.read_text().splitlines()[0])["kind"] == "train"


def test_a_checkpoint_line_says_where_the_wait_went():
    record = {
        "kind": "checkpoint", "step": 6, "path": "runs/x/checkpoint-6", "seconds": 1.32, "background_seconds": 4.9,
        "parts": {"previous save": 0.0, "ranks meet": 0.01, "model files": 0.6, "DeepSpeed state to host": 0.7, "other": 0.01},
    }
    line = format_line(record)
    assert line == "checkpoint saved: runs/x/checkpoint-6 (training waited 1.3 s: model files 0.6 s, DeepSpeed state to host 0.7 s; written beside it in 4.9 s)"
    assert format_line({**record, "parts": None}) == "checkpoint saved: runs/x/checkpoint-6 (training waited 1.3 s; written beside it in 4.9 s)"
