"""LoRA adapter folders: what they hold, which base they belong to, whether they fit it, and loading
them onto it (used by ``merge`` and by inference on base + adapter).

An adapter folder is what peft saves (``adapter_config.json`` + ``adapter_model.safetensors``):
a run's ``final/`` or one of its ``checkpoint-N/``. Weights trained fully beside LoRA (peft's
``modules_to_save``: the merger, the DeepStack mergers, maybe ``lm_head``) are saved whole in the
same file. A ZeRO-3 checkpoint written without ``stage3_gather_16bit_weights_on_model_save`` has an
empty (or no) adapter file; its weights are then gathered from the DeepSpeed shards
(``global_stepN/``) with DeepSpeed's own ``zero_to_fp32``.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

from qvltune.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def is_adapter(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).exists()


def _names_adapter(name_or_path: str) -> bool:
    """Whether a model.path names a LoRA adapter folder (False for a model, a Hub id or a lost path)."""
    from qvltune.tiny import resolve_model_path

    try:
        return is_adapter(Path(resolve_model_path(name_or_path)))
    except UserError:
        return False


def adapter_base(path: Path) -> str | None:
    """The base model an adapter folder was trained on (from adapter_config.json), if it is one."""
    cfg = path / ADAPTER_CONFIG
    if not cfg.exists():
        return None
    return json.loads(cfg.read_text()).get("base_model_name_or_path")


def looks_local(name: str) -> bool:
    """A path rather than a Hub id ("org/name") or a builtin name."""
    return name.startswith(("/", ".", "~")) or Path(name).expanduser().exists() or name.count("/") > 1


def run_dir_of(path: Path) -> Path | None:
    """The run folder that a ``final/`` or ``checkpoint-N/`` folder belongs to, if it is one."""
    parent = path.resolve().parent
    return parent if (parent / "config.yaml").exists() else None


def run_model_path(run_dir: Path) -> str | None:
    """``model.path`` of a run's saved config (read leniently: only the base model's name is needed)."""
    import yaml

    for cfg in (run_dir / "final" / "qvltune.yaml", run_dir / "config.yaml"):
        try:
            return str(yaml.safe_load(cfg.read_text())["model"]["path"])
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            continue
    return None


def base_for_adapter(adapter_dir: Path) -> tuple[str, str | None]:
    """(base model, a note when it is not the one the adapter records).

    peft records the base as it was given at training time; when that was a local path that has
    since moved (e.g. the tiny model's cache folder), the run's config still names it portably.

    A run that started from another adapter (``init --from`` an SFT run: model.path is that run's
    ``final/``) trained on the base with that adapter merged in, but peft records the bare base:
    its base is that adapter folder (``load_model`` merges it in), or merging and predicting would
    silently leave the first adapter out."""
    run_dir = run_dir_of(adapter_dir)
    from_run = run_model_path(run_dir) if run_dir else None
    if from_run and _names_adapter(from_run):
        return from_run, f"this run started from the adapter {from_run}: the base is that adapter merged into its own base"
    recorded = adapter_base(adapter_dir)
    if recorded and not (looks_local(recorded) and not Path(recorded).expanduser().exists()):
        return recorded, None
    if from_run:
        return from_run, f"the adapter's recorded base {recorded or '(none)'} does not exist; using the run config's model.path {from_run}"
    raise UserError(
        f"{adapter_dir / ADAPTER_CONFIG}: base_model_name_or_path {recorded or '(missing)'} not found",
        "pass --base with the base model the adapter was trained on (a local folder or Hub id)",
    )


def processor_source(adapter_dir: Path, base: str) -> str:
    """Where the adapter's processor lives: its own folder (``final/``), else the run's ``final/``
    (checkpoints hold none; ``final/`` carries the run's pixel budget), else the base model."""
    candidates = [adapter_dir]
    run_dir = run_dir_of(adapter_dir)
    if run_dir:
        candidates.append(run_dir / "final")
    for folder in candidates:
        if any((folder / name).exists() for name in _PROCESSOR_FILES):
            return str(folder)
    return base


def adapter_processor(adapter_dir: Path, base: str):
    """The processor to save or run with an adapter (``processor_source``'s). Taken from the base,
    it gets the run's pixel budget from its config.yaml when there is a run: a checkpoint merged or
    evaluated before ``final/`` exists would otherwise carry the base's default image sizes."""
    from qvltune.model import load_processor

    source = processor_source(adapter_dir, base)
    run_dir = run_dir_of(adapter_dir)
    budget = run_pixel_budget(run_dir) if source == base and run_dir else None
    return load_processor(source, *(budget or (None, None)))


def run_pixel_budget(run_dir: Path) -> tuple[int, int] | None:
    """(min_pixels, max_pixels) of a run's saved config; None when it cannot be read."""
    import yaml

    from qvltune.config import parse_config

    try:
        return parse_config(yaml.safe_load((run_dir / "config.yaml").read_text())).data.pixel_budget()
    except (OSError, yaml.YAMLError, UserError):
        return None


def read_lora_config(adapter_dir: Path):
    """The adapter's peft config; only LoRA adapters can be merged and loaded here."""
    from peft import PeftConfig

    try:
        config = PeftConfig.from_pretrained(str(adapter_dir))
    except (ValueError, TypeError, OSError, json.JSONDecodeError) as e:
        raise UserError(f"{adapter_dir / ADAPTER_CONFIG}: cannot read it: {str(e).splitlines()[0]}", "it should be written by peft (qvltune train)") from None
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    if peft_type != "LORA":
        raise UserError(f"{adapter_dir / ADAPTER_CONFIG}: peft_type {peft_type} is not LoRA", "only LoRA adapters can be merged")
    config.inference_mode = True
    return config


# ----------------------------------------------------------------------------------------------
# Weights


def _is_empty(weights: dict[str, Any]) -> bool:
    # Under ZeRO-3 without the 16-bit gather, the Trainer saves each partitioned parameter as a
    # zero-element placeholder.
    return not weights or any(t.numel() == 0 for t in weights.values())


def adapter_weights(adapter_dir: Path, peft_model) -> tuple[dict[str, Any], str]:
    """(the adapter's weights in peft's saved format, where they came from).

    ``peft_model`` wraps the base (real or on the meta device); it names the keys of weights
    gathered from ZeRO shards the way peft saves them."""
    from safetensors.torch import load_file

    file = adapter_dir / ADAPTER_WEIGHTS
    weights = load_file(str(file)) if file.exists() else {}
    if not _is_empty(weights):
        return weights, str(file)
    if not (adapter_dir / "latest").exists():
        what = "is empty" if file.exists() else "is missing"
        raise UserError(f"{file} {what} and {adapter_dir} holds no DeepSpeed shards to gather it from", "use the run's final/ folder or another checkpoint-N")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from peft import get_peft_model_state_dict

    tag = (adapter_dir / "latest").read_text().strip()
    # zero_to_fp32 prints its progress on stdout (which belongs to the command's results) and bars on stderr.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        full = get_fp32_state_dict_from_zero_checkpoint(str(adapter_dir), tag=tag)
    gathered = get_peft_model_state_dict(peft_model, state_dict=full)
    if _is_empty(gathered):
        raise UserError(f"{adapter_dir / tag}: the DeepSpeed shards hold no adapter weights", "use the run's final/ folder or another checkpoint-N")
    return gathered, f"DeepSpeed ZeRO shards in {adapter_dir / tag} (the adapter file {'is empty' if file.exists() else 'is missing'})"


def parameter_shapes(model) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape by name, tied ones under each of their names (works on meta models)."""
    return {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}


def fit_problems(weights: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Why the adapter's tensors do not fit the base model's parameters (empty when they do).

    peft skips adapter keys that name no module in the base without an error, so a wrong base would
    silently lose part of the training: every key is checked here."""
    problems = []
    for key, tensor in sorted(weights.items()):
        name = key.removeprefix(_PEFT_PREFIX)
        got = tuple(tensor.shape)
        for kind in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
            if f".{kind}." in name or name.endswith(f".{kind}"):
                module = name.split(f".{kind}")[0]
                base = shapes.get(f"{module}.weight")
                if base is None:
                    problems.append(f"{module}: the adapter adapts it but the base model has no such module")
                    break
                # LoRA factors: A is (r, in), B is (out, r) for a Linear (out, in) weight; the
                # embedding factors are transposed (A: (r, vocab), B: (dim, r) for a (vocab, dim) table).
                expected = {
                    "lora_A": (None, base[-1]),
                    "lora_B": (base[0], None),
                    "lora_embedding_A": (None, base[0]),
                    "lora_embedding_B": (base[-1], None),
                }.get(kind)
                if expected and len(got) == 2 and any(e is not None and e != g for e, g in zip(expected, got)):
                    problems.append(f"{name}: adapter shape {list(got)} does not fit the base weight {list(base)}")
                break
        else:
            base = shapes.get(name)
            if base is None:
                problems.append(f"{name}: trained beside LoRA but the base model has no such parameter")
            elif base != got:
                problems.append(f"{name}: adapter shape {list(got)}, base shape {list(base)}")
    return problems


def raise_if_unfit(problems: list[str], adapter_dir: Path, base: str) -> None:
    if problems:
        listed = "\n  ".join(problems[:5]) + (f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise UserError(
            f"the adapter {adapter_dir} does not fit the base {base} ({len(problems)} mismatch(es)):\n  {listed}",
            "pass --base with the exact model the adapter was trained on",
        )


def attach_adapter(base_model, adapter_dir: Path, base: str, weights: dict[str, Any] | None = None):
    """base + adapter as a peft model in eval mode, after checking that every adapter tensor fits.

    Loads through ``set_peft_model_state_dict`` (what ``PeftModel.from_pretrained`` does), so weights
    gathered from ZeRO shards take the same path as the adapter file; ``weights`` skips reading them
    again when the caller already has them."""
    from peft import PeftModel, set_peft_model_state_dict

    shapes = parameter_shapes(base_model)
    config = read_lora_config(adapter_dir)
    with warnings.catch_warnings():
        # peft warns on every wrap about tied embeddings and transformers deprecations: advice for
        # training code, noise for a user loading an adapter.
        warnings.simplefilter("ignore")
        model = PeftModel(base_model, config)
    if weights is None:
        weights, _ = adapter_weights(adapter_dir, model)
    raise_if_unfit(fit_problems(weights, shapes), adapter_dir, base)
    result = set_peft_model_state_dict(model, weights)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k or "modules_to_save" in k]
    missing = [k for k in result.missing_keys if "lora_" in k or ".modules_to_save." in k]
    if unexpected or missing:
        raise UserError(f"the adapter {adapter_dir} does not load onto {base}: {(unexpected or missing)[0]} {'unexpected' if unexpected else 'missing'}", "pass --base with the exact model the adapter was trained on")
    return model.eval()
