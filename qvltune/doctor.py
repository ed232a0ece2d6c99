"""``qvltune doctor``: is this environment ready to train? Each check says what it found and the fix.

``collect_facts`` is the only part that looks at the machine (imports, NVML, disk); ``run_checks``
is a pure function of those facts, tested with made-up ones (a CPU-only torch on a GPU machine, an
old transformers, ``TORCH_CUDA_ARCH_LIST=9.0a``, a 64 MB /dev/shm, ...). A ``fail`` is a blocker:
training would not start or would crash; ``warn`` is worth fixing; ``info`` is context.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from qvltune.hardware import GpuInfo
from qvltune.units import GiB

MIN_PYTHON = (3, 10)
MIN_TORCH = (2, 4)
MIN_TRANSFORMERS = (5, 17)  # Qwen3-VL and the Trainer features the worker relies on (DESIGN.md sec. 4)
MIN_PEFT = (0, 17)
# The guide's hardware section: "~200GB disk space" for LoRA on a 7B model, "~500GB" for full.
DISK_WARN = 100 * GiB
DISK_FAIL = 5 * GiB
# DataLoader workers hand batches over through /dev/shm; Docker's default of 64 MB kills them
# with "bus error" on the first image batch.
SHM_WARN = 1 * GiB
TORCH_CUDA_INDEX = "https://download.pytorch.org/whl/cu128"

Status = Literal["ok", "warn", "fail", "info"]


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass
class Facts:
    python: tuple[int, int, int]
    torch: str | None = None  # version, None when not importable
    torch_cuda: str | None = None  # torch.version.cuda (None: a CPU build)
    cuda_available: bool = False
    transformers: str | None = None
    qwen3_vl: bool = False
    peft: str | None = None
    deepspeed: str | None = None
    deepspeed_error: str | None = None
    cpu_adam: str | None = None  # None = compatible, else why not
    arch_list: str | None = None  # TORCH_CUDA_ARCH_LIST
    gpus: list[GpuInfo] = field(default_factory=list)
    driver: str | None = None
    driver_cuda: str | None = None  # the newest CUDA the driver supports
    nvml_note: str | None = None
    sdpa: bool = False
    varlen: bool = False
    flash_attn: str | None = None
    triton: str | None = None  # torch.compile's GPU code generator
    c_compiler: str | None = None  # triton builds a small launcher with it at the first compile
    disk_path: str = "."
    disk_free: int | None = None
    shm_total: int | None = None


def _version_tuple(v: str | None) -> tuple[int, ...]:
    out = []
    for part in (v or "0").split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def _at_least(v: str | None, minimum: tuple[int, ...]) -> bool:
    return _version_tuple(v) >= minimum


def run_checks(f: Facts) -> list[Check]:
    out: list[Check] = []
    add = lambda *a: out.append(Check(*a))  # noqa: E731

    py = ".".join(map(str, f.python))
    add("python", "ok" if f.python[:2] >= MIN_PYTHON else "fail", f"Python {py}", "" if f.python[:2] >= MIN_PYTHON else "use Python 3.10 or newer")

    # torch and its CUDA build
    if f.torch is None:
        add("torch", "fail", "not installed", f"pip install torch --index-url {TORCH_CUDA_INDEX}")
    elif not _at_least(f.torch, MIN_TORCH):
        add("torch", "fail", f"torch {f.torch} (qvltune needs >= {'.'.join(map(str, MIN_TORCH))})", f"pip install -U torch --index-url {TORCH_CUDA_INDEX}")
    elif f.gpus and f.torch_cuda is None:
        add("torch", "fail", f"torch {f.torch} is a CPU-only build but this machine has {len(f.gpus)} GPU(s)", f"pip install --force-reinstall torch --index-url {TORCH_CUDA_INDEX}")
    elif f.gpus and f.torch_cuda and f.driver_cuda and _version_tuple(f.driver_cuda)[:1] < _version_tuple(f.torch_cuda)[:1]:
        add("torch", "fail", f"torch {f.torch} is built for CUDA {f.torch_cuda}; the driver ({f.driver}) supports CUDA {f.driver_cuda}", "update the NVIDIA driver, or install a torch build for the driver's CUDA")
    elif f.gpus and not f.cuda_available:
        add("torch", "fail", f"torch {f.torch} (CUDA {f.torch_cuda}) cannot use the GPUs", "check CUDA_VISIBLE_DEVICES and the driver (nvidia-smi), or reinstall torch for this driver's CUDA")
    else:
        where = f"CUDA {f.torch_cuda}" if f.torch_cuda else "CPU build"
        note = "" if f.gpus or f.torch_cuda is None else " (no GPU here: CPU mode)"
        add("torch", "ok", f"torch {f.torch}, {where}{note}")

    if f.transformers is None:
        add("transformers", "fail", "not installed", "pip install 'transformers>=5.17'")
    elif not _at_least(f.transformers, MIN_TRANSFORMERS):
        add("transformers", "fail", f"transformers {f.transformers} (Qwen3-VL training needs >= 5.17)", "pip install -U 'transformers>=5.17'")
    elif not f.qwen3_vl:
        add("transformers", "fail", f"transformers {f.transformers} has no Qwen3VLForConditionalGeneration", "pip install -U 'transformers>=5.17'")
    else:
        add("transformers", "ok", f"transformers {f.transformers} (Qwen3-VL and Qwen3-VL-MoE)")

    if f.peft is None:
        add("peft", "fail", "not installed", "pip install 'peft>=0.17'")
    elif not _at_least(f.peft, MIN_PEFT):
        add("peft", "warn", f"peft {f.peft} (tested with >= 0.17)", "pip install -U 'peft>=0.17'")
    else:
        add("peft", "ok", f"peft {f.peft}")

    if f.deepspeed is None:
        add("deepspeed", "fail", f"cannot import deepspeed: {f.deepspeed_error or 'not installed'}", "pip install 'deepspeed>=0.16'")
    else:
        add("deepspeed", "ok", f"deepspeed {f.deepspeed}")
        arch = f.arch_list or ""
        if "9.0a" in arch.replace(" ", ";").split(";"):
            add(
                "deepspeed ops",
                "warn",
                f"TORCH_CUDA_ARCH_LIST={arch}: DeepSpeed's op builder crashes on the '9.0a' arch (CPU Adam for offload, fused ops)",
                "export TORCH_CUDA_ARCH_LIST=9.0 (qvltune train and launch.sh already rewrite it for their own runs)",
            )
        elif f.cpu_adam is not None:
            add("deepspeed ops", "warn", f"CPU Adam (needed for ZeRO-Offload) cannot be built: {f.cpu_adam}", "apt install build-essential python3-dev ninja-build (or avoid deepspeed.offload_*)")
        else:
            add("deepspeed ops", "ok", "CPU Adam builds here (ZeRO-Offload works); no optimizer op is needed otherwise (torch AdamW)")

    # GPUs
    if not f.gpus:
        add("gpus", "warn", f.nvml_note or "no NVIDIA GPU found", "CPU mode runs `qvltune demo`; train real models on a GPU machine")
    else:
        names = ", ".join(sorted({g.name for g in f.gpus}))
        add("gpus", "ok", f"{len(f.gpus)} x {names}; driver {f.driver or '?'} (CUDA {f.driver_cuda or '?'})")
        for g in f.gpus:
            if not g.bf16:
                add(f"gpu {g.index} bf16", "warn", f"{g.name} (compute capability {g.compute_capability}) has no bf16", "set optim.bf16: false (fp32 needs twice the memory); `qvltune init` does it for you")
            if g.memory_total and g.memory_used > 0.1 * g.memory_total:
                add(f"gpu {g.index} memory", "warn", f"{g.memory_used / GiB:.1f} of {g.memory_total / GiB:.1f} GiB already in use", "stop the other process (nvidia-smi shows it) or train on other GPUs (launch.gpus)")

    # attention backends
    if f.sdpa:
        add("attention: sdpa", "ok", "torch scaled_dot_product_attention (qvltune's default; packed rows get a block-diagonal mask)")
    else:
        add("attention: sdpa", "fail", "torch.nn.functional.scaled_dot_product_attention missing", f"pip install -U torch --index-url {TORCH_CUDA_INDEX}")
    if f.varlen:
        add("attention: varlen", "ok", "torch.nn.attention.varlen.varlen_attn: packed rows without masks (model.attn_implementation auto uses it on GPUs)")
    else:
        add("attention: varlen", "info", "torch.nn.attention.varlen not available (torch < 2.10): use sdpa", "optional: a newer torch")
    if f.flash_attn:
        add("attention: flash-attn", "ok", f"flash-attn {f.flash_attn} (model.attn_implementation: flash_attention_2)")
    else:
        add("attention: flash-attn", "info", "flash-attn not installed (optional: sdpa and varlen need nothing)")

    # torch.compile (optim.compile, on by default for bf16 GPUs): inductor emits triton kernels, and
    # triton compiles a small launcher with the system C compiler at the first step.
    if f.gpus:
        if f.triton is None:
            add("compile", "warn", "triton is not installed: optim.compile would fail at the first step", "pip install triton (torch's CUDA wheels bring it), or set optim.compile: false")
        elif f.c_compiler is None:
            add("compile", "warn", f"triton {f.triton} needs a C compiler (cc/gcc) at the first compile; none found", "apt install build-essential, or set optim.compile: false")
        else:
            add("compile", "ok", f"triton {f.triton}, C compiler {f.c_compiler} (optim.compile works)")

    # disk and shared memory
    if f.disk_free is not None:
        free = f"{f.disk_free / GiB:,.0f} GiB free at {f.disk_path}"
        if f.disk_free < DISK_FAIL:
            add("disk", "fail", free, "free space: one checkpoint of an 8B model with optimizer states is ~100 GB")
        elif f.disk_free < DISK_WARN:
            add("disk", "warn", free + " (the guide: ~200 GB for LoRA on 7B, ~500 GB for full fine-tuning)", "point output_dir at a larger disk, or lower schedule.save_total_limit")
        else:
            add("disk", "ok", free)
    if f.shm_total is None:
        add("/dev/shm", "info", "no /dev/shm (DataLoader workers use the file system)")
    elif f.shm_total < SHM_WARN:
        add("/dev/shm", "warn", f"{f.shm_total / 1024**2:,.0f} MiB: DataLoader workers crash with 'bus error' on image batches", "docker run --shm-size=16g (or --ipc=host), or set data.num_workers: 0")
    else:
        add("/dev/shm", "ok", f"{f.shm_total / GiB:,.1f} GiB")
    return out


def blockers(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.status == "fail"]


# ----------------------------------------------------------------------------------------------
# Looking at the machine (the only I/O)


def _version(module: str) -> tuple[str | None, Any, str | None]:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "?"), mod, None
    except Exception as e:  # ImportError, or a broken install raising anything at import
        return None, None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def collect_facts(path: str | Path = ".", nvml: Any = None) -> Facts:
    from qvltune.hardware import detect_gpus

    f = Facts(python=tuple(sys.version_info[:3]), disk_path=str(path))
    f.torch, torch, _ = _version("torch")
    if torch is not None:
        f.torch_cuda = torch.version.cuda
        try:
            f.cuda_available = torch.cuda.is_available()
        except Exception:
            f.cuda_available = False
        f.sdpa = hasattr(torch.nn.functional, "scaled_dot_product_attention")
        try:
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401

            f.varlen = True
        except Exception:
            f.varlen = False
    f.transformers, transformers, _ = _version("transformers")
    if transformers is not None:
        try:
            f.qwen3_vl = hasattr(transformers, "Qwen3VLForConditionalGeneration") and transformers.Qwen3VLForConditionalGeneration is not None
        except Exception:
            f.qwen3_vl = False
    f.peft, _, _ = _version("peft")
    f.arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    # DeepSpeed logs to stdout (its accelerator note on import): keep stdout for results (--json).
    with contextlib.redirect_stdout(sys.stderr):
        f.deepspeed, _, f.deepspeed_error = _version("deepspeed")
        if f.deepspeed is not None and "9.0a" not in (f.arch_list or ""):
            try:
                from deepspeed.ops.op_builder import CPUAdamBuilder

                f.cpu_adam = None if CPUAdamBuilder().is_compatible(verbose=False) else "DeepSpeed reports it incompatible with this system"
            except Exception as e:
                f.cpu_adam = f"{type(e).__name__}: {e}"
    f.flash_attn, _, _ = _version("flash_attn")
    f.triton, _, _ = _version("triton")
    f.c_compiler = next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)
    f.gpus, f.driver, f.driver_cuda, f.nvml_note = detect_gpus(nvml)
    target = Path(path)
    while not target.exists() and target != target.parent:
        target = target.parent
    try:
        f.disk_free = shutil.disk_usage(target).free
    except OSError:
        f.disk_free = None
    try:
        f.shm_total = shutil.disk_usage("/dev/shm").total
    except OSError:
        f.shm_total = None
    return f
