"""What a training-run estimate is of: the machine (``Machine``), the dataset as ``check-data`` counted
it (``DatasetSummary``), and the worst micro-batch one GPU processes (``Workload``, from the run
config and the data). qvltune.estimate turns these into memory, FLOPs and time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qvltune.config import RunConfig
from qvltune.pixels import TOKEN_PIXELS
from qvltune.units import GiB

# Packed rows without a dataset to measure: text tokens assumed beside each image.
TEXT_TOKENS_PER_IMAGE_SAMPLE = 64


@dataclass(frozen=True)
class Machine:
    """Where the run goes: identical GPUs on each node (or CPU processes when gpus_per_node is 0)."""

    gpu_name: str | None
    gpu_memory: int  # bytes per GPU (the smallest of the node's)
    gpus_per_node: int
    nodes: int = 1
    host_ram: int | None = None  # bytes per node
    peak_tflops: float | None = None
    bf16: bool = True
    cpu_processes: int = 1

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes if self.gpus_per_node else self.cpu_processes

    @property
    def is_cpu(self) -> bool:
        return self.gpus_per_node == 0

    def label(self) -> str:
        if self.is_cpu:
            return f"CPU ({self.cpu_processes} process{'es' if self.cpu_processes > 1 else ''})"
        nodes = f" x {self.nodes} nodes" if self.nodes > 1 else ""
        return f"{self.gpus_per_node} x {self.gpu_name} ({self.gpu_memory / GiB:.0f} GiB){nodes}"

    @classmethod
    def from_inventory(cls, inv: Any, nodes: int = 1, gpu_count: int | None = None, cpu_processes: int = 1) -> Machine:
        """From ``hardware.Inventory`` (GPUs of this node; other nodes assumed identical)."""
        gpus = list(inv.gpus)
        host_ram = inv.host.ram_total if inv.host else None
        if not gpus:
            return cls(None, host_ram or 0, 0, 1, host_ram, None, False, cpu_processes)
        if gpu_count is not None:
            gpus = gpus[:gpu_count] if gpu_count <= len(gpus) else gpus + [gpus[-1]] * (gpu_count - len(gpus))
        smallest = min(gpus, key=lambda g: g.memory_total)
        return cls(smallest.name, smallest.memory_total, len(gpus), nodes, host_ram, smallest.peak_tflops, all(g.bf16 for g in gpus))

    def with_gpus(self, gpus_per_node: int) -> Machine:
        from dataclasses import replace

        return replace(self, gpus_per_node=gpus_per_node)


@dataclass(frozen=True)
class DatasetSummary:
    """What the estimator and planner need from ``check-data``'s report."""

    records: int
    p50: int
    p99: int
    longest: int
    mean: float
    tokens: int  # per epoch
    image_tokens: int  # per epoch (included in tokens)
    max_images_per_record: int
    suggested_max_seq_length: int | None
    trained_tokens: int = 0  # labelled (answer) tokens per epoch
    # Token-weighted sizes (sum of squares / sum): the sample, and the image, an average token sits
    # in. Attention's cost per token grows with them (qvltune.step_flops).
    attended_sample_tokens: float = 0.0
    attended_image_tokens: float = 0.0

    @property
    def image_share(self) -> float:
        return self.image_tokens / self.tokens if self.tokens else 0.0


def summarize_report(report: Any, min_pixels: int, max_pixels: int) -> DatasetSummary:
    """A ``DatasetSummary`` from ``qvltune.data.check.Report`` at the given pixel budget."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    image_tokens = image_tokens_sq = 0
    for w, h in report.image_sizes:
        try:
            rh, rw = smart_resize(h, w, factor=32, min_pixels=min_pixels, max_pixels=max_pixels)
        except ValueError:  # extreme aspect ratios are reported by check-data itself
            continue
        tokens = (rh // 32) * (rw // 32)
        image_tokens += tokens
        image_tokens_sq += tokens * tokens
    lengths = report.lengths
    total = sum(lengths)
    return DatasetSummary(
        records=len(lengths),
        p50=report.percentile(50),
        p99=report.percentile(99),
        longest=max(lengths, default=0),
        mean=total / len(lengths) if lengths else 0.0,
        tokens=total,
        image_tokens=image_tokens,
        max_images_per_record=max((k for k, v in report.images_per_record.items() if v), default=0),
        suggested_max_seq_length=report.suggested_max_seq_length(),
        trained_tokens=report.trained_tokens,
        attended_sample_tokens=sum(n * n for n in lengths) / total if total else 0.0,
        attended_image_tokens=image_tokens_sq / image_tokens if image_tokens else 0.0,
    )


@dataclass(frozen=True)
class Workload:
    """The tokens one GPU processes per micro-batch (the peak is set by the largest batch)."""

    tokens: int  # text + image tokens of one micro-batch (rows x max_seq_length)
    image_tokens: int  # LLM image tokens among them (x merge^2 = vision patches)
    rows: int
    tokens_per_epoch: int | None = None
    assumption: str = ""
    label_share: float = 1.0  # labelled (answer) tokens / tokens; 1.0 = the worst case when unknown
    # The sample and the image an average token attends within (token-weighted, see DatasetSummary;
    # 0 = unknown: qvltune.step_flops then takes a whole row and the pixel budget's largest image).
    attended_tokens: float = 0.0
    attended_image_tokens: float = 0.0
    answer_share: float = 0.0  # labelled tokens / tokens as counted, not doubled (0 = unknown: label_share)
    # The data's image tokens / tokens, for an epoch's FLOPs (image_tokens is the worst micro-batch's,
    # for memory; 0 = unknown: that one's share).
    mean_image_share: float = 0.0


def workload_for(cfg: RunConfig, data: DatasetSummary | None = None) -> Workload:
    """The worst micro-batch the run can see: ``per_device_batch`` rows of ``max_seq_length`` tokens
    (a longer record is refused), holding as many image tokens as the pixel budget and the data allow."""
    rows, seq = cfg.optim.per_device_batch, cfg.data.max_seq_length
    if cfg.stage == "dpo":  # a pair is two sequences: two rows, or packed rows of whole pairs (qvltune.preference.data)
        rows, seq = (rows, 2 * seq) if cfg.data.packing else (2 * rows, seq)
    # Packed rows fill up to max_seq_length; padded rows are as long as the batch's longest record.
    longest = min(seq, data.longest) if data and data.longest and not cfg.data.packing else seq
    tokens = rows * longest
    max_image = cfg.data.pixel_budget()[1] // TOKEN_PIXELS
    if cfg.data.packing:
        share = data.image_share if data and data.tokens else max_image / (max_image + TEXT_TOKENS_PER_IMAGE_SAMPLE)
        image = int(tokens * share)
        why = f"packed rows of {seq} tokens, {share:.0%} image tokens" + (" (from the dataset)" if data else " (assumed: no dataset)")
    else:
        per_record = data.max_images_per_record if data else 1
        image = rows * min(longest, per_record * max_image)
        why = f"{rows} row(s) of up to {longest} tokens with {per_record} image(s) of up to {max_image} tokens each" + ("" if data else " (assumed: no dataset)")
    # Labelled share: the answers' fraction, doubled for safety (one batch can hold the long answers).
    label_share = min(1.0, 2 * data.trained_tokens / data.tokens) if data and data.tokens and data.trained_tokens else 1.0
    # Packed rows attend within each sample (varlen); a padded row's attention spans the whole row
    # (0: qvltune.step_flops takes the row's length).
    attended = data.attended_sample_tokens if data and cfg.data.packing else 0.0
    answers = data.trained_tokens / data.tokens if data and data.tokens else 0.0
    return Workload(
        tokens=tokens,
        image_tokens=image,
        rows=rows,
        tokens_per_epoch=data.tokens if data else None,
        assumption=why,
        label_share=label_share,
        attended_tokens=attended,
        attended_image_tokens=data.attended_image_tokens if data else 0.0,
        answer_share=answers,
        mean_image_share=data.image_share if data and data.tokens else 0.0,
    )
