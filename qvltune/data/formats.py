"""Read multimodal conversation datasets (JSON lists and JSONL) into one canonical ``Record``.

Three record shapes are accepted, detected per record:

1. Qwen official: ``{"image": "a.jpg" | [...], "video": ..., "conversations": [{"from": "human"|"gpt"|"system",
   "value": "<image>\\nWhat is shown?"}]}``
2. ShareGPT / LLaMA-Factory: ``{"messages": [{"role": "user", "content": "<image>..."}], "images": [...], "videos": [...]}``
3. HF chat: ``{"messages": [{"role": "user", "content": [{"type": "image", "image": "a.jpg"}, {"type": "text", "text": "..."}]}]}``

In shapes 1 and 2 each ``<image>`` / ``<video>`` placeholder takes the next media item in order and
the counts must match exactly. A video is a video file, a folder of frames, or a list of frame paths.

Parsing never stops at the first problem: every problem of a record is reported with its file,
line (JSONL) or index (JSON list) and field, so one pass of ``check-data`` finds them all.

This module owns the shapes: detecting a record's shape and parsing it. The ``Record`` it yields is
qvltune.data.record's; mixtures of files are qvltune.data.mixture's.
"""

from __future__ import annotations

import json
import re
from typing import Any

from qvltune.data.record import Media, Message, Problem, RawItem, Record

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
_PLACEHOLDER_RE = re.compile(r"(<image>|<video>)")

SHAPE_QWEN = "qwen"
SHAPE_SHAREGPT = "sharegpt"
SHAPE_HF = "hf-chat"

# Role spellings per shape. Anything else is an error: a role we do not know is never trained as the
# assistant by default (the official recipe's pitfall).
_QWEN_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_CHAT_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}


# ----------------------------------------------------------------------------------------------
# Parsing one record


class _Collector:
    def __init__(self, file: str, index: int, line: int | None):
        self.file, self.index, self.line = file, index, line
        self.problems: list[Problem] = []

    def error(self, field: str, message: str, fix: str = "", code: str = "") -> None:
        self.problems.append(Problem("error", self.file, self.line, self.index, field, message, fix, code))

    def warning(self, field: str, message: str, fix: str = "", code: str = "") -> None:
        self.problems.append(Problem("warning", self.file, self.line, self.index, field, message, fix, code))


def detect_shape(value: dict[str, Any]) -> str | None:
    if "conversations" in value:
        return SHAPE_QWEN
    if "messages" in value:
        messages = value["messages"]
        if isinstance(messages, list) and any(
            isinstance(m, dict) and isinstance(m.get("content"), list) for m in messages
        ):
            return SHAPE_HF
        return SHAPE_SHAREGPT
    return None


def parse_record(item: RawItem, file: str) -> tuple[Record | None, list[Problem]]:
    """Turn one raw JSON value into a ``Record``, collecting every problem found on the way."""
    c = _Collector(file, item.index, item.line)
    value = item.value
    if not isinstance(value, dict):
        c.error("", f"a record must be a JSON object (got {_type_name(value)})", "wrap it as {\"conversations\": [...]} or {\"messages\": [...]}", "not-object")
        return None, c.problems
    shape = detect_shape(value)
    if shape is None:
        keys = ", ".join(sorted(value)) or "none"
        c.error("", f"unknown record shape (keys: {keys})", "give a \"conversations\" list (Qwen format) or a \"messages\" list (ShareGPT / HF chat)", "unknown-shape")
        return None, c.problems
    if shape == SHAPE_HF:
        messages = _parse_hf(value, c)
    else:
        messages = _parse_placeholder_shape(value, shape, c)
    if messages is not None:
        _check_turns(messages, shape, c)
    if any(p.severity == "error" for p in c.problems) or messages is None:
        return None, c.problems
    return Record(file, item.index, item.line, shape, messages, value), c.problems


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), type(value).__name__)


def _media_list(value: dict[str, Any], keys: tuple[str, ...], kind: str, c: _Collector) -> tuple[str, list[str | tuple[str, ...]]]:
    """The media items of a record (``image``/``images`` or ``video``/``videos``), validated."""
    present = [k for k in keys if k in value and value[k] is not None]
    if len(present) > 1:
        c.error(present[1], f"both \"{present[0]}\" and \"{present[1]}\" are given", f"use one {kind} list")
    if not present:
        return keys[0], []
    key = present[0]
    raw = value[key]
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list):
        c.error(key, f"must be a path or a list of paths (got {_type_name(raw)})", code="bad-media")
        return key, []
    out: list[str | tuple[str, ...]] = []
    for i, item in enumerate(items):
        if isinstance(item, str) and item.strip():
            out.append(item)
        elif kind == "video" and isinstance(item, list) and item and all(isinstance(f, str) and f for f in item):
            out.append(tuple(item))  # a video given as its list of frames
        else:
            expect = "a path or a list of frame paths" if kind == "video" else "a path"
            c.error(f"{key}[{i}]", f"must be {expect} (got {_type_name(item)})", code="bad-media")
    return key, out


def _parse_placeholder_shape(value: dict[str, Any], shape: str, c: _Collector) -> list[Message] | None:
    if shape == SHAPE_QWEN:
        turns_key, role_key, text_key, roles = "conversations", "from", "value", _QWEN_ROLES
        role_help = "human, gpt or system"
    else:
        turns_key, role_key, text_key, roles = "messages", "role", "content", _CHAT_ROLES
        role_help = "user, assistant or system"
    img_key, images = _media_list(value, ("image", "images") if shape == SHAPE_QWEN else ("images", "image"), "image", c)
    vid_key, videos = _media_list(value, ("video", "videos") if shape == SHAPE_QWEN else ("videos", "video"), "video", c)
    turns = value[turns_key]
    if not isinstance(turns, list):
        c.error(turns_key, f"must be a list of turns (got {_type_name(turns)})", code="bad-turns")
        return None
    messages: list[Message] = []
    n_img = n_vid = 0
    for t, turn in enumerate(turns):
        where = f"{turns_key}[{t}]"
        if not isinstance(turn, dict):
            c.error(where, f"a turn must be an object (got {_type_name(turn)})", code="bad-turn")
            continue
        role_raw = turn.get(role_key)
        if role_key not in turn:
            c.error(where, f"missing \"{role_key}\"", f"set it to {role_help}", "bad-role")
            continue
        role = roles.get(role_raw) if isinstance(role_raw, str) else None
        if role is None:
            c.error(f"{where}.{role_key}", f"unknown role {json.dumps(role_raw)}", f"use {role_help}", "bad-role")
            continue
        if text_key not in turn:
            c.error(where, f"missing \"{text_key}\"", "give the turn's text", "bad-value")
            continue
        text = turn[text_key]
        if not isinstance(text, str):
            c.error(f"{where}.{text_key}", f"must be text (got {_type_name(text)})", code="bad-value")
            continue
        parts: list[str | Media] = []
        for piece in _PLACEHOLDER_RE.split(text):
            if piece == IMAGE_PLACEHOLDER or piece == VIDEO_PLACEHOLDER:
                kind = "image" if piece == IMAGE_PLACEHOLDER else "video"
                if role == "assistant":
                    c.error(f"{where}.{text_key}", f"a {piece} placeholder in an assistant turn", "media belong in user turns; remove it from the answer", "placeholder-in-answer")
                    continue
                if role == "system":  # counted, so the other media keep their places in the error-free count
                    c.error(f"{where}.{text_key}", f"a {piece} placeholder in a system turn: Qwen3-VL's chat template renders only a system turn's text, so every later {kind} would land on the wrong placeholder", "move the media to the first user turn", "media-in-system")
                if kind == "image":
                    source = images[n_img] if n_img < len(images) else None
                    parts.append(Media("image", source if source is not None else "", f"{img_key}[{n_img}]"))
                    n_img += 1
                else:
                    source = videos[n_vid] if n_vid < len(videos) else None
                    parts.append(Media("video", source if source is not None else "", f"{vid_key}[{n_vid}]"))
                    n_vid += 1
            elif piece:
                parts.append(piece)
        messages.append(Message(role, parts, _reasoning(turn, role, where, c)))
    for kind, used, given, key, ph in (("image", n_img, len(images), img_key, IMAGE_PLACEHOLDER), ("video", n_vid, len(videos), vid_key, VIDEO_PLACEHOLDER)):
        if used != given:
            c.error(key, f"{used} {ph} placeholder(s) but {given} {kind}(s) listed", f"put one {ph} in the text for each {kind}, in order", "placeholder-count")
    return messages


def _parse_hf(value: dict[str, Any], c: _Collector) -> list[Message] | None:
    turns = value["messages"]
    messages: list[Message] = []
    for t, turn in enumerate(turns):
        where = f"messages[{t}]"
        if not isinstance(turn, dict):
            c.error(where, f"a turn must be an object (got {_type_name(turn)})", code="bad-turn")
            continue
        role = _CHAT_ROLES.get(turn.get("role")) if isinstance(turn.get("role"), str) else None
        if role is None:
            c.error(f"{where}.role", f"unknown role {json.dumps(turn.get('role'))}", "use user, assistant or system", "bad-role")
            continue
        content = turn.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            c.error(f"{where}.content", f"must be text or a list of parts (got {_type_name(content)})", code="bad-value")
            continue
        parts: list[str | Media] = []
        for p, part in enumerate(content):
            pwhere = f"{where}.content[{p}]"
            if not isinstance(part, dict):
                c.error(pwhere, f"a content part must be an object (got {_type_name(part)})", code="bad-value")
                continue
            ptype = part.get("type")
            if ptype == "text" or (ptype is None and "text" in part):
                text = part.get("text")
                if not isinstance(text, str):
                    c.error(f"{pwhere}.text", f"must be text (got {_type_name(text)})", code="bad-value")
                    continue
                parts.append(text)
            elif ptype in ("image", "video") or (ptype is None and ("image" in part or "video" in part)):
                kind = ptype or ("image" if "image" in part else "video")
                if role == "assistant":
                    c.error(pwhere, f"an {kind} in an assistant turn", "media belong in user turns", "placeholder-in-answer")
                    continue
                if role == "system":
                    c.error(pwhere, f"an {kind} in a system turn: Qwen3-VL's chat template renders only a system turn's text, so it would be dropped and every later {kind} would land on the wrong placeholder", "move it to the first user turn", "media-in-system")
                    continue
                source = part.get(kind)
                if kind == "image" and source is None:
                    source = part.get("path") or part.get("url")
                if kind == "video" and isinstance(source, list) and source and all(isinstance(f, str) and f for f in source):
                    source = tuple(source)
                elif not (isinstance(source, str) and source.strip()):
                    c.error(f"{pwhere}.{kind}", f"must be a path (got {_type_name(source)})", code="bad-media")
                    continue
                parts.append(Media(kind, source, f"{pwhere}.{kind}"))
            else:
                c.error(f"{pwhere}.type", f"unknown content type {json.dumps(ptype)}", "use text, image or video", "bad-value")
        messages.append(Message(role, parts, _reasoning(turn, role, where, c)))
    return messages


def _reasoning(turn: dict[str, Any], role: str, where: str, c: _Collector) -> str | None:
    """An assistant turn's ``reasoning_content`` (Thinking models), validated."""
    value = turn.get("reasoning_content")
    if value is None:
        return None
    if role != "assistant":
        c.error(f"{where}.reasoning_content", "reasoning in a non-assistant turn", "reasoning belongs to the answer it leads to: move it to the assistant turn", "bad-value")
    elif not isinstance(value, str):
        c.error(f"{where}.reasoning_content", f"must be text (got {_type_name(value)})", code="bad-value")
    else:
        return value
    return None


def _check_turns(messages: list[Message], shape: str, c: _Collector) -> None:
    """Turn order: an optional system turn first, then user/assistant alternating, ending with an answer."""
    turns_key = "conversations" if shape == SHAPE_QWEN else "messages"
    if not messages:
        c.error(turns_key, "no turns", "add a user turn and an assistant answer", "no-turns")
        return
    body = messages[1:] if messages[0].role == "system" else messages
    offset = len(messages) - len(body)
    for i, msg in enumerate(messages):
        if msg.role == "system" and i > 0:
            c.error(f"{turns_key}[{i}]", "a system turn after the first turn", "move the system prompt to the start", "turn-order")
    expected = "user"
    for i, msg in enumerate(body):
        if msg.role == "system":
            continue
        if msg.role != expected:
            c.error(f"{turns_key}[{i + offset}]", f"expected {'an' if expected == 'assistant' else 'a'} {expected} turn here, got {msg.role} (turns must alternate user, assistant, starting with user)", "reorder or merge the turns", "turn-order")
            break
        expected = "assistant" if expected == "user" else "user"
    if not any(m.role == "assistant" for m in messages):
        c.error(turns_key, "no assistant turn: nothing to learn", "add the answer as an assistant (gpt) turn", "no-answer")
    elif body and body[-1].role == "user":
        c.error(f"{turns_key}[{len(messages) - 1}]", "the record ends with a user turn that has no answer", "add the answer or drop the last turn", "turn-order")
    for i, msg in enumerate(messages):
        if msg.role == "assistant" and not msg.text().strip():
            c.error(f"{turns_key}[{i}]", "empty answer", "write the expected answer", "empty-answer")
        elif msg.role == "user" and not msg.text().strip() and not any(isinstance(p, Media) for p in msg.parts):
            c.error(f"{turns_key}[{i}]", "empty user turn", "write the question", "empty-turn")
