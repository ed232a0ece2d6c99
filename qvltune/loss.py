"""Cross-entropy on the answer tokens only, without materialising full-vocabulary logits.

The plain path computes logits for every token of the batch (8k tokens x 151,936 vocabulary = 2.5 GB
in bf16, twice that upcast to fp32, and as much again for their gradient) although only the answer
tokens carry labels. Here the language model's last hidden states of the labelled positions are
gathered (indices prepared by the collator on the host, so nothing waits on the GPU), and the loss
and its gradients are computed chunk by chunk in one pass: logits for a chunk, their softmax, the
gradient w.r.t. the hidden states (and w.r.t. the weight when lm_head trains), then the next chunk.
Backward only scales the stored gradients. No library in the stack does this for Qwen3-VL's
(tied or untied) lm_head without another dependency, hence this module.
"""

from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100
# Elements of one fp32 logits chunk (256 M = 1 GiB); the chunk's rows follow from the vocabulary size.
CHUNK_ELEMENTS = 1 << 28


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, need_hidden_grad: bool, need_weight_grad: bool):
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        acc = torch.promote_types(hidden.dtype, torch.float32)  # softmax and sums in fp32 (or fp64)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight_grad else None
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start : start + rows]
            t = targets[start : start + rows]
            logits = (h @ weight.t()).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            valid = t != IGNORE_INDEX
            safe = t.clamp(min=0)
            picked = logits.gather(1, safe[:, None])[:, 0]
            total += ((lse - picked) * valid).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d(sum CE)/d(logits) = softmax - one_hot, on labelled rows only (in place: logits -> probs).
            probs = logits.sub_(lse[:, None]).exp_()
            probs.scatter_add_(1, safe[:, None], -valid[:, None].to(probs.dtype))
            probs.mul_(valid[:, None])
            g = probs.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + rows] = g @ weight
            if grad_weight is not None:
                grad_weight.addmm_(g.t().to(acc), h.to(acc))
            del logits, probs, g  # free this chunk before the next one is computed
        ctx.save_for_backward(grad_hidden if grad_hidden is not None else torch.empty(0), grad_weight if grad_weight is not None else torch.empty(0))
        ctx.has = (grad_hidden is not None, grad_weight is not None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_output.to(grad_hidden.dtype) if ctx.has[0] else None
        gw = (grad_weight * grad_output).to(ctx.weight_dtype) if ctx.has[1] else None
        return gh, gw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum over rows of CE(hidden @ weight.T, targets), rows with target -100 ignored; hidden: (N, H)."""
    grad = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(hidden, weight, targets, grad and hidden.requires_grad, grad and weight.requires_grad)


class LossHead(nn.Module):
    """Stands in for ``lm_head`` during training.

    Given ``set_targets(index, targets)`` (flat positions whose next token is labelled, and those
    labels), its forward returns the summed loss of those positions instead of logits; without
    targets it is the ordinary linear layer. It owns the very same weight Parameter (tied or not),
    so saving, tying and ZeRO-3 gathering (which happens for the module whose forward runs) are
    unchanged."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight
        self.index: torch.Tensor | None = None
        self.targets: torch.Tensor | None = None
        self.reduce = None

    def set_targets(self, index: torch.Tensor | None, targets: torch.Tensor | None, reduce=None) -> None:
        """``reduce(hidden_rows, weight)``, when given, replaces the summed cross-entropy (the
        preference losses need per-answer sums: qvltune.preference.loss). It runs inside this
        forward, where ZeRO-3 has the weight gathered."""
        self.index, self.targets, self.reduce = index, targets, reduce

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.targets is None:
            return nn.functional.linear(hidden, self.weight)
        flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.index)
        if self.reduce is not None:
            return self.reduce(flat, self.weight)
        return linear_cross_entropy(flat, self.weight, self.targets)


def install_loss_head(model) -> LossHead | None:
    """Replace the HF model's ``lm_head`` (a bias-free Linear) by a ``LossHead``; None if it is wrapped
    (e.g. peft's modules_to_save copy when lm_head trains beside LoRA): then the plain path is used."""
    head = model.get_output_embeddings()
    if isinstance(head, LossHead):
        return head
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    loss_head = LossHead(head)
    model.set_output_embeddings(loss_head)
    return loss_head


def loss_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat index of each position whose next token is labelled, that label) for a (B, L) batch.

    Computed on the host by the collator: the GPU never has to report how many there are."""
    b, n = labels.shape
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    flat = shifted.reshape(-1)
    index = (flat != IGNORE_INDEX).nonzero()[:, 0]
    return index, flat.index_select(0, index)
