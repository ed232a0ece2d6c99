"""Preference records: a prompt (one or more turns, media included) and two answers, chosen and rejected.

Two layouts are accepted, detected per record:

1. LLaMA-Factory's ShareGPT preference layout: the prompt in ``conversations`` (``from``/``value``)
   or ``messages`` (``role``/``content``), ending with the user's turn; ``chosen`` and ``rejected``
   each one assistant turn in the same spelling (``{"from": "gpt", "value": ...}``) or plain text;
   ``images`` / ``videos`` filled into the prompt's ``<image>`` / ``<video>`` placeholders in order.
2. TRL's: ``prompt``, ``chosen``, ``rejected``, ``images``. Plain (strings; ``<image>`` placeholders
   in the prompt) or conversational (lists of ``{"role", "content"}`` messages; a content part
   ``{"type": "image"}`` takes the next item of ``images``, as TRL's vision datasets write it).

Each pair becomes two ordinary records (``qvltune.data.record.Record``): the prompt followed by the
chosen answer, and the prompt followed by the rejected one, both training only their last turn. They
are parsed by the SFT parser itself (so every rule of the data contract holds, media only in the
prompt included), and its problems are reported under the preference record's own field names
(``chosen``, ``rejected``, ``prompt[1]``...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from qvltune.data.formats import parse_record
from qvltune.data.record import Problem, RawItem, Record

LAYOUT_SHAREGPT = "sharegpt-preference"
LAYOUT_TRL = "trl-preference"

_QWEN_TURN = ("from", "value", "gpt")
_CHAT_TURN = ("role", "content", "assistant")


def is_preference(value: Any) -> bool:
    """A record in one of the preference layouts (it names a chosen or a rejected answer)."""
    return isinstance(value, dict) and ("chosen" in value or "rejected" in value)


@dataclass
class Pair:
    file: str
    index: int
    line: int | None
    layout: str
    chosen: Record  # the prompt turns + the chosen answer (train_last_only)
    rejected: Record

    def where(self) -> str:
        return self.chosen.where()

    @property
    def prompt(self) -> list:
        return self.chosen.messages[:-1]


@dataclass
class Converted:
    """A preference record rewritten as the SFT records of its two answers."""

    layout: str
    chosen: dict[str, Any]
    rejected: dict[str, Any]
    renames: list[tuple[str, str]]  # (field prefix in the SFT record, field in the preference record)
    problems: list[Problem]

    def rename(self, problem: Problem, answer: str) -> Problem:
        """A problem found in the SFT record of ``answer``, under the preference record's field names."""
        field = problem.field
        for src, dst in self.renames:
            dst = dst.replace("{answer}", answer)
            if field == src or field.startswith(src + ".") or field.startswith(src + "["):
                return replace(problem, field=dst + field[len(src):])
        return problem


def _type(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), type(value).__name__)


def convert(value: dict[str, Any], file: str, index: int, line: int | None) -> Converted:
    problems: list[Problem] = []

    def error(field: str, message: str, fix: str, code: str) -> None:
        problems.append(Problem("error", file, line, index, field, message, fix, code))

    for key in ("chosen", "rejected"):
        if key not in value or value[key] is None:
            error(key, f"missing \"{key}\" answer", "a preference record needs both a chosen and a rejected answer", "missing-answer")
    if "prompt" in value:
        return _convert_trl(value, problems, error)
    if "conversations" in value or "messages" in value:
        return _convert_sharegpt(value, problems, error)
    keys = ", ".join(sorted(value)) or "none"
    error("", f"a preference record without a prompt (keys: {keys})", "give the prompt as \"conversations\"/\"messages\" (LLaMA-Factory) or \"prompt\" (TRL)", "unknown-shape")
    return Converted("", {}, {}, [], problems)


def _media_keys(value: dict[str, Any]) -> dict[str, Any]:
    return {k: value[k] for k in ("image", "images", "video", "videos") if k in value}


def _answer_turn(answer: Any, key: str, spelling: tuple[str, str, str], error) -> dict[str, Any] | None:
    """One assistant turn from a chosen/rejected value (a turn in the prompt's spelling, or text)."""
    role_key, text_key, assistant = spelling
    if isinstance(answer, str):
        return {role_key: assistant, text_key: answer}
    if isinstance(answer, list) and len(answer) == 1:
        answer = answer[0]
    if isinstance(answer, dict):
        return answer
    if answer is not None:
        error(key, f"must be one assistant turn or its text (got {_type(answer)}{' of ' + str(len(answer)) + ' turns' if isinstance(answer, list) else ''})", "give the answer as {\"role\": \"assistant\", \"content\": ...} or as text", "bad-answer")
    return None


def _convert_sharegpt(value, problems, error) -> Converted:
    turns_key = "conversations" if "conversations" in value else "messages"
    spelling = _QWEN_TURN if turns_key == "conversations" else _CHAT_TURN
    prompt = value[turns_key]
    if not isinstance(prompt, list):
        error(turns_key, f"must be a list of turns (got {_type(prompt)})", "give the prompt turns as a list", "bad-turns")
        return Converted(LAYOUT_SHAREGPT, {}, {}, [], problems)
    out = {}
    for key in ("chosen", "rejected"):
        turn = _answer_turn(value.get(key), key, spelling, error)
        out[key] = {turns_key: prompt + [turn], **_media_keys(value)} if turn is not None else {}
    n = len(prompt)
    renames = [(f"{turns_key}[{n}]", "{answer}")]
    return Converted(LAYOUT_SHAREGPT, out["chosen"], out["rejected"], renames, problems)


def _fill_media(messages: list[Any], images: list[Any], videos: list[Any], error) -> list[Any]:
    """TRL's conversational prompts mark media as ``{"type": "image"}`` parts: give each the next
    item of ``images`` (``videos``), as TRL does."""
    queues = {"image": list(images), "video": list(videos)}
    used = {"image": 0, "video": 0}
    out = []
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            parts = []
            for p in m["content"]:
                if isinstance(p, dict) and p.get("type") in ("image", "video") and not p.get(p["type"]):
                    kind = p["type"]
                    p = {**p, kind: queues[kind][used[kind]] if used[kind] < len(queues[kind]) else None}
                    used[kind] += 1
                parts.append(p)
            m = {**m, "content": parts}
        out.append(m)
    for kind, key in (("image", "images"), ("video", "videos")):
        if used[kind] and used[kind] != len(queues[kind]):
            error(key, f"{used[kind]} {kind} part(s) in the prompt but {len(queues[kind])} {kind}(s) listed", f"list one {kind} for each {{\"type\": \"{kind}\"}} part, in order", "placeholder-count")
    return out


def _convert_trl(value, problems, error) -> Converted:
    prompt = value["prompt"]
    media = _media_keys(value)
    if isinstance(prompt, str):
        out = {}
        for key in ("chosen", "rejected"):
            turn = _answer_turn(value.get(key), key, _CHAT_TURN, error)
            out[key] = {"messages": [{"role": "user", "content": prompt}, turn], **media} if turn is not None else {}
        return Converted(LAYOUT_TRL, out["chosen"], out["rejected"], [("messages[0]", "prompt"), ("messages[1]", "{answer}")], problems)
    if not isinstance(prompt, list):
        error("prompt", f"must be text or a list of messages (got {_type(prompt)})", "give the prompt as text or as [{\"role\": \"user\", \"content\": ...}]", "bad-turns")
        return Converted(LAYOUT_TRL, {}, {}, [], problems)
    structured = any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in prompt)
    images = value.get("images", value.get("image")) or []
    videos = value.get("videos", value.get("video")) or []
    images = [images] if isinstance(images, str) else images
    videos = [videos] if isinstance(videos, str) else videos
    if structured:
        if not isinstance(images, list) or not isinstance(videos, list):
            error("images", "must be a list of paths", "give images as a list", "bad-media")
            return Converted(LAYOUT_TRL, {}, {}, [], problems)
        prompt = _fill_media(prompt, images, videos, error)
        media = {}  # the paths now sit in the prompt's parts
    out = {}
    for key in ("chosen", "rejected"):
        turn = _answer_turn(value.get(key), key, _CHAT_TURN, error)
        if turn is not None and structured and isinstance(turn.get("content"), str):
            turn = {**turn, "content": [{"type": "text", "text": turn["content"]}]}
        out[key] = {"messages": prompt + [turn], **media} if turn is not None else {}
    n = len(prompt)
    renames = [(f"messages[{n}]", "{answer}")] + [(f"messages[{i}]", f"prompt[{i}]") for i in range(n)]
    return Converted(LAYOUT_TRL, out["chosen"], out["rejected"], renames, problems)


def _text(record: Record) -> str:
    return re.sub(r"\s+", " ", record.messages[-1].text()).strip()


def parse_pair(item: RawItem, file: str) -> tuple[Pair | None, list[Problem]]:
    """A preference record as a ``Pair``, with every problem found (under its own field names)."""
    value = item.value
    if not isinstance(value, dict):
        return None, [Problem("error", file, item.line, item.index, "", f"a record must be a JSON object (got {_type(value)})", "write each pair as {\"prompt\": ..., \"chosen\": ..., \"rejected\": ...}", "not-object")]
    conv = convert(value, file, item.index, item.line)
    problems = list(conv.problems)
    records: dict[str, Record | None] = {}
    for key in ("chosen", "rejected"):
        sft = getattr(conv, key)
        if not sft:
            records[key] = None
            continue
        rec, found = parse_record(RawItem(item.index, item.line, sft), file)
        for p in found:
            p = conv.rename(p, key)
            if p not in problems:  # a prompt problem is found in both answers' records: report it once
                problems.append(p)
        records[key] = rec
        if rec is not None and rec.messages[-1].role != "assistant":
            problems.append(Problem("error", file, item.line, item.index, key, "the answer must be an assistant turn", "give chosen/rejected as assistant turns", "bad-answer"))
            records[key] = None
    chosen, rejected = records["chosen"], records["rejected"]
    if chosen is not None and rejected is not None and _text(chosen) == _text(rejected):
        problems.append(Problem("error", file, item.line, item.index, "rejected", "the rejected answer is the same as the chosen one: nothing to prefer", "give two different answers, or drop the pair", "same-answers"))
    if any(p.severity == "error" for p in problems) or chosen is None or rejected is None:
        return None, problems
    raw = {k: v for k, v in value.items() if k not in ("chosen", "rejected")}
    chosen = replace(chosen, raw=raw, train_last_only=True)
    rejected = replace(rejected, raw=raw, train_last_only=True)
    return Pair(file, item.index, item.line, conv.layout, chosen, rejected), problems


def sft_items(item: RawItem, file: str) -> tuple[Converted | None, dict[str, RawItem]]:
    """The raw SFT items of a preference record's two answers (for the SFT checks of media and tokens)."""
    if not isinstance(item.value, dict):
        return None, {}
    conv = convert(item.value, file, item.index, item.line)
    return conv, {k: RawItem(item.index, item.line, getattr(conv, k), None, item.progress) for k in ("chosen", "rejected") if getattr(conv, k)}

