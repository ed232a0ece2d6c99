"""Problems for people: one line per problem, or one line for many records sharing a problem.

A wrong ``--image-root`` on a 300-record dataset is one mistake, not 300: problems of one kind with
the same message (the file they concern is kept apart, in ``Problem.path``) are folded into

    image not found: 300 records, e.g. train.jsonl:2, :3, :4 ... (all under imgs/)

``--json`` keeps every problem; this grouping is for the human output only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from qvltune.data.record import Problem

GROUP_FROM = 4  # this many problems sharing a message read as one line
EXAMPLES = 3  # locations named in a grouped line


@dataclass(frozen=True)
class ProblemLine:
    severity: str
    text: str
    fix: str
    count: int  # problems this line stands for


def group_problems(problems: Sequence[Problem], group_from: int = GROUP_FROM) -> list[ProblemLine]:
    """Problems in their order, those sharing (severity, kind, message, fix) folded into one line
    at the place of the first of them once there are ``group_from`` or more."""
    groups: dict[tuple[str, str, str, str], list[Problem]] = {}
    for p in problems:
        groups.setdefault(_key(p), []).append(p)
    out: list[ProblemLine] = []
    for p in problems:
        group = groups[_key(p)]
        if len(group) < group_from:
            what = f"{p.message}: {_show(p.path)}" if p.path else p.message
            out.append(ProblemLine(p.severity, f"{p.where()}: {what}", p.fix, 1))
        elif group[0] is p:
            out.append(ProblemLine(p.severity, _group_text(group), p.fix, len(group)))
    return out


def _key(p: Problem) -> tuple[str, str, str, str]:
    return (p.severity, p.code, p.message, p.fix)


def _group_text(group: list[Problem]) -> str:
    records = len({(p.file, p.index) for p in group})
    count = f"{records} records" if records == len(group) else f"{len(group)} times in {records} records"
    examples, last_file = [], None
    for p in group[:EXAMPLES]:
        if p.line is None:
            examples.append(p.where())
        else:
            examples.append(f":{p.line}" if p.file == last_file else f"{p.file}:{p.line}")
        last_file = p.file
    more = " ..." if len(group) > EXAMPLES else ""
    return f"{group[0].message}: {count}, e.g. {', '.join(examples)}{more}{_where_files(group)}"


def _where_files(group: list[Problem]) -> str:
    """' (all under imgs/)' when the problems name files sharing a folder; '' otherwise."""
    paths = [p.path for p in group]
    if not all(paths):
        return ""
    if len(set(paths)) == 1:
        return f" (all {_show(paths[0])})"
    try:
        common = os.path.commonpath([os.path.dirname(p) for p in paths])
    except ValueError:  # absolute and relative paths mixed
        return ""
    if not common or common == os.sep:
        return ""
    return f" (all under {_show(common)}{os.sep})"


def _show(path: str) -> str:
    """A path relative to the working directory when it lies under it (shorter to read)."""
    if not os.path.isabs(path):
        return path
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel
