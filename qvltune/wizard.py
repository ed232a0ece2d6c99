"""The questions ``qvltune init`` asks (questionary), and nothing else: answers in, answers out.

Each question states its trade-off in one line and proposes the recommended default (the answer
given by a flag or an answers file, else the planner's recommendation). Decisions live in
``qvltune.plan``; printing lives in the CLI. ``**prompt`` is passed to every question, so tests
drive the real prompts with prompt_toolkit's pipe input (``input=..., output=DummyOutput()``).
Questions use ``unsafe_ask``: Ctrl-C raises ``KeyboardInterrupt`` (exit 130) instead of returning
None and carrying on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import questionary
from questionary import Choice

from qvltune.catalog import KNOWN_MODELS, SIZE_BILLIONS
from qvltune.plan import Answers
from qvltune.tiny import BUILTIN_TINY

FOLDER = "__folder__"

_MODEL_NOTES = {
    "2B": "fastest; LoRA fits a 24 GB GPU",
    "4B": "a good balance; LoRA fits a 24-48 GB GPU",
    "8B": "strong; LoRA fits one 80 GB GPU, full fine-tuning wants 8 of them",
    "32B": "strongest dense model; needs several 80 GB GPUs even with LoRA",
    "30B-A3B": "mixture of experts: 3 B active parameters per token, 31 B to hold (ZeRO-2 only)",
}


def model_choices() -> list[Choice]:
    out = [Choice(f"Qwen3-VL-{m.size} ({SIZE_BILLIONS[m.size]:g} B parameters)", value=m.hub_id, description=_MODEL_NOTES[m.size]) for m in KNOWN_MODELS]
    out.append(Choice("a local model folder", value=FOLDER, description="a downloaded or fine-tuned Qwen3-VL (a folder with config.json)"))
    out.append(Choice("builtin:tiny (1.5 M parameters)", value=BUILTIN_TINY, description="the embedded tiny Qwen3-VL: checks the whole pipeline on a CPU in minutes"))
    return out


def data_exists(text: str) -> bool | str:
    """True, or why not: every file of a dataset or mixture must exist."""
    text = text.strip()
    if not text:
        return "give a dataset file (JSON or JSONL), or a mixture a.jsonl%50,b.jsonl"
    from qvltune.data.mixture import entry_files

    try:
        files = entry_files(text)
    except ValueError as e:
        return str(e)
    for name in files:
        path = Path(name).expanduser()
        if not path.is_file():
            return f"not a file: {path}"
    return True


def model_folder(text: str) -> bool | str:
    """True, or why the folder cannot be a model: missing, a file, or without config.json."""
    path = Path(text.strip()).expanduser()
    if not text.strip():
        return "give the folder that holds the model's config.json"
    if not path.exists():
        return f"folder not found: {path}"
    if not path.is_dir():
        return f"{path} is a file: give the folder that holds config.json"
    return True if (path / "config.json").is_file() else f"no config.json in {path}"


def _positive_int(text: str) -> bool | str:
    return True if text.strip().isdigit() and int(text) >= 1 else "a whole number, 1 or more"


def ask_model(default: str, **prompt: Any) -> str:
    choices = model_choices()
    values = [c.value for c in choices]
    pick = default if default in values else FOLDER
    answer = questionary.select(
        "Model",
        choices=choices,
        default=pick,
        instruction=f"(bigger answers better but needs more memory and time; recommended: {default})",
        **prompt,
    ).unsafe_ask()
    if answer != FOLDER:
        return answer
    return questionary.text(
        "Model folder",
        default="" if default in values else default,
        instruction="(a Qwen3-VL folder with config.json)",
        validate=model_folder,
        **prompt,
    ).unsafe_ask().strip()


def ask(defaults: Answers, *, recommended_model: str, on_dataset: Callable[[str], None] | None = None, **prompt: Any) -> Answers:
    """Ask every question, proposing ``defaults`` (flags, answers file) or the recommendation."""
    a = defaults.model_copy()
    a.model = ask_model(a.model or recommended_model, **prompt)

    a.data = questionary.text(
        "Training data",
        default=a.data or "",
        instruction="(JSON/JSONL file, or a mixture a.jsonl%50,b.jsonl; it is checked now, before any GPU time)",
        validate=data_exists,
        **prompt,
    ).unsafe_ask().strip()
    if on_dataset is not None:
        on_dataset(a.data)

    a.domain_shift = questionary.confirm(
        "Are your images very different from ordinary photos (medical, satellite, documents, industrial)?",
        default=a.domain_shift,
        instruction="(yes trains the vision tower too: better adaptation, more memory and time) " + yes_no(a.domain_shift),
        **prompt,
    ).unsafe_ask()

    a.fast = questionary.confirm(
        "Do you need results fast (hours rather than days)?",
        default=a.fast,
        instruction="(yes: LoRA with a frozen vision tower, 2-3x faster, slightly lower quality) " + yes_no(a.fast),
        **prompt,
    ).unsafe_ask()

    a.resolution = questionary.select(
        "Image resolution",
        choices=[
            Choice("fixed", value="fixed", description="every image resized to the same area: predictable memory (start here)"),
            Choice("variable", value="variable", description="images keep their size within a range: matches inference, uses more memory"),
        ],
        default=a.resolution,
        instruction="(recommended: fixed first, variable once stable)",
        **prompt,
    ).unsafe_ask()

    a.packing = questionary.select(
        "Packing (several short samples per row)",
        choices=[
            Choice("auto", value="auto", description="on when samples are much shorter than the row length"),
            Choice("on", value="on", description="30-50% faster when samples are short; exact per-sample attention"),
            Choice("off", value="off", description="one sample per row, padded"),
        ],
        default=a.packing,
        instruction="(recommended: auto)",
        **prompt,
    ).unsafe_ask()

    a.out = questionary.text(
        "Output folder",
        default=a.out,
        instruction="(qvltune.yaml, ds_zero.json, launch.sh and the runs/ go here)",
        **prompt,
    ).unsafe_ask().strip() or "."

    a.nodes = int(
        questionary.text(
            "Nodes (machines)",
            default=str(a.nodes),
            instruction="(1 unless you train across machines: each needs the same GPUs; you list them in a hostfile)",
            validate=_positive_int,
            **prompt,
        ).unsafe_ask()
    )
    return a


def yes_no(default: bool) -> str:
    """questionary shows (Y/n) only without an instruction: ours say the trade-off, so add it back."""
    return "(Y/n) " if default else "(y/N) "


def confirm(message: str, default: bool = True, **prompt: Any) -> bool:
    return bool(questionary.confirm(message, default=default, **prompt).unsafe_ask())
