"""Packing is exact: a packed row gives every sample the same loss as its own unpadded forward."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from conftest import write_image
from qvltune.data.formats import parse_record
from qvltune.data.packing import PackedCollator, PaddedCollator, RopeIndex, pack_bins, padding_fraction
from qvltune.data.record import RawItem
from qvltune.data.tokenize import IGNORE_INDEX, Encoder

# fp32 on CPU: the packed and unpacked forwards differ only by summation order.
TOLERANCE = 1e-4


def records(tmp_path: Path):
    write_image(tmp_path / "a.png", (192, 128), (200, 40, 40))
    write_image(tmp_path / "b.png", (64, 96), (40, 40, 200))
    write_image(tmp_path / "c.png", (128, 128), (40, 200, 40))
    values = [
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red"}]},
        {"messages": [{"role": "user", "content": "Say something long about colours."}, {"role": "assistant", "content": "Blue and green are colours of the sky and trees."}]},
        {"image": ["b.png", "c.png"], "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "<image><image>Which is blue?"}, {"from": "gpt", "value": "The first."}, {"from": "human", "value": "And green?"}, {"from": "gpt", "value": "The second."}]},
        {"image": "c.png", "conversations": [{"from": "human", "value": "<image>Colour?"}, {"from": "gpt", "value": "green"}]},
    ]
    out = []
    for i, v in enumerate(values):
        rec, problems = parse_record(RawItem(i, i + 1, v), str(tmp_path / "d.jsonl"))
        assert not problems
        out.append(rec)
    return out


def per_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss of each position's label (next-token), 0 where unlabelled; aligned with labels."""
    losses = torch.zeros(labels.shape, dtype=torch.float32)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none")
    losses[:, 1:] = ce
    return losses


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from qvltune.model import load_model

    return load_model(str(tiny_model_dir), dtype="float32", attn_implementation="sdpa").eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_losses_equal_unpacked(tmp_path, tiny_model, tiny_processor, attn):
    tiny_model.set_attn_implementation(attn)
    encoder = Encoder(tiny_processor)
    samples = [encoder.encode(r) for r in records(tmp_path)]
    # A sample whose first token carries a label (chat samples never do: they open with the user's
    # turn): packed after another sample, that label would be predicted from the previous sample's
    # last token; the collator must mask it.
    samples[1] = dataclasses.replace(samples[1], labels=[samples[1].input_ids[0], *samples[1].labels[1:]])
    model_inputs = ("input_ids", "mm_token_type_ids", "position_ids", "pixel_values", "image_grid_thw", "attention_mask", "use_cache")

    unpacked = []
    for s in samples:
        batch = PaddedCollator(0)([[s]])
        with torch.no_grad():
            logits = tiny_model(**{k: v for k, v in batch.items() if k in model_inputs}).logits
        tok = per_token_losses(logits, batch["labels"])[0]
        n = (batch["labels"][0, 1:] != IGNORE_INDEX).sum()
        unpacked.append(tok.sum() / n)

    collator = PackedCollator(tiny_processor.tokenizer.pad_token_id, RopeIndex(tiny_model.config))
    # Two rows of different lengths in one batch: the shorter is padded.
    batch = collator([samples[:3], samples[3:]])
    assert "attention_mask" not in batch
    with torch.no_grad():
        logits = tiny_model(**{k: v for k, v in batch.items() if k in model_inputs}).logits
    tok = per_token_losses(logits, batch["labels"])
    labels = batch["labels"]
    row, k = 0, 0
    for i, s in enumerate(samples):
        if i == 3:
            row, k = 1, 0
        span = slice(k, k + len(s))
        lab = labels[row, span]
        assert lab[0] == IGNORE_INDEX  # no loss term crosses into a sample from the one before
        assert torch.equal(lab[1:], torch.tensor(s.labels[1:]))  # labels stay inside their sample
        packed_loss = tok[row, span].sum() / (lab != IGNORE_INDEX).sum()
        assert abs(packed_loss - unpacked[i]) < TOLERANCE, (i, attn, float(packed_loss), float(unpacked[i]))
        k += len(s)
    assert (labels[1, k:] == IGNORE_INDEX).all()  # the pad tail is never trained
    # Positions: text row restarts at 0 per sample; the M-RoPE rows equal the model's own for a lone sample.
    pos = batch["position_ids"]
    assert pos[0, 0, len(samples[0])] == 0
    lone = tiny_model.model.get_rope_index(
        torch.tensor([samples[2].input_ids]), mm_token_type_ids=torch.tensor([samples[2].mm_token_type_ids]), image_grid_thw=samples[2].image_grid_thw
    )[0][:, 0]
    a = len(samples[0]) + len(samples[1])
    assert torch.equal(pos[1:, 0, a : a + len(samples[2])], lone)


def test_pack_bins_fills_rows_and_is_deterministic():
    lengths = [50, 200, 120, 90, 30, 250, 10, 60, 180, 75]
    bins = pack_bins(lengths, 256, seed=0)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 256 for b in bins)
    assert bins == pack_bins(lengths, 256, seed=0)
    assert len(bins) <= 6  # 1065 tokens need at least 5 rows of 256
    with pytest.raises(ValueError):
        pack_bins([300], 256, seed=0)


def test_padding_fraction():
    assert padding_fraction([[10, 10]]) == 0.0
    assert padding_fraction([[10, 5]]) == pytest.approx(0.25)
    assert padding_fraction([[4], [8, 8]]) == 0.0


def test_pack_bins_is_plain_first_fit_decreasing():
    """The max-tree finds the same rows as scanning the open rows for the first with room."""
    import random

    def first_fit(lengths, capacity, seed):
        order = list(range(len(lengths)))
        rng = random.Random(seed)
        rng.shuffle(order)
        order.sort(key=lambda i: -lengths[i])
        bins, free = [], []
        for i in order:
            for b, room in enumerate(free):
                if room >= lengths[i]:
                    bins[b].append(i)
                    free[b] -= lengths[i]
                    break
            else:
                bins.append([i])
                free.append(capacity - lengths[i])
        rng.shuffle(bins)
        return bins

    rng = random.Random(1)
    for seed in range(200):
        capacity = rng.choice([8, 50, 256, 4096])
        lengths = [rng.randint(1, capacity if rng.random() < 0.5 else max(1, capacity // 5)) for _ in range(rng.randint(0, 300))]
        assert pack_bins(lengths, capacity, seed) == first_fit(lengths, capacity, seed), seed
