"""``RunConfig``: the single source of truth of a training run, loaded strictly from YAML.

This module owns the run config as a whole (``RunConfig`` and its derived views) and its loading:
unknown keys and bad values are errors; every problem is reported at once as
``field.path: message (got X)``; relative paths are anchored to the file; the resolved config
(every default and preset written out) is saved beside the checkpoints. The sections it holds are
in qvltune.config_sections; cross-field conflicts are in qvltune.config_checks (those decided by
the file alone are checked here, when the file is parsed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from qvltune.config_checks import check_conflicts
from qvltune.config_sections import (
    Components,
    DataConfig,
    DeepSpeedConfig,
    DPOConfig,
    LaunchConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    SourceConfig,
    _Strict,
)
from qvltune.errors import UserError
from qvltune.pixels import resolve_pixels

Strategy = Literal["lora", "full", "mixed"]
COMPONENTS = ("vision", "merger", "deepstack", "llm", "lm_head")

# What each strategy trains (the guide's three strategies). The vision tower stays frozen unless the
# visual domain is far from pre-training; `components` overrides any entry.
STRATEGY_PRESETS: dict[str, dict[str, str]] = {
    "lora": {"vision": "frozen", "merger": "frozen", "deepstack": "frozen", "llm": "lora", "lm_head": "frozen"},
    "mixed": {"vision": "frozen", "merger": "full", "deepstack": "full", "llm": "lora", "lm_head": "frozen"},
    "full": {"vision": "frozen", "merger": "full", "deepstack": "full", "llm": "full", "lm_head": "full"},
}


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
        raise UserError(_listed(source, problems, "problem"), "fix the " + ("field" if len(problems) == 1 else "fields above") + "; `qvltune init` writes a valid config") from None
    conflicts = check_conflicts(cfg)
    if conflicts:
        raise UserError(_listed(source, conflicts, "conflict"), "fix the " + ("fields" if len(conflicts) == 1 else "fields above")) from None
    return cfg


def _listed(source: str, problems: list[str], kind: str) -> str:
    """One problem on one line (``run.yaml: data.max_seq_length: ...``); several listed under a count."""
    if len(problems) == 1:
        return f"{source}: {problems[0]}"
    return f"{source}: {len(problems)} {kind}(s):\n  " + "\n  ".join(problems)


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

    def anchor_spec(spec):
        from qvltune.data.mixture import rewrite_paths  # each entry's file and image_root, settings kept

        if isinstance(spec, str):
            return rewrite_paths(spec, anchor)
        out = []
        for item in spec:
            if isinstance(item, SourceConfig):
                item = item.model_copy(update={"path": anchor(item.path), "image_root": anchor(item.image_root) if item.image_root else None})
            else:
                item = rewrite_paths(item, anchor)
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
