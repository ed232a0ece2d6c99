"""The DPO and IPO losses, and per-answer log-probabilities from the fused answer-only head.

A preference pair is a prompt with a chosen and a rejected answer. Its loss depends on four numbers:
the summed log-probability of each answer under the policy and under the reference model. Those
sums are taken over the answer tokens only, chunk by chunk from the language model's last hidden
states (``qvltune.loss``'s approach): full-vocabulary logits are never materialised for the batch.

The loss of a pair cannot be written as a sum over tokens (it is a sigmoid of the difference of two
sums), so the gradient of a token's logits is ``dL/dlogp(answer) * (one_hot - softmax)``, where the
first factor is known only once every token of both answers has been seen. ``linear_preference``
therefore computes, in its forward: the per-token log-probabilities and the unscaled gradient w.r.t.
the hidden states (one pass), then the per-answer factors from the pair losses, then (only when the
output weight trains) a second pass for the weight's gradient. Backward only scales what forward
stored; nothing is recomputed after the weights were released (ZeRO-3 gathers ``lm_head`` only while
its forward runs).

Losses (``preference_losses``), with ``h = (logp_c - ref_c) - (logp_r - ref_r)``:
- ``sigmoid`` (DPO, Rafailov et al. 2023): ``-(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)``,
  ``e`` the label smoothing (conservative DPO; 0 is plain DPO).
- ``ipo`` (Azar et al. 2023): ``(h - 1 / (2 beta))^2`` on log-probabilities averaged over each
  answer's tokens (as TRL and the paper's implementation do).
Rewards are ``beta * (logp - ref)`` of each answer (averaged per token for IPO, like the loss).
``rpo_alpha`` > 0 adds ``rpo_alpha`` x the chosen answer's mean cross-entropy per token to each
pair's loss (RPO, Pang et al. 2024; TRL's ``rpo_alpha``, LLaMA-Factory's ``pref_ftx``): DPO alone
can raise the chosen answer's reward while lowering its probability, which matters when the
preferred answers lie far from what the model generates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qvltune.loss import CHUNK_ELEMENTS, IGNORE_INDEX

LOSS_TYPES = ("sigmoid", "ipo")


@dataclass(frozen=True)
class PreferenceLoss:
    beta: float = 0.1
    loss: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0


def preference_losses(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, spec: PreferenceLoss,
    chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen reward, rejected reward) from summed answer log-probs, all shape (P,).

    ``*_tokens`` (answer lengths) are needed by IPO, which compares per-token means, and by RPO."""
    raw_chosen = chosen
    if spec.loss == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs the answers' token counts")
        ct, rt = chosen_tokens.clamp(min=1).to(chosen.dtype), rejected_tokens.clamp(min=1).to(chosen.dtype)
        chosen, ref_chosen, rejected, ref_rejected = chosen / ct, ref_chosen / ct, rejected / rt, ref_rejected / rt
    chosen_ratio = chosen - ref_chosen
    rejected_ratio = rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if spec.loss == "sigmoid":
        e = spec.label_smoothing
        losses = -(1 - e) * F.logsigmoid(spec.beta * h) - e * F.logsigmoid(-spec.beta * h)
    elif spec.loss == "ipo":
        losses = (h - 1 / (2 * spec.beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {spec.loss!r} (known: {', '.join(LOSS_TYPES)})")
    if spec.rpo_alpha:
        if chosen_tokens is None:
            raise ValueError("rpo_alpha needs the chosen answers' token counts")
        # The raw summed log-prob (before IPO's averaging) over the answer's tokens: its mean NLL.
        losses = losses - spec.rpo_alpha * raw_chosen / chosen_tokens.clamp(min=1).to(raw_chosen.dtype)
    return losses, spec.beta * chosen_ratio.detach(), spec.beta * rejected_ratio.detach()


@dataclass
class Pairs:
    """Where the answers of a batch's pairs are, prepared by the collator on the host.

    ``row_sample``: for each labelled position (``loss_index`` order), the answer (sample) it belongs
    to; ``chosen`` / ``rejected``: the sample index of each pair's answers; ``tokens``: answer lengths
    in labelled tokens; ``reference``: the reference log-prob of every answer when precomputed."""

    row_sample: torch.Tensor  # (N,) long
    chosen: torch.Tensor  # (P,) long
    rejected: torch.Tensor  # (P,) long
    tokens: torch.Tensor  # (S,) long
    reference: torch.Tensor | None = None  # (S,) float64

    @property
    def samples(self) -> int:
        return int(self.tokens.shape[0])

    def to(self, device) -> Pairs:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Pairs(move(self.row_sample), move(self.chosen), move(self.rejected), move(self.tokens), move(self.reference))


def pair_loss_sum(logps: torch.Tensor, reference: torch.Tensor, pairs: Pairs, spec: PreferenceLoss) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed loss over the batch's pairs, chosen rewards, rejected rewards) from per-answer log-probs."""
    tokens = pairs.tokens.to(logps.device)
    losses, rc, rr = preference_losses(
        logps[pairs.chosen], logps[pairs.rejected], reference[pairs.chosen], reference[pairs.rejected], spec, tokens[pairs.chosen], tokens[pairs.rejected]
    )
    return losses.sum(), rc, rr


def _token_logps(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, acc: torch.dtype):
    """(logits upcast, their logsumexp, log-prob of each target, valid mask) of one chunk of rows."""
    logits = (h @ weight.t()).to(acc)
    lse = torch.logsumexp(logits, dim=-1)
    valid = t != IGNORE_INDEX
    safe = t.clamp(min=0)
    picked = logits.gather(1, safe[:, None])[:, 0]
    return logits, lse, (picked - lse) * valid, valid, safe


def _rows(weight: torch.Tensor) -> int:
    return max(1, CHUNK_ELEMENTS // weight.shape[0])


def linear_sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, row_sample: torch.Tensor, samples: int) -> torch.Tensor:
    """Summed log-prob of each sample's labelled tokens, (samples,), without gradients (the reference)."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    out = torch.zeros(samples, dtype=acc, device=hidden.device)
    rows = _rows(weight)
    with torch.no_grad():
        for start in range(0, hidden.shape[0], rows):
            _, _, lp, _, _ = _token_logps(hidden[start : start + rows], weight, targets[start : start + rows], acc)
            out.index_add_(0, row_sample[start : start + rows], lp)
    return out


class _LinearPreference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, row_sample, samples: int, loss_of: Callable, need_hidden_grad: bool, need_weight_grad: bool):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        rows = _rows(weight)
        logps = torch.zeros(samples, dtype=acc, device=hidden.device)
        unit = torch.empty_like(hidden) if need_hidden_grad else None  # d logp(token) / d hidden, unscaled
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start : start + rows], targets[start : start + rows]
            logits, lse, lp, valid, safe = _token_logps(h, weight, t, acc)
            logps.index_add_(0, row_sample[start : start + rows], lp)
            if unit is not None:
                # d logp / d logits = one_hot - softmax, on labelled rows (in place: logits -> -probs).
                g = logits.sub_(lse[:, None]).exp_().neg_()
                g.scatter_add_(1, safe[:, None], valid[:, None].to(g.dtype))
                g.mul_(valid[:, None])
                unit[start : start + rows] = g.to(hidden.dtype) @ weight
            del logits
        # The pair losses from the sums, and d loss / d logp of every answer (a tiny graph of (S,) tensors).
        with torch.enable_grad():
            leaf = logps.detach().requires_grad_(True)
            loss = loss_of(leaf)
            (scale,) = torch.autograd.grad(loss, leaf) if (need_hidden_grad or need_weight_grad) else (None,)
        grad_hidden = grad_weight = None
        if scale is not None:
            row_scale = scale[row_sample]  # (N,)
            if unit is not None:
                grad_hidden = unit.mul_(row_scale[:, None].to(unit.dtype))
            if need_weight_grad:
                grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
                for start in range(0, hidden.shape[0], rows):
                    h, t = hidden[start : start + rows], targets[start : start + rows]
                    logits, lse, _, valid, safe = _token_logps(h, weight, t, acc)
                    g = logits.sub_(lse[:, None]).exp_().neg_()
                    g.scatter_add_(1, safe[:, None], valid[:, None].to(g.dtype))
                    g.mul_((valid.to(acc) * row_scale[start : start + rows].to(acc))[:, None])
                    grad_weight.addmm_(g.t(), h.to(acc))
                    del logits, g
        ctx.save_for_backward(grad_hidden if grad_hidden is not None else torch.empty(0), grad_weight if grad_weight is not None else torch.empty(0))
        ctx.has = (grad_hidden is not None, grad_weight is not None)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(logps)
        return loss.detach(), logps

    @staticmethod
    def backward(ctx, grad_loss, grad_logps):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_loss.to(grad_hidden.dtype) if ctx.has[0] else None
        gw = (grad_weight * grad_loss).to(ctx.weight_dtype) if ctx.has[1] else None
        return gh, gw, None, None, None, None, None, None


def linear_preference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, pairs: Pairs, reference: torch.Tensor, spec: PreferenceLoss) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed pair loss of the batch, per-answer policy log-probs (detached)) from the labelled
    positions' hidden states (N, H), the output weight and their targets. ``reference``: (S,)."""
    grad = torch.is_grad_enabled()
    reference = reference.detach()

    def loss_of(logps: torch.Tensor) -> torch.Tensor:
        return pair_loss_sum(logps, reference.to(logps.dtype), pairs, spec)[0]

    return _LinearPreference.apply(hidden, weight, targets, pairs.row_sample, pairs.samples, loss_of, grad and hidden.requires_grad, grad and weight.requires_grad)


def logits_sequence_logps(logits: torch.Tensor, targets: torch.Tensor, row_sample: torch.Tensor, samples: int) -> torch.Tensor:
    """Summed log-prob of each sample's labelled tokens from already computed logits rows (N, V):
    the plain path (``optim.fused_loss: false``, or an ``lm_head`` wrapped by peft), with autograd."""
    lp = -F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return torch.zeros(samples, dtype=lp.dtype, device=lp.device).index_add(0, row_sample, lp)
