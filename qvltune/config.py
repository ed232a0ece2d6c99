"""``RunConfig``: the single source of truth of a training run, loaded strictly from YAML.

Unknown keys and bad values are errors; every problem is reported at once as
``field.path: message (got X)``. Cross-field conflicts that can be decided from the file alone are
checked here (``check_conflicts``); those needing the model or the hardware are checked by
``check_against_model`` / ``check_against_hardware`` before anything is launched. The resolved
config (every default and preset written out) is saved beside the checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qvltune.data.media import DEFAULT_IMAGE_PIXEL_LIMIT
from qvltune.errors import UserError
from qvltune.pixels import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, resolve_pixels

Strategy = Literal["lora", "full", "mixed"]
Mode = Literal["frozen", "full", "lora"]
COMPONENTS = ("vision", "merger", "deepstack", "llm", "lm_head")

# What each strategy trains (the guide's three strategies). The vision tower stays frozen unless the
# visual domain is far from pre-training; `components` overrides any entry.
STRATEGY_PRESETS: dict[str, dict[str, str]] = {
    "lora": {"vision": "frozen", "merger": "frozen", "deepstack": "frozen", "llm": "lora", "lm_head": "frozen"},
    "mixed": {"vision": "frozen", "merger": "full", "deepstack": "full", "llm": "lora", "lm_head": "frozen"},
    "full": {"vision": "frozen", "merger": "full", "deepstack": "full", "llm": "full", "lm_head": "full"},
}
# Components that can be LoRA-adapted, and which can be trained fully beside LoRA adapters (peft's
# modules_to_save keeps a trainable copy, so only the small parts qualify).
LORA_CAPABLE = {"vision", "llm"}
FULL_BESIDE_LORA = {"merger", "deepstack", "lm_head"}

LLM_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VISION_LORA_TARGETS = ["qkv", "proj", "linear_fc1", "linear_fc2"]
# Attention implementations that keep packed samples apart (block-diagonal mask or varlen kernels).
PACKING_SAFE_ATTENTION = {"auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "varlen"}


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
    from qvltune.data.formats import parse_mixture

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
    # torch.compile each transformer block (language model and vision tower): fuses the many small
    # element-wise kernels (norms, RoPE, activations, LoRA scaling) that make the step launch-bound.
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
    profile_steps: tuple[int, int] | None = None
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


class RunConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    output_dir: str = "runs"
    # sft: supervised fine-tuning on answers; dpo: preference tuning on chosen/rejected pairs.
    stage: Literal["sft", "dpo"] = "sft"
    model: ModelConfig
    data: DataConfig
    dpo: DPOConfig | None = None
    strategy: Strategy = "mixed"
    components: Components = Field(default_factory=Components)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)

    @model_validator(mode="after")
    def _pixels(self):
        resolve_pixels(self.data.min_pixels, self.data.max_pixels, self.data.min_image_tokens, self.data.max_image_tokens)
        return self

    # -- derived views (never stored twice) ------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def modes(self) -> dict[str, str]:
        """The training mode of each component: the strategy preset with the overrides applied."""
        preset = dict(STRATEGY_PRESETS[self.strategy])
        preset.update({k: v for k, v in self.components.model_dump().items() if v is not None})
        return preset

    def preference(self) -> DPOConfig:
        """The DPO settings (their defaults when the section is left out)."""
        return self.dpo or DPOConfig()

    def lr_for(self, component: str) -> float:
        override = getattr(self.optim.component_lr, component)
        return override if override is not None else self.optim.learning_rate

    def uses_lora(self) -> bool:
        return any(m == "lora" for m in self.modes().values())

    def resolved(self) -> dict[str, Any]:
        """The config with presets written out: what is saved beside checkpoints."""
        doc = self.model_dump(mode="json")
        doc["components"] = self.modes()
        if self.stage == "dpo":
            doc["dpo"] = self.preference().model_dump(mode="json")
        else:
            doc.pop("dpo", None)
        return doc


# ----------------------------------------------------------------------------------------------
# Loading


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _keys_at(root: type[BaseModel] | None, loc: tuple) -> list[str]:
    """The keys allowed where ``loc`` points (its last part is the unknown key), following nested
    models through their annotations (``X | None``, ``dict[str, X]`` and the like)."""
    import typing

    model = root
    for part in loc[:-1]:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            if isinstance(part, (int, str)) and model is not None:
                continue  # a list index or dict key inside a container of models
            return []
        annotation, model = model.model_fields[part].annotation, None
        stack = [annotation]
        while stack:
            t = stack.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                model = t
                break
            stack += list(typing.get_args(t))
    if model is None:
        return []
    return list(model.model_fields) + [f.alias for f in model.model_fields.values() if f.alias]


def format_validation_error(e: ValidationError, root: type[BaseModel] | None = None) -> list[str]:
    """One line per problem, ``field.path: message (got X)``; an unknown key gets the nearest known
    one (``did you mean learning_rate?``) when ``root``, the validated model, is given."""
    import difflib

    lines = []
    for err in e.errors():
        # Literal/union errors name the branch in loc (e.g. 'int', 'literal[...]'): drop those parts.
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and (p.startswith(("literal[", "list[", "function-")) or p in ("int", "str", "float", "bool"))))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            near = difflib.get_close_matches(str(loc[-1]), _keys_at(root, loc), n=1, cutoff=0.6) if loc else []
            msg = f"unknown key: did you mean {near[0]}?" if near else "unknown key (check the spelling; `qvltune init` writes a complete config)"
        elif err["type"] == "missing":
            msg = "required"
        got = err.get("input")
        got_text = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{_format_loc(loc) or '(top level)'}: {msg}{got_text}")
    return list(dict.fromkeys(lines))


def parse_config(doc: Any, source: str = "config") -> RunConfig:
    """Validate a loaded YAML document; raises ``UserError`` listing every problem."""
    if not isinstance(doc, dict):
        raise UserError(f"{source}: a run config must be a YAML mapping (got {type(doc).__name__})", "start from `qvltune init` or a file in templates/")
    try:
        cfg = RunConfig.model_validate(doc)
    except ValidationError as e:
        problems = format_validation_error(e, RunConfig)
        raise UserError(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(problems), "fix the fields above; `qvltune init` writes a valid config") from None
    conflicts = check_conflicts(cfg)
    if conflicts:
        raise UserError(f"{source}: {len(conflicts)} conflict(s):\n  " + "\n  ".join(conflicts), "fix the fields above") from None
    return cfg


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.exists():
        raise UserError(f"config file not found: {path}", "create one with `qvltune init`")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}{where}: invalid YAML: {problem}", "fix the YAML syntax (indentation, colons, quotes)") from None
    except (UnicodeDecodeError, OSError) as e:
        raise UserError(f"cannot read {path}: {e}", "check the file") from None
    cfg = parse_config(doc, str(path))
    return _anchor_paths(cfg, path.parent.resolve())


def _anchor_paths(cfg: RunConfig, base: Path) -> RunConfig:
    """Relative paths in a config file are relative to the file, not to the working directory."""

    def anchor(p: str) -> str:
        # Keep mixture suffixes (a.jsonl%50) and Hub ids / builtin names intact.
        head, sep, pct = p.partition("%")
        q = Path(head)
        return str(q if q.is_absolute() else (base / q)) + sep + pct

    def anchor_entry(entry: str) -> str:
        from qvltune.data.formats import split_settings

        head, settings = split_settings(entry.strip())
        if "image_root" in settings:
            settings["image_root"] = anchor(settings["image_root"])
        inner = ",".join(f"{k}={v}" for k, v in settings.items())
        return anchor(head) + (f"[{inner}]" if settings else "")

    def anchor_spec(spec):
        from qvltune.data.formats import _split_entries

        if isinstance(spec, str):
            return ",".join(anchor_entry(s) for s in _split_entries(spec) if s.strip())
        out = []
        for item in spec:
            if isinstance(item, SourceConfig):
                item = item.model_copy(update={"path": anchor(item.path), "image_root": anchor(item.image_root) if item.image_root else None})
            else:
                item = anchor_entry(item)
            out.append(item)
        return out

    cfg.data.train = anchor_spec(cfg.data.train)
    if cfg.data.eval:
        cfg.data.eval = anchor_spec(cfg.data.eval)
    if cfg.data.image_root:
        cfg.data.image_root = anchor(cfg.data.image_root)
    if not Path(cfg.output_dir).is_absolute():
        cfg.output_dir = str(base / cfg.output_dir)
    model_path = base / cfg.model.path
    if not cfg.model.path.startswith("builtin:") and not Path(cfg.model.path).is_absolute() and (cfg.model.path.startswith(".") or model_path.exists()):
        cfg.model.path = str(model_path)
    ref = cfg.dpo.reference_model() if cfg.dpo else None
    if ref and not ref.startswith("builtin:") and not Path(ref).is_absolute() and (ref.startswith(".") or (base / ref).exists()):
        cfg.dpo.reference = str(base / ref)
    if cfg.launch.hostfile and not Path(cfg.launch.hostfile).is_absolute():
        cfg.launch.hostfile = str(base / cfg.launch.hostfile)
    return cfg


def dump_config(cfg: RunConfig, path: Path) -> None:
    """Write the resolved config (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.resolved(), sort_keys=False))
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------
# Conflicts


def check_conflicts(cfg: RunConfig) -> list[str]:
    """Every conflict between fields that the file alone decides, as 'field: message' lines."""
    out: list[str] = []
    modes = cfg.modes()
    lora_parts = [c for c, m in modes.items() if m == "lora"]
    if all(m == "frozen" for m in modes.values()):
        out.append("components: every component is frozen: nothing to train (unfreeze one, e.g. components.llm: lora)")
    if cfg.strategy in ("lora", "mixed") and not lora_parts:
        out.append(f"strategy: '{cfg.strategy}' but no component is LoRA-adapted: LoRA has nothing to adapt (set components.llm: lora, or strategy: full)")
    if cfg.strategy == "full" and lora_parts:
        out.append(f"components: strategy 'full' with LoRA on {', '.join(lora_parts)} (use strategy: mixed or lora)")
    if lora_parts:
        heavy = [c for c, m in modes.items() if m == "full" and c not in FULL_BESIDE_LORA]
        if heavy:
            out.append(f"components: {', '.join(heavy)} trained fully beside LoRA adapters would be copied whole into the adapter; train {', '.join(heavy)} with LoRA, freeze it, or use strategy: full")
        if "llm" in lora_parts and not cfg.lora.target_modules:
            out.append("lora.target_modules: empty while components.llm is lora: LoRA has nothing to adapt")
        if "vision" in lora_parts and not cfg.lora.vision_target_modules:
            out.append("lora.vision_target_modules: empty while components.vision is lora: LoRA has nothing to adapt")
    o = cfg.optim
    if o.effective_batch is not None:
        per_step = o.per_device_batch * o.grad_accum
        if o.effective_batch % per_step:
            out.append(
                f"optim.effective_batch: {o.effective_batch} is not a multiple of per_device_batch x grad_accum = {per_step} "
                f"(effective batch = per_device_batch x grad_accum x processes)"
            )
    ds = cfg.deepspeed
    if ds.offload_optimizer and ds.stage < 1:
        out.append("deepspeed.offload_optimizer: needs ZeRO stage 1, 2 or 3 (got stage 0)")
    if ds.offload_params and ds.stage != 3:
        out.append(f"deepspeed.offload_params: needs ZeRO stage 3 (got stage {ds.stage})")
    if ds.stage != 3 and any(v is not None for v in ds.zero3.model_dump().values()):
        out.append(f"deepspeed.zero3: ZeRO-3 settings with stage {ds.stage} would be ignored (remove the section, or use stage: 3)")
    if cfg.data.packing and cfg.model.attn_implementation not in PACKING_SAFE_ATTENTION:
        out.append(f"data.packing: attention '{cfg.model.attn_implementation}' cannot keep packed samples apart (use sdpa or varlen)")
    if cfg.data.eval and cfg.data.eval_split:
        out.append("data.eval_split: give an eval set or a held-out split, not both")
    out += _preference_conflicts(cfg)
    if isinstance(cfg.launch.gpus, list) and cfg.launch.nodes > 1:
        out.append("launch.gpus: a device list applies to one node; with several nodes give a count or 'all'")
    return out


def _preference_conflicts(cfg: RunConfig) -> list[str]:
    if cfg.stage != "dpo":
        return ["dpo: settings given but stage is sft (set stage: dpo, or remove the dpo section)"] if cfg.dpo is not None else []
    d, out = cfg.preference(), []
    if d.reference == "adapter_off" and not cfg.uses_lora():
        out.append(f"dpo.reference: adapter_off needs LoRA adapters to switch off (strategy is {cfg.strategy} without LoRA): use reference: precomputed (the starting model's log-probs, computed once) or a model path")
    if d.label_smoothing and d.loss != "sigmoid":
        out.append(f"dpo.label_smoothing: applies to the sigmoid loss only (loss is {d.loss}); set it to 0")
    return out


def check_against_model(cfg: RunConfig, model_type: str) -> list[str]:
    out = []
    if model_type not in ("qwen3_vl", "qwen3_vl_moe"):
        out.append(f"model.path: {cfg.model.path} is a '{model_type}' model, not Qwen3-VL (qwen3_vl or qwen3_vl_moe)")
    if model_type == "qwen3_vl_moe" and cfg.deepspeed.stage == 3:
        out.append("deepspeed.stage: ZeRO-3 with the MoE model (30B-A3B) gathers every expert each step and hangs or crawls with uneven routing; use stage 2 (with offload_optimizer if memory is short)")
    return out


def check_against_hardware(cfg: RunConfig, gpus: list[Any]) -> list[str]:
    """Conflicts that depend on the machine (``gpus`` from ``hardware.detect_gpus``)."""
    out = []
    if not gpus:
        if cfg.optim.bf16:
            out.append("optim.bf16: no GPU found (CPU mode): set optim.bf16: false")
        if cfg.optim.optimizer == "adamw_torch_fused":
            out.append("optim.optimizer: adamw_torch_fused needs a GPU: use adamw_torch in CPU mode")
        return out
    if cfg.optim.bf16:
        old = [g for g in gpus if not g.bf16]
        if old:
            out.append(f"optim.bf16: GPU {old[0].index} ({old[0].name}, compute capability {old[0].compute_capability}) has no bf16: set optim.bf16: false")
    if isinstance(cfg.launch.gpus, list):
        missing = [i for i in cfg.launch.gpus if i >= len(gpus)]
        if missing:
            out.append(f"launch.gpus: device(s) {missing} do not exist ({len(gpus)} GPU(s) found)")
    elif isinstance(cfg.launch.gpus, int) and cfg.launch.gpus > len(gpus) and cfg.launch.nodes == 1:
        out.append(f"launch.gpus: {cfg.launch.gpus} requested but {len(gpus)} found")
    return out
