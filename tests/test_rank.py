"""Each rank's own outcome (qvltune.rank): the recorder around a real child process -- an abrupt
exit, a death by signal, an exception, a signal passed on exactly once -- and which rank the parent
names from the records. (The real DeepSpeed run with a dying rank: test_faults.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qvltune.rank import NOTE_ENV, clear_records, first_failure, read_records, record_path, run_and_record

REPO = Path(__file__).resolve().parent.parent


def child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def recorded(tmp_path: Path, code: str, rank: int = 1) -> tuple[int, dict]:
    path = record_path(tmp_path, 0, rank)
    status = run_and_record(child(code), path, {"rank": rank, "local_rank": rank, "node": 0})
    return status, json.loads(path.read_text())


def test_an_abrupt_exit_is_recorded_with_its_own_code(tmp_path):
    status, doc = recorded(tmp_path, "import os; os._exit(17)")  # nothing of the child's own runs
    assert status == 17 and doc["exit_code"] == 17 and doc["signal"] is None and doc["received"] is None and doc["error"] is None
    assert (doc["rank"], doc["node"]) == (1, 0) and doc["ended"] >= doc["started"]


def test_a_death_by_signal_is_named(tmp_path):
    status, doc = recorded(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert status == 128 + 9 and doc["signal"] == "SIGKILL" and doc["received"] is None


def test_the_workers_own_error_joins_the_record(tmp_path):
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); from qvltune.rank import note; note('error', 'RuntimeError: boom hf_abcdefghijklmnopqrstuvwx'); sys.exit(1)"
    status, doc = recorded(tmp_path, code)
    assert status == 1 and doc["error"].startswith("RuntimeError: boom") and "hf_abcdefghijklmnopqrstuvwx" not in doc["error"]  # redacted


def _recorder(tmp_path: Path, child_code: str) -> subprocess.Popen:
    """``run_and_record`` in a process of its own (as DeepSpeed starts it), to be signalled."""
    script = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); from pathlib import Path; from qvltune.rank import run_and_record, record_path\n"
        f"sys.exit(run_and_record([sys.executable, '-c', {child_code!r}], record_path(Path({str(tmp_path)!r}), 0, 0), {{'rank': 0, 'local_rank': 0, 'node': 0}}))"
    )
    return subprocess.Popen([sys.executable, "-c", script], start_new_session=True)


# A worker that notes each SIGTERM (as qvltune.worker's stop handler does) and exits on the second.
COUNTING_WORKER = (
    f"import sys, signal, time, os; sys.path.insert(0, {str(REPO)!r}); from qvltune.rank import note\n"
    "n = []\n"
    "def h(s, f):\n"
    "    note('received', 'SIGTERM'); n.append(s)\n"
    "    if len(n) == 2: os._exit(2)\n"
    "signal.signal(signal.SIGTERM, h); print('ready', flush=True)\n"
    "t = time.time()\n"
    "while time.time() - t < 3: time.sleep(0.05)\n"
    "sys.exit(1 if n else 0)\n"
)


def _wait_for_child(recorder: subprocess.Popen) -> None:
    deadline = time.time() + 10
    while time.time() < deadline:
        kids = [int(p) for p in Path(f"/proc/{recorder.pid}/task/{recorder.pid}/children").read_text().split()]
        if kids:
            time.sleep(0.5)  # its signal handler is installed
            return
        time.sleep(0.05)
    raise AssertionError("the recorder started no child")


@pytest.mark.parametrize("to_group", [False, True])
def test_a_signal_reaches_the_worker_once_and_marks_it_stopped(tmp_path, to_group):
    # To the recorder alone (a scheduler signalling the rank's process): passed on. To the whole
    # group (DeepSpeed's teardown, psutil's tree kill): the worker got it already, not passed again
    # (a second SIGTERM would stop it without its checkpoint).
    recorder = _recorder(tmp_path, COUNTING_WORKER)
    _wait_for_child(recorder)
    if to_group:
        os.killpg(recorder.pid, signal.SIGTERM)
    else:
        recorder.send_signal(signal.SIGTERM)
    assert recorder.wait(20) == 1  # one SIGTERM seen: the worker stopped on its own terms
    doc = json.loads(record_path(tmp_path, 0, 0).read_text())
    assert doc["exit_code"] == 1 and doc["received"]["signal"] == "SIGTERM"


def test_the_first_failure_is_the_earliest_one_not_stopped_by_a_signal():
    def rec(rank, code, ended, received=None, signal=None, node=0):
        return {"rank": rank, "local_rank": rank % 2, "node": node, "host": f"h{node}", "exit_code": code, "signal": signal, "received": received, "ended": ended}

    teardown = {"signal": "SIGTERM", "time": 5.0}
    # Rank 0 ended first, but on the launcher's SIGTERM: rank 1's own 17 is the cause.
    f = first_failure([rec(0, 1, 5.0, teardown), rec(1, 17, 5.1)])
    assert (f.rank, f.exit_code) == (1, 17) and f.describe() == "rank 1 (exit code 17)"
    # Both failed of their own accord: the earlier one (the other fell on the broken collective).
    assert first_failure([rec(0, 1, 5.3), rec(1, 17, 5.1)]).rank == 1
    assert first_failure([rec(0, 1, 5.0), rec(1, 17, 5.1)]).rank == 0
    # Killed by the kernel (no signal it could see coming): named with the signal, on its node.
    f = first_failure([rec(0, 1, 9.0, teardown), rec(3, 137, 8.0, signal="SIGKILL", node=1)])
    assert (f.rank, f.node, f.exit_code) == (3, 1, 137) and f.describe(2) == "local rank 1 (killed by SIGKILL) on node 1 (h1), rank 3" and f.status_code == -9
    # Every failed rank had been signalled (Ctrl-C twice): the earliest of them; success: nobody.
    assert first_failure([rec(0, 130, 2.0, teardown), rec(1, 130, 1.0, teardown)]).rank == 1
    assert first_failure([rec(0, 0, 1.0), rec(1, 0, 1.0)]) is None
    assert first_failure([]) is None


def test_records_of_an_earlier_attempt_are_cleared_per_node(tmp_path):
    for node, rank in [(0, 0), (0, 1), (1, 2)]:
        path = record_path(tmp_path, node, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"rank": rank, "node": node, "exit_code": 0}))
    clear_records(tmp_path, 1)
    assert [r["rank"] for r in read_records(tmp_path)] == [0, 1]
    assert [r["rank"] for r in read_records(tmp_path, 0)] == [0, 1] and read_records(tmp_path, 1) == []
    clear_records(tmp_path)
    assert read_records(tmp_path) == []


def test_a_worker_started_by_hand_notes_nothing(tmp_path, monkeypatch):
    from qvltune.rank import note

    monkeypatch.delenv(NOTE_ENV, raising=False)
    note("error", "x")  # no file anywhere, no error
    assert not any(tmp_path.iterdir())


def test_the_parent_names_the_first_failed_rank_writes_the_end_record_and_exits_with_its_code(tmp_path, capsys):
    # qvltune train's side after the launcher exited with 1 (the code of the rank it polled first):
    # the records, not the launcher, give the rank and the code. Rank 0's error holds "[...]", as
    # gloo's messages do: printed as text, not read as markup.
    from qvltune.cli.train import report
    from qvltune.config import parse_config
    from qvltune.dashboard import DashboardState
    from qvltune.metrics import read_all
    from qvltune.train import Outcome, rank_failure

    cfg = parse_config({"name": "die", "output_dir": str(tmp_path), "model": {"path": "builtin:tiny"}, "data": {"train": "d.jsonl"}})
    run_dir = cfg.run_dir
    gloo = "RuntimeError: [/__w/pytorch/third_party/gloo/transport/tcp/pair.cc:545] Read error: Connection reset by peer"
    for rank, code, error, ended in [(0, 1, gloo, 10.4), (1, 9, "[bold]ValueError: bad[/bold]", 10.0)]:
        path = record_path(run_dir, 0, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"rank": rank, "local_rank": rank, "node": 0, "host": "h", "exit_code": code, "signal": None, "error": error, "received": None, "ended": ended}))
    state = DashboardState(cfg.name)
    state.step = 2
    outcome = Outcome(1, state, ["launcher: exits with return code = 1"], interrupted=False)
    outcome.failure = rank_failure(run_dir, outcome)
    assert report(outcome, cfg, tmp_path / "die.yaml") == 9
    err = capsys.readouterr().err
    assert "training failed: rank 1 (exit code 9): [bold]ValueError: bad[/bold];" in err, err
    end = read_all(run_dir / "metrics.jsonl")[-1]
    assert (end["kind"], end["status"], end["rank"], end["exit_code"], end["step"]) == ("end", "rank_failed", 1, 9, 2)
    # What rank 0 explained itself (out of memory, NaN, ...) is not overwritten by a second end record.
    state.status = "oom"
    assert rank_failure(run_dir, Outcome(1, state, [], interrupted=False)) is None
    assert len([r for r in read_all(run_dir / "metrics.jsonl") if r["kind"] == "end"]) == 1


def test_an_exit_is_described_with_its_signal_either_way_it_is_reported():
    from qvltune.launch import describe_exit

    assert describe_exit(-9) == "killed by SIGKILL"  # as Popen reports it
    assert describe_exit(137) == "exit code 137: 128 + SIGKILL"  # as the guard and a shell report it
    assert describe_exit(17) == "exit code 17" and describe_exit(0) == "exit code 0"


def test_a_process_ended_without_finalizing_still_waits_for_its_threads_and_exit_handlers(tmp_path):
    """qvltune.process_exit: what a normal exit does that matters is kept (a non-daemon thread's
    work, the exit handlers, the buffered output), an idle thread pool nobody shut down does not
    hold the exit, and the code is the one asked for."""
    code = (
        f"import sys, atexit, threading, time; sys.path.insert(0, {str(REPO)!r}); from pathlib import Path\n"
        "from qvltune.process_exit import end_process\n"
        f"out = Path({str(tmp_path)!r})\n"
        "threading.Thread(target=lambda: (time.sleep(0.3), (out / 'thread').write_text('done'))).start()\n"
        "atexit.register(lambda: (out / 'handler').write_text('ran'))\n"
        "from concurrent.futures import ThreadPoolExecutor; pool = ThreadPoolExecutor(1); pool.submit(int).result()  # never shut down\n"
        "sys.stdout.write('buffered')\n"
        "end_process(3, noted=lambda stage: open(out / 'stages', 'a').write(stage + ';'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # the output is buffered, as by default
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20, env=env)
    assert result.returncode == 3 and result.stdout == "buffered"
    assert (tmp_path / "thread").read_text() == "done" and (tmp_path / "handler").read_text() == "ran"
    assert (tmp_path / "stages").read_text() == "returned;handlers done;"


def test_an_unexpected_worker_error_still_ends_the_rank_cleanly(tmp_path, monkeypatch, capsys):
    """An error no handler explains: its traceback goes to the log and the worker returns exit code 1,
    so the rank still ends through end_process (its process group destroyed: gloo aborts a process
    that finalizes without that, and the record would read SIGABRT instead of the error)."""
    from qvltune import worker

    def boom(run_dir, resume):
        raise RuntimeError("boom")

    monkeypatch.setattr(worker, "run", boom)
    assert worker.main(["--run-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().endswith("RuntimeError: boom")


def test_a_node_that_did_not_start_this_attempt_is_not_blamed_for_an_old_failure(tmp_path):
    """Node 0 reads every node's records from the shared run folder; node 1's are from an earlier
    attempt (it never started this one): the failure named is this attempt's, node 0's rank 1."""
    from qvltune.dashboard import DashboardState
    from qvltune.train import Outcome, rank_failure

    for node, rank, code, ended in [(1, 2, 9, 5.0), (0, 1, 17, 50.0), (0, 0, 1, 51.0)]:
        path = record_path(tmp_path, node, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"rank": rank, "local_rank": rank % 2, "node": node, "host": f"h{node}", "exit_code": code, "signal": None, "error": None, "received": None, "ended": ended}))
    outcome = Outcome(1, DashboardState("x"), [], interrupted=False)
    assert rank_failure(tmp_path, outcome, nodes=2, write_end=False).node == 1  # the stale record wins without the attempt's nodes
    failure = rank_failure(tmp_path, outcome, nodes=2, write_end=False, attempt={0})
    assert (failure.node, failure.rank, failure.exit_code) == (0, 1, 17)
