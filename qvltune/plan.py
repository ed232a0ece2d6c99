"""The decision tree ``qvltune init`` walks: (answers, machine, model, dataset) -> run config + why.

Pure: the machine comes as an ``estimate.Machine`` (from the NVML inventory or ``--gpu`` flags),
the model as ``estimate.ModelStats`` (its config.json built on the meta device), the dataset as an
``estimate.DatasetSummary`` (check-data's report). Every branch records a ``Decision`` with the
reason, and every heuristic names its source: "the guide" is the practitioner's guide the tree
comes from (Fine-Tuning Overview: Training Qwen3-VL, /work/shared/000_bca68d092ee35d6d.txt, whose
"Key decision tree", "Training Strategies", "Training Hyperparameters" and "DeepSpeed Integration"
sections are quoted below).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qvltune.catalog import KNOWN_MODELS, builtin_config, size_of
from qvltune.config import STRATEGY_PRESETS, RunConfig, format_validation_error, parse_config
from qvltune.errors import UserError
from qvltune.estimate import SAFETY_MARGIN, GiB, DatasetSummary, Estimate, Machine, ModelStats, estimate, format_bytes, model_stats, workload_for
from qvltune.pixels import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, QWEN25_TOKEN_PIXELS, TOKEN_PIXELS
from qvltune.tiny import BUILTIN_TINY, TINY_MAX_PIXELS, TINY_MIN_PIXELS

# The guide: "Effective batch size = 1 x 8 x 8 GPUs = 64" (scripts/sft_7b.sh).
DEFAULT_EFFECTIVE_BATCH = 64
# An epoch of fewer optimizer steps leaves warmup and the cosine schedule nothing to work with.
MIN_STEPS_PER_EPOCH = 20
# The guide's learning rates: "LoRA: 1e-4, Full: 5e-5"; the vision tower lower than the LLM.
LR_LORA = 1e-4
LR_FULL = 5e-5
LR_VISION_FULL = 1e-5
LR_VISION_LORA = 5e-5
# The guide's fixed resolution: "min_pixels = max_pixels = 256 * 28 * 28" (~200k pixels = 196
# Qwen3-VL tokens); variable: 64*28*28 .. 1024*28*28 (qvltune.pixels' defaults).
FIXED_PIXELS = 256 * QWEN25_TOKEN_PIXELS
# Packing pays off when a row holds several samples: on when the median record is at most this
# fraction of the row (the guide: "30-50% faster training, same final quality"). Packed rows are
# the guide's "--max_seq_length 8192", halved while they do not fit (never below the longest record).
# Longer rows (up to LONGEST_ROW_TOKENS) are taken where they fit WITHOUT gradient checkpointing and
# one row per GPU stays within the effective batch: with varlen attention a longer row costs no
# extra attention work, and a step's host-side work (kernel launches, DeepSpeed's gradient hooks) is
# the same for 8k or 16k tokens, so a GPU that would idle behind the host gets more to do
# (benchmarks/RESULTS.md, training throughput).
PACKING_MAX_FRACTION = 0.25
PACKED_ROW_TOKENS = 8192
LONGEST_ROW_TOKENS = 32768
MIN_ROW_WITHOUT_CHECKPOINTING = 2048
# Hold out this fraction for eval loss when the dataset is big enough to spare it (the guide:
# "Evaluation loss: should track training loss (not diverge)").
EVAL_SPLIT = 0.05
EVAL_MIN_RECORDS = 200
DEFAULT_EPOCHS = 2.0
DEFAULT_MAX_SEQ_LENGTH = 4096
# The built-in tiny model is a pipeline check, not a small real model: what `qvltune demo` measured
# on a 2-core CPU (DESIGN.md sec. 4): batch 32 at lr 2e-3 learns its colour task in a few epochs.
TINY_LR = 2e-3
TINY_EFFECTIVE_BATCH = 32
# Models this small train on a CPU in minutes (the built-in tiny one has 1.9 M parameters; a test
# model of a few million is no different). The smallest released size, 2B, would take weeks.
CPU_PRACTICAL_PARAMS = 50_000_000


class Answers(BaseModel):
    """Everything ``qvltune init`` asks; also the answers file (replayable with ``--answers``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str | None = Field(None, description="Hub id, local folder or builtin:tiny")
    data: str | None = Field(None, description="training data (file or mixture)")
    image_root: str | None = None
    domain_shift: bool = Field(False, description="images far from ordinary photos (medical, satellite, documents, industrial)")
    fast: bool = Field(False, description="fast turnaround: LoRA with a frozen vision tower")
    resolution: Literal["fixed", "variable"] = "fixed"
    max_image_tokens: int | None = Field(None, ge=1)
    packing: Literal["auto", "on", "off"] = "auto"
    out: str = "."
    nodes: int = Field(1, ge=1)
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    strategy: Literal["auto", "lora", "mixed", "full"] = "auto"
    effective_batch: int | None = Field(None, ge=1)
    epochs: float = Field(DEFAULT_EPOCHS, gt=0)
    max_seq_length: int | None = Field(None, ge=64)


# The flag of every answer (for "missing answers" messages and the answers file's comments).
ANSWER_FLAGS = {
    "model": "--model",
    "data": "--data",
    "image_root": "--image-root",
    "domain_shift": "--domain-shift / --no-domain-shift",
    "fast": "--fast / --no-fast",
    "resolution": "--resolution fixed|variable",
    "max_image_tokens": "--max-image-tokens",
    "packing": "--packing auto|on|off",
    "out": "--out",
    "nodes": "--nodes",
    "name": "--name",
    "strategy": "--strategy auto|lora|mixed|full",
    "effective_batch": "--effective-batch",
    "epochs": "--epochs",
    "max_seq_length": "--max-seq-length",
}


def parse_answers(doc: Any, source: str = "answers") -> Answers:
    if not isinstance(doc, dict):
        raise UserError(f"{source}: an answers file must be a YAML mapping (got {type(doc).__name__})", "write one with `qvltune init`")
    try:
        return Answers.model_validate(doc)
    except ValidationError as e:
        problems = format_validation_error(e)
        raise UserError(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(problems), "fix the answers above (`qvltune init --help` lists them)") from None


@dataclass(frozen=True)
class Decision:
    topic: str
    choice: str
    why: str


@dataclass
class Plan:
    config: RunConfig
    doc: dict[str, Any]  # the run config document, exactly as validated
    decisions: list[Decision]
    estimate: Estimate
    machine: Machine
    fits: bool
    suggestions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def effective_batch(self) -> int:
        o = self.config.optim
        return o.per_device_batch * o.grad_accum * self.machine.world_size

    def decision(self, topic: str) -> Decision:
        return next(d for d in self.decisions if d.topic == topic)


@dataclass(frozen=True)
class Rung:
    """A memory-saving step: ZeRO stage and CPU offload."""

    stage: int
    offload_optimizer: bool = False
    offload_params: bool = False

    def label(self) -> str:
        extra = " + offload optimizer" if self.offload_optimizer else ""
        extra += " + params" if self.offload_params else ""
        return f"ZeRO-{self.stage}{extra}"


# The guide's "ZeRO Stage 2 ... Stage 3 ... Stage 3 + CPU offload", cheapest first. ZeRO-3 is never
# used for the MoE model (config.check_against_model: every expert gathered each step hangs or
# crawls); ZeRO-2 with optimizer offload is its last resort.
DENSE_LADDER = (Rung(2), Rung(3), Rung(3, True), Rung(3, True, True))
MOE_LADDER = (Rung(2), Rung(2, True))
CPU_LADDER = (Rung(2),)


def ladder(stats: ModelStats, machine: Machine, offload: bool = True) -> tuple[Rung, ...]:
    rungs = CPU_LADDER if machine.is_cpu else MOE_LADDER if stats.is_moe else DENSE_LADDER
    return tuple(r for r in rungs if offload or not r.offload_optimizer)


# ----------------------------------------------------------------------------------------------
# Small pure decisions (each tested on its own)


def pixel_budget(answers: Answers) -> tuple[int, int, str]:
    """(min_pixels, max_pixels, why) for the resolution answer."""
    if answers.model == BUILTIN_TINY and answers.max_image_tokens is None:
        return TINY_MIN_PIXELS, TINY_MAX_PIXELS, "the tiny model's own budget: 4-64 tokens per image"
    if answers.resolution == "fixed":
        px = answers.max_image_tokens * TOKEN_PIXELS if answers.max_image_tokens else FIXED_PIXELS
        return px, px, (
            f"fixed: every image resized to about {px:,} pixels = {px // TOKEN_PIXELS} tokens; predictable memory, easy to debug "
            "(the guide: 'Start with fixed, switch to variable once stable')"
        )
    hi = answers.max_image_tokens * TOKEN_PIXELS if answers.max_image_tokens else DEFAULT_MAX_PIXELS
    lo = min(DEFAULT_MIN_PIXELS, hi)
    return lo, hi, (
        f"variable: {lo:,}-{hi:,} pixels = {lo // TOKEN_PIXELS}-{hi // TOKEN_PIXELS} tokens per image, aspect kept; "
        "matches variable-resolution inference (the guide: 'Trains model to handle diverse inputs')"
    )


def recommend_model(machine: Machine) -> str:
    """The default model offered by the wizard: the largest size whose mixed-strategy training
    plainly fits this machine (rough rule: ~2.2 bytes per parameter of GPU memory for bf16 weights
    plus LoRA/activations headroom), the tiny model without a GPU."""
    if machine.is_cpu:
        return BUILTIN_TINY
    memory_gb = machine.gpu_memory / GiB
    for size, need_gb in (("8B", 40), ("4B", 24), ("2B", 0)):
        if memory_gb >= need_gb:
            return f"Qwen/Qwen3-VL-{size}-Instruct"
    return "Qwen/Qwen3-VL-2B-Instruct"


def default_name(answers: Answers, strategy: str) -> str:
    if answers.name:
        return answers.name
    model = answers.model or "model"
    size = size_of(model)
    stem = "tiny" if model == BUILTIN_TINY else f"qwen3vl-{size.lower()}" if size else re.sub(r"[^A-Za-z0-9._-]+", "-", model.rstrip("/").split("/")[-1]).strip("-._") or "model"
    return f"{stem}-{strategy}"


def effective_batch_target(answers: Answers, data: DatasetSummary | None) -> tuple[int, str]:
    if answers.effective_batch:
        return answers.effective_batch, "given with --effective-batch"
    if answers.model == BUILTIN_TINY:
        return TINY_EFFECTIVE_BATCH, f"the tiny model learns with batches of {TINY_EFFECTIVE_BATCH} (measured by `qvltune demo`)"
    target = DEFAULT_EFFECTIVE_BATCH
    why = "the guide's effective batch: 1 per GPU x 8 accumulation x 8 GPUs = 64"
    if data and data.records and data.records // target < MIN_STEPS_PER_EPOCH:
        target = max(1, 2 ** max(0, (data.records // MIN_STEPS_PER_EPOCH).bit_length() - 1))
        why = f"{data.records} records: a batch of {target} gives at least {MIN_STEPS_PER_EPOCH} optimizer steps per epoch (64 would give {max(1, data.records // 64)})"
    return target, why


def choose_packing(answers: Answers, data: DatasetSummary | None, max_seq_length: int) -> tuple[bool, str]:
    """Pack when the median record is at most a quarter of the row it would be packed into: the
    given max_seq_length, else the guide's 8192-token rows (or the longest record, if longer)."""
    if answers.packing != "auto":
        return answers.packing == "on", f"chosen with --packing {answers.packing}"
    if not data or not data.records:
        return False, "no dataset summary: cannot tell whether records are short (give --packing on to force it)"
    row = answers.max_seq_length or max(max_seq_length, PACKED_ROW_TOKENS)
    if data.p50 <= PACKING_MAX_FRACTION * row:
        return True, (
            f"the median record ({data.p50:,} tokens) is under a quarter of a row of {row:,} tokens: several samples per row "
            "instead of one short row each (the guide: packing is '30-50% faster training, same final quality')"
        )
    return False, f"records fill most of a row (median {data.p50:,} of {row:,} tokens): little to gain"


def row_lengths(answers: Answers, data: DatasetSummary | None, seq: int, packing: bool) -> list[int]:
    """max_seq_length candidates, longest first: packed rows of 32768 tokens halved down to ``seq``
    (the longest record); unpacked, or given with --max-seq-length, just ``seq``. Rows longer than
    the guide's 8192 are only taken without gradient checkpointing (``make_plan``)."""
    if not packing or answers.max_seq_length or answers.packing == "on" and not data:
        return [seq]
    out = []
    row = max(seq, LONGEST_ROW_TOKENS)
    while row >= seq:
        out.append(row)
        if row // 2 < seq:
            break
        row //= 2
    return out if out[-1] == seq else out + [seq]


def choose_max_seq_length(answers: Answers, data: DatasetSummary | None) -> tuple[int, bool, str]:
    """(max_seq_length, skip longer records?, why)."""
    if answers.max_seq_length:
        return answers.max_seq_length, False, "given with --max-seq-length"
    if data and data.suggested_max_seq_length:
        seq = data.suggested_max_seq_length
        if data.longest > seq:
            return seq, True, (
                f"p99 of the dataset's token lengths ({data.p99:,}) rounded up: a few outliers (longest {data.longest:,}) would "
                "double every row's memory; records longer than this are skipped (data.on_bad_sample: skip)"
            )
        return seq, False, f"the longest record ({data.longest:,} tokens; p99 {data.p99:,}) rounded up to a multiple of 256: no record is cut or skipped"
    return DEFAULT_MAX_SEQ_LENGTH, False, f"no dataset summary: the default {DEFAULT_MAX_SEQ_LENGTH}; `qvltune check-data` suggests one from your data"


# ----------------------------------------------------------------------------------------------
# The tree


@dataclass
class _Choice:
    """A candidate run: what varies while searching memory."""

    strategy: str
    vision: str
    rung: Rung
    checkpointing: bool
    per_device_batch: int
    max_seq_length: int
    min_pixels: int
    max_pixels: int
    learning_rate: float | None = None  # None: by strategy


def _doc(answers: Answers, c: _Choice, *, machine: Machine, packing: bool, skip_long: bool, rows_target: int, data: DatasetSummary | None, name: str) -> dict[str, Any]:
    """The run config document of one candidate (validated by ``parse_config``)."""
    W = machine.world_size
    grad_accum = max(1, round(rows_target / (c.per_device_batch * W)))  # the nearest to the target
    lr = c.learning_rate or (LR_FULL if c.strategy == "full" else LR_LORA)
    component_lr: dict[str, float] = {}
    components: dict[str, str] = {}
    if c.vision != STRATEGY_PRESETS[c.strategy]["vision"]:
        components["vision"] = c.vision
    if c.vision == "full":
        component_lr["vision"] = LR_VISION_FULL
    elif c.vision == "lora":
        component_lr["vision"] = LR_VISION_LORA
    data_doc: dict[str, Any] = {"train": answers.data or "data/train.jsonl"}
    if answers.image_root:
        data_doc["image_root"] = answers.image_root
    if data and data.records >= EVAL_MIN_RECORDS:
        data_doc["eval_split"] = EVAL_SPLIT
    data_doc.update({"min_pixels": c.min_pixels, "max_pixels": c.max_pixels, "max_seq_length": c.max_seq_length, "packing": packing})
    if skip_long:
        data_doc["on_bad_sample"] = "skip"
    rows = None
    if data and data.records:
        per_row = max(1, int(c.max_seq_length // max(1.0, data.mean))) if packing else 1
        rows = max(1, data.records // per_row)
    steps = max(1, rows // (c.per_device_batch * grad_accum * W)) if rows else None
    every = min(500, max(10, steps // 2)) if steps else 200
    doc: dict[str, Any] = {
        "name": name,
        "output_dir": "runs",
        "model": {"path": answers.model or BUILTIN_TINY, "attn_implementation": "auto"},
        "data": data_doc,
        "strategy": c.strategy,
    }
    if components:
        doc["components"] = components
    doc["optim"] = {
        "learning_rate": lr,
        **({"component_lr": component_lr} if component_lr else {}),
        "optimizer": "adamw_torch" if machine.is_cpu else "adamw_torch_fused",
        "scheduler": "cosine",
        "warmup_ratio": 0.03,
        "weight_decay": 0.01,
        "max_grad_norm": 1.0,
        "epochs": answers.epochs,
        "per_device_batch": c.per_device_batch,
        "grad_accum": grad_accum,
        "effective_batch": c.per_device_batch * grad_accum * W,
        "bf16": machine.bf16 and not machine.is_cpu,
        "gradient_checkpointing": c.checkpointing,
        "compile": compiles(machine, c.rung),
    }
    doc["schedule"] = {"log_steps": min(10, every), "eval_steps": every, "save_steps": every, "save_total_limit": 3}
    doc["deepspeed"] = {"stage": c.rung.stage, "offload_optimizer": c.rung.offload_optimizer, "offload_params": c.rung.offload_params}
    launch: dict[str, Any] = {"gpus": "all"} if not machine.is_cpu else {"cpu_processes": machine.cpu_processes}
    if answers.nodes > 1:
        launch.update({"nodes": answers.nodes, "hostfile": "hostfile"})
    doc["launch"] = launch
    return doc


def _config(doc: dict[str, Any]) -> RunConfig:
    return parse_config(doc, "planned config")


class _Search:
    """Builds and estimates candidate configs against the machine."""

    def __init__(self, answers: Answers, machine: Machine, stats: ModelStats, data: DatasetSummary | None, *, packing: bool, skip_long: bool, rows_target: int, name: str):
        self.answers, self.machine, self.stats, self.data = answers, machine, stats, data
        self.packing, self.skip_long, self.rows_target, self.name = packing, skip_long, rows_target, name

    def doc(self, c: _Choice, machine: Machine | None = None) -> dict[str, Any]:
        return _doc(self.answers, c, machine=machine or self.machine, packing=self.packing, skip_long=self.skip_long, rows_target=self.rows_target, data=self.data, name=self.name)

    def estimate(self, c: _Choice, machine: Machine | None = None, stats: ModelStats | None = None) -> tuple[RunConfig, Estimate]:
        machine = machine or self.machine
        cfg = _config(self.doc(c, machine))
        return cfg, estimate(cfg, stats or self.stats, machine, workload_for(cfg, self.data))

    def fits(self, est: Estimate, machine: Machine | None = None) -> bool:
        machine = machine or self.machine
        return est.fits(machine.gpu_memory) and est.host_fits(machine.host_ram)

    def first_fit(self, c: _Choice, *, offload: bool = True, machine: Machine | None = None, stats: ModelStats | None = None) -> tuple[_Choice, RunConfig, Estimate] | None:
        """The cheapest rung, checkpointing off before on (it recomputes the forward: slower)."""
        machine, stats = machine or self.machine, stats or self.stats
        for rung in ladder(stats, machine, offload):
            for ckpt in (False, True):
                cand = replace(c, rung=rung, checkpointing=ckpt)
                cfg, est = self.estimate(cand, machine, stats)
                if self.fits(est, machine):
                    return cand, cfg, est
        return None


def make_plan(
    answers: Answers,
    machine: Machine,
    stats: ModelStats,
    data: DatasetSummary | None = None,
    *,
    stats_for: Callable[[str], ModelStats] | None = None,
) -> Plan:
    """Walk the tree; ``stats_for(size)`` gives other catalog sizes' stats (for 'a smaller model').

    Sequence length and packing come first (they set the activations every later branch weighs);
    packed rows start at 8192 tokens and are halved until the plan fits."""
    stats_for = stats_for or (lambda size: model_stats(builtin_config(size)))
    seq, skip_long, seq_why = choose_max_seq_length(answers, data)
    packing, pack_why = choose_packing(answers, data, seq)
    options = row_lengths(answers, data, seq, packing)
    if packing and data and data.mean and len(options) > 1:
        # Rows so long that one per GPU already exceeds the effective batch only make steps coarser.
        target = effective_batch_target(answers, data)[0]
        options = [r for r in options if machine.world_size * max(1, int(r // data.mean)) <= target] or options[-1:]
    # The longest packed row that fits without gradient checkpointing (recomputing the forward costs
    # ~1/3 more compute), down to MIN_ROW_WITHOUT_CHECKPOINTING; else the longest row that fits at all.
    plans: list[tuple[int, Plan]] = []
    for n, row in enumerate(options):
        why = seq_why
        longer = row > max(seq, PACKED_ROW_TOKENS)  # beyond the guide's 8192: only without checkpointing
        if longer:
            why = (
                f"packed rows of {row:,} tokens: the longest row (from {LONGEST_ROW_TOKENS:,}) that fits without gradient checkpointing "
                "and keeps one row per GPU within the effective batch; with varlen attention longer rows cost no extra attention, "
                f"and fewer, larger micro-batches keep the GPU ahead of the host; longest record: {seq_why}"
            )
        elif row == PACKED_ROW_TOKENS:
            why = f"packed rows of {row:,} tokens (the guide's packing example: --max_seq_length 8192); longest record: {seq_why}"
        elif row != seq:
            why = (
                f"packed rows of {row:,} tokens: halved from the guide's 8192 until one row per GPU stays within the effective batch "
                f"and the plan fits without gradient checkpointing if it can; longest record: {seq_why}"
            )
        elif packing and n:
            why = f"{seq_why}; longer packed rows do not fit"
        plan = _plan_for(answers, machine, stats, data, stats_for, row, skip_long, why, packing, pack_why)
        if longer and not (plan.fits and not plan.config.optim.gradient_checkpointing):
            continue
        first = not plans
        plans.append((row, plan))
        if plan.fits and not plan.config.optim.gradient_checkpointing and (row >= MIN_ROW_WITHOUT_CHECKPOINTING or first):
            return plan
    return next((p for _, p in plans if p.fits), plans[-1][1])


def _plan_for(
    answers: Answers,
    machine: Machine,
    stats: ModelStats,
    data: DatasetSummary | None,
    stats_for: Callable[[str], ModelStats],
    seq: int,
    skip_long: bool,
    seq_why: str,
    packing: bool,
    pack_why: str,
) -> Plan:
    decisions: list[Decision] = []
    warnings: list[str] = []

    def decide(topic: str, choice: str, why: str) -> None:
        decisions.append(Decision(topic, choice, why))

    tiny = answers.model == BUILTIN_TINY
    cpu_practical = tiny or stats.total <= CPU_PRACTICAL_PARAMS
    if machine.is_cpu:
        decide("machine", "CPU", "no NVIDIA GPU found: CPU mode (gloo backend, fp32), practical for tiny test models only")
        if not cpu_practical:
            warnings.append(f"training {answers.model} on a CPU is impractically slow: run `qvltune init` on the GPU machine, or plan for it here with --gpu H200 --gpu-count 8")
    else:
        total = f"{machine.world_size} GPUs in total; " if machine.nodes > 1 else ""
        decide("machine", machine.label(), total + ("bf16 on every GPU" if machine.bf16 else "at least one GPU has no bf16 (compute capability < 8.0)"))

    lo, hi, pix_why = pixel_budget(answers)
    target, batch_why = effective_batch_target(answers, data)
    samples_per_row = max(1, int(seq // max(1.0, data.mean))) if (packing and data and data.records) else 1
    rows_target = max(1, round(target / samples_per_row))
    base = _Choice("mixed", "frozen", Rung(2), False, 1, seq, lo, hi)
    name = default_name(answers, "plan")
    search = _Search(answers, machine, stats, data, packing=packing, skip_long=skip_long, rows_target=rows_target, name=name)

    # 1. Strategy. The guide's tree: "Need fast turnaround? Yes -> LoRA + frozen vision";
    #    "Do you have 8x A100 (80GB)? Yes -> Full fine-tuning (best quality); No -> LoRA".
    if answers.strategy != "auto":
        strategy, why = answers.strategy, f"chosen with --strategy {answers.strategy}"
    elif answers.fast:
        strategy = "lora"
        why = "fast turnaround: LoRA on the LLM with a frozen vision tower trains 2-3x faster (the guide: 'Need fast turnaround? Yes -> LoRA + frozen vision')"
    else:
        full = search.first_fit(replace(base, strategy="full", vision="full" if answers.domain_shift else "frozen"), offload=False)
        if full:
            strategy = "full"
            why = (
                f"full fine-tuning fits: {format_bytes(full[2].per_gpu)} of {format_bytes(machine.gpu_memory)} per {unit_of(machine)} with {full[0].rung.label()} "
                "(the guide: 'Do you have 8x A100 (80GB)? Yes -> Full fine-tuning (best quality)')"
            )
        else:
            _, best = search.estimate(replace(base, strategy="full", rung=ladder(stats, machine, offload=False)[-1], checkpointing=True))
            strategy = "mixed"
            why = (
                f"full fine-tuning would need {format_bytes(best.per_gpu)} per {unit_of(machine)} without CPU offload ({format_bytes(machine.gpu_memory)} available); "
                "mixed: frozen vision tower, fully trained merger, LoRA on the LLM (the guide's recommended strategy: "
                "'LoRA on LLM gives 80% of full fine-tuning quality at 20% cost')"
            )
    decide("strategy", strategy, why)

    # 2. Vision tower. The guide: train it for a "new visual domain (medical scans, satellite imagery)",
    #    not for "general images (pre-trained weights already excellent)".
    if answers.domain_shift:
        vision = "full" if strategy == "full" else "lora"
        if vision == "full":
            vwhy = f"images far from pre-training: the vision tower trains fully, at a lower learning rate ({LR_VISION_FULL:g})"
        else:
            vwhy = (
                f"images far from pre-training: LoRA on the vision tower adapts it at a fraction of full training's memory (learning rate {LR_VISION_LORA:g})"
                + ("; this overrides the fast-turnaround rule of a frozen tower" if answers.fast else "")
            )
    else:
        vision = "frozen"
        vwhy = "images like ordinary photos: the pre-trained vision tower is kept frozen (the guide: 'Vision encoder rarely needs changes')"
    decide("vision", vision, vwhy)

    if tiny:
        lr = TINY_LR
        decide("learning rate", f"{lr:g}", "the tiny model's rate (measured by `qvltune demo`: real models use the guide's 1e-4 LoRA / 5e-5 full); cosine, 3% warmup")
    else:
        lr = LR_FULL if strategy == "full" else LR_LORA
        decide("learning rate", f"{lr:g}", "the guide: 'LoRA: 1e-4, Full: 5e-5'; cosine schedule, 3% warmup, weight decay 0.01")
    decide("precision", "bf16" if machine.bf16 and not machine.is_cpu else "fp32", "bf16 on GPUs of compute capability 8.0+ (the guide: '--bf16 True')" if machine.bf16 and not machine.is_cpu else "no bf16 here: fp32 (twice the memory of bf16)")
    decide("resolution", "fixed" if lo == hi else "variable", pix_why)
    decide("max_seq_length", str(seq), seq_why)
    decide("packing", "on" if packing else "off", pack_why)

    # 3. Memory: the cheapest ZeRO stage and checkpointing setting that fit with the margin.
    chosen = replace(base, strategy=strategy, vision=vision, learning_rate=lr)
    found = search.first_fit(chosen)
    suggestions: list[str] = []
    if found:
        chosen, cfg, est = found
        # A larger micro-batch where memory allows (fewer, larger matmuls); never past the target.
        if not packing:
            for pdb in (2, 4, 8):
                if pdb * machine.world_size > rows_target:
                    break
                cand = replace(chosen, per_device_batch=pdb)
                c2, e2 = search.estimate(cand)
                if not search.fits(e2):
                    break
                chosen, cfg, est = cand, c2, e2
        fits = True
        margin = f"{format_bytes(est.per_gpu)} of {format_bytes(machine.gpu_memory)} per {unit_of(machine)}, with a {SAFETY_MARGIN:.0%} safety margin"
        zwhy = f"the cheapest stage that fits: {margin} (the guide: 'Stage 2: Good for 7B-30B models', 'Stage 3 + Offload: extreme memory savings')"
        if stats.is_moe:
            zwhy += "; never ZeRO-3 for the MoE model (every expert is gathered each step)"
        decide("zero", chosen.rung.label(), zwhy)
        if chosen.checkpointing:
            _, off = search.estimate(replace(chosen, checkpointing=False))
            decide("gradient checkpointing", "on", f"without it this stage needs {format_bytes(off.per_gpu)} per {unit_of(machine)} (the guide's first OOM fix: '--gradient_checkpointing True')")
        else:
            decide("gradient checkpointing", "off", "memory allows it: no recomputed forward pass (about a third more compute saved)")
        if compiles(machine, chosen.rung):
            decide("compile", "on", "torch.compile of each decoder layer fuses its small element-wise kernels (one compilation, about a minute, at the first step)")
    else:
        chosen = replace(chosen, rung=ladder(stats, machine)[-1], checkpointing=True)
        cfg, est = search.estimate(chosen)
        fits = False
        decide("zero", chosen.rung.label(), f"nothing fits: even the most frugal setting needs {format_bytes(est.per_gpu)} per {unit_of(machine)} ({format_bytes(machine.gpu_memory)} available)" + (f" and {format_bytes(est.host_total)} of host memory" if est.host_total else ""))
        decide("gradient checkpointing", "on", "the most memory-saving setting")
        suggestions = _suggestions(search, chosen, stats, machine, stats_for, data)

    # 4. Batch: effective = per-device batch x accumulation x GPUs (the guide's formula).
    o = cfg.optim
    eff = o.per_device_batch * o.grad_accum * machine.world_size
    unit = ("packed row" if packing else "sample") + ("s" if eff != 1 else "")
    devices = f"{machine.world_size} {'process' if machine.is_cpu else 'GPU'}{'s' if machine.world_size > 1 else ''}"
    bwhy = f"{eff} {unit} = {o.per_device_batch} per device x {o.grad_accum} accumulation x {devices}; {batch_why}"
    if packing and samples_per_row > 1:
        bwhy += f"; ~{samples_per_row} samples per packed row, so ~{eff * samples_per_row} samples per step"
    if eff > rows_target:
        bwhy += f" (above the target: every {'process' if machine.is_cpu else 'GPU'} needs at least one {'row' if packing else 'sample'} per step)"
    decide("effective batch", str(eff), bwhy)
    if answers.nodes > 1:
        decide("nodes", str(answers.nodes), "multi-node: ssh/pdsh through `hostfile` ('host slots=N'), Slurm through `train.sbatch`, or `qvltune train --node-rank N --master-addr HOST` on each node; every node needs the same GPUs and the data at the same path, the run folder on shared storage")

    final_name = default_name(answers, strategy)
    doc = search.doc(chosen)
    doc["name"] = final_name
    cfg = _config(doc)
    if est.host_total and machine.host_ram and not est.host_fits(machine.host_ram):
        warnings.append(f"CPU offload needs {format_bytes(est.host_total)} of host memory; this node has {format_bytes(machine.host_ram)}")
    elif est.host_total and machine.host_ram is None:
        warnings.append(f"CPU offload needs {format_bytes(est.host_total)} of host memory per node (not checked: the machine's memory is unknown here)")
    return Plan(cfg, doc, decisions, est, machine, fits and not (machine.is_cpu and not cpu_practical), suggestions, warnings)


def _suggestions(search: _Search, chosen: _Choice, stats: ModelStats, machine: Machine, stats_for: Callable[[str], ModelStats], data: DatasetSummary | None) -> list[str]:
    """The nearest options that would fit, each checked with the estimator."""
    out: list[str] = []
    if machine.is_cpu:
        return ["plan for a GPU machine: --gpu H200 --gpu-count 8 (or run `qvltune init` there)"]
    # More GPUs of the same kind (ZeRO-3 partitions weights and states; -2 for the MoE model).
    for total in (2, 4, 8, 16, 32, 64):
        if total <= machine.world_size:
            continue
        per_node = min(total, max(machine.gpus_per_node, 8))
        bigger = replace(machine, gpus_per_node=per_node, nodes=-(-total // per_node))
        hit = search.first_fit(chosen, offload=False, machine=bigger)
        if hit:
            out.append(f"more GPUs: {total} x {machine.gpu_name} would fit ({hit[0].rung.label()}, {format_bytes(hit[2].per_gpu)} per GPU)")
            break
    # LoRA instead of full / a frozen vision tower.
    if chosen.strategy == "full":
        hit = search.first_fit(replace(chosen, strategy="mixed", vision="lora" if chosen.vision != "frozen" else "frozen"))
        if hit:
            out.append(f"LoRA: --strategy mixed would fit ({hit[0].rung.label()}, {format_bytes(hit[2].per_gpu)} per GPU)")
    if chosen.vision != "frozen":
        hit = search.first_fit(replace(chosen, vision="frozen"))
        if hit:
            out.append(f"a frozen vision tower (--no-domain-shift) would fit ({hit[0].rung.label()}, {format_bytes(hit[2].per_gpu)} per GPU)")
    # A smaller model of the same family.
    for km in sorted(KNOWN_MODELS, key=lambda k: -builtin_param_count(k.size)):
        if builtin_param_count(km.size) >= stats.total * 0.95:
            continue
        other = stats_for(km.size)
        hit = search.first_fit(chosen, stats=other)
        if hit:
            out.append(f"a smaller model: --model {km.hub_id} would fit ({hit[0].rung.label()}, {format_bytes(hit[2].per_gpu)} per GPU)")
            break
    # Fewer image tokens (matters when the vision tower trains or images fill the rows).
    tokens = chosen.max_pixels // TOKEN_PIXELS
    while tokens > 64:
        tokens //= 2
        hit = search.first_fit(replace(chosen, max_pixels=tokens * TOKEN_PIXELS, min_pixels=min(chosen.min_pixels, tokens * TOKEN_PIXELS)))
        if hit:
            out.append(f"lower max_pixels: --max-image-tokens {tokens} ({tokens * TOKEN_PIXELS:,} pixels) would fit ({hit[0].rung.label()}, {format_bytes(hit[2].per_gpu)} per GPU)")
            break
    # Shorter rows.
    seq = chosen.max_seq_length
    while seq > 512:
        seq //= 2
        hit = search.first_fit(replace(chosen, max_seq_length=seq))
        if hit:
            longer = f"; records longer than {seq} would be skipped" if data and data.longest > seq else ""
            out.append(f"shorter rows: --max-seq-length {seq} would fit ({hit[0].rung.label()}, {format_bytes(hit[2].per_gpu)} per GPU){longer}")
            break
    if not out:
        out.append("no nearby option fits this machine: use a machine with more GPU memory")
    return out


def compiles(machine: Machine, rung: Rung) -> bool:
    """torch.compile the decoder layers on bf16-capable GPUs under ZeRO-0..2: it fuses the element-wise
    kernels that leave the step launch-bound (benchmarks/RESULTS.md). Not on CPU (the compile would
    outlast a small run) nor under ZeRO-3, whose gather hooks would run inside each compiled call."""
    return not machine.is_cpu and machine.bf16 and rung.stage < 3


def unit_of(machine: Machine) -> str:
    return "process" if machine.is_cpu else "GPU"


def builtin_param_count(size: str) -> float:
    from qvltune.catalog import SIZE_BILLIONS

    return SIZE_BILLIONS[size] * 1e9


def machine_for(inventory: Any, nodes: int = 1, gpu_count: int | None = None) -> Machine:
    """The planning machine from a ``hardware.Inventory`` (other nodes assumed identical)."""
    return Machine.from_inventory(inventory, nodes=nodes, gpu_count=gpu_count)
