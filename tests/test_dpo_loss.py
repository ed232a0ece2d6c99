"""The DPO/IPO losses from the fused answer-only head equal a direct implementation (full logits, one
answer at a time), value and gradients, to 1e-5 in fp32; the beta -> 0 limit; a hand-computed pair."""

from __future__ import annotations

import math

import pytest
import torch

from qvltune import loss as loss_mod
from qvltune.loss import IGNORE_INDEX
from qvltune.preference.loss import Pairs, PreferenceLoss, linear_preference, linear_sequence_logps, preference_losses


def direct_dpo(hiddens, weight, labels, ref, spec: PreferenceLoss):
    """The textbook computation: per answer, full logits, log_softmax, gather, sum; then the loss of
    each pair (answers 2k chosen, 2k+1 rejected) written out from the papers' formulas."""
    logps, lengths = [], []
    for h, y in zip(hiddens, labels):
        lp = torch.log_softmax(h @ weight.t(), dim=-1)
        keep = y != IGNORE_INDEX
        logps.append(lp[keep].gather(1, y[keep][:, None]).sum())
        lengths.append(int(keep.sum()))
    losses = []
    for k in range(len(logps) // 2):
        c, r = 2 * k, 2 * k + 1
        pc, pr, rc, rr = logps[c], logps[r], ref[c], ref[r]
        if spec.loss == "ipo":
            pc, rc, pr, rr = pc / lengths[c], rc / lengths[c], pr / lengths[r], rr / lengths[r]
        h = (pc - rc) - (pr - rr)
        if spec.loss == "sigmoid":
            e = spec.label_smoothing
            losses.append(-(1 - e) * torch.log(torch.sigmoid(spec.beta * h)) - e * torch.log(torch.sigmoid(-spec.beta * h)))
        else:
            losses.append((h - 1 / (2 * spec.beta)) ** 2)
        if spec.rpo_alpha:
            losses[-1] = losses[-1] + spec.rpo_alpha * (-logps[c] / lengths[c])  # the chosen answer's NLL per token
    return torch.stack(losses).sum(), torch.stack(logps)


def random_batch(seed=0, pairs=3, vocab=40, dim=16):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, dim, generator=g) * 0.5
    hiddens, labels = [], []
    for _ in range(2 * pairs):
        n = int(torch.randint(3, 9, (1,), generator=g))
        hiddens.append(torch.randn(n, dim, generator=g))
        y = torch.randint(0, vocab, (n,), generator=g)
        y[: int(torch.randint(1, n - 1, (1,), generator=g))] = IGNORE_INDEX  # the prompt part: unlabelled
        labels.append(y)
    ref = torch.randn(2 * pairs, generator=g, dtype=torch.float64) - 10
    return hiddens, weight, labels, ref


def packed(hiddens, labels, ref):
    """The collator's layout: every answer's labelled rows concatenated, each row naming its answer."""
    rows = torch.cat([h[y != IGNORE_INDEX] for h, y in zip(hiddens, labels)])
    targets = torch.cat([y[y != IGNORE_INDEX] for y in labels])
    row_sample = torch.cat([torch.full((int((y != IGNORE_INDEX).sum()),), i) for i, y in enumerate(labels)])
    tokens = torch.tensor([int((y != IGNORE_INDEX).sum()) for y in labels])
    n = len(labels)
    return rows, targets, Pairs(row_sample, torch.arange(0, n, 2), torch.arange(1, n, 2), tokens, ref)


@pytest.mark.parametrize("spec", [PreferenceLoss(0.1, "sigmoid", 0.0), PreferenceLoss(0.5, "sigmoid", 0.2), PreferenceLoss(0.1, "ipo", 0.0), PreferenceLoss(0.1, "sigmoid", 0.0, 0.7), PreferenceLoss(0.1, "ipo", 0.0, 0.7)], ids=["dpo", "dpo-smoothed", "ipo", "rpo", "ipo-rpo"])
@pytest.mark.parametrize("chunk_elements", [1 << 28, 5 * 40])  # one chunk, and 5-row chunks
def test_fused_loss_and_gradients_equal_the_direct_computation(monkeypatch, spec, chunk_elements):
    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", chunk_elements)
    import qvltune.preference.loss as pl

    monkeypatch.setattr(pl, "CHUNK_ELEMENTS", chunk_elements)
    hiddens, weight, labels, ref = random_batch()
    hiddens = [h.requires_grad_(True) for h in hiddens]
    weight.requires_grad_(True)
    want, want_logps = direct_dpo(hiddens, weight, labels, ref.float(), spec)
    (want * 0.7).backward()
    want_gh = [h.grad.clone() for h in hiddens]
    want_gw = weight.grad.clone()
    for h in hiddens:
        h.grad = None
    weight.grad = None

    rows, targets, pairs = packed(hiddens, labels, ref)
    rows.retain_grad()
    got, got_logps = linear_preference(rows, weight, targets, pairs, ref, spec)
    (got * 0.7).backward()
    assert torch.allclose(got.float(), want, rtol=1e-5, atol=1e-5), (got, want)
    assert torch.allclose(got_logps.float(), want_logps, rtol=1e-5, atol=1e-5)
    # Gradients w.r.t. every hidden state (prompt rows get none) and the output weight.
    for h, y, g in zip(hiddens, labels, want_gh):
        assert torch.allclose(h.grad[y != IGNORE_INDEX], g[y != IGNORE_INDEX], rtol=1e-5, atol=1e-6)
        assert torch.all(g[y == IGNORE_INDEX] == 0)
    assert torch.allclose(weight.grad, want_gw, rtol=1e-5, atol=1e-6)
    # The reference path (no gradients) gives the same sums.
    assert torch.allclose(linear_sequence_logps(rows.detach(), weight.detach(), targets, pairs.row_sample, pairs.samples), want_logps.detach(), rtol=1e-5, atol=1e-5)


def test_frozen_weight_gets_no_gradient():
    hiddens, weight, labels, ref = random_batch(seed=1)
    rows, targets, pairs = packed(hiddens, labels, ref)
    rows.requires_grad_(True)
    loss, _ = linear_preference(rows, weight, targets, pairs, ref, PreferenceLoss())
    loss.backward()
    assert rows.grad is not None and rows.grad.abs().sum() > 0 and weight.grad is None


def test_beta_to_zero_limit():
    """As beta -> 0 the DPO loss of every pair -> log 2 and its gradient -> -beta/2 d(h)."""
    c, r = torch.tensor([-3.0, -7.0], dtype=torch.float64, requires_grad=True), torch.tensor([-5.0, -2.0], dtype=torch.float64, requires_grad=True)
    ref_c, ref_r = torch.tensor([-4.0, -6.0], dtype=torch.float64), torch.tensor([-4.5, -3.0], dtype=torch.float64)
    beta = 1e-6
    losses, rc, rr = preference_losses(c, r, ref_c, ref_r, PreferenceLoss(beta, "sigmoid", 0.0))
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)), atol=1e-6)
    assert rc.abs().max() < 1e-5 and rr.abs().max() < 1e-5
    losses.sum().backward()
    assert torch.allclose(c.grad / beta, torch.full_like(c, -0.5), atol=1e-6)
    assert torch.allclose(r.grad / beta, torch.full_like(r, 0.5), atol=1e-6)


def test_hand_computed_pair():
    """beta 0.1; chosen -10 (reference -12), rejected -9 (reference -8):
    h = (−10 − −12) − (−9 − −8) = 2 + 1 = 3; loss = −log σ(0.3) = log(1 + e^−0.3) = 0.554355;
    with label smoothing 0.1: 0.9·0.554355 + 0.1·log(1 + e^0.3) = 0.498920 + 0.085436 = 0.584355;
    IPO (1 token each): (3 − 5)² = 4; rewards 0.2 and −0.1."""
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    args = (t(-10.0), t(-9.0), t(-12.0), t(-8.0))
    loss, rc, rr = preference_losses(*args, PreferenceLoss(0.1, "sigmoid", 0.0))
    assert loss.item() == pytest.approx(0.554355, abs=1e-6)
    assert rc.item() == pytest.approx(0.2) and rr.item() == pytest.approx(-0.1)
    assert preference_losses(*args, PreferenceLoss(0.1, "sigmoid", 0.1))[0].item() == pytest.approx(0.584355, abs=1e-6)
    ones = torch.ones(1)
    assert preference_losses(*args, PreferenceLoss(0.1, "ipo", 0.0), ones, ones)[0].item() == pytest.approx(4.0)
