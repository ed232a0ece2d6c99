"""Where profiled GPU time goes, by kind of kernel: matmuls, attention, compiled fusions, the
optimizer, communication, copies, eager elementwise work, and the time no kernel ran.

torch.profiler's tables list kernels by name, hundreds of them (``nvjet_sm90_tst_256x128...``,
``triton_poi_fused_...``); the question a slow step asks is coarser: how much of the step was matrix
math, how much was everything else, and how long the GPU sat idle. This groups the device events of
a chrome trace (what ``torch.profiler.profile.export_chrome_trace`` writes) by name. No library
does this grouping; the patterns are the kernel names PyTorch, cuBLAS, cuDNN, FlashAttention,
Triton and NCCL use on Hopper GPUs.
"""

from __future__ import annotations

import re
from collections import defaultdict

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")

# (kind, pattern on the kernel's name): the first match wins.
KINDS: tuple[tuple[str, str], ...] = (
    ("communication (NCCL)", r"nccl"),
    ("attention (flash, cuDNN)", r"flash|fmha|sdpa|attention"),
    ("matmuls (cuBLAS, CUTLASS)", r"gemm|nvjet|cutlass|xmma|cublas|splitKreduce|^triton_tem_"),
    ("optimizer (fused AdamW)", r"multi_tensor_apply|adam"),
    ("compiled fusions (Triton)", r"^triton_"),
    ("softmax and loss", r"softmax|nll_loss|cross_entropy"),
    ("normalization", r"norm"),
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
