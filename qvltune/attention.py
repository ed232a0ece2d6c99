"""Variable-length attention for packed rows, without the flash-attn package.

A packed row holds several samples; masked sdpa computes every block of the row's attention matrix,
masked or not, so most of its work is wasted. ``varlen`` attention computes only each sample's own
causal block: on CUDA through ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention kernels
shipped with PyTorch), elsewhere through a per-sample sdpa loop (exact, for CPU tests).

It is registered with transformers' ``AttentionInterface`` under the name ``qvltune_varlen`` and
used by the language model only (the vision tower keeps sdpa: it already attends per image). The
batch carries ``cu_seq_lens_q``/``max_length_q`` (sample boundaries over the flattened batch), which
transformers forwards from the model call to every attention layer; no 4-D mask is ever built.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

NAME = "qvltune_varlen"


def varlen_available() -> bool:
    """True where the fused varlen kernels exist (PyTorch >= 2.10 with CUDA)."""
    if not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    """Cumulative boundaries [0, l0, l0+l1, ...] (int32, as the kernels want)."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


# Opaque to torch.compile: its Python loop over the samples would make every new sample count a
# recompilation of the compiled decoder layer (optim.compile) on CPU.
@torch.compiler.disable
def _per_sample_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference implementation: causal sdpa on each sample separately. q: (T, Hq, D); k, v: (T, Hkv, D)."""
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b == a:
            continue
        qs = q[a:b].transpose(0, 1)
        ks = k[a:b].repeat_interleave(groups, dim=1).transpose(0, 1)
        vs = v[a:b].repeat_interleave(groups, dim=1).transpose(0, 1)
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1)
    return out


def _varlen_takes_gqa() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch without varlen attention: the CPU path never calls _fused
        return False
    return "enable_gqa" in inspect.signature(varlen_attn).parameters


# Read once at import: set lazily inside the first compiled call, this global changed under dynamo's
# guard and made every compiled decoder layer compile a second time (seen in TORCH_LOGS=recompiles).
_GQA_KWARG = _varlen_takes_gqa()


def _fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    groups = q.shape[1] // k.shape[1]
    if groups > 1 and not _GQA_KWARG:  # torch 2.10/2.11: no GQA support, repeat the KV heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    kwargs = {"enable_gqa": True} if groups > 1 and _GQA_KWARG else {}
    # window (-1, 0) = causal (the older signature has no is_causal).
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, window_size=(-1, 0), **kwargs)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query: (B, Hq, L, D); key/value: (B, Hkv, L, D) -> (B, L, Hq, D), like transformers' sdpa."""
    if cu_seq_lens_q is None:
        # A batch without sample boundaries (generation, or built elsewhere): plain sdpa. The mask
        # interface gave the flash-style 2-D padding mask (or None); sdpa wants it 4-D and causal.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if attention_mask is not None and attention_mask.ndim == 2:
            q_len, kv_len = query.shape[2], key.shape[2]
            causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
            attention_mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    b, hq, n, d = query.shape
    q = query.transpose(1, 2).reshape(b * n, hq, d)
    k = key.transpose(1, 2).reshape(b * n, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * n, value.shape[1], d)
    scale = scaling if scaling is not None else d**-0.5
    if q.is_cuda:
        out = _fused(q, k, v, cu_seq_lens_q, int(max_length_q), scale)
    else:
        out = _per_sample_sdpa(q, k, v, cu_seq_lens_q, scale)
    return out.view(b, n, hq, d), None


def register() -> None:
    """Make ``qvltune_varlen`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, varlen_attention_forward)
    # Like flash attention: no 4-D mask (None for packed rows, the 2-D padding mask otherwise).
    AttentionMaskInterface.register(NAME, flash_attention_mask)


def use_varlen_attention(model) -> None:
    """Switch the language model to varlen attention; the vision tower keeps sdpa."""
    register()
    vision = model.config.vision_config._attn_implementation or "sdpa"
    model.set_attn_implementation({"text_config": NAME, "vision_config": vision})
