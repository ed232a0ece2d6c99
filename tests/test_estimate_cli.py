"""`qvltune estimate CONFIG`: the breakdown, fits / does not fit per GPU, --gpu flags, --json."""

from __future__ import annotations

import json

import pytest
import yaml
from fake_nvml import MACHINES, FakeNvml

from qvltune import hardware
from qvltune.cli import main


@pytest.fixture
def no_gpu(monkeypatch):
    class NoNvml:
        def nvmlInit(self):
            raise OSError("no driver")

    monkeypatch.setattr(hardware, "_load_nvml", lambda: NoNvml())


def write(tmp_path, demo_data, model="Qwen/Qwen3-VL-8B-Instruct", **over):
    train, _ = demo_data
    doc = {"name": "e", "model": {"path": model}, "data": {"train": str(train), "max_seq_length": 4096}, "strategy": "mixed"}
    for k, v in over.items():
        if isinstance(v, dict):
            doc.setdefault(k, {}).update(v)
        else:
            doc[k] = v
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    c = capsys.readouterr()
    return e.value.code, c.out, c.err


def test_estimate_for_another_gpu(tmp_path, demo_data, capsys, no_gpu):
    # packed rows of 4096 tokens: activations, not the optimizer step, set the peak
    code, out, _ = cli(["estimate", str(write(tmp_path, demo_data, data={"packing": True})), "--gpu", "H200"], capsys)
    assert code == 0, out
    for text in ("Parameters", "Memory per GPU", "weights", "optimizer states", "LLM activations", "loss (fused)", "peak allocated", "framework overhead", "fits", "time: ~"):
        assert text in out, text
    assert "each of 1 x NVIDIA H200: fits" in out


def test_does_not_fit_exits_1(tmp_path, demo_data, capsys, no_gpu):
    path = write(tmp_path, demo_data, model="Qwen/Qwen3-VL-32B-Instruct", strategy="full")
    code, out, err = cli(["estimate", str(path), "--gpu", "4090", "--gpu-count", "2"], capsys)
    assert code == 1 and "does not fit" in out and "Hint:" in err


def test_json(tmp_path, demo_data, capsys, no_gpu):
    code, out, _ = cli(["estimate", str(write(tmp_path, demo_data)), "--gpu-memory", "80", "--gpu-count", "8", "--json"], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["fits"] is True and doc["world_size"] == 8
    assert doc["per_gpu"] > doc["peak_allocated"] > 0 and doc["trainable_params"] < doc["total_params"]
    assert {t["name"] for t in doc["gpu_terms"]} >= {"weights", "gradients", "optimizer states"}


def test_detected_gpus_listed_one_by_one(tmp_path, demo_data, capsys, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(hardware, "_load_nvml", lambda: FakeNvml(MACHINES["4x A6000"]))
    code, out, _ = cli(["estimate", str(write(tmp_path, demo_data, model="Qwen/Qwen3-VL-2B-Instruct")), "--no-data"], capsys)
    assert code == 0 and all(f"GPU {i} NVIDIA RTX A6000: fits" in out for i in range(4))
    assert "time: not estimated" in out


def test_cpu_tiny(tmp_path, demo_data, capsys, no_gpu):
    path = write(tmp_path, demo_data, model="builtin:tiny", optim={"bf16": False, "optimizer": "adamw_torch"}, data={"max_seq_length": 256})
    code, out, err = cli(["estimate", str(path)], capsys)
    assert code == 0 and "Memory per process" in out and "on this CPU (1 process(es)): fits" in out
    assert "0.0 GFLOP" not in out and "MFLOP per token" in out  # a unit that leaves digits to read
    assert "no NVIDIA GPU" in err


def test_unknown_gpu_and_bad_model(tmp_path, demo_data, capsys, no_gpu):
    code, _, err = cli(["estimate", str(write(tmp_path, demo_data)), "--gpu", "MI300X"], capsys)
    assert code == 1 and "unknown GPU 'MI300X'" in err and "--gpu-memory" in err
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, _, err = cli(["estimate", str(write(tmp_path, demo_data, model=str(folder))), "--gpu", "H200"], capsys)
    assert code == 1 and "not Qwen3-VL" in err
