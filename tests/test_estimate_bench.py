"""benchmarks/estimate_accuracy.py runs on the GPU machine; here: its CPU side (model folders,
exact-length data, configs, predictions, the Markdown table) with --dry-run, and its measuring
path on the tiny model."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from qvltune.config import parse_config

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "estimate_accuracy.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("estimate_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_cases_cover_the_required_matrix(bench):
    cases = [c for c in bench.CASES if c.size != "tiny"]
    assert {c.size for c in cases} >= {"2B", "8B"}
    assert {c.strategy for c in cases} >= {"lora", "full"}
    assert {c.checkpointing for c in cases} == {True, False}
    for c in cases:  # every case is a valid run config
        parse_config(bench.case_config(c, Path("/m"), Path("/d.jsonl"), 4096, Path("/w"), 8))


def test_dry_run(bench, tmp_path, tiny_model_dir, capsys):
    assert bench.main(["--dry-run", "--cases", "2b-lora,8b-full-z3-ckpt-2gpu", "--seq", "1024", "--steps", "2", "--work", str(tmp_path), "--out", str(tmp_path / "out"), "--gpu", "H200"]) == 0
    out = capsys.readouterr().out
    assert "| 2b-lora | 2B | lora | off | 2 | 1 |" in out and "| 8b-full-z3-ckpt-2gpu | 8B | full | on | 3 | 2 |" in out
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["case"] for r in rows] == ["2b-lora", "8b-full-z3-ckpt-2gpu"]
    assert all(r["predicted_gib"] > 1 and r["tokens"] > 784 for r in rows)
    # the model folder is the real shape with the tiny tokenizer's ids, loadable by transformers
    cfg = json.loads((tmp_path / "model-2b" / "config.json").read_text())
    assert cfg["text_config"]["hidden_size"] == 2048 and cfg["image_token_id"] < 2000


def test_markdown_error_column(bench):
    row = {"case": "x", "size": "2B", "strategy": "lora", "vision": None, "checkpointing": False, "stage": 2, "offload": False, "gpus": 1, "tokens": 4096, "predicted_gib": 22.0, "measured_gib": 20.0, "predicted_tokens_per_s": 1000.0, "tokens_per_s": 900.0}
    assert "| 22.0 | 20.0 | +10.0% | 1,000 | 900 |" in bench.markdown([row])


def test_refuses_to_measure_without_a_gpu(bench, capsys, monkeypatch):
    from qvltune import hardware

    monkeypatch.setattr(hardware, "_load_nvml", lambda: (_ for _ in ()).throw(ImportError("no pynvml")))
    assert bench.main(["--cases", "2b-lora"]) == 2 and "--dry-run" in capsys.readouterr().err
    assert bench.main(["--cases", "nope"]) == 2


@pytest.mark.slow
def test_measuring_path_trains_through_the_launcher_on_cpu(bench, tmp_path):
    """The GPU measurement's own path (validate, prepare_run, the deepspeed launcher, the metrics it
    polls), run for the tiny model on CPU so that it cannot break unseen between GPU sessions."""
    out = tmp_path / "out"
    shm_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    assert bench.main(["--allow-cpu", "--cases", "tiny-full", "--steps", "2", "--work", str(tmp_path), "--out", str(out)]) == 0
    (row,) = json.loads((out / "results.json").read_text())
    assert row["steps"] >= 2 and row["tokens_per_s"] > 0 and "error" not in row
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= shm_before, "the stopped ranks' shared-memory buffers must be removed"
