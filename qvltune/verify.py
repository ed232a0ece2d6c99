"""Proving a merged model: the probe batch, its logits against a high-precision reference, and the
weights against the base, tensor by tensor.

**Logits.** Rounding to bf16 (or fp16) changes a model's outputs whatever one does; how much is
measured on the probe, not guessed. The reference is base + adapter *unmerged* in float32 on the
merge's device (the adapter's function, computed as exactly as the stack allows). Measured against
it: the saved merged model, reloaded, and the unmerged model in the output dtype (the base's weights
as stored, the adapter beside them, as peft would serve it without merging). The second error is
what serving in that dtype costs anyway; the merged model passes when its RMS error over the probe's
real positions is at most ``ERROR_FACTOR`` times it. A merge mistake (a wrong LoRA scale, a module
trained beside LoRA left out, an adapter added twice) moves logits by a share of what training moved
them, far beyond rounding; ``tests/test_merge.py`` plants each one and sees the check fail.

In float32 the unmerged model *is* the reference, so the allowance is float32 reassociation alone:
``REASSOCIATION`` of the reference logits' RMS.

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

# The merged model may be this many times further from the float32 reference than the unmerged
# model in the same dtype. Merging rounds W + BA once where the unmerged model keeps W exact and adds
# a separately rounded BAx: two rounding patterns of the same size, so their errors are alike (tiny
# model, bf16: merged 1.1x the unmerged error; benchmarks/RESULTS.md has the real-size ratios).
ERROR_FACTOR = 2.0
# float32 reassociation: sums taken in another order (W x + B A x vs (W + BA) x), ~80 float32 ulps
# of the logits' RMS; measured 1e-7 on the tiny model.
REASSOCIATION = 1e-5

_PROBE_TURNS = [
    ("What colour is the shape?", "The shape is red."),
    ("Describe the picture in one sentence.", "A blue circle above a green square."),
]


@dataclass
class LogitCheck:
    """The merged model and the unmerged one in the output dtype, each against the float32 reference,
    over the probe's real tokens (padding excluded)."""

    merged_rms: float  # RMS of (merged - reference) logits
    merged_max: float  # largest |merged - reference|
    unmerged_rms: float  # RMS of (unmerged in the output dtype - reference): the unavoidable error
    unmerged_max: float
    reference_rms: float  # RMS of the reference logits
    scale: float  # the largest |reference logit|
    training_effect: float  # max |reference - base|: how far training moved the logits
    top1_agreement: float  # positions where the merged model's argmax is the reference's
    positions: int
    factor: float = ERROR_FACTOR

    @property
    def allowance(self) -> float:
        """The unavoidable RMS error: the unmerged model's, never below float32 reassociation."""
        return max(self.unmerged_rms, REASSOCIATION * self.reference_rms)

    @property
    def tolerance(self) -> float:
        return self.factor * self.allowance

    @property
    def ok(self) -> bool:
        return not math.isnan(self.merged_rms) and self.merged_rms <= self.tolerance  # NaN fails

    @property
    def ratio(self) -> float:
        return self.merged_rms / self.allowance if self.allowance else math.inf


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


def compare_logits(reference, base, unmerged, merged, mask) -> LogitCheck:
    """``reference``: base + adapter unmerged in float32; ``base``: the adapter disabled; ``unmerged``
    and ``merged``: the models under comparison, in the output dtype (logits as float32)."""
    ref = reference[mask].double()
    merged_rms, merged_max = logit_errors(reference, merged, mask)
    unmerged_rms, unmerged_max = logit_errors(reference, unmerged, mask)
    return LogitCheck(
        merged_rms=merged_rms,
        merged_max=merged_max,
        unmerged_rms=unmerged_rms,
        unmerged_max=unmerged_max,
        reference_rms=float(ref.pow(2).mean().sqrt()),
        scale=float(ref.abs().max()),
        training_effect=logit_errors(reference, base, mask)[1],
        top1_agreement=float((merged[mask].argmax(-1) == reference[mask].argmax(-1)).float().mean()),
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
        check.missing = sorted(k for k in base_index if k not in merged_index)
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
