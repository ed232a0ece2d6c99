"""Checkpoint folders of a run: which are complete, which is the latest (torch-free, used by both
the worker and the parent).

A checkpoint is complete once its marker file exists; the worker writes the marker last, after every
rank finished writing and the files were synced, so a save interrupted at any moment leaves a folder
without a marker, which resume never picks.
"""

from __future__ import annotations

from pathlib import Path

COMPLETE_MARKER = "qvltune-complete"
STOP_FILE = "STOP"  # the parent writes it on Ctrl-C; every rank checks it at each step's end


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / COMPLETE_MARKER).exists()


def checkpoints(run_dir: Path) -> list[Path]:
    """checkpoint-N folders, oldest first."""
    found = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def latest_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose save finished; half-written ones are never picked."""
    done = [p for p in checkpoints(run_dir) if is_complete(p)]
    return done[-1] if done else None


def last_checkpoint_text(run_dir: Path) -> str | None:
    """``latest_complete_checkpoint`` as the ``end`` record's ``last_checkpoint`` field (a path or null)."""
    c = latest_complete_checkpoint(run_dir)
    return str(c) if c else None
