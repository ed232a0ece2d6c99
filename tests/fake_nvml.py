"""A small stand-in for pynvml: the only thing qvltune's tests fake (hardware.detect_gpus(nvml=...))."""

from __future__ import annotations

from types import SimpleNamespace

MiB = 1024**2

# (name as NVML reports it, memory MiB, compute capability)
A100_80 = ("NVIDIA A100-SXM4-80GB", 81920, (8, 0))
RTX_4090 = ("NVIDIA GeForce RTX 4090", 24564, (8, 9))
A6000 = ("NVIDIA RTX A6000", 49140, (8, 6))
H200 = ("NVIDIA H200", 143771, (9, 0))
V100 = ("Tesla V100-SXM2-32GB", 32768, (7, 0))

MACHINES = {
    "8x A100-80GB": [A100_80] * 8,
    "1x RTX 4090": [RTX_4090],
    "4x A6000": [A6000] * 4,
    "1x H200": [H200],
}


class FakeNvml:
    """The pynvml functions hardware.py calls, over a fixed list of GPUs."""

    def __init__(self, gpus, used_mib=0, driver="550.54.15", cuda=12040, bytes_names=False, fail_on=None):
        self.gpus = list(gpus)
        self.used = used_mib
        self.driver = driver
        self.cuda = cuda
        self.bytes_names = bytes_names
        self.fail_on = fail_on
        self.initialised = False
        self.shutdowns = 0

    def _maybe_fail(self, name):
        if self.fail_on == name:
            raise RuntimeError(f"{name} failed")

    def nvmlInit(self):
        self._maybe_fail("nvmlInit")
        self.initialised = True

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self):
        return self.driver.encode() if self.bytes_names else self.driver

    def nvmlSystemGetCudaDriverVersion(self):
        return self.cuda

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        self._maybe_fail("nvmlDeviceGetHandleByIndex")
        return i

    def nvmlDeviceGetName(self, h):
        name = self.gpus[h][0]
        return name.encode() if self.bytes_names else name

    def nvmlDeviceGetMemoryInfo(self, h):
        total = self.gpus[h][1] * MiB
        used = self.used * MiB
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return self.gpus[h][2]

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=37, memory=10)

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 41


class NoNvml:
    """NVML present but no driver (nvmlInit raises, like NVMLError_DriverNotLoaded)."""

    def nvmlInit(self):
        raise OSError("NVML Shared Library Not Found")
