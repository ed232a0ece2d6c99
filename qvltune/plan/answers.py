"""What ``qvltune init`` asks: the answers (flags, wizard or a replayable answers file)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qvltune.config import format_validation_error
from qvltune.errors import UserError

DEFAULT_EPOCHS = 2.0


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
    # sft: supervised fine-tuning; dpo: preference tuning on chosen/rejected pairs (qvltune.preference).
    stage: Literal["sft", "dpo"] = "sft"


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
    "stage": "--stage sft|dpo",
}


def parse_answers(doc: Any, source: str = "answers") -> Answers:
    if not isinstance(doc, dict):
        raise UserError(f"{source}: an answers file must be a YAML mapping (got {type(doc).__name__})", "write one with `qvltune init`")
    try:
        return Answers.model_validate(doc)
    except ValidationError as e:
        problems = format_validation_error(e, Answers)
        raise UserError(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(problems), "fix the answers above (`qvltune init --help` lists them)") from None

