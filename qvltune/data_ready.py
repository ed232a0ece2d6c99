"""The data check beside the launcher: ``qvltune train`` starts DeepSpeed first and checks the data
while the ranks start (Python, torch, the process group, the model's weights), and the ranks wait
for the check's verdict before they read the data index.

The check itself is unchanged and never skipped: every record and media file is checked as before
(or taken from the index cache, which re-stamps every media file). What changes is that the
launcher's start-up -- tens of seconds on a GPU machine, in processes of their own -- no longer
waits behind it. The order that protects the user stays: no rank reads the data index before the
parent wrote it, and a failed check stops the ranks before they train.

The hand-over is two files in the run folder: ``data_index.json`` (written atomically by
``qvltune.train.prepare_index``), then ``data_ready.json`` with how long the check took, written
only after it. ``qvltune.train.prepare_folder`` removes both before the launch, so a rank can never
take an earlier attempt's index for this one's. The ranks wait only when ``qvltune train`` tells
them to (``QVLTUNE_DATA_PENDING``: its process id), which it does only on one node, where every
rank is a child of the launcher it started; with a hostfile (ranks started over ssh, which passes
that variable on to none of them) it writes the index before the launch. A rank started by hand
(launch.sh) prepares the data itself as before.

Torch-free: the parent imports it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil

from qvltune.errors import UserError

DATA_READY = "data_ready.json"
PENDING_ENV = "QVLTUNE_DATA_PENDING"  # the pid of the `qvltune train` that is checking the data


def mark_data_ready(run_dir: Path, seconds: float) -> None:
    """After the data index is written: the ranks may read it. ``seconds``: how long the check took."""
    tmp = run_dir / f".{DATA_READY}.tmp"
    tmp.write_text(json.dumps({"seconds": round(seconds, 3), "time": time.time()}))
    tmp.replace(run_dir / DATA_READY)


def pending_env() -> dict[str, str]:
    """What the parent hands the ranks when it launches them before its data check ends."""
    return {PENDING_ENV: str(os.getpid())}


def wait_for_data(run_dir: Path, environ: dict[str, str] | None = None, poll: float = 0.05) -> float | None:
    """In a rank, before it reads the data index: when ``qvltune train`` is still checking the data,
    wait for its ``data_ready`` mark and return how long its check took; None when nothing was
    pending (started by hand, or the parent checked before launching). A parent that went away
    without marking the data ready (its check failed, or it was stopped) ends the wait with an error
    instead of a rank waiting forever."""
    environ = os.environ if environ is None else environ
    pending = environ.get(PENDING_ENV)
    if not pending:
        return None
    ready = run_dir / DATA_READY
    parent = int(pending)
    while True:
        try:
            return float(json.loads(ready.read_text())["seconds"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if not psutil.pid_exists(parent):
            raise UserError(f"qvltune train (process {parent}) ended before it finished checking the data in {run_dir}", "run qvltune train again")
        time.sleep(poll)
