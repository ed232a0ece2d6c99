"""qvltune.profiling: profiled GPU time by kind of kernel, and the callback that writes it. The names are kernels recorded on the
H200 (benchmarks/results/2b-mixed-qvltune-profile.txt) and the ones NCCL, Triton and fused AdamW
launch; the trace events are built by hand in the shape torch.profiler exports (a CPU has no
kernels to trace; tests/test_gpu.py profiles real ones)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from qvltune.profiling import IDLE, kernel_kinds, kind_of, kinds_table

RECORDED = Path(__file__).parent.parent / "benchmarks" / "results" / "2b-mixed-qvltune-profile.txt"


@pytest.mark.parametrize(("name", "kind"), [
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "matmuls (cuBLAS, CUTLASS)"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "matmuls (cuBLAS, CUTLASS)"),
    ("triton_tem_fused_mm_0", "matmuls (cuBLAS, CUTLASS)"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention (flash, cuDNN)"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>", "attention (flash, cuDNN)"),
    ("void flash_fwd_varlen_kernel", "attention (flash, cuDNN)"),
    ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", "compiled fusions (Triton)"),
    ("triton_poi_fused__scaled_dot_product_flash_attention_transpose_3", "compiled fusions (Triton)"),  # named after the node it feeds
    ("void multi_tensor_apply_kernel<TensorListMetadata<4>, FusedAdamMathFunctor>", "optimizer, foreach ops"),
    ("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication (NCCL)"),
    ("Memcpy DtoD (Device -> Device)", "copies and fills"),
    ("void at::native::vectorized_layer_norm_kernel<c10::BFloat16, float>", "normalization"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::BFloat16>>", "other eager kernels"),
])
def test_kernels_are_grouped_by_what_they_compute(name, kind):
    assert kind_of(name) == kind


def test_the_recorded_kernels_of_the_h200_profile_fall_into_their_kinds():
    names = [line[:55].strip() for line in RECORDED.read_text().splitlines() if line[:55].strip().startswith(("nvjet", "void", "cudnn", "Memcpy"))]
    kinds = {n: kind_of(n) for n in names}
    assert len(names) > 20 and {"matmuls (cuBLAS, CUTLASS)", "attention (flash, cuDNN)", "copies and fills", "other eager kernels"} <= set(kinds.values())
    assert all(k == "matmuls (cuBLAS, CUTLASS)" for n, k in kinds.items() if n.startswith("nvjet"))  # every GEMM a matmul
    assert all(k == "attention (flash, cuDNN)" for n, k in kinds.items() if "flash" in n or "sdpa" in n)
    assert kind_of("void at::native::normal_kernel<float>") == "other eager kernels"  # RNG, not a norm


def kernel(name, ts, dur, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_time_by_kind_counts_overlaps_once_and_shows_the_idle_gaps():
    events = [
        {"ph": "X", "cat": "cpu_op", "name": "ProfilerStep", "ts": 0, "dur": 1000},  # the span: 1 ms
        kernel("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", 100, 300),
        kernel("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_TNN", 300, 200),  # overlaps the first: 100..500
        kernel("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", 200, 400),  # another stream, beside the matmuls
        kernel("Memcpy HtoD (Pinned -> Device)", 700, 100, cat="gpu_memcpy"),
        {"ph": "i", "cat": "kernel", "name": "instant", "ts": 5},  # no duration: not a kernel run
    ]
    rows = {r["kind"]: r for r in kernel_kinds(events)}
    assert rows["matmuls (cuBLAS, CUTLASS)"]["ms"] == pytest.approx(0.4) and rows["matmuls (cuBLAS, CUTLASS)"]["kernels"] == 2
    assert rows["communication (NCCL)"]["ms"] == pytest.approx(0.4) and rows["copies and fills"]["ms"] == pytest.approx(0.1)
    assert rows[IDLE]["ms"] == pytest.approx(0.4)  # busy 100..600 and 700..800 of 0..1000
    assert rows[IDLE]["share"] == pytest.approx(0.4) and rows["matmuls (cuBLAS, CUTLASS)"]["share"] == pytest.approx(0.4)
    assert "no kernel running" in kinds_table(list(rows.values()))


def test_a_trace_without_kernels_has_no_kinds():
    assert kernel_kinds([{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 10}]) == []


def test_the_profiled_steps_are_written_on_a_cpu_without_kinds(tmp_path, monkeypatch):
    """schedule.profile_steps on a CPU: the host table and the trace, and no kinds (no kernels); the
    seconds the writing took (made at least 0.2 s here) are excluded from the step's time."""
    from types import SimpleNamespace

    import torch

    from qvltune import profiling
    from qvltune.profiling import profiler_callback

    real_write = profiling.write_profile

    def slow_write(*args):
        time.sleep(0.2)
        real_write(*args)

    monkeypatch.setattr(profiling, "write_profile", slow_write)
    excluded = []
    callback, state = profiler_callback(tmp_path, 3, 1, exclude=excluded.append), SimpleNamespace(global_step=1)
    for step in (1, 2, 3, 4):  # the Trainer's counter: steps done at a step's begin, the step's own number at its end
        state.global_step = step - 1
        callback.on_step_begin(None, state, None)
        if step == 3:
            torch.randn(64, 64) @ torch.randn(64, 64)
        state.global_step = step
        callback.on_step_end(None, state, None)
        assert (tmp_path / "profile.txt").exists() == (step >= 3), step  # written at the end of step 3, the one the records call 3
    text = (tmp_path / "profile.txt").read_text()
    assert text.startswith("optimizer steps 3..3") and "by host time" in text and "aten::mm" in text
    assert "by kind of kernel" not in text and (tmp_path / "profile-trace.json").stat().st_size > 0
    assert len(excluded) == 1 and excluded[0] >= 0.2  # the writing is not the next step's time


def test_a_run_that_ends_inside_the_window_writes_the_steps_it_took(tmp_path):
    from types import SimpleNamespace

    import torch

    from qvltune.profiling import profiler_callback

    callback, state = profiler_callback(tmp_path, 4, 10), SimpleNamespace(global_step=3)
    callback.on_step_begin(None, state, None)
    torch.randn(8, 8) @ torch.randn(8, 8)
    state.global_step = 4
    callback.on_step_end(None, state, None)
    assert not (tmp_path / "profile.txt").exists()
    callback.on_train_end(None, state, None)  # max_steps was 4
    assert (tmp_path / "profile.txt").read_text().startswith("optimizer steps 4..4")


def test_a_profiler_that_cannot_start_does_not_end_the_run(tmp_path, capsys, monkeypatch):
    """Another profiler holding the GPU's tracing (nsys, a second torch.profiler) makes start() raise."""
    from types import SimpleNamespace

    import torch

    from qvltune.profiling import profiler_callback

    def busy(*args, **kwargs):
        raise RuntimeError("CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED")

    monkeypatch.setattr(torch.profiler, "profile", busy)
    callback, state = profiler_callback(tmp_path, 4, 1), SimpleNamespace(global_step=3)
    callback.on_step_begin(None, state, None)
    state.global_step = 4
    callback.on_step_end(None, state, None)
    assert "the profile could not be started (training goes on)" in capsys.readouterr().out
    assert not (tmp_path / "profile.txt").exists()


def test_a_trace_too_large_to_split_is_left_to_a_viewer(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import torch

    from qvltune import profiling

    monkeypatch.setattr(profiling, "MAX_TRACE_TO_SPLIT", 10)  # bytes: any trace is larger
    callback, state = profiling.profiler_callback(tmp_path, 4, 1), SimpleNamespace(global_step=3)
    callback.on_step_begin(None, state, None)
    torch.randn(8, 8) @ torch.randn(8, 8)
    state.global_step = 4
    callback.on_step_end(None, state, None)
    text = (tmp_path / "profile.txt").read_text()
    assert "not split here; open profile-trace.json" in text and "by host time" in text


def test_a_profile_that_cannot_be_written_does_not_end_the_run(tmp_path, capsys):
    from types import SimpleNamespace

    import torch

    from qvltune.profiling import profiler_callback

    callback, state = profiler_callback(tmp_path / "gone", 4, 1), SimpleNamespace(global_step=3)  # no such folder
    callback.on_step_begin(None, state, None)
    torch.randn(8, 8) @ torch.randn(8, 8)
    state.global_step = 4
    callback.on_step_end(None, state, None)
    assert "the profile could not be written" in capsys.readouterr().out
