"""Each rank's own outcome: what DeepSpeed starts on every rank (``python -m qvltune.rank``), which
runs the worker (``python -m qvltune.worker``) as its child and records how it ended.

Why a process of its own: DeepSpeed's launcher polls its ranks once a second and, when one fails,
tears the others down (SIGTERM) and exits with the code of whichever failed rank it happens to poll
first, so a rank that died with 17 may be reported as 1 (a peer that failed on the broken
collective) and the rank its log names is simply the last one it started. A rank that dies by
``os._exit``, a segfault or the kernel's OOM killer cannot write anything itself; only its parent
sees its exit status. So every rank's parent is this small recorder (no torch), which writes
``ranks/node<N>-rank<R>.json`` in the run folder when its worker ends:

    {"rank": 1, "local_rank": 1, "node": 0, "host": "...", "pid": 1234, "exit_code": 17,
     "signal": null, "error": null, "received": null, "started": ..., "returned": ...,
     "exiting": ..., "ended": ...}

``signal`` names the signal that killed the worker; ``received`` the signal (and when) that reached
this rank before it ended -- the launcher's teardown, a scheduler, Ctrl-C twice -- which marks the
rank as stopped, not as the cause; ``error`` is what the worker itself reported (an uncaught
exception, or qvltune's own one-line error) through the note file it is handed in
``QVLTUNE_RANK_NOTE``; ``returned`` and ``exiting`` (null unless it got that far) when its main
returned and when its exit handlers had run, so a slow exit shows where it went. ``qvltune train``
reads the records after the launcher exits (``first_failure``) to name the rank that failed first,
with its own exit code.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from qvltune.redact import redact

RANKS_DIR = "ranks"  # inside the run folder
NOTE_ENV = "QVLTUNE_RANK_NOTE"  # the worker appends JSON lines here: {"error": ...} or {"received": ...}
FORWARD_WAIT_SECONDS = 0.3  # how long a signal to this process waits to see whether the worker got it too


def record_path(run_dir: Path, node: int, rank: int) -> Path:
    return run_dir / RANKS_DIR / f"node{node}-rank{rank}.json"


def clear_records(run_dir: Path, node: int | None = None) -> None:
    """Before a launch: the records of an earlier attempt say nothing about this one. ``node``: only
    that node's (several nodes started one by one each clear their own)."""
    for path in (run_dir / RANKS_DIR).glob("node*-rank*.json" if node is None else f"node{node}-rank*.json"):
        path.unlink(missing_ok=True)


def note(kind: str, text: str, environ: dict[str, str] | None = None) -> None:
    """From the worker: add what only it knows (``error``: an exception; ``received``: a signal) to
    its rank's record. One appended line, so it is safe in a signal handler and never half-read."""
    path = (os.environ if environ is None else environ).get(NOTE_ENV)
    if not path:
        return  # started by hand, not through qvltune.rank
    try:
        with open(path, "a") as f:
            f.write(json.dumps({kind: text, "time": time.time()}) + "\n")
    except OSError:
        pass  # the record still has the exit code


def _read_notes(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if "error" in doc:
            out["error"] = doc["error"]  # the last one: the exception that ended the worker
        if "received" in doc and "received" not in out:  # the first signal is the one that stopped it
            out["received"] = {"signal": doc["received"], "time": doc["time"]}
        if "exit" in doc:  # where the worker's exit went: when its main returned, when its exit handlers ended
            out.setdefault("exit", {})[doc["exit"]] = doc["time"]
    return out


def die_with_parent(sig: signal.Signals) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``sig`` when its parent dies, even by SIGKILL (Linux prctl
    PR_SET_PDEATHSIG), so a lost parent never leaves a rank running on a GPU. Used for the
    launcher under ``qvltune train`` (SIGTERM: the ranks checkpoint) and for the worker under its
    recorder here (SIGKILL: the recorder is gone, nothing is left to record)."""

    def preexec() -> None:
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # not Linux: the process group is still stopped on every path qvltune controls

    return preexec


def run_dir_arg(argv: list[str]) -> Path | None:
    """The ``--run-dir DIR`` of a rank's (and its worker's) arguments; None without one."""
    at = argv.index("--run-dir") + 1 if "--run-dir" in argv else len(argv)
    return Path(argv[at]) if at < len(argv) else None


def shell_status(code: int) -> int:
    """A Popen return code as a shell reports it: 128 + N for a process killed by signal N."""
    return code if code >= 0 else 128 - code


def run_and_record(argv: list[str], record: Path, identity: dict[str, Any]) -> int:
    """Run ``argv`` (the worker), pass on the signals this process gets, and write ``record`` when it
    ends. Returns its exit status as a shell would (128 + N for signal N)."""
    record.parent.mkdir(parents=True, exist_ok=True)
    notes = record.with_name(f".{record.stem}.notes")
    notes.unlink(missing_ok=True)
    started = time.time()
    received: dict[str, Any] | None = None
    child = subprocess.Popen(argv, env={**os.environ, NOTE_ENV: str(notes)}, preexec_fn=die_with_parent(signal.SIGKILL))

    def forward(signum, frame):
        nonlocal received
        if received is None:
            received = {"signal": signal.Signals(signum).name, "time": time.time()}
        # Pass it on unless the worker got it too (a signal to the process group, the launcher's
        # teardown): it checkpoints on the first signal and stops at once on a second, so one signal
        # must stay one. The worker notes a signal the moment it gets one.
        time.sleep(FORWARD_WAIT_SECONDS)
        if "received" not in _read_notes(notes):
            try:
                os.kill(child.pid, signum)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    code = child.wait()
    ended = time.time()
    worker = _read_notes(notes)
    # The first signal that reached the rank, whether this process or the worker saw it first.
    seen = [r for r in (received, worker.get("received")) if r]
    doc = {
        **identity,
        "host": socket.gethostname(),
        "pid": child.pid,
        "exit_code": shell_status(code),
        "signal": signal.Signals(-code).name if code < 0 and -code in signal.Signals._value2member_map_ else None,
        "error": redact(worker["error"]) if worker.get("error") else None,  # no token from an exception's text
        "received": min(seen, key=lambda r: r["time"]) if seen else None,
        "started": started,
        "returned": worker.get("exit", {}).get("returned"),  # the worker's main returned (its work done)
        "exiting": worker.get("exit", {}).get("handlers done"),  # its exit handlers ran; then the process ends
        "ended": ended,
    }
    tmp = record.with_name(f".{record.name}.tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(record)  # whole, so a reader never sees half
    notes.unlink(missing_ok=True)
    return doc["exit_code"]


# ----------------------------------------------------------------------------------------------
# Reading the records (qvltune train, after the launcher exits)


@dataclass(frozen=True)
class RankFailure:
    rank: int
    local_rank: int
    node: int
    host: str
    exit_code: int
    signal: str | None
    error: str | None

    @property
    def how(self) -> str:
        return f"killed by {self.signal}" if self.signal else f"exit code {self.exit_code}"

    def describe(self, nodes: int = 1) -> str:
        """``rank 1 (exit code 17)``; with several nodes ``local rank 0 (killed by SIGKILL) on node 1
        (host), rank 2``; then the worker's own error, when it reported one."""
        what = f"rank {self.rank} ({self.how})" if nodes <= 1 else f"local rank {self.local_rank} ({self.how}) on node {self.node} ({self.host}), rank {self.rank}"
        return what + (f": {self.error}" if self.error else "")

    @property
    def status_code(self) -> int:
        """The code as Popen reports it (-N for signal N), for the node status files."""
        return -signal.Signals[self.signal].value if self.signal else self.exit_code

    def as_record(self) -> dict[str, Any]:
        return {"rank": self.rank, "local_rank": self.local_rank, "node": self.node, "host": self.host, "exit_code": self.exit_code, "signal": self.signal, "error": self.error}


def read_records(run_dir: Path, node: int | None = None) -> list[dict[str, Any]]:
    out = []
    for path in sorted((run_dir / RANKS_DIR).glob("node*-rank*.json" if node is None else f"node{node}-rank*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return out


def first_failure(records: list[dict[str, Any]]) -> RankFailure | None:
    """The rank that failed first, of its own accord: a non-zero exit with no signal received before
    it ended (those were stopped by the teardown, a scheduler or Ctrl-C), the earliest to end. When
    every failed rank had been signalled, the earliest of them (the cause came from outside)."""
    failed = [r for r in records if r.get("exit_code") not in (0, None)]
    own = [r for r in failed if not r.get("received")]
    pick = min(own or failed, key=lambda r: r.get("ended", float("inf")), default=None)
    if pick is None:
        return None
    return RankFailure(
        int(pick["rank"]), int(pick.get("local_rank", pick["rank"])), int(pick.get("node", 0)), str(pick.get("host", "?")), int(pick["exit_code"]), pick.get("signal"), pick.get("error")
    )


def main(argv: list[str]) -> int:
    """``python -m qvltune.rank [--local_rank=N] --run-dir DIR [...]``: the worker's arguments, as
    DeepSpeed's launcher passes them (RANK, LOCAL_RANK and CROSS_RANK, the node, in the environment)."""
    run_dir = run_dir_arg(argv)
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    node = int(os.environ.get("CROSS_RANK", "0"))
    return run_and_record(
        [sys.executable, "-u", "-m", "qvltune.worker", *argv], record_path(run_dir, node, rank), {"rank": rank, "local_rank": local, "node": node}
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
