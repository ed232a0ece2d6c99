"""The machine: GPUs through NVML (the only NVML user in qvltune), host memory, CPUs and disk.

No GPU, no driver or no NVML library gives an empty inventory and a note (CPU / demo mode), never a
crash. Tests fake NVML with a small object of the same functions (``nvml`` argument).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvltune.units import GiB

# Dense bf16 tensor-core peaks (datasheet, TFLOP/s) by name fragment, for MFU. Unknown GPUs get no MFU.
PEAK_BF16_TFLOPS = [
    ("H200", 989.0),
    ("H100", 989.0),  # SXM; the PCIe card is ~756 but reports the same family name
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("A6000", 155.0),
    ("RTX 6000 Ada", 364.0),
    ("4090", 165.0),
    ("3090", 71.0),
    ("A10", 125.0),
    ("L4", 121.0),
    ("V100", 125.0),  # fp16 (no bf16)
    ("T4", 65.0),  # fp16 (no bf16)
]


def peak_tflops(name: str) -> float | None:
    for fragment, tflops in PEAK_BF16_TFLOPS:
        if fragment.lower() in name.lower():
            return tflops
    return None


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_total: int  # bytes
    memory_free: int
    memory_used: int
    compute_capability: str  # "9.0"
    utilization: int | None = None  # percent
    temperature: int | None = None
    node: int | None = None  # set for another node's GPUs on node 0's panel (multi-node runs)

    @property
    def bf16(self) -> bool:
        """bf16 tensor cores need compute capability 8.0 (Ampere) or newer."""
        return float(self.compute_capability) >= 8.0

    @property
    def memory_total_gb(self) -> float:
        return self.memory_total / GiB

    @property
    def peak_tflops(self) -> float | None:
        return peak_tflops(self.name)


@dataclass(frozen=True)
class HostInfo:
    cpus: int
    ram_total: int
    ram_available: int
    disk_free: int  # at the output folder
    shm_total: int | None = None


@dataclass(frozen=True)
class Inventory:
    gpus: list[GpuInfo] = field(default_factory=list)
    host: HostInfo | None = None
    driver: str | None = None
    cuda: str | None = None
    note: str | None = None  # why there are no GPUs, when there are none

    @property
    def gpu_count(self) -> int:
        return len(self.gpus)


def _load_nvml():
    import pynvml

    return pynvml


def detect_gpus(nvml: Any = None) -> tuple[list[GpuInfo], str | None, str | None, str | None]:
    """(gpus, driver version, CUDA version, note). Never raises: no NVML means no GPUs, with a note."""
    try:
        nvml = nvml or _load_nvml()
        nvml.nvmlInit()
    except Exception as e:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return [], None, None, f"no NVIDIA GPU found ({type(e).__name__}): CPU mode, fine for the demo"
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        try:
            cuda_int = nvml.nvmlSystemGetCudaDriverVersion()
            cuda = f"{cuda_int // 1000}.{(cuda_int % 1000) // 10}"
        except Exception:
            cuda = None
        gpus = []
        visible = _visible_indices(nvml.nvmlDeviceGetCount())
        for i, physical in enumerate(visible):
            h = nvml.nvmlDeviceGetHandleByIndex(physical)
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            major, minor = nvml.nvmlDeviceGetCudaComputeCapability(h)
            try:
                util = nvml.nvmlDeviceGetUtilizationRates(h).gpu
            except Exception:
                util = None
            try:
                temp = nvml.nvmlDeviceGetTemperature(h, 0)
            except Exception:
                temp = None
            gpus.append(GpuInfo(i, _text(nvml.nvmlDeviceGetName(h)), mem.total, mem.free, mem.used, f"{major}.{minor}", util, temp))
        note = None if gpus else "NVML found no GPUs: CPU mode, fine for the demo"
        return gpus, driver, cuda, note
    except Exception as e:
        return [], None, None, f"NVML failed ({type(e).__name__}: {e}): CPU mode"
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def _visible_indices(count: int) -> list[int]:
    """Physical indices of the GPUs this process may use (CUDA_VISIBLE_DEVICES as integers)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return list(range(count))
    out = []
    for part in env.split(","):
        part = part.strip()
        if part.isdigit() and int(part) < count:
            out.append(int(part))
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def host_info(path: str | Path = ".") -> HostInfo:
    import psutil

    target = Path(path)
    while not target.exists() and target != target.parent:
        target = target.parent
    vm = psutil.virtual_memory()
    try:
        shm = shutil.disk_usage("/dev/shm").total
    except OSError:
        shm = None
    return HostInfo(os.cpu_count() or 1, vm.total, vm.available, shutil.disk_usage(target).free, shm)


def inventory(output_dir: str | Path = ".", nvml: Any = None) -> Inventory:
    gpus, driver, cuda, note = detect_gpus(nvml)
    return Inventory(gpus, host_info(output_dir), driver, cuda, note)


def sample_gpus(nvml: Any = None) -> list[GpuInfo]:
    """Current memory/utilisation of every visible GPU (for the live panel)."""
    return detect_gpus(nvml)[0]


# ----------------------------------------------------------------------------------------------
# GPUs by name, for planning another machine (``--gpu H200``) than the one qvltune runs on.

MiB = 1024**2

# Memory as NVML reports it (MiB) and compute capability, by name fragment (datasheets; checked
# against nvidia-smi where we had the card). More specific fragments come first.
KNOWN_GPUS: list[tuple[str, str, int, str]] = [
    # (fragment, canonical name, memory MiB, compute capability)
    ("GH200", "NVIDIA GH200 96GB", 97871, "9.0"),
    ("H200", "NVIDIA H200", 143771, "9.0"),
    ("H100", "NVIDIA H100 80GB HBM3", 81559, "9.0"),
    ("B200", "NVIDIA B200", 183359, "10.0"),
    ("A100-40", "NVIDIA A100-SXM4-40GB", 40960, "8.0"),
    ("A100 40", "NVIDIA A100-SXM4-40GB", 40960, "8.0"),
    ("A100", "NVIDIA A100-SXM4-80GB", 81920, "8.0"),
    ("A800", "NVIDIA A800-SXM4-80GB", 81920, "8.0"),
    ("L40S", "NVIDIA L40S", 46068, "8.9"),
    ("L40", "NVIDIA L40", 46068, "8.9"),
    ("RTX 6000 Ada", "NVIDIA RTX 6000 Ada Generation", 49140, "8.9"),
    ("A6000", "NVIDIA RTX A6000", 49140, "8.6"),
    ("4090", "NVIDIA GeForce RTX 4090", 24564, "8.9"),
    ("3090", "NVIDIA GeForce RTX 3090", 24576, "8.6"),
    ("A10", "NVIDIA A10", 23028, "8.6"),
    ("L4", "NVIDIA L4", 23034, "8.9"),
    ("V100", "Tesla V100-SXM2-32GB", 32768, "7.0"),
    ("T4", "Tesla T4", 15360, "7.5"),
]


def known_gpu(name: str) -> tuple[str, int, str] | None:
    """(canonical name, memory in bytes, compute capability) of a GPU named like ``H200`` or
    ``NVIDIA A100-SXM4-80GB``, else None."""
    for fragment, canonical, mib, cc in KNOWN_GPUS:
        if fragment.lower() in name.lower():
            return canonical, mib * MiB, cc
    return None


def planned_gpus(name: str | None, count: int, memory_gb: float | None = None) -> list[GpuInfo]:
    """``count`` GPUs of a machine that is not this one, from a name and/or a memory size (GB, as
    in "80 GB": GiB). Raises ValueError naming the known GPUs when neither tells the memory."""
    spec = known_gpu(name) if name else None
    if memory_gb is None and spec is None:
        names = ", ".join(dict.fromkeys(f for f, *_ in KNOWN_GPUS))
        raise ValueError(f"unknown GPU '{name}': give its memory too (known: {names})")
    canonical = spec[0] if spec else (name or f"GPU with {memory_gb:g} GB")
    memory = int(memory_gb * GiB) if memory_gb is not None else spec[1]
    cc = spec[2] if spec else "8.0"  # an unknown card given by memory alone: assume bf16-capable
    return [GpuInfo(i, canonical, memory, memory, 0, cc) for i in range(count)]


def planned_inventory(name: str | None, count: int, memory_gb: float | None = None, host: HostInfo | None = None) -> Inventory:
    """An inventory for planning another machine (flags ``--gpu/--gpu-count/--gpu-memory``)."""
    gpus = planned_gpus(name, count, memory_gb)
    return Inventory(gpus, host, None, None, f"planning for {count} x {gpus[0].name} (given on the command line, not detected)")
