"""The matmul limit: the bf16 TFLOP/s one large GEMM reaches on this GPU (torch.matmul, cuBLAS),
the ceiling benchmarks/step_account.py measures a training step's FLOPs against.

    python benchmarks/matmul_limit.py [--sizes 4096,8192,16384] [--repeats 50]

Square products of each size, warmed up, timed with CUDA events; prints TFLOP/s per size and the
best. On a machine without a GPU it times the CPU (a smoke run, not a limit anyone trains at).
"""

from __future__ import annotations

import argparse
import time

import torch


def tflops(n: int, repeats: int, device: str) -> float:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(repeats):
            a @ b
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        began = time.perf_counter()
        for _ in range(repeats):
            a @ b
        seconds = time.perf_counter() - began
    return 2 * n**3 * repeats / seconds / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=None, help="default: 4096,8192,16384 on a GPU, 512,1024 on a CPU (a smoke run)")
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (float32)"
    sizes = args.sizes or ("4096,8192,16384" if device == "cuda" else "512,1024")
    rates = {int(n): tflops(int(n), args.repeats, device) for n in sizes.split(",")}
    for n, rate in rates.items():
        print(f"{name}: {n} x {n} x {n}: {rate:,.1f} TFLOP/s")
    print(f"matmul limit: {max(rates.values()):,.1f} TFLOP/s")


if __name__ == "__main__":
    main()
