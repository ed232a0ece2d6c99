"""The NVML inventory, on a fake NVML (the only thing faked): GPUs, bf16, CUDA_VISIBLE_DEVICES, no NVML."""

from __future__ import annotations

import pytest
from fake_nvml import H200, MACHINES, V100, FakeNvml, NoNvml

from qvltune import hardware
from qvltune.estimate_inputs import Machine
from qvltune.hardware import detect_gpus, inventory, known_gpu, peak_tflops, planned_gpus, planned_inventory
from qvltune.units import GiB


@pytest.mark.parametrize(
    "machine, count, name, memory_gib, cc, tflops",
    [
        ("8x A100-80GB", 8, "NVIDIA A100-SXM4-80GB", 80.0, "8.0", 312.0),
        ("1x RTX 4090", 1, "NVIDIA GeForce RTX 4090", 23.99, "8.9", 165.0),
        ("4x A6000", 4, "NVIDIA RTX A6000", 47.99, "8.6", 155.0),
        ("1x H200", 1, "NVIDIA H200", 140.4, "9.0", 989.0),
    ],
)
def test_detects_each_machine(machine, count, name, memory_gib, cc, tflops, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = FakeNvml(MACHINES[machine], used_mib=1024)
    gpus, driver, cuda, note = detect_gpus(fake)
    assert len(gpus) == count and note is None
    assert [g.index for g in gpus] == list(range(count))
    g = gpus[0]
    assert g.name == name and g.compute_capability == cc and g.bf16
    assert g.memory_total_gb == pytest.approx(memory_gib, abs=0.01)
    assert g.memory_used == GiB and g.memory_free == g.memory_total - GiB
    assert g.utilization == 37 and g.temperature == 41
    assert g.peak_tflops == tflops
    assert driver == "550.54.15" and cuda == "12.4"
    assert fake.shutdowns == 1


def test_bytes_names_and_no_bf16_before_ampere(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpus, driver, _, _ = detect_gpus(FakeNvml([V100, H200], bytes_names=True))
    assert [g.name for g in gpus] == ["Tesla V100-SXM2-32GB", "NVIDIA H200"] and driver == "550.54.15"
    assert [g.bf16 for g in gpus] == [False, True]


def test_cuda_visible_devices_selects_and_renumbers(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,9")
    gpus, *_ = detect_gpus(FakeNvml(MACHINES["4x A6000"]))
    assert [g.index for g in gpus] == [0, 1]


@pytest.mark.parametrize("fake", [NoNvml(), FakeNvml([], cuda=12040), FakeNvml([H200], fail_on="nvmlDeviceGetHandleByIndex")])
def test_no_gpu_means_empty_inventory_and_a_note(fake, tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    inv = inventory(tmp_path, nvml=fake)
    assert inv.gpus == [] and inv.gpu_count == 0
    assert "CPU mode" in inv.note
    assert inv.host.cpus >= 1 and inv.host.ram_total > 0 and inv.host.disk_free > 0


def test_missing_pynvml_is_not_a_crash(monkeypatch):
    def missing():
        raise ImportError("No module named 'pynvml'")

    monkeypatch.setattr(hardware, "_load_nvml", missing)
    gpus, driver, cuda, note = detect_gpus()
    assert gpus == [] and driver is None and "ImportError" in note


def test_host_disk_of_a_folder_not_yet_created(tmp_path):
    assert hardware.host_info(tmp_path / "a" / "b").disk_free > 0


@pytest.mark.parametrize(
    "name, canonical, memory_gib, cc",
    [
        ("H200", "NVIDIA H200", 140.4, "9.0"),
        ("h100", "NVIDIA H100 80GB HBM3", 79.6, "9.0"),
        ("A100", "NVIDIA A100-SXM4-80GB", 80.0, "8.0"),
        ("A100-40GB", "NVIDIA A100-SXM4-40GB", 40.0, "8.0"),
        ("NVIDIA RTX A6000", "NVIDIA RTX A6000", 48.0, "8.6"),
        ("4090", "NVIDIA GeForce RTX 4090", 24.0, "8.9"),
        ("GH200", "NVIDIA GH200 96GB", 95.6, "9.0"),
        ("T4", "Tesla T4", 15.0, "7.5"),
    ],
)
def test_known_gpus_by_name(name, canonical, memory_gib, cc):
    got = known_gpu(name)
    assert got[0] == canonical and got[1] / GiB == pytest.approx(memory_gib, abs=0.1) and got[2] == cc


def test_planned_gpus():
    gpus = planned_gpus("H200", 8)
    assert len(gpus) == 8 and all(g.memory_free == g.memory_total for g in gpus) and gpus[0].peak_tflops == 989.0
    assert planned_gpus("H200", 1, memory_gb=100)[0].memory_total == 100 * GiB
    assert planned_gpus(None, 2, memory_gb=48)[0].bf16
    with pytest.raises(ValueError, match="unknown GPU 'MI300X'.*H200"):
        planned_gpus("MI300X", 1)
    inv = planned_inventory("4090", 2)
    assert inv.gpu_count == 2 and "not detected" in inv.note


def test_peak_tflops_unknown_is_none():
    assert peak_tflops("Some Future GPU") is None


def test_machine_from_inventory(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    inv = inventory(tmp_path, nvml=FakeNvml(MACHINES["8x A100-80GB"]))
    m = Machine.from_inventory(inv, nodes=2)
    assert (m.gpus_per_node, m.nodes, m.world_size, m.bf16, m.peak_tflops) == (8, 2, 16, True, 312.0)
    assert m.gpu_memory == 81920 * 1024**2 and m.host_ram == inv.host.ram_total
    assert Machine.from_inventory(inv, gpu_count=4).world_size == 4
    cpu = Machine.from_inventory(inventory(tmp_path, nvml=NoNvml()), cpu_processes=2)
    assert cpu.is_cpu and cpu.world_size == 2 and not cpu.bf16
