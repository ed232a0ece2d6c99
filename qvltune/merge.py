"""Merge a LoRA adapter into its base model, save a plain Hugging Face model folder, and verify it.

``merge`` is one linear recipe:

1. Resolve the adapter (a run folder gives its ``final/``), its base (``adapter_config.json``, or
   ``--base``) and the output dtype (the base's own unless given).
2. Refuse before any weight is loaded: a quantized base, a base of another model type, adapter
   tensors that do not fit the base (checked against a meta-device copy: no memory), an output
   folder that is not empty (unless ``force``) or that would overwrite the adapter or the base, too
   little free disk or device memory.
3. Load the base in float32, attach the adapter, and keep on a probe batch (two images and their
   chat) the logits of base + adapter unmerged (the float32 reference) and of the base alone (what
   training changed), and the names of the weights that training changed.
4. ``merge_and_unload`` in float32 (peft: LoRA deltas are added in, ``modules_to_save`` copies
   replace the originals), cast once to the output dtype, then save safetensors shards, the processor
   (tokenizer, chat template, image and video processors) and the generation config into a temporary
   folder beside the output.
5. The unmerged model in the output dtype (the base as stored, the adapter beside it) on the probe:
   the error that dtype costs anyway.
6. Verify what is on disk (``qvltune.verify``): reload it with ``AutoModelForImageTextToText`` +
   ``AutoProcessor``; its logits are within a stated factor of the unavoidable error of the
   reference, the processor encodes the probe identically, and every weight differs from the base
   exactly where training changed it.
7. Move it into place (replacing the old folder under ``force``). A failed verification leaves the
   folder at ``OUT.unverified`` for inspection, never at ``OUT``.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qvltune.adapter import (
    adapter_processor,
    adapter_weights,
    attach_adapter,
    base_for_adapter,
    fit_problems,
    is_adapter,
    parameter_shapes,
    raise_if_unfit,
    read_lora_config,
    run_dir_of,
)
from qvltune.errors import UserError
from qvltune.infer import check_device, default_device, resolve_model_dir
from qvltune.model import adapter_start, load_model, model_class, read_model_config
from qvltune.tiny import resolve_model_path
from qvltune.verify import LogitCheck, WeightCheck, base_weight_files, compare_inputs, compare_logits, compare_weights, probe_batch, probe_logits, trained_weights

DTYPE_NAMES = ("float32", "float16", "bfloat16")
DEFAULT_SHARD_SIZE = "5GB"
# Beside the weights the folder holds the processor, tokenizer and index files (Qwen's tokenizer.json
# is ~11 MB); keep a margin for them and for the filesystem.
DISK_MARGIN_BYTES = 256 * 1024**2
# The float32 model and the probe's activations and logits: ~10% above the weights (the probe is
# two small images; its float32 logits over a 151,936-token vocabulary are ~0.5 GB).
MEMORY_MARGIN = 1.1
PROVENANCE_FILE = "qvltune-merge.json"


# ----------------------------------------------------------------------------------------------
# Results


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
            lg = self.logits
            if not lg.merge_ok:
                out.append(f"the float32 merge differs from base + adapter: RMS {lg.merge_rms:.3g} of logits (at most {lg.merge_limit:.2g}, float32 reassociation)")
            if not lg.saved_ok:
                out.append(f"the saved folder's logits: RMS error {lg.saved_rms:.3g}, {lg.ratio:.1f}x that of the merged weights rounded to {self.dtype} in memory ({lg.allowance:.3g}; at most {lg.factor:g}x)")
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
            "logits": {
                **asdict(self.logits), "merge_limit": self.logits.merge_limit, "merge_ok": self.logits.merge_ok, "merge_ratio": self.logits.merge_ratio,
                "allowance": self.logits.allowance, "tolerance": self.logits.tolerance, "ratio": self.logits.ratio, "saved_ok": self.logits.saved_ok, "ok": self.logits.ok,
            },
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
        if value in DTYPE_NAMES:
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
    """The base's architecture on the meta device: names and shapes, no memory, no weights read
    (a base that is itself an adapter folder: its own base's)."""
    import torch
    from transformers import AutoConfig

    start = adapter_start(base)
    config = AutoConfig.from_pretrained(resolve_model_path(start[0] if start else base))
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
    """The probe batch and its logits, taken before and beside merging."""

    batch: dict[str, Any]
    logits: Any  # base + adapter unmerged, float32: the reference
    base_logits: Any  # adapter disabled, float32
    merged32_logits: Any  # the float32 merge, before rounding
    cast_logits: Any  # the float32 merge cast once to the output dtype, in memory
    changed: set[str]  # weights that training changed
    unmerged_logits: Any = None  # base + adapter unmerged in the output dtype


def check_memory(meta, device: str) -> None:
    """Merging holds the base in float32 on ``device``: refuse before loading when it cannot fit."""
    import torch

    from qvltune.hardware import host_info

    need = sum(p.numel() for p in meta.parameters()) * 4 * MEMORY_MARGIN
    if device.startswith("cuda"):
        free, where = torch.cuda.mem_get_info(torch.device(device))[0], f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    else:
        free, where = host_info().ram_available, "the CPU (host memory)"
    if free and need > free:
        raise UserError(
            f"merging needs about {need / 1024**3:.1f} GiB on {where} (the base in float32, so that the merge is exact before one rounding) and {free / 1024**3:.1f} GiB are free",
            "merge on a device with more memory (--device cuda on a GPU machine), or free memory",
        )


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
    if dtype not in DTYPE_NAMES:
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
    check_memory(meta, device)
    if unties:
        notes.append("lm_head was trained beside LoRA: the merged model keeps it apart from the input embeddings (tie_word_embeddings: false)")
    return MergePlan(adapter_dir, base, out, dtype, device, shard_bytes, weights, weights_from, tied_base, unties, notes)


def merge_and_save(plan: MergePlan, folder: Path) -> Reference:
    """Base + adapter in float32 -> the reference on the probe -> ``merge_and_unload`` in float32 ->
    one cast to the output dtype -> weights and processor in ``folder``."""
    import torch

    model = attach_adapter(load_model(plan.base, dtype="float32").to(plan.device), plan.adapter_dir, plan.base, plan.weights)
    processor = adapter_processor(plan.adapter_dir, plan.base)
    batch = probe_batch(processor)
    logits = probe_logits(model, batch)
    with model.disable_adapter():
        base_logits = probe_logits(model, batch)
    changed = trained_weights(model)
    try:
        merged = model.merge_and_unload(safe_merge=True)
    except ValueError as e:  # safe_merge found NaNs
        raise UserError(f"merging {plan.adapter_dir} failed: {str(e).splitlines()[0]}", "the adapter's weights are broken (NaN); merge an earlier checkpoint-N") from None
    merged.eval()
    merged32_logits = probe_logits(merged, batch)
    merged.to(getattr(torch, plan.dtype))  # the one rounding: W + BA computed in float32
    cast_logits = probe_logits(merged, batch)
    merged.save_pretrained(str(folder), max_shard_size=plan.shard_bytes)  # with generation_config.json
    processor.save_pretrained(str(folder))  # tokenizer, chat template, image and video processors
    return Reference(batch, logits, base_logits, merged32_logits, cast_logits, changed)


def unmerged_logits(plan: MergePlan, reference: Reference):
    """The probe's logits of base + adapter, unmerged, in the output dtype: the base's weights as
    stored and the adapter beside them (as inference on the adapter folder runs). In float32 this is
    the reference's own computation."""
    if plan.dtype == "float32":
        return reference.logits
    model = attach_adapter(load_model(plan.base, dtype=plan.dtype).to(plan.device), plan.adapter_dir, plan.base, plan.weights)
    logits = probe_logits(model, reference.batch)
    del model
    gc.collect()
    return logits


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
    mask = reference.batch["attention_mask"].bool()
    logits = compare_logits(reference.logits, reference.base_logits, reference.merged32_logits, reference.cast_logits, merged_logits, reference.unmerged_logits, mask)
    if adapter_start(plan.base):  # the base is loaded as another adapter merged into its own base
        weights = WeightCheck(skipped=f"the base {plan.base} is an adapter merged into its own base as it loads: no stored tensors of it to compare with (the logit checks stand)")
    else:
        weights = compare_weights(base_weight_files(plan.base), folder, reference.changed, tied)
    return logits, weights, processor_problem


def merge(
    adapter: str,
    out: Path,
    *,
    base: str | None = None,
    dtype: str | None = None,
    max_shard_size: str = DEFAULT_SHARD_SIZE,
    device: str | None = None,
    force: bool = False,
    progress=None,
) -> MergeResult:
    """Merge ADAPTER into its base, save it to ``out`` and verify it (see the module docstring).
    ``progress(phase, done, total)``, if given, hears when each slow phase begins (after every
    check of the inputs has passed)."""
    start = time.time()
    device = device or default_device()
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
            gc.collect()  # the merged model is gone: free it before loading another
            if progress:
                progress("verifying: the adapter unmerged in the output dtype, then the saved folder reloaded", 0, None)
            reference.unmerged_logits = unmerged_logits(plan, reference)
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
