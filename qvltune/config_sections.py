"""The sections of a run config (``model``, ``data``, ``lora``, ``optim``, ``schedule``, ``deepspeed``,
``launch``, ``dpo``): one strict pydantic model each, with its defaults and per-field bounds.

``RunConfig`` (qvltune.config) holds one of each; conflicts between fields are checked in
qvltune.config_checks.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from qvltune.data.media import DEFAULT_IMAGE_PIXEL_LIMIT
from qvltune.pixels import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, resolve_pixels

Mode = Literal["frozen", "full", "lora"]

LLM_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VISION_LORA_TARGETS = ["qkv", "proj", "linear_fc1", "linear_fc2"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    path: str = Field(description="Hub id (Qwen/Qwen3-VL-2B-Instruct), local folder, or builtin:tiny")
    trust_remote_code: bool = False
    # auto: varlen attention (qvltune.attention) where its CUDA kernels exist, else sdpa.
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "varlen"] = "auto"
    # Build the architecture from config.json with random weights: throughput and memory benchmarks
    # of real-size shapes without downloading their weights. Never for real training.
    random_init: bool = False


class Components(_Strict):
    """Per-component overrides of the strategy preset (None = take the preset)."""

    vision: Mode | None = None
    merger: Literal["frozen", "full"] | None = None
    deepstack: Literal["frozen", "full"] | None = None
    llm: Mode | None = None
    lm_head: Literal["frozen", "full"] | None = None


class SourceConfig(_Strict):
    """One dataset of a mixture with its own settings (unset: the data section's)."""

    path: str
    weight: float = Field(100.0, gt=0, le=1000, description="percent of the file used per epoch; > 100 repeats records")
    image_root: str | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    min_image_tokens: int | None = None
    max_image_tokens: int | None = None

    @model_validator(mode="after")
    def _budget(self):
        resolve_pixels(self.min_pixels, self.max_pixels, self.min_image_tokens, self.max_image_tokens)
        return self


def _check_mixture(value):
    """A mixture string or list parses (per-source settings included); the value is kept as written."""
    from qvltune.data.mixture import parse_mixture

    if value is not None:
        parse_mixture(value if isinstance(value, str) else [v.model_dump() if isinstance(v, SourceConfig) else v for v in value])
    return value


class DataConfig(_Strict):
    # A file, a mixture string (a.jsonl%50[max_image_tokens=256],b.jsonl) or a list of sources.
    train: str | list[str | SourceConfig] = Field(description="dataset file(s) or mixture a.jsonl%50,b.jsonl, or a list of sources")
    eval: str | list[str | SourceConfig] | None = None
    eval_split: float = Field(0.0, ge=0.0, lt=0.5, description="seeded held-out fraction when no eval set is given")
    image_root: str | None = None
    allow_media_outside_root: bool = False
    min_pixels: int | None = None
    max_pixels: int | None = None
    min_image_tokens: int | None = None
    max_image_tokens: int | None = None
    max_seq_length: int = Field(4096, ge=64)
    packing: bool = False
    on_bad_sample: Literal["error", "skip"] = "error"
    num_workers: int = Field(2, ge=0)
    video_fps: float = Field(2.0, gt=0)
    # Frames per video: files are resampled to video_fps within [video_min_frames, video_max_frames];
    # folders/lists of frames are thinned beyond video_max_frames. video_max_tokens bounds each video's
    # LLM tokens (all frames), lowering the resolution of long videos.
    video_min_frames: int = Field(2, ge=2)
    video_max_frames: int | None = Field(None, ge=2)
    video_max_tokens: int | None = Field(None, ge=1)
    # Thinking templates (which drop earlier reasoning): train every answer in the context the
    # template gives it as the last turn (each), or only each record's final answer (last).
    thinking_turns: Literal["each", "last"] = "each"
    # Cache the checked index (token counts) beside the data, keyed by its content and these settings.
    index_cache: bool = True
    # Largest image (width x height as stored) that is decoded; above it an image is refused as a
    # possible decompression bomb. The default is Pillow's own limit; raise it for gigapixel scans.
    image_pixel_limit: int = Field(DEFAULT_IMAGE_PIXEL_LIMIT, ge=1)

    _mixtures = field_validator("train", "eval")(classmethod(lambda cls, v: _check_mixture(v)))

    def video_sampling(self):
        from qvltune.data.video import VideoSampling

        return VideoSampling(self.video_fps, self.video_min_frames, self.video_max_frames, self.video_max_tokens)

    def pixel_budget(self) -> tuple[int, int]:
        lo, hi = resolve_pixels(self.min_pixels, self.max_pixels, self.min_image_tokens, self.max_image_tokens)
        return (lo if lo is not None else DEFAULT_MIN_PIXELS, hi if hi is not None else DEFAULT_MAX_PIXELS)


class LoraConfig(_Strict):
    rank: int = Field(64, ge=1)
    alpha: float = Field(128, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(LLM_LORA_TARGETS))
    vision_target_modules: list[str] = Field(default_factory=lambda: list(VISION_LORA_TARGETS))


class ComponentLR(_Strict):
    vision: float | None = Field(None, gt=0)
    merger: float | None = Field(None, gt=0)
    deepstack: float | None = Field(None, gt=0)
    llm: float | None = Field(None, gt=0)
    lm_head: float | None = Field(None, gt=0)


class OptimConfig(_Strict):
    learning_rate: float = Field(1e-4, gt=0, lt=1)
    component_lr: ComponentLR = Field(default_factory=ComponentLR)
    optimizer: Literal["adamw_torch", "adamw_torch_fused"] = "adamw_torch_fused"
    scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.01, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    per_device_batch: int = Field(1, ge=1)
    grad_accum: int = Field(8, ge=1)
    effective_batch: int | None = Field(None, ge=1, description="optional check: per_device_batch x grad_accum x processes")
    bf16: bool = True
    gradient_checkpointing: bool = True
    # Loss on answer tokens only, chunked, without full-vocabulary logits (qvltune.loss); false = plain logits.
    fused_loss: bool = True
    # torch.compile each language-model decoder layer (qvltune.compiled_layers.compile_blocks; vision blocks stay
    # eager): fuses the many small element-wise kernels (norms, RoPE, activations, LoRA scaling) that
    # make the step launch-bound.
    compile: bool = False
    # On a NaN/inf loss: stop (naming the step and the last good checkpoint), or skip_step: DeepSpeed
    # already drops the update of a step whose gradients are not finite; count such steps, say so in
    # the metrics, and stop once more than max_skipped_steps were skipped.
    nan_policy: Literal["stop", "skip_step"] = "stop"
    max_skipped_steps: int = Field(10, ge=1)
    seed: int = 42


class ScheduleConfig(_Strict):
    log_steps: int = Field(10, ge=1)
    eval_steps: int = Field(200, ge=1)
    save_steps: int | None = Field(200, ge=1, description="null: no checkpoints at all (benchmarks); a crash then loses the run")
    save_total_limit: int | None = Field(3, ge=1)
    # Write checkpoints in the background (qvltune.checkpoint_writer): training waits only for a copy
    # of the state in host memory (as much as the optimizer state of the trained parameters).
    async_save: bool = True
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    # Profile optimizer steps [start, start + count) with torch.profiler: <run>/profile.txt (+ trace).
    # Steps are numbered as in the train records: the first is 1.
    profile_steps: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] | None = None
    # Record Python frames too (torch.profiler with_stack): shows host time spent in Python, e.g.
    # DeepSpeed's ZeRO-3 hooks, in the trace; slows the profiled steps.
    profile_python: bool = False


class Zero3Config(_Strict):
    """ZeRO-3's gather and reduce settings (DeepSpeed's names, without the ``stage3_`` prefix).

    Unset: derived from the model's own sizes at launch (``qvltune.zero.zero3_tuning``); `qvltune
    init` writes them out with the reason for each."""

    prefetch_bucket_size: int | None = Field(None, ge=0)
    param_persistence_threshold: int | None = Field(None, ge=0)
    max_live_parameters: int | None = Field(None, ge=1)
    max_reuse_distance: int | None = Field(None, ge=0)
    reduce_bucket_size: int | None = Field(None, ge=1)
    overlap_comm: bool | None = None


class DeepSpeedConfig(_Strict):
    stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    zero3: Zero3Config = Field(default_factory=Zero3Config)


class LaunchConfig(_Strict):
    gpus: Literal["all"] | int | list[int] = Field("all", description="'all', a count, or device indices")
    cpu_processes: int = Field(1, ge=1, description="processes when there is no GPU (CPU mode)")
    nodes: int = Field(1, ge=1)
    hostfile: str | None = None
    master_addr: str | None = None
    master_port: int | None = Field(None, ge=1024, le=65535)

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("must be at least 1")
        if isinstance(v, list) and (not v or len(set(v)) != len(v) or min(v) < 0):
            raise ValueError("must list distinct device indices")
        return v


REFERENCE_MODES = ("adapter_off", "precomputed")


class DPOConfig(_Strict):
    """Preference tuning (``stage: dpo``; qvltune.preference)."""

    beta: float = Field(0.1, gt=0, le=10, description="how far the policy may move from the reference (DPO's beta)")
    # sigmoid: DPO (with label_smoothing: conservative DPO); ipo: IPO on per-token mean log-probs.
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="assumed share of flipped preference labels (sigmoid only)")
    # RPO: + rpo_alpha x the chosen answer's cross-entropy per token (TRL's rpo_alpha, LLaMA-Factory's pref_ftx).
    rpo_alpha: float = Field(0.0, ge=0.0)
    # adapter_off: the same model with its LoRA adapters (and the modules trained beside them) off,
    # each step; precomputed: the starting model's log-probs, computed once before training and kept
    # in the run folder (works for full fine-tuning); or a model folder / Hub id, precomputed likewise.
    reference: str = Field("adapter_off", min_length=1)

    def reference_model(self) -> str | None:
        return None if self.reference in REFERENCE_MODES else self.reference
