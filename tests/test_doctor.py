"""`qvltune doctor`: every check on made-up facts (pure), and the command on this machine."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from fake_nvml import H200, V100, FakeNvml

from qvltune.cli import main
from qvltune.doctor import Facts, blockers, collect_facts, run_checks
from qvltune.hardware import GpuInfo
from qvltune.units import GiB


def gpu(name="NVIDIA H200", cc="9.0", used=0, total=140 * GiB, index=0):
    return GpuInfo(index, name, total, total - used, used, cc)


HEALTHY = Facts(
    python=(3, 11, 7),
    torch="2.10.0+cu128",
    torch_cuda="12.8",
    cuda_available=True,
    transformers="5.24.0",
    qwen3_vl=True,
    peft="0.21.2",
    deepspeed="0.19.8",
    cpu_adam=None,
    arch_list="9.0",
    gpus=[gpu(), gpu(index=1)],
    driver="570.86",
    driver_cuda="12.8",
    sdpa=True,
    varlen=True,
    flash_attn=None,
    triton="3.5.0",
    c_compiler="cc",
    disk_free=800 * GiB,
    shm_total=64 * GiB,
)


def statuses(facts):
    return {c.name: c.status for c in run_checks(facts)}


def test_healthy_gpu_machine_has_no_blocker():
    checks = run_checks(HEALTHY)
    assert not blockers(checks)
    s = {c.name: c for c in checks}
    assert s["gpus"].detail.startswith("2 x NVIDIA H200") and s["attention: varlen"].status == "ok"
    assert s["attention: flash-attn"].status == "info"  # optional
    assert s["compile"].status == "ok" and "compile" not in statuses(replace(HEALTHY, gpus=[]))  # CPU runs never compile


@pytest.mark.parametrize(
    "change, name, status, fix",
    [
        ({"python": (3, 9, 1)}, "python", "fail", "3.10"),
        ({"torch": None}, "torch", "fail", "pip install torch"),
        ({"torch": "2.1.0"}, "torch", "fail", "pip install -U torch"),
        ({"torch_cuda": None}, "torch", "fail", "--force-reinstall torch"),  # CPU-only build on a GPU machine
        ({"driver_cuda": "11.8"}, "torch", "fail", "update the NVIDIA driver"),
        ({"cuda_available": False}, "torch", "fail", "CUDA_VISIBLE_DEVICES"),
        ({"transformers": None}, "transformers", "fail", "transformers>=5.17"),
        ({"transformers": "4.57.1"}, "transformers", "fail", "transformers>=5.17"),
        ({"qwen3_vl": False}, "transformers", "fail", "transformers>=5.17"),
        ({"peft": None}, "peft", "fail", "peft>=0.17"),
        ({"peft": "0.13.0"}, "peft", "warn", "peft>=0.17"),
        ({"deepspeed": None, "deepspeed_error": "ImportError: libcudart.so"}, "deepspeed", "fail", "pip install"),
        ({"arch_list": "9.0a"}, "deepspeed ops", "warn", "export TORCH_CUDA_ARCH_LIST=9.0"),
        ({"triton": None}, "compile", "warn", "optim.compile: false"),
        ({"c_compiler": None}, "compile", "warn", "build-essential"),
        ({"arch_list": "8.0;9.0a"}, "deepspeed ops", "warn", "export TORCH_CUDA_ARCH_LIST=9.0"),
        ({"cpu_adam": "no compiler"}, "deepspeed ops", "warn", "build-essential"),
        ({"gpus": [gpu("Tesla V100-SXM2-32GB", "7.0")]}, "gpu 0 bf16", "warn", "optim.bf16: false"),
        ({"gpus": [gpu(used=60 * GiB)]}, "gpu 0 memory", "warn", "stop the other process"),
        ({"gpus": [], "nvml_note": "no NVIDIA GPU found"}, "gpus", "warn", "CPU mode"),
        ({"sdpa": False}, "attention: sdpa", "fail", "torch"),
        ({"varlen": False}, "attention: varlen", "info", "newer torch"),
        ({"disk_free": 2 * GiB}, "disk", "fail", "free space"),
        ({"disk_free": 50 * GiB}, "disk", "warn", "larger disk"),
        ({"shm_total": 64 * 1024**2}, "/dev/shm", "warn", "--shm-size"),
    ],
)
def test_each_problem_has_its_fix(change, name, status, fix):
    checks = {c.name: c for c in run_checks(replace(HEALTHY, **change))}
    c = checks[name]
    assert c.status == status, c
    assert fix in c.fix, c
    assert bool(blockers(list(checks.values()))) == (status == "fail")


def test_cpu_machine_with_a_cpu_torch_is_fine():
    s = statuses(replace(HEALTHY, torch_cuda=None, cuda_available=False, gpus=[], driver=None, driver_cuda=None, nvml_note="no NVIDIA GPU found"))
    assert s["torch"] == "ok" and s["gpus"] == "warn" and "fail" not in s.values()


def test_collect_facts_with_a_fake_nvml(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    f = collect_facts(tmp_path / "not-yet", nvml=FakeNvml([H200, V100]))
    assert [g.name for g in f.gpus] == ["NVIDIA H200", "Tesla V100-SXM2-32GB"] and f.driver_cuda == "12.4"
    assert f.torch and f.transformers and f.qwen3_vl and f.deepspeed and f.sdpa and f.disk_free > 0
    assert f.arch_list == "9.0a" and f.cpu_adam is None  # the op builder is not touched with 9.0a
    s = statuses(f)
    assert s["deepspeed ops"] == "warn" and s["gpu 1 bf16"] == "warn"


def test_doctor_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["doctor", "--json"])
    doc = json.loads(capsys.readouterr().out)
    names = {c["name"] for c in doc["checks"]}
    assert {"python", "torch", "transformers", "peft", "deepspeed", "deepspeed ops", "gpus", "attention: sdpa", "disk", "/dev/shm"} <= names
    assert e.value.code == (0 if doc["ok"] else 1) and doc["ok"] == all(c["status"] != "fail" for c in doc["checks"])
    with pytest.raises(SystemExit):
        main(["doctor"])
    out = capsys.readouterr().out
    assert "python" in out and ("ready" in out or "blocker" in out)
