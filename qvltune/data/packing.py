"""Batches: padded (the plain path) and packed (several samples per row, exactly isolated).

Packing concatenates whole samples into rows of at most ``max_seq_length`` tokens (images are never
split: a sample is the unit). Each row gets 4-row ``position_ids``: row 0 holds text positions that
restart at 0 for every sample, rows 1-3 that sample's own M-RoPE ids, computed by transformers' own
``get_rope_index``. transformers detects the packed rows from the restarting positions and builds a
block-diagonal causal mask (sdpa/eager) or varlen calls (flash/varlen attention), so no token attends
across samples; the first label of every sample is masked so no loss term crosses a boundary either.
"""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass
from typing import Any

import torch

from qvltune.data.tokenize import IGNORE_INDEX, Encoded


def pack_bins(lengths: list[int], capacity: int, seed: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of sample indices into rows of at most ``capacity`` tokens.

    Deterministic for a seed: ties are broken by a seeded shuffle, and the bins are shuffled so rows
    do not come sorted by length. First fit is found in a max-tree of the rows' free room (leaves not
    yet opened hold a whole row), so a million samples pack in seconds: the plain scan over open rows
    is O(samples x rows), hours at that size."""
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    rng.shuffle(order)
    order.sort(key=lambda i: -lengths[i])
    if not order:
        return []
    if lengths[order[0]] > capacity:
        i = order[0]
        raise ValueError(f"sample {i} has {lengths[i]} tokens, more than the row capacity {capacity}")
    # First fit leaves at most one row half empty or less, so it opens at most 2 * total / capacity + 1 rows.
    most = min(len(order), 2 * sum(lengths) // max(1, capacity) + 2)
    size = 1
    while size < most:
        size *= 2
    room = [capacity] * (2 * size)  # room[node]: the most free room of a row under it; leaves at size..2*size
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        node = 1
        while node < size:  # the leftmost row with room: first fit
            node = 2 * node if room[2 * node] >= n else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([i])
        else:
            bins[b].append(i)
        room[node] -= n
        node //= 2
        while node:
            top = max(room[2 * node], room[2 * node + 1])
            if room[node] == top:
                break
            room[node] = top
            node //= 2
    rng.shuffle(bins)
    return bins


def padding_fraction(row_lengths: list[list[int]]) -> float:
    """Fraction of pad tokens when each batch (a list of row lengths) is padded to its longest row."""
    total = sum(max(rows) * len(rows) for rows in row_lengths if rows)
    real = sum(sum(rows) for rows in row_lengths)
    return 0.0 if total == 0 else 1.0 - real / total


class RopeIndex:
    """transformers' own M-RoPE position code for a model config, without the model's weights.

    The collator runs in DataLoader workers where the model is not available; borrowing the model
    class's methods keeps packed positions identical to what the model computes for one sample."""

    def __init__(self, config: Any):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

        self.config = config
        model_cls = Qwen3VLModel
        if getattr(config, "model_type", "") == "qwen3_vl_moe":
            from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeModel

            model_cls = Qwen3VLMoeModel
        self._get_rope_index = model_cls.get_rope_index
        self._params = set(inspect.signature(model_cls.get_rope_index).parameters)
        # Helpers that get_rope_index calls on self in some transformers versions.
        for name in ("get_vision_position_ids",):
            if hasattr(model_cls, name):
                setattr(self, name, getattr(model_cls, name).__get__(self))

    def __call__(self, sample: Encoded) -> torch.Tensor:
        """(3, n) M-RoPE positions of one sample."""
        ids = torch.tensor([sample.input_ids])
        kwargs: dict[str, Any] = {"image_grid_thw": sample.image_grid_thw, "video_grid_thw": sample.video_grid_thw}
        if "mm_token_type_ids" in self._params:
            kwargs["mm_token_type_ids"] = torch.tensor([sample.mm_token_type_ids])
        if sample.image_grid_thw is None and sample.video_grid_thw is None:
            n = len(sample.input_ids)
            return torch.arange(n).expand(3, n)
        positions, _ = self._get_rope_index(self, ids, **kwargs)
        return positions[:, 0, :]


def _cat(tensors: list[Any]) -> Any:
    tensors = [t for t in tensors if t is not None]
    return torch.cat(tensors) if tensors else None


@dataclass
class BatchStats:
    """Counts the metrics need, computed on the host so reading them never syncs the GPU."""

    real_tokens: int
    padded_tokens: int
    samples: int
    trained_tokens: int


def _loss_targets(out: dict[str, Any]) -> None:
    from qvltune.loss import loss_positions

    out["loss_index"], out["loss_targets"] = loss_positions(out["labels"])


def _media(samples: list[Encoded], out: dict[str, Any]) -> None:
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        value = _cat([getattr(s, key) for s in samples])
        if value is not None:
            out[key] = value


def dummy_image(image_token_id: int, vision_config: Any) -> Encoded:
    """One image token backed by a blank 32x32 image (a 2x2 patch grid), never labelled.

    Under ZeRO-3 every rank must run the same modules in the same order: a rank whose micro-batch
    has no image would skip the vision tower while the others gather its weights, and the job hangs
    (NCCL) or aborts (gloo: "Received data size doesn't match expected size"). Giving such a batch
    this dummy image, isolated from the real tokens, keeps every rank in step; it affects no loss
    term, so its gradients are zeros. It also keeps a run that trains only the vision side going on
    one rank: without it, a text-only micro-batch gives no trained parameter a gradient
    (qvltune.training_data.gets_dummy_image says when)."""
    c = vision_config
    dim = c.in_channels * c.temporal_patch_size * c.patch_size**2
    return Encoded([image_token_id], [IGNORE_INDEX], [1], torch.zeros(4, dim), torch.tensor([[1, 2, 2]]))


def _nonempty(items: list[list[Encoded]], pad_token_id: int) -> list[list[Encoded]]:
    """Drop rows whose samples were all skipped as bad; an entirely empty batch becomes one pad
    token without labels (it adds nothing to the loss, and every rank still takes the step)."""
    rows = [item for item in items if item]
    return rows or [[Encoded([pad_token_id], [IGNORE_INDEX], [0])]]


def _with_dummy(items: list[list[Encoded]], dummy: Encoded | None) -> tuple[list[list[Encoded]], bool]:
    """Append the dummy image to the first row when no sample of the batch has media."""
    if dummy is None or any(s.pixel_values is not None or s.pixel_values_videos is not None for item in items for s in item):
        return items, False
    return [items[0] + [dummy], *items[1:]], True


def _varlen_kwargs(segments: list[int]) -> dict[str, Any]:
    """Sample boundaries over the flattened batch, for varlen attention (see qvltune.attention)."""
    from qvltune.attention import cu_seqlens

    cu = cu_seqlens([n for n in segments if n > 0])
    longest = max(segments)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


class PaddedCollator:
    """The plain path: one sample per row, right-padded, with an attention mask (the model computes
    M-RoPE positions itself). With ``varlen`` each row's tokens and its pad tail become segments."""

    def __init__(self, pad_token_id: int, dummy: Encoded | None = None, varlen: bool = False):
        self.pad = pad_token_id
        self.dummy = dummy
        self.varlen = varlen

    def __call__(self, items: list[list[Encoded]]) -> dict[str, Any]:
        items, dummied = _with_dummy(_nonempty(items, self.pad), self.dummy)
        # A dummy image rides at the end of row 0 with attention mask 0: no real token sees it.
        samples = [s for item in items for s in item if s is not self.dummy]
        rows = [len(s) for s in samples]
        if dummied:
            rows[0] += 1
        width = max(rows)
        n = len(samples)
        input_ids = torch.full((n, width), self.pad, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        types = torch.zeros((n, width), dtype=torch.long)
        for r, s in enumerate(samples):
            k = len(s)
            input_ids[r, :k] = torch.tensor(s.input_ids)
            labels[r, :k] = torch.tensor(s.labels)
            mask[r, :k] = 1
            types[r, :k] = torch.tensor(s.mm_token_type_ids)
        if dummied:
            k = len(samples[0])
            input_ids[0, k] = self.dummy.input_ids[0]
            types[0, k] = 1
        out = {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "mm_token_type_ids": types}
        if self.varlen:
            # The dummy image token (if any) is attended by no real token: give it its own segment.
            segments = []
            for r, n in enumerate(rows):
                real = n - 1 if (dummied and r == 0) else n
                segments += [real, n - real, width - n]
            out.update(_varlen_kwargs(segments))
        _loss_targets(out)
        _media(samples + ([self.dummy] if dummied else []), out)
        out["stats"] = BatchStats(sum(len(s) for s in samples), n * width, n, sum(s.trained_tokens for s in samples))
        return out


class PackedCollator:
    """Each item is one packed row (a list of samples); rows are padded to the longest in the batch."""

    def __init__(self, pad_token_id: int, rope_index: RopeIndex, dummy: Encoded | None = None, varlen: bool = False):
        self.pad = pad_token_id
        self.rope_index = rope_index
        self.dummy = dummy
        self.varlen = varlen

    def __call__(self, items: list[list[Encoded]]) -> dict[str, Any]:
        # A dummy image is one more (unlabelled) segment of row 0: the packed mask isolates it.
        items, _ = _with_dummy(_nonempty(items, self.pad), self.dummy)
        width = max(sum(len(s) for s in item) for item in items)
        n = len(items)
        input_ids = torch.full((n, width), self.pad, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        types = torch.zeros((n, width), dtype=torch.long)
        positions = torch.zeros((4, n, width), dtype=torch.long)
        segments: list[int] = []
        for r, item in enumerate(items):
            k = 0
            for s in item:
                m = len(s)
                segments.append(m)
                input_ids[r, k : k + m] = torch.tensor(s.input_ids)
                labels[r, k : k + m] = torch.tensor(s.labels)
                labels[r, k] = IGNORE_INDEX  # never predict a sample's first token from the previous sample
                types[r, k : k + m] = torch.tensor(s.mm_token_type_ids)
                positions[0, r, k : k + m] = torch.arange(m)
                positions[1:, r, k : k + m] = self.rope_index(s)
                k += m
            # The pad tail restarts its positions too, so it forms its own (masked, unlabelled) segment.
            positions[:, r, k:] = torch.arange(width - k)
            segments.append(width - k)
        # use_cache=False matters: transformers only looks for packed rows when no KV cache is built.
        out = {"input_ids": input_ids, "labels": labels, "position_ids": positions, "mm_token_type_ids": types, "use_cache": False}
        if self.varlen:
            out.update(_varlen_kwargs(segments))
        _loss_targets(out)
        samples = [s for item in items for s in item]
        _media(samples, out)
        real = [s for s in samples if s is not self.dummy]
        out["stats"] = BatchStats(sum(len(s) for s in real), n * width, len(real), sum(s.trained_tokens for s in real))
        return out
