"""The canonical ``Record`` every dataset shape is read into (qvltune.data.formats), its ``Message``
turns and ``Media`` items, the ``RawItem`` a file yields before parsing, and the ``Problem`` that
locates anything wrong with a dataset (file, line or index, field) and says how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset, located precisely enough to fix it."""

    severity: Severity
    file: str
    line: int | None  # 1-based line in the file (JSONL, or where a JSON list element starts)
    index: int | None  # 0-based record index
    field: str  # e.g. "conversations[1].value"; "" for the whole record
    message: str
    fix: str = ""
    code: str = ""  # a stable machine-readable kind, e.g. "missing-media"
    path: str = ""  # the media file concerned, kept out of ``message`` so that one problem shared by many records reads as one

    def text(self) -> str:
        """What is wrong, with the file it concerns."""
        return f"{self.message}: {self.path}" if self.path else self.message

    def where(self) -> str:
        loc = self.file
        if self.line is not None:
            loc += f":{self.line}"
        if self.index is not None:
            loc += f" (record {self.index})"
        if self.field:
            loc += f" {self.field}"
        return loc

    def __str__(self) -> str:
        text = f"{self.where()}: {self.text()}"
        return f"{text} — {self.fix}" if self.fix else text


@dataclass(frozen=True)
class Media:
    """One image or video referenced by a record, as written in the file."""

    kind: Literal["image", "video"]
    source: str | tuple[str, ...]  # a path, or for videos possibly a list of frame paths
    field: str  # where it was written, for messages


@dataclass
class Message:
    role: Literal["system", "user", "assistant"]
    parts: list[str | Media]  # text and media, in order
    # An assistant turn's reasoning given apart from its answer (a turn's "reasoning_content" field);
    # Thinking templates render it as <think>...</think> where they keep it.
    reasoning: str | None = None

    def text(self) -> str:
        return "".join(p for p in self.parts if isinstance(p, str))

    def to_chat(self) -> dict[str, Any]:
        """The HF content-list message that chat templates render."""
        content = []
        for part in self.parts:
            if isinstance(part, Media):
                content.append({"type": part.kind})
            elif part:
                content.append({"type": "text", "text": part})
        msg: dict[str, Any] = {"role": self.role, "content": content}
        if self.reasoning is not None:
            msg["reasoning_content"] = self.reasoning
        return msg


@dataclass
class Record:
    file: str
    index: int
    line: int | None
    shape: str
    messages: list[Message]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    # A view of a record for chat templates that rewrite earlier turns (Thinking models): only the
    # last assistant turn is trained; see qvltune.data.tokenize.record_views.
    train_last_only: bool = False

    @property
    def media(self) -> list[Media]:
        return [p for m in self.messages for p in m.parts if isinstance(p, Media)]

    @property
    def images(self) -> list[Media]:
        return [m for m in self.media if m.kind == "image"]

    @property
    def videos(self) -> list[Media]:
        return [m for m in self.media if m.kind == "video"]

    def chat(self) -> list[dict[str, Any]]:
        return [m.to_chat() for m in self.messages]

    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line is not None else f"{self.file}[{self.index}]"


# ----------------------------------------------------------------------------------------------
# Raw items: what qvltune.data.files.read_items yields (JSONL, JSON lists, gzip, encodings)


@dataclass
class RawItem:
    index: int
    line: int | None
    value: Any
    problem: Problem | None = None  # set when the item could not be read at all
    progress: float = 0.0  # fraction of the file (as stored) read so far
    offset: int = -1  # byte offset of its line in a plain JSONL file (-1: gzip or JSON list), to read it back alone
