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

# On a terminal Rich wraps long lines between words at its width (the terminal itself would cut
# them mid-word); into a file or a pipe a line stays whole, for grep and for logs.
out = Console(highlight=False, soft_wrap=not sys.stdout.isatty())
err = Console(stderr=True, highlight=False, soft_wrap=not sys.stderr.isatty())


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


class Status:
    """What ``status`` yields: ``report(phase, done, total)`` moves the spinner (or bar) on; a new
    phase restarts its elapsed time. Library code takes ``report`` as a plain callback."""

    def __init__(self, progress: Any = None, task: Any = None, phase: str = ""):
        self.progress, self.task, self.phase = progress, task, phase

    def report(self, phase: str, done: int = 0, total: int | None = None) -> None:
        if self.progress is None:  # no terminal: one line per phase
            if phase != self.phase:
                note(f"{phase} ...")
            self.phase = phase
            return
        if phase != self.phase:
            self.phase = phase
            self.progress.reset(self.task, total=total, completed=done, description=escape(phase))
        else:
            self.progress.update(self.task, completed=done, total=total)


@contextmanager
def status(message: str) -> Iterator[Status]:
    """Say what is happening while it happens: on a terminal a spinner (a bar once a total is
    known) with the elapsed time, gone when done; otherwise one line per phase.

    Anything that can take more than a couple of seconds runs inside one, so no wait is silent."""
    if not err.is_terminal:
        note(f"{message} ...")
        yield Status(phase=message)
        return
    from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class Count(ProgressColumn):
        """"n/total" once a total is known; nothing before (a "0/?" would only puzzle)."""

        def render(self, task):
            return Text(f"{task.completed:,.0f}/{task.total:,.0f}" if task.total else "")

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=20), Count(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(escape(message), total=None)
        yield Status(progress, task, message)
