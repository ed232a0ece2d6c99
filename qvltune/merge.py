"""Merge a LoRA adapter into its base model, save a plain Hugging Face model folder, and verify it.

``merge`` is one linear recipe:

1. Resolve the adapter (a run folder gives its ``final/``), its base (``adapter_config.json``, or
   ``--base``) and the output dtype (the base's own unless given).
2. Refuse before any weight is loaded: a quantized base, a base of another model type, adapter
   tensors that do not fit the base (checked against a meta-device copy: no memory), an output
   folder that is not empty (unless ``force``) or that would overwrite the adapter or the base, too
   little free disk.
3. Load the base in the output dtype, attach the adapter, and keep on a probe batch (two images and
   their chat) the logits of base + adapter (the reference) and of the base alone (what training
   changed), and the names of the weights that training changed.
4. ``merge_and_unload`` (peft: LoRA deltas are added in, ``modules_to_save`` copies replace the
   originals), then save safetensors shards, the processor (tokenizer, chat template, image and
   video processors) and the generation config into a temporary folder beside the output.
5. Verify what is on disk: reload it with ``AutoModelForImageTextToText`` + ``AutoProcessor``; the
   logits match the reference within the dtype's tolerance, the processor encodes the probe
   identically, and every weight differs from the base exactly where training changed it.
6. Move it into place (replacing the old folder under ``force``). A failed verification leaves the
   folder at ``OUT.unverified`` for inspection, never at ``OUT``.

The base + adapter reference runs in the output dtype on the same device: that is how the adapter
was trained and would be served, so the comparison measures the merge alone.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qvltune.adapter import (
    adapter_weights,
    attach_adapter,
    base_for_adapter,
    fit_problems,
    is_adapter,
    parameter_shapes,
    processor_source,
    raise_if_unfit,
    read_lora_config,
    run_dir_of,
)
from qvltune.errors import UserError
from qvltune.infer import check_device, resolve_model_dir
from qvltune.model import load_model, load_processor, model_class, read_model_config
from qvltune.tiny import resolve_model_path

# Largest |merged - reference| logit allowed, as a fraction of the largest reference logit (at least 1).
# The reference is base + adapter in the same dtype, so the difference is only where rounding falls
# when W and the LoRA delta are added before the matmul instead of after. Measured on the tiny model
# (tests/test_merge.py): float32 2e-7, float16 1e-3, bfloat16 3.9e-3 (half a bf16 ulp of the largest
# logit). The limits leave room for the longer reductions of real-size models (rounding error grows
# with width and depth) and stay far below what a missing merge changes (the short test trainings move
# logits by more than 1.0 of 2.0):
#   float32  1e-4  ~800 float32 ulps (2^-23): reassociation only
#   float16  1e-2  ~10 float16 ulps (2^-10)
#   bfloat16 5e-2  ~6 bfloat16 ulps (2^-7)
LOGIT_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
DEFAULT_SHARD_SIZE = "5GB"
# Beside the weights the folder holds the processor, tokenizer and index files (Qwen's tokenizer.json
# is ~11 MB); keep a margin for them and for the filesystem.
DISK_MARGIN_BYTES = 256 * 1024**2
PROVENANCE_FILE = "qvltune-merge.json"

_PROBE_TURNS = [
    ("What colour is the shape?", "The shape is red."),
    ("Describe the picture in one sentence.", "A blue circle above a green square."),
]


# ----------------------------------------------------------------------------------------------
# Results


@dataclass
class LogitCheck:
    """Merged model vs base + adapter on the probe batch (real tokens only, padding excluded)."""

    max_abs_diff: float
    tolerance: float  # absolute: relative_tolerance x max(1, scale)
    relative_tolerance: float
    scale: float  # the largest |reference logit|
    training_effect: float  # max |(base + adapter) - base|: how far training moved the logits
    top1_agreement: float  # fraction of positions where the merged model's argmax is the reference's
    positions: int

    @property
    def ok(self) -> bool:
        return self.max_abs_diff == self.max_abs_diff and self.max_abs_diff <= self.tolerance  # NaN fails


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


@dataclass
class MergeResult:
    adapter: Path
    base: str
    out: Path
    dtype: str
    device: str
    weights_from: str
    files: list[str]
    size_bytes: int
    logits: LogitCheck
    weights: WeightCheck
    processor_problem: str | None
    notes: list[str]
    seconds: float

    @property
    def ok(self) -> bool:
        return self.logits.ok and self.weights.ok and self.processor_problem is None

    def problems(self) -> list[str]:
        out = []
        if not self.logits.ok:
            out.append(f"logits differ by {self.logits.max_abs_diff:.3g} (tolerance {self.logits.tolerance:.3g})")
        w = self.weights
        for label, names in (("trained but not merged", w.not_merged), ("changed though training left them", w.unexpected), ("missing", w.missing)):
            if names:
                out.append(f"{len(names)} weight(s) {label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}")
        if self.processor_problem:
            out.append(self.processor_problem)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "adapter": str(self.adapter),
            "base": self.base,
            "out": str(self.out),
            "dtype": self.dtype,
            "device": self.device,
            "weights_from": self.weights_from,
            "files": self.files,
            "size_bytes": self.size_bytes,
            "logits": {**asdict(self.logits), "ok": self.logits.ok},
            "weights": {**asdict(self.weights), "ok": self.weights.ok},
            "processor_problem": self.processor_problem,
            "problems": self.problems(),
            "notes": self.notes,
            "seconds": round(self.seconds, 2),
        }


# ----------------------------------------------------------------------------------------------
# Refusals (before any weight is loaded)


def find_adapter(source: str) -> Path:
    """The adapter folder SOURCE names (a run folder gives ``final/``); refuses what is no adapter."""
    path = Path(resolve_model_dir(source))
    if is_adapter(path):
        return path
    if (path / "config.json").exists():
        raise UserError(
            f"nothing to merge: {path} holds a full model, not a LoRA adapter (no adapter_config.json)",
            f"it already is a plain model folder: qvltune predict {path} --image IMG --prompt TEXT",
        )
    raise UserError(f"{source} is not a local LoRA adapter folder", "give a run folder (runs/NAME), its final/ or a checkpoint-N/ folder")


def parse_shard_size(size: str) -> int:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        value = convert_file_size_to_int(size.strip())
    except ValueError:
        value = 0
    if value <= 0:
        raise UserError(f"--max-shard-size: '{size}' is not a size", "write a whole number and a unit, e.g. 5GB, 500MB or 2GiB")
    return value


def _dtype_of(config: dict[str, Any]) -> str | None:
    for doc in (config, config.get("text_config") or {}):
        value = doc.get("dtype") or doc.get("torch_dtype")
        if value in LOGIT_TOLERANCE:
            return value
    return None


def check_base(base: str, adapter_dir: Path, overridden: bool) -> dict[str, Any]:
    """The base's config.json, after refusing a quantized base or one of another model type."""
    config = read_model_config(base)
    quant = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if quant:
        method = quant.get("quant_method", "quantized") if isinstance(quant, dict) else "quantized"
        raise UserError(
            f"the base {base} is quantized ({method}): LoRA deltas cannot be added to quantized weights without losing them",
            "pass --base with the unquantized model it was made from (e.g. Qwen/Qwen3-VL-8B-Instruct), then quantize the merged folder",
        )
    model_type = config.get("model_type", "?")
    if overridden:
        try:
            trained_on, _ = base_for_adapter(adapter_dir)
            trained_type = read_model_config(trained_on).get("model_type")
        except UserError:  # the original base is not reachable from here: shapes are still checked
            trained_on, trained_type = None, None
        if trained_type and trained_type != model_type:
            raise UserError(
                f"the adapter {adapter_dir} was trained on a '{trained_type}' model ({trained_on}) but --base {base} is '{model_type}'",
                "pass --base with the model the adapter was trained on",
            )
    model_class(model_type)  # refuses anything that is not Qwen3-VL
    return config


def meta_model(base: str):
    """The base's architecture on the meta device: names and shapes, no memory, no weights read."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(base))
    with torch.device("meta"):
        return model_class(config.model_type)._from_config(config)


def output_bytes(meta, dtype: str, unties_embeddings: bool) -> int:
    """Bytes of the merged weights: every parameter once (tied ones once), plus the output embedding
    when training ``lm_head`` beside LoRA unties it from the input embedding."""
    import torch

    count = sum(p.numel() for p in meta.parameters())
    if unties_embeddings:
        count += meta.get_output_embeddings().weight.numel()
    return count * torch.finfo(getattr(torch, dtype)).bits // 8


def free_disk(path: Path) -> int:
    """Free bytes on the filesystem that will hold ``path`` (its nearest existing ancestor)."""
    target = path.absolute()
    while not target.exists() and target != target.parent:
        target = target.parent
    return shutil.disk_usage(target).free


def check_output(out: Path, force: bool, protected: list[Path]) -> None:
    target = out.resolve()
    for keep in protected:
        keep = keep.resolve()
        if target == keep or target in keep.parents:
            raise UserError(f"--out {out} would overwrite {keep}", "choose an output folder outside the adapter, its run and the base model")
    if target.exists():
        if not target.is_dir():
            raise UserError(f"--out {out} is a file", "give a folder (it is created)")
        if any(target.iterdir()) and not force:
            raise UserError(f"output folder {out} exists and is not empty", "choose another --out, or add --force to replace its contents")


def check_disk(out: Path, need: int) -> None:
    free = free_disk(out)
    if free < need:
        raise UserError(
            f"not enough free disk for {out}: the merged model needs about {need / 1024**3:.2f} GiB, {free / 1024**3:.2f} GiB are free",
            "free some space or choose an --out on another disk (a smaller --dtype halves the size)",
        )


# ----------------------------------------------------------------------------------------------
# Probe, reference and checks


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


def compare_logits(reference, base, merged, mask, dtype: str) -> LogitCheck:
    ref, got, before = reference[mask], merged[mask], base[mask]
    scale = float(ref.abs().max())
    relative = LOGIT_TOLERANCE[dtype]
    return LogitCheck(
        max_abs_diff=float((got - ref).abs().max()),
        tolerance=relative * max(1.0, scale),
        relative_tolerance=relative,
        scale=scale,
        training_effect=float((ref - before).abs().max()),
        top1_agreement=float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
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


# ----------------------------------------------------------------------------------------------
# The recipe


def _bind_deepspeed_logs_to_stderr() -> None:
    """``save_pretrained`` imports DeepSpeed (through accelerate), whose logger writes to stdout, the
    stream of results (``--json``). Importing it here with stdout pointed at stderr binds its log
    handler to stderr for the rest of the process."""
    if "deepspeed" in sys.modules:
        return
    with contextlib.redirect_stdout(sys.stderr):
        try:
            import deepspeed  # noqa: F401
        except ImportError:  # merging does not need it
            pass


@dataclass
class MergePlan:
    """What ``plan_merge`` resolved and checked; nothing has been loaded or written yet."""

    adapter_dir: Path
    base: str
    out: Path
    dtype: str
    device: str
    shard_bytes: int
    weights: dict[str, Any]  # the adapter's tensors, in peft's saved format
    weights_from: str
    tied_base: bool  # the base ties lm_head to the input embeddings
    unties: bool  # lm_head was trained beside LoRA: the merged model keeps both
    notes: list[str]


@dataclass
class Reference:
    """Base + adapter on the probe batch, taken before merging."""

    batch: dict[str, Any]
    logits: Any  # base + adapter
    base_logits: Any  # adapter disabled
    changed: set[str]  # weights that training changed


def plan_merge(adapter: str, out: Path, *, base: str | None, dtype: str | None, max_shard_size: str, device: str, force: bool) -> MergePlan:
    """Resolve the adapter, base and dtype, and refuse whatever would fail, before loading weights."""
    from peft import PeftModel

    notes: list[str] = []
    check_device(device)
    shard_bytes = parse_shard_size(max_shard_size)
    adapter_dir = find_adapter(adapter)
    lora = read_lora_config(adapter_dir)
    overridden = base is not None
    if base is None:
        base, note = base_for_adapter(adapter_dir)
        notes += [note] if note else []
    config = check_base(base, adapter_dir, overridden)
    dtype = dtype or _dtype_of(config) or "bfloat16"
    if dtype not in LOGIT_TOLERANCE:
        raise UserError(f"--dtype: unknown dtype '{dtype}'", "use bf16, fp16 or fp32")
    meta = meta_model(base)
    shapes = parameter_shapes(meta)
    tied_base = bool(meta.config.get_text_config().tie_word_embeddings)
    need = {untie: output_bytes(meta, dtype, untie) + DISK_MARGIN_BYTES for untie in (False, True)}
    weights, weights_from = adapter_weights(adapter_dir, PeftModel(meta, lora))  # wraps meta in place
    raise_if_unfit(fit_problems(weights, shapes), adapter_dir, base)
    unties = tied_base and any(k.startswith("base_model.model.lm_head.") for k in weights)
    protected = [p for p in (adapter_dir, run_dir_of(adapter_dir), Path(resolve_model_path(base))) if p is not None and p.exists()]
    check_output(out, force, protected)
    check_disk(out, need[unties])
    if unties:
        notes.append("lm_head was trained beside LoRA: the merged model keeps it apart from the input embeddings (tie_word_embeddings: false)")
    return MergePlan(adapter_dir, base, out, dtype, device, shard_bytes, weights, weights_from, tied_base, unties, notes)


def merge_and_save(plan: MergePlan, folder: Path) -> Reference:
    """Base + adapter -> the reference on the probe -> ``merge_and_unload`` -> weights and processor in ``folder``."""
    model = attach_adapter(load_model(plan.base, dtype=plan.dtype).to(plan.device), plan.adapter_dir, plan.base, plan.weights)
    processor = load_processor(processor_source(plan.adapter_dir, plan.base))
    batch = probe_batch(processor)
    logits = probe_logits(model, batch)
    with model.disable_adapter():
        base_logits = probe_logits(model, batch)
    changed = trained_weights(model)
    try:
        merged = model.merge_and_unload(safe_merge=True)
    except ValueError as e:  # safe_merge found NaNs
        raise UserError(f"merging {plan.adapter_dir} failed: {str(e).splitlines()[0]}", "the adapter's weights are broken (NaN); merge an earlier checkpoint-N") from None
    merged.save_pretrained(str(folder), max_shard_size=plan.shard_bytes)  # with generation_config.json
    processor.save_pretrained(str(folder))  # tokenizer, chat template, image and video processors
    return Reference(batch, logits, base_logits, changed)


def verify(plan: MergePlan, folder: Path, reference: Reference) -> tuple[LogitCheck, WeightCheck, str | None]:
    """Check what is on disk: reloaded as any user would, against the reference and the base."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=getattr(torch, plan.dtype)).to(plan.device).eval()
    processor_problem = compare_inputs(reference.batch, probe_batch(AutoProcessor.from_pretrained(str(folder))))
    merged_logits = probe_logits(model, reference.batch)
    tied = dict(getattr(type(model), "_tied_weights_keys", None) or {}) if plan.tied_base else {}
    del model
    gc.collect()
    logits = compare_logits(reference.logits, reference.base_logits, merged_logits, reference.batch["attention_mask"].bool(), plan.dtype)
    weights = compare_weights(base_weight_files(plan.base), folder, reference.changed, tied)
    return logits, weights, processor_problem


def merge(
    adapter: str,
    out: Path,
    *,
    base: str | None = None,
    dtype: str | None = None,
    max_shard_size: str = DEFAULT_SHARD_SIZE,
    device: str = "cpu",
    force: bool = False,
    progress=None,
) -> MergeResult:
    """Merge ADAPTER into its base, save it to ``out`` and verify it (see the module docstring).
    ``progress(phase, done, total)``, if given, hears when each slow phase begins (after every
    check of the inputs has passed)."""
    start = time.time()
    _bind_deepspeed_logs_to_stderr()
    with warnings.catch_warnings():
        # peft and transformers warn about tied embeddings and deprecations on every load; what
        # matters to the user is in the notes and the verification.
        warnings.simplefilter("ignore")
        plan = plan_merge(adapter, out, base=base, dtype=dtype, max_shard_size=max_shard_size, device=device, force=force)
        if progress:
            progress(f"merging into the base on {device} (loads the base model)", 0, None)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.merging-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            reference = merge_and_save(plan, tmp)
            gc.collect()  # the merged model is gone: free it before reloading
            if progress:
                progress("verifying: reloading the saved folder, comparing logits and weights", 0, None)
            logits, weights, processor_problem = verify(plan, tmp, reference)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    notes = list(plan.notes)
    if logits.training_effect == 0:
        notes.append("the adapter does not change the model's outputs on the probe (an untrained checkpoint?)")
    if weights.skipped:
        notes.append(f"weight comparison skipped: {weights.skipped}")
    size = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
    result = MergeResult(plan.adapter_dir, plan.base, out, plan.dtype, device, plan.weights_from, [], size, logits, weights, processor_problem, notes, 0.0)
    result.out = out if result.ok else out.with_name(out.name + ".unverified")  # never a failed merge at OUT
    result.files = sorted([p.name for p in tmp.iterdir()] + [PROVENANCE_FILE])
    result.seconds = time.time() - start
    (tmp / PROVENANCE_FILE).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    if result.out.exists():
        shutil.rmtree(result.out)  # --force, or an earlier .unverified
    tmp.rename(result.out)
    return result
