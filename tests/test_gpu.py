"""GPU-only checks (skipped without CUDA): the fused varlen kernels and the bf16 training path."""

from __future__ import annotations

import pytest
import torch

from qvltune.attention import _per_sample_sdpa, cu_seqlens, varlen_attention_forward, varlen_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_varlen_kernel_matches_per_sample_sdpa():
    assert varlen_available()
    torch.manual_seed(0)
    lengths = [700, 1, 300, 1047]
    n = sum(lengths)
    q = torch.randn(1, 16, n, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16)
    cu = cu_seqlens(lengths).cuda()
    out, _ = varlen_attention_forward(None, q, k, v, None, cu_seq_lens_q=cu, max_length_q=max(lengths))
    ref = _per_sample_sdpa(q[0].transpose(0, 1).float(), k[0].transpose(0, 1).float(), v[0].transpose(0, 1).float(), cu, 128**-0.5)
    assert (out[0].float() - ref).abs().max() < 2e-2  # bf16 inputs


def test_fused_loss_on_cuda_matches_full_logits():
    from qvltune.loss import linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(3000, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(151936, 2048, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    targets = torch.randint(0, 151936, (3000,), device="cuda")
    ours = linear_cross_entropy(hidden, weight, targets)
    ours.backward()
    gh, gw = hidden.grad.float(), weight.grad.float()
    hidden.grad = weight.grad = None
    ref = torch.nn.functional.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum")
    ref.backward()
    assert abs(ours.item() - ref.item()) / ref.item() < 1e-3
    assert torch.nn.functional.cosine_similarity(gh.flatten(), hidden.grad.float().flatten(), dim=0) > 0.999
    assert torch.nn.functional.cosine_similarity(gw.flatten(), weight.grad.float().flatten(), dim=0) > 0.999


def test_snapshot_buffers_pin_up_to_their_cap_and_are_reused():
    """Checkpoint snapshots (qvltune.host_buffers): pinned host buffers up to the cap, pageable past
    it; non-blocking copies hold the device's values after one synchronisation; the next save reuses
    the same memory."""
    from qvltune.host_buffers import HostBuffers

    a, b = torch.randn(1024, device="cuda"), torch.randn(4096, device="cuda")
    buffers = HostBuffers(pin_limit_bytes=a.numel() * a.element_size())
    buffers.begin()
    ca, cb = buffers.copy(a), buffers.copy(b)
    buffers.synchronize()
    assert ca.is_pinned() and not cb.is_pinned() and buffers.pinned_bytes == 4096
    assert ca.equal(a.cpu()) and cb.equal(b.cpu())
    buffers.release()
    a.add_(1)
    buffers.begin()
    again = buffers.copy(a)
    buffers.synchronize()
    assert again.data_ptr() == ca.data_ptr() and again.equal(a.cpu()) and buffers.pinned_bytes == 4096
    buffers.release()
    buffers.begin()  # a new shape replaces the pinned buffer: torch keeps its block cached, still counted
    smaller = buffers.copy(torch.randn(512, device="cuda"))
    assert not smaller.is_pinned() and buffers.pinned_bytes == 4096
    buffers.release()
    buffers.free()  # after training: given back, the cache emptied
    assert buffers.buffers == [] and buffers.pinned_bytes == 0


def test_profiled_kernels_are_grouped_by_kind(tmp_path):
    """schedule.profile_steps on a GPU: profile.txt starts with the time by kind of kernel."""
    from types import SimpleNamespace

    from qvltune.profiling import profiler_callback

    callback, state = profiler_callback(tmp_path, 1, 1), SimpleNamespace(global_step=0)
    callback.on_step_begin(None, state, None)
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a = (a @ a).tanh()
    q = torch.randn(1, 16, 2048, 128, device="cuda", dtype=torch.bfloat16)
    torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    state.global_step = 2
    callback.on_step_end(None, state, None)
    text = (tmp_path / "profile.txt").read_text()
    kinds = text.split("== by kind of kernel")[1].split("==")[0]
    assert "matmuls (cuBLAS, CUTLASS)" in kinds and "attention (flash, cuDNN)" in kinds and "no kernel running" in kinds
