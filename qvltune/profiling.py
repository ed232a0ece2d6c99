"""Profiling a run (``schedule.profile_steps``): the callback that runs torch.profiler over chosen
optimizer steps, the tables it writes, and where the profiled GPU time went by kind of kernel:
matmuls, attention, compiled fusions, the optimizer, communication, copies, eager elementwise work,
and the time no kernel ran.

torch.profiler's tables list kernels by name, hundreds of them (``nvjet_sm90_tst_256x128...``,
``triton_poi_fused_...``); the question a slow step asks is coarser: how much of the step was matrix
math, how much was everything else, and how long the GPU sat idle. This groups the device events of
a chrome trace (what ``torch.profiler.profile.export_chrome_trace`` writes) by name; the patterns
are the kernel names PyTorch, cuBLAS, cuDNN, FlashAttention, Triton and NCCL use on Hopper GPUs.
(Holistic Trace Analysis groups kernels too, as a separate package with pandas and its own trace
loader: more than one table in profile.txt needs.)
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from pathlib import Path

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")

# (kind, pattern on the kernel's name): the first match wins.
KINDS: tuple[tuple[str, str], ...] = (
    ("communication (NCCL)", r"nccl"),
    # Not an Inductor fusion that takes its name from an attention node (triton_..._attention_...).
    ("attention (flash, cuDNN)", r"^(?!triton_).*(flash|fmha|sdpa|attention)"),
    ("matmuls (cuBLAS, CUTLASS)", r"gemm|nvjet|cutlass|xmma|cublas|splitKreduce|^triton_tem_"),
    ("optimizer, foreach ops", r"multi_tensor_apply|adam"),  # AdamW's step, and foreach ops (gradient clipping's norms, zeroing)
    ("compiled fusions (Triton)", r"^triton_"),
    ("softmax and loss", r"softmax|nll_loss|cross_entropy"),
    ("normalization", r"layer_?norm|rms_?norm|group_?norm|batch_?norm"),
    ("copies and fills", r"^(Memcpy|Memset)|copy_kernel|fill_kernel|CatArrayBatchedCopy"),
    ("other eager kernels", r""),
)
IDLE = "no kernel running"


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: overlapping kernels (several streams) count once."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def kind_of(name: str) -> str:
    return next(kind for kind, pattern in KINDS if re.search(pattern, name, re.IGNORECASE))


def kernel_kinds(events: list[dict]) -> list[dict]:
    """Device time per kind of kernel (ms, the union of its kernels' intervals), the number of
    kernels, and the share of the profiled span (the first to the last event of the trace, host
    events included); last, the span's time with no kernel running. Empty without device events."""
    by_kind: dict[str, list[tuple[float, float]]] = defaultdict(list)
    span = [float("inf"), float("-inf")]
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        start, end = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        span = [min(span[0], start), max(span[1], end)]
        if e.get("cat") in DEVICE_CATEGORIES:
            by_kind[kind_of(e.get("name", ""))].append((start, end))
    if not by_kind:
        return []
    length = span[1] - span[0]
    rows = [{"kind": kind, "ms": union_us(by_kind[kind]) / 1e3, "kernels": len(by_kind[kind])} for kind, _ in KINDS if by_kind[kind]]
    busy = union_us([iv for ivs in by_kind.values() for iv in ivs])
    rows.append({"kind": IDLE, "ms": (length - busy) / 1e3, "kernels": 0})
    for row in rows:
        row["share"] = row["ms"] * 1e3 / length if length else 0.0
    return rows


def kinds_table(rows: list[dict]) -> str:
    lines = [f"{'kind':<28} {'GPU ms':>10} {'share':>7} {'kernels':>8}"]
    lines += [f"{r['kind']:<28} {r['ms']:>10,.1f} {r['share']:>7.1%} {r['kernels']:>8,}" for r in rows]
    return "\n".join(lines)


def profiler_callback(run_dir: Path, start: int, count: int, python: bool = False, exclude=None):
    """torch.profiler over optimizer steps [start, start + count), numbered as the train and stall
    records number them (the first step is 1): rank 0 writes profile.txt (on a GPU: the time by kind
    of kernel, ``kernel_kinds``, then ops by device time; ops by host time) and profile-trace.json
    (open in chrome://tracing or Perfetto); ``python`` adds the Python frames
    (schedule.profile_python). A run that ends inside the window writes the steps it took.
    ``exclude(seconds)`` is told how long the writing took (the report callback's
    ``exclude_seconds``: it is not the next step's time)."""
    import torch
    from transformers import TrainerCallback

    from qvltune.trainer import is_main

    class Profile(TrainerCallback):
        def __init__(self):
            self.prof = None

        # A diagnostic never ends the run it looks at: the profiler can fail to start or stop (another
        # profiler holds the GPU's tracing, e.g. under nsys), its report can fail to be written.
        def on_step_begin(self, args, state, control, **kwargs):
            # state.global_step counts the steps done: step ``start`` begins when start - 1 are.
            if state.global_step == start - 1 and self.prof is None:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                try:
                    self.prof = torch.profiler.profile(activities=activities, record_shapes=False, with_stack=python)
                    self.prof.start()
                except Exception as e:
                    self.prof = None
                    _say_failed("started", e)

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is not None and state.global_step == start + count - 1:
                self._finish(state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            if self.prof is not None:  # the run ended inside the window (max_steps, a stop)
                self._finish(state.global_step)

        def _finish(self, last: int) -> None:
            began = time.perf_counter()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            prof, self.prof = self.prof, None
            try:
                prof.stop()
            except Exception as e:
                _say_failed("stopped", e)
                return
            try:
                if is_main():
                    write_profile(prof, run_dir, f"optimizer steps {start}..{last}")
            except Exception as e:
                _say_failed("written", e)
            if exclude:
                exclude(time.perf_counter() - began)

    return Profile()


def _say_failed(what: str, error: Exception) -> None:
    print(f"qvltune: the profile could not be {what} (training goes on): {type(error).__name__}: {error}", flush=True)


# The kinds are read from the exported trace (kernels with their start and end times, which the
# profiler's averages do not keep); a trace past this size (long windows with Python frames) is left
# for a trace viewer rather than parsed in the training process's memory.
MAX_TRACE_TO_SPLIT = 1 << 30


def write_profile(prof, run_dir: Path, title: str) -> None:
    """profile-trace.json and profile.txt of a stopped torch.profiler: the time by kind of kernel
    (GPU runs: the trace holds kernels), then ops by device time, then by host time."""
    import torch

    trace = run_dir / "profile-trace.json"
    prof.export_chrome_trace(str(trace))
    averages = prof.key_averages()
    text = title + "\n"
    if trace.stat().st_size > MAX_TRACE_TO_SPLIT:
        kinds = []
        text += f"\n(by kind of kernel: the trace is {trace.stat().st_size / 1e9:.1f} GB, not split here; open profile-trace.json)\n"
    else:
        kinds = kernel_kinds(json.loads(trace.read_text(encoding="utf-8")).get("traceEvents", []))
    if kinds:
        text += "\n== by kind of kernel (share of the profiled steps; kinds on other streams overlap) ==\n" + kinds_table(kinds) + "\n"
    if torch.cuda.is_available():
        text += "\n== by device time ==\n" + averages.table(sort_by="self_device_time_total", row_limit=40)
    text += "\n== by host time ==\n" + averages.table(sort_by="self_cpu_time_total", row_limit=40)
    (run_dir / "profile.txt").write_text(text + "\n")
