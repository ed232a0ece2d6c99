"""Proving a merged model: the probe batch, its logits against a high-precision reference, and the
weights against the base, tensor by tensor.

**Logits, in two stages.** The reference is base + adapter *unmerged* in float32 on the merge's
device: the adapter's function, computed as exactly as the stack allows.

1. *The merge.* ``merge_and_unload`` runs in float32; before any rounding, the merged model's logits
   on the probe must equal the reference's up to float32 reassociation (``W x + B A x`` summed in
   another order than ``(W + BA) x``): at most ``FP32_TOLERANCE`` of the reference logits' RMS. A
   merge mistake (a wrong LoRA scale, a module trained beside LoRA left out, an adapter added twice)
   moves logits by a share of what training moved them, orders of magnitude beyond that, and no
   bf16 noise can hide it: ``tests/test_merge.py`` plants each one and sees this stage fail.
2. *The rounding and the saved folder.* The merged weights are cast once to the output dtype. What
   that costs is measured, not guessed: the cast model's error against the reference, in memory. The
   folder written to disk, reloaded as any user would, must be within ``ERROR_FACTOR`` of it (equal,
   when saving and reloading lose nothing).

Beside them, the unmerged model in the output dtype (the base's weights as stored, the adapter's
product added in float32, as peft serves an adapter) is measured too and reported: rounding
``W + BA`` to bf16 costs more than keeping ``W`` exact and adding ``BAx`` (2-3x in RMS on 8B), which
is why a fixed fraction of either error cannot be the gate.

**Weights.** Every tensor of the saved folder equals the base's (cast to the output dtype) exactly
where training left it, and differs where training changed it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvltune.tiny import resolve_model_path

# Stage 1: float32 merged vs float32 unmerged, RMS relative to the reference logits' RMS. Float32
# reassociation measured on the H200 (benchmarks/RESULTS.md): 3e-6 at 2B, 7e-6 at 8B; 2e-7 on the
# tiny model. The planted merge mistakes were 3e-3 to 0.4 at 2B.
# Warn (not fail) when the saved 16-bit merge is this many times further from the reference than
# the adapter unmerged in the same dtype (LogitCheck.rounding_note).
ROUNDING_WARN = 2.0
FP32_TOLERANCE = 1e-4
# Stage 2: the reloaded folder may be this many times further from the reference than the merged
# weights cast once in memory (ratio 1.0 when the saved folder is exactly those weights).
ERROR_FACTOR = 2.0

_PROBE_TURNS = [
    ("What colour is the shape?", "The shape is red."),
    ("Describe the picture in one sentence.", "A blue circle above a green square."),
]


@dataclass
class LogitCheck:
    """Errors against the float32 reference (base + adapter unmerged), RMS and max over the probe's
    real tokens (padding excluded) and the whole vocabulary."""

    merge_rms: float  # stage 1: float32 merged (before the cast)
    merge_max: float
    saved_rms: float  # stage 2: the saved folder, reloaded in the output dtype
    saved_max: float
    cast_rms: float  # the float32 merge cast once to the output dtype, in memory: what the dtype costs
    cast_max: float
    unmerged_rms: float  # base + adapter unmerged in the output dtype (reported, not gated)
    unmerged_max: float
    reference_rms: float  # RMS of the reference logits
    scale: float  # the largest |reference logit|
    training_effect: float  # max |reference - base|: how far training moved the logits
    top1_agreement: float  # positions where the saved model's argmax is the reference's
    positions: int
    factor: float = ERROR_FACTOR
    fp32_tolerance: float = FP32_TOLERANCE

    @property
    def merge_limit(self) -> float:
        return self.fp32_tolerance * self.reference_rms

    @property
    def merge_ok(self) -> bool:
        return not math.isnan(self.merge_rms) and self.merge_rms <= self.merge_limit  # NaN fails

    @property
    def allowance(self) -> float:
        """What rounding to the output dtype costs: the cast-once error, never below stage 1's limit."""
        return max(self.cast_rms, self.merge_limit)

    @property
    def tolerance(self) -> float:
        return self.factor * self.allowance

    @property
    def saved_ok(self) -> bool:
        return not math.isnan(self.saved_rms) and self.saved_rms <= self.tolerance

    @property
    def ok(self) -> bool:
        return self.merge_ok and self.saved_ok

    @property
    def merge_ratio(self) -> float:
        """Stage 1's error as a multiple of its limit (a planted mistake: hundreds to thousands)."""
        return self.merge_rms / self.merge_limit if self.merge_limit else math.inf

    @property
    def ratio(self) -> float:
        """Stage 2: the saved model's error as a multiple of the cast-once error."""
        return self.saved_rms / self.allowance if self.allowance else math.inf

    def rounding_note(self, dtype: str) -> str | None:
        """A warning when storing the merged weights in a 16-bit dtype costs clearly more than running
        the adapter unmerged in it: updates far below the dtype's resolution (short runs, small
        learning rates) partly round away in ``W + BA``. Measured on the H200 (8B mixed, 8 steps):
        merged bf16 at 2.5x the unmerged adapter's error moved the held-out loss from 9.05 to 9.39,
        while the same folder merged in fp32 kept 9.05."""
        if dtype == "float32" or not self.unmerged_rms or self.saved_rms <= ROUNDING_WARN * self.unmerged_rms:
            return None
        short = {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)
        return (f"storing the merge in {short} moves the logits {self.saved_rms / self.unmerged_rms:.1f}x as far as the adapter run unmerged in {short}: "
                f"part of training's small updates rounds away in W + BA (eval loss can differ from training's); --dtype fp32 keeps them (twice the size)")


@dataclass
class WeightCheck:
    """Each merged tensor against the base's: changed exactly where training changed it."""

    changed: int = 0  # differ from the base, as training changed them
    unchanged: int = 0  # equal to the base, as training left them
    not_merged: list[str] = field(default_factory=list)  # trained, but equal to the base
    unexpected: list[str] = field(default_factory=list)  # untouched by training, but different (or extra)
    missing: list[str] = field(default_factory=list)  # in the base, absent from the merged folder
    skipped: str | None = None  # why the check could not run

    @property
    def ok(self) -> bool:
        return not (self.not_merged or self.unexpected or self.missing)





def probe_images() -> list[Any]:
    """Two deterministic pictures of different sizes (so the batch has two image grids and padding)."""
    from PIL import Image, ImageDraw

    images = []
    for (w, h), (bg, fg) in (((160, 96), ((40, 80, 220), (220, 40, 40))), ((96, 128), ((40, 170, 60), (235, 215, 40)))):
        image = Image.new("RGB", (w, h), bg)
        draw = ImageDraw.Draw(image)
        draw.ellipse((w // 6, h // 6, w // 2, h // 2), fill=fg)
        draw.rectangle((w // 2, h // 2, w - 8, h - 8), fill=(250, 250, 250))
        images.append(image)
    return images


def probe_batch(processor) -> dict[str, Any]:
    """A batch of two image + question + answer chats, encoded with the model's chat template."""
    texts = []
    for question, answer in _PROBE_TURNS:
        chat = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
        texts.append(processor.apply_chat_template(chat, tokenize=False))
    return dict(processor(text=texts, images=probe_images(), padding=True, return_tensors="pt"))


def probe_logits(model, batch: dict[str, Any]):
    import torch

    with torch.no_grad():
        inputs = {k: v.to(model.device) for k, v in batch.items()}
        return model(**inputs).logits.float().cpu()


def compare_inputs(original: dict[str, Any], reloaded: dict[str, Any]) -> str | None:
    """Why the saved processor encodes the probe differently from the one merged with (None if it does not)."""
    import torch

    if set(original) != set(reloaded):
        return f"the saved processor returns {sorted(reloaded)} instead of {sorted(original)}"
    for key, value in original.items():
        other = reloaded[key]
        same = value.shape == other.shape and (torch.allclose(value.float(), other.float()) if value.is_floating_point() else torch.equal(value, other))
        if not same:
            return f"the saved processor encodes the probe differently ({key}): check its pixel budget and chat template"
    return None


def logit_errors(reference, other, mask) -> tuple[float, float]:
    """(RMS, max) of |other - reference| over the real positions (``mask``) and the whole vocabulary."""
    diff = (other[mask].double() - reference[mask].double()).abs()
    return float(diff.pow(2).mean().sqrt()), float(diff.max())


def compare_logits(reference, base, merged32, cast, saved, unmerged, mask) -> LogitCheck:
    """``reference``: base + adapter unmerged in float32; ``base``: the adapter disabled; ``merged32``:
    the float32 merge; ``cast``: it cast once to the output dtype; ``saved``: the reloaded folder;
    ``unmerged``: base + adapter in the output dtype (all logits as float32, on the CPU)."""
    ref = reference[mask].double()
    merge_rms, merge_max = logit_errors(reference, merged32, mask)
    saved_rms, saved_max = logit_errors(reference, saved, mask)
    cast_rms, cast_max = logit_errors(reference, cast, mask)
    unmerged_rms, unmerged_max = logit_errors(reference, unmerged, mask)
    return LogitCheck(
        merge_rms=merge_rms, merge_max=merge_max, saved_rms=saved_rms, saved_max=saved_max,
        cast_rms=cast_rms, cast_max=cast_max, unmerged_rms=unmerged_rms, unmerged_max=unmerged_max,
        reference_rms=float(ref.pow(2).mean().sqrt()),
        scale=float(ref.abs().max()),
        training_effect=logit_errors(reference, base, mask)[1],
        top1_agreement=float((saved[mask].argmax(-1) == reference[mask].argmax(-1)).float().mean()),
        positions=int(mask.sum()),
    )


def trained_weights(peft_model) -> set[str]:
    """Names (in the merged model) of the weights that training changed.

    A LoRA layer changes its weight when both factors are non-zero (B starts at zero and stays there
    untrained); a module trained beside LoRA changes the parameters whose trained copy differs from
    the original."""
    import torch
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    changed = set()
    for name, module in peft_model.named_modules():
        prefix = name.removeprefix("base_model.model.")
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    factors = [module.lora_A[adapter].weight, module.lora_B[adapter].weight]
                elif adapter in module.lora_embedding_A:
                    factors = [module.lora_embedding_A[adapter], module.lora_embedding_B[adapter]]
                else:
                    continue
                if all(bool((f != 0).any()) for f in factors):
                    changed.add(f"{prefix}.weight")
                    if module.lora_bias.get(adapter):
                        changed.add(f"{prefix}.bias")
        elif isinstance(module, ModulesToSaveWrapper):
            original = dict(module.original_module.named_parameters())
            for adapter in module.active_adapters:
                for pname, p in module.modules_to_save[adapter].named_parameters():
                    if not torch.equal(p, original[pname]):
                        changed.add(f"{prefix}.{pname}")
    return changed


def base_weight_files(base: str) -> list[Path]:
    path = Path(resolve_model_path(base))
    if not path.is_dir():  # a Hub id: the snapshot that loading it just put in the cache
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(base, local_files_only=True, allow_patterns=["*.safetensors"]))
    return sorted(path.glob("*.safetensors"))


def compare_weights(base_files: list[Path], out: Path, changed: set[str], tied: dict[str, str]) -> WeightCheck:
    """Tensor by tensor from disk (one at a time, so memory stays flat): merged vs base cast to the
    merged dtype. ``tied`` maps a tied parameter to the one the base stores (lm_head -> embeddings).

    Dense Qwen3-VL has no checkpoint key conversion in transformers 5, so names on disk are the
    module names that ``changed`` uses."""
    import torch
    from safetensors import safe_open

    check = WeightCheck()
    if not base_files:
        check.skipped = "the base has no safetensors files to compare with"
        return check
    with contextlib.ExitStack() as stack:
        base_index: dict[str, Any] = {}
        for file in base_files:
            handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            base_index.update({key: handle for key in handle.keys()})
        merged_index: dict[str, Any] = {}
        for file in sorted(out.glob("*.safetensors")):
            handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            merged_index.update({key: handle for key in handle.keys()})
        # In the base but not saved; or trained, stored tied in the base, and not saved (lm_head,
        # trained beside LoRA, must be saved apart from the embeddings it was tied to).
        check.missing = sorted({k for k in base_index if k not in merged_index} | {k for k in changed if k in tied and k not in merged_index})
        for key in sorted(merged_index):
            source = key if key in base_index else tied.get(key)
            if source not in base_index:
                check.unexpected.append(f"{key} (not in the base)")
                continue
            got = merged_index[key].get_tensor(key)
            before = base_index[source].get_tensor(source).to(got.dtype)
            same = got.shape == before.shape and torch.equal(got, before)
            if key in changed:
                if same:
                    check.not_merged.append(key)
                else:
                    check.changed += 1
            elif same:
                check.unchanged += 1
            else:
                check.unexpected.append(key)
    return check
