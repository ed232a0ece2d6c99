"""The small pure decisions of the plan, each tested on its own, and the numbers behind them.

Every heuristic names its source: "the guide" is the practitioner's guide the tree comes from
(Fine-Tuning Overview: Training Qwen3-VL; its "Key decision tree", "Training Strategies",
"Training Hyperparameters" and "DeepSpeed Integration" sections are quoted below).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qvltune.catalog import size_of
from qvltune.estimate_inputs import DatasetSummary, Machine
from qvltune.model_stats import ModelStats
from qvltune.pixels import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, QWEN25_TOKEN_PIXELS, TOKEN_PIXELS
from qvltune.plan.answers import Answers
from qvltune.plan import reasons
from qvltune.tiny import BUILTIN_TINY, TINY_MAX_PIXELS, TINY_MIN_PIXELS
from qvltune.units import GiB

# The guide: "Effective batch size = 1 x 8 x 8 GPUs = 64" (scripts/sft_7b.sh).
DEFAULT_EFFECTIVE_BATCH = 64
# An epoch of fewer optimizer steps leaves warmup and the cosine schedule nothing to work with.
MIN_STEPS_PER_EPOCH = 20
# The guide's learning rates: "LoRA: 1e-4, Full: 5e-5"; the vision tower lower than the LLM.
LR_LORA = 1e-4
LR_FULL = 5e-5
# Preference tuning moves the model less than SFT: LLaMA-Factory's Qwen2-VL LoRA DPO example
# (examples/train_lora/qwen2_5vl_lora_dpo.yaml) uses 5e-6 where its SFT example uses 1e-4.
DPO_LR_FACTOR = 0.05
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
DEFAULT_MAX_SEQ_LENGTH = 4096
# The built-in tiny model is a pipeline check, not a small real model: what `qvltune demo` measured
# on a 2-core CPU (DESIGN.md sec. 4): batch 32 at lr 2e-3 learns its colour task in a few epochs.
TINY_LR = 2e-3
TINY_EFFECTIVE_BATCH = 32
# Models this small train on a CPU in minutes (the built-in tiny one has 1.5 M parameters; a test
# model of a few million is no different). The smallest released size, 2B, would take weeks.
CPU_PRACTICAL_PARAMS = 50_000_000


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
# used for the MoE model (config_checks.check_against_model: every expert gathered each step hangs or
# crawls); ZeRO-2 with optimizer offload is its last resort.
DENSE_LADDER = (Rung(2), Rung(3), Rung(3, True), Rung(3, True, True))
MOE_LADDER = (Rung(2), Rung(2, True))
CPU_LADDER = (Rung(2),)
# One GPU: ZeRO-3 partitions each tensor into one piece, so without parameter offload it holds all
# that ZeRO-2 holds, plus its gathered working set, and still pays its gathers and hooks every step
# (benchmarks/zero3_overhead.py measures what they cost). ZeRO-2 with the optimizer offloaded saves
# the same memory as ZeRO-3 with it; ZeRO-3 is left for offloading the parameters too.
ONE_GPU_LADDER = (Rung(2), Rung(2, True), Rung(3, True, True))


def ladder(stats: ModelStats, machine: Machine, offload: bool = True) -> tuple[Rung, ...]:
    rungs = CPU_LADDER if machine.is_cpu else MOE_LADDER if stats.is_moe else ONE_GPU_LADDER if machine.world_size == 1 else DENSE_LADDER
    return tuple(r for r in rungs if offload or not r.offload_optimizer)


# ----------------------------------------------------------------------------------------------
# Small pure decisions (each tested on its own)


def pixel_budget(answers: Answers) -> tuple[int, int, str]:
    """(min_pixels, max_pixels, why) for the resolution answer. The tiny model's budget is its own
    (4-64 tokens per image: its images are small), fixed or variable as answered."""
    tiny = answers.model == BUILTIN_TINY and answers.max_image_tokens is None
    if answers.max_image_tokens:
        hi = answers.max_image_tokens * TOKEN_PIXELS
    else:
        hi = TINY_MAX_PIXELS if tiny else FIXED_PIXELS if answers.resolution == "fixed" else DEFAULT_MAX_PIXELS
    lo = hi if answers.resolution == "fixed" else min(TINY_MIN_PIXELS if tiny else DEFAULT_MIN_PIXELS, hi)
    return lo, hi, reasons.resolution(lo, hi, given_tokens=answers.max_image_tokens, tiny=tiny).why


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
        return TINY_EFFECTIVE_BATCH, f"the tiny model learns with batches of {TINY_EFFECTIVE_BATCH}, measured by `qvltune demo`"
    target = DEFAULT_EFFECTIVE_BATCH
    why = "the guide's effective batch: 1 per GPU x 8 accumulation x 8 GPUs = 64"
    if data and data.records and data.records // target < MIN_STEPS_PER_EPOCH:
        target = max(1, 2 ** max(0, (data.records // MIN_STEPS_PER_EPOCH).bit_length() - 1))
        why = f"{data.records} records: a batch of {target} gives at least {MIN_STEPS_PER_EPOCH} optimizer steps per epoch (64 would give {max(1, data.records // 64)})"
    return target, why


def packing_row(answers: Answers, max_seq_length: int) -> int:
    """The row packing is weighed against: the given max_seq_length, else the guide's 8192-token
    rows (or the longest record, if longer)."""
    return answers.max_seq_length or max(max_seq_length, PACKED_ROW_TOKENS)


def choose_packing(answers: Answers, data: DatasetSummary | None, max_seq_length: int) -> tuple[bool, str]:
    """Pack when the median record is at most a quarter of the row it would be packed into
    (``packing_row``). The plan restates the reason for the row it finally chooses."""
    if answers.packing != "auto":
        return answers.packing == "on", reasons.packing(answers.packing == "on", given=answers.packing, row=max_seq_length).why
    if not data or not data.records:
        return False, reasons.packing(False, given=None, row=max_seq_length).why
    row = packing_row(answers, max_seq_length)
    on = data.p50 <= PACKING_MAX_FRACTION * row
    return on, reasons.packing(on, given=None, row=row, p50=data.p50, per_row=samples_per_row(row, data), considered_row=row).why


def samples_per_row(row: int, data: DatasetSummary | None) -> int:
    """Samples a packed row holds on average: what turns rows into samples in the batch arithmetic."""
    return max(1, int(row // max(1.0, data.mean))) if data and data.records else 1


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


def seq_basis(answers: Answers, data: DatasetSummary | None) -> str:
    """What sets the shortest row: given | longest (every record) | p99 (outliers skipped) | default."""
    if answers.max_seq_length:
        return "given"
    if data and data.suggested_max_seq_length:
        return "p99" if data.longest > data.suggested_max_seq_length else "longest"
    return "default"


def choose_max_seq_length(answers: Answers, data: DatasetSummary | None) -> tuple[int, bool, str]:
    """(max_seq_length, skip longer records?, why): the shortest row the data allows."""
    how = seq_basis(answers, data)
    seq = answers.max_seq_length if how == "given" else data.suggested_max_seq_length if how in ("p99", "longest") else DEFAULT_MAX_SEQ_LENGTH
    longest, p99 = (data.longest, data.p99) if data and data.records else (None, None)
    # Records longer than the row are skipped (not an error that stops train), as the reason says.
    skip = how == "p99" or (how == "given" and longest is not None and longest > seq)
    return seq, skip, reasons.max_seq_length(seq, how=how, longest=longest, p99=p99).why


def compiles(machine: Machine, rung: Rung) -> bool:
    """torch.compile the decoder layers on bf16-capable GPUs: it fuses the element-wise kernels that
    leave the step launch-bound (benchmarks/RESULTS.md). Not on CPU (the compile would outlast a
    small run). Under ZeRO-3 too: with DeepSpeed's plain linear (`zero.deepspeed_config` sets it
    when compiling) every layer shares one graph, and on one H200 compiled ZeRO-3 ran at 1.01x
    ZeRO-2's speed for 2B mixed (0.63x eager), 0.97x for 8B mixed and 0.89x for 8B full; with two
    ranks it has run on the CPU only (the losses of the eager run to 5 digits), and the planner
    plans ZeRO-3 without parameter offload only on several GPUs: the first multi-GPU run is the
    check still to come. Not with the parameters offloaded to the host: no compiled run there
    (`optim.compile: true` tries it)."""
    return not machine.is_cpu and machine.bf16 and not rung.offload_params


def unit_of(machine: Machine) -> str:
    return "process" if machine.is_cpu else "GPU"


def builtin_param_count(size: str) -> float:
    from qvltune.catalog import SIZE_BILLIONS

    return SIZE_BILLIONS[size] * 1e9
