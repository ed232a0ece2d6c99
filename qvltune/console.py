"""The one output module: results go to stdout, progress, warnings and hints to stderr.

Commands with ``--json`` print only JSON on stdout; everything human goes through ``err``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def error(message: str, hint: str | None = None) -> None:
    err.print(f"[bold red]Error:[/] {escape(message)}")
    if hint:
        err.print(f"[bold]Hint:[/] {escape(hint)}")


def warn(message: str) -> None:
    err.print(f"[yellow]Warning:[/] {escape(message)}")


def note(message: str) -> None:
    err.print(f"[dim]{escape(message)}[/]")


def print_json(document: Any) -> None:
    """Print one JSON document on stdout, nothing else (for ``--json``)."""
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
    sys.stdout.flush()


def escape(text: str) -> str:
    from rich.markup import escape as _escape

    return _escape(str(text))


@contextmanager
def status(message: str, *, total: int | None = None) -> Iterator[Any]:
    """Say what is happening while it happens: on a terminal a spinner (or a bar, with ``total``)
    and the elapsed time, gone when done; otherwise one line. Yields ``advance(n)``.

    Anything that can take more than a couple of seconds runs inside one, so no wait is silent."""
    if not err.is_terminal:
        note(f"{message} ...")
        yield lambda n=1: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description}")]
    if total:
        columns += [BarColumn(bar_width=20), MofNCompleteColumn(), TimeRemainingColumn()]
    columns.append(TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(escape(message), total=total)
        yield lambda n=1: progress.advance(task, n)
