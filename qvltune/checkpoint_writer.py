"""Checkpoints written in the background: training waits only for a copy of the state in host memory.

A checkpoint of a LoRA/mixed run is mostly DeepSpeed's part: the fp32 master weights and Adam
moments of every trained parameter (``*_optim_states.pt``) and the trained modules'
(``mp_rank_*_model_states.pt``), several GB for 8B. Writing and syncing them is what made each save
cost training 20 s. Here DeepSpeed's ``save_checkpoint`` runs as usual, but through
``SnapshotEngine`` (a DeepSpeed ``CheckpointEngine``, its documented extension point): ``save``
copies the state dict to host memory and returns; a thread then writes the copies, syncs the folder
and only then lets the checkpoint be marked complete. Under ZeRO-1/2 a LoRA/mixed checkpoint's adapter
goes the same way (``snapshot_adapter``: its tensors alone, where the Trainer would first copy the
whole model to host memory). The snapshots go into host buffers kept from save to save
(qvltune.host_buffers: pinned on a GPU). The Trainer's other small files (scheduler, RNG, trainer
state) are written as before, synchronously; the thread syncs them too. ``SaveParts`` times where
the wait goes (the ``save`` record's ``parts``).

DeepSpeed's own asynchronous engines do not fit: its ``DecoupledCheckpointEngine`` hands the live
tensors to a writer process and waits for the write before the next optimizer step (so a save still
costs one write minus one forward/backward), and it and ``FastCheckpointEngine`` write through the
``async_io`` op, which needs libaio and an op build on every machine.

The completeness marker stays the commit point (qvltune.checkpoints): every rank writes and syncs its
files, then leaves a ``.saved-rank-N`` file; rank 0 writes the marker once all ranks have, from its
thread. A rank whose write fails leaves ``.failed-rank-N`` with its error instead, and rank 0's
thread raises it (naming the rank) rather than wait for a part that will not come. Only one save is in flight: the next save (and the end of training) waits for it. A crash at
any moment before the marker leaves a folder without it, which resume never picks. Threads never run
collectives (that would race the training's); ranks meet through the files in the shared run folder.
"""

from __future__ import annotations

import errno
import functools
import os
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qvltune.checkpoints import COMPLETE_MARKER
from qvltune.host_buffers import HostBuffers, host_copy

RANK_DONE = ".saved-rank-{}"
RANK_FAILED = ".failed-rank-{}"  # holds the rank's error: rank 0 stops waiting for it and names it


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path``, then its folders and ``path`` itself (so new names survive a
    power loss). A write-back error that only shows at fsync (ENOSPC, EIO: network file systems)
    is raised: the checkpoint must not be marked complete. A folder whose file system cannot sync
    folders (EINVAL) is skipped."""
    for root, dirs, files in os.walk(path):
        for name in files:
            _fsync(os.path.join(root, name), folder=False)
        for name in dirs:
            _fsync(os.path.join(root, name), folder=True)
    _fsync(str(path), folder=True)


def _fsync(path: str, folder: bool) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if not (folder and e.errno == errno.EINVAL):
            raise
    finally:
        os.close(fd)


class SaveAbandoned(RuntimeError):
    """Rank 0 stopped waiting for the other ranks' parts (a failing run): no marker was written."""


def write_marker(target: Path, step: int) -> None:
    """The checkpoint's completeness marker, atomically (write a temporary name, rename, sync)."""
    import json

    marker = target / COMPLETE_MARKER
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step, "time": time.time()}))
    tmp.replace(marker)
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SaveParts:
    """Where the time training waited for one save went: named parts (``with parts.part(name)``,
    repeated parts add up); ``record(total)`` lists them in order, the rest of the total as ``other``.
    The ``save`` and ``checkpoint`` records carry it; the run log prints it (dashboard.save_parts_text)."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}

    @contextmanager
    def part(self, name: str):
        started = time.time()
        try:
            yield
        finally:
            self.parts[name] = self.parts.get(name, 0.0) + time.time() - started

    def record(self, total: float) -> dict[str, float]:
        out = {name: round(seconds, 3) for name, seconds in self.parts.items()}
        rest = total - sum(self.parts.values())
        if rest >= 0.0005:
            out["other"] = round(rest, 3)
        return out


@dataclass
class Pending:
    """One checkpoint's background part on this rank."""

    step: int
    target: Path
    files: list[tuple[object, str, Callable]]  # (host copy, path, write(copy, path))
    blocking_seconds: float
    parts: dict[str, float] = field(default_factory=dict)  # SaveParts.record of the blocking part
    thread: threading.Thread | None = None
    error: BaseException | None = None
    background_seconds: float | None = None
    done: threading.Event = field(default_factory=threading.Event)


class CheckpointWriter:
    """This rank's background checkpoint writing (see the module docstring).

    ``capturing(engine)`` routes a DeepSpeed engine's checkpoint files through host-memory snapshots;
    ``start(...)`` writes them in a thread; ``wait()`` joins the save in flight and raises its error.
    ``on_complete(step, target, blocking_s, background_s, parts)`` runs on rank 0 once the marker is written."""

    def __init__(self, rank: int, world: int, enabled: bool = True, on_complete: Callable | None = None, rotate: Callable | None = None, poll: float = 0.05):
        self.rank, self.world, self.enabled = rank, world, enabled
        self.on_complete, self.rotate, self.poll = on_complete, rotate, poll
        self.snapshots: list[tuple[object, str, Callable]] = []  # filled during a save (SnapshotEngine.save, snapshot_adapter)
        self.buffers = HostBuffers()  # the snapshots' host memory, reused from save to save
        self.current: Pending | None = None
        self._stop = threading.Event()

    # -- DeepSpeed side ------------------------------------------------------------------------

    @contextmanager
    def capturing(self, engine):
        """While a checkpoint is saved: route the DeepSpeed engine's files through host-memory
        snapshots (only the plain torch checkpoint engine is replaced: one set up in the DeepSpeed
        config is left alone); the engine's own afterwards, so nothing saved outside a checkpoint
        (the final model) waits for a thread."""
        current = getattr(engine, "checkpoint_engine", None)
        if not self.enabled or current is None:
            yield
            return
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

        if type(current) is not TorchCheckpointEngine:
            yield
            return
        engine.checkpoint_engine = _snapshot_engine_class()(self, current)
        try:
            yield
        finally:
            engine.checkpoint_engine = current

    # -- one save --------------------------------------------------------------------------------

    def begin(self) -> None:
        """A save begins taking snapshots (after ``wait``: the previous write released the buffers)."""
        self.snapshots = []
        self.buffers.begin()

    def start(self, step: int, target: Path, blocking_seconds: float, parts: dict[str, float] | None = None) -> None:
        """Write what this save snapshot (in a thread when enabled), sync, and mark the checkpoint
        complete once every rank has (rank 0). ``parts``: where ``blocking_seconds`` went."""
        job = Pending(step, Path(target), self.snapshots, blocking_seconds, parts or {})
        self.snapshots = []
        self.current = job
        if not self.enabled:
            self._write(job)
            self._raise(job)
            return
        job.thread = threading.Thread(target=self._write, args=(job,), name=f"qvltune-save-{step}", daemon=True)
        job.thread.start()

    def free_buffers(self) -> None:
        """After training's last checkpoint is written (``wait``): give the host buffers back."""
        self.buffers.free()

    def discard(self) -> None:
        """Forget the snapshots of a save that failed before it could start writing."""
        self.snapshots = []
        self.buffers.release()

    def wait(self) -> Pending | None:
        """Join the save in flight and raise its error (once: the save is then no longer in flight).
        Returns it."""
        job, self.current = self.current, None
        if job is not None and job.thread is not None:
            job.thread.join()
        if job is not None:
            self._raise(job)
        return job

    def in_error(self) -> bool:
        """True once the save in flight failed on this rank (checked at every step's end)."""
        job = self.current
        return job is not None and job.done.is_set() and job.error is not None

    def settle(self, timeout: float = 60.0) -> None:
        """A failing run: give the save in flight ``timeout`` seconds to complete, then stop waiting
        for other ranks (which may be gone); errors are not raised."""
        job = self.current
        if job is not None and job.thread is not None:
            job.thread.join(timeout)
        self.close()

    def close(self) -> None:
        """Stop waiting for other ranks (a failing run): rank 0's thread gives up without a marker
        (its save ends in ``SaveAbandoned``, never reported as complete)."""
        self._stop.set()

    def _raise(self, job: Pending) -> None:
        if job.error is not None:
            try:
                job.error.checkpoint_step = job.step  # which checkpoint it was (explain_failure names it)
            except AttributeError:
                pass
            raise job.error

    def _write(self, job: Pending) -> None:
        started = time.time()
        try:
            for obj, path, write in job.files:
                write(obj, path)
            job.files.clear()
            fsync_tree(job.target)  # this rank's files, the Trainer's synchronous ones included
            (job.target / RANK_DONE.format(self.rank)).write_text("")
            if self.rank == 0:
                self._commit(job)
            job.background_seconds = time.time() - started
            if self.rank == 0 and self.on_complete is not None:
                self.on_complete(job.step, job.target, job.blocking_seconds, job.background_seconds, job.parts)
        except BaseException as e:  # noqa: BLE001 - reported in the training thread
            job.error = e
            if self.rank != 0:  # rank 0's thread waits for this rank's part: tell it why none comes
                try:
                    (job.target / RANK_FAILED.format(self.rank)).write_text(f"{type(e).__name__}: {e}")
                except OSError:
                    pass
        finally:
            # Once, here: the next save may overwrite the buffers. Not earlier (release is
            # check-then-release: a second one could free a lock the next save took).
            self.buffers.release()
            job.done.set()

    def _commit(self, job: Pending) -> None:
        """Rank 0: wait for every rank's done file, then write the marker and rotate. Raises when a
        rank could not write its part (its failed file) or the run stopped waiting (``close``)."""
        names = [job.target / RANK_DONE.format(r) for r in range(self.world)]
        while not all(n.exists() for n in names):
            for r in range(1, self.world):
                failed = job.target / RANK_FAILED.format(r)
                if failed.exists():
                    raise OSError(errno.EIO, f"rank {r} could not write its part of checkpoint-{job.step} ({failed.read_text().strip()})")
            if self._stop.is_set():
                raise SaveAbandoned(f"checkpoint-{job.step}: stopped waiting for the other ranks' parts")
            time.sleep(self.poll)
        write_marker(job.target, job.step)
        for n in names:
            n.unlink(missing_ok=True)
        if self.rotate is not None:
            self.rotate()


def _torch_save(obj, path: str, zipfile: bool = True) -> None:
    torch.save(obj, path, _use_new_zipfile_serialization=zipfile)


def _safetensors_save(state: dict, path: str) -> None:
    from safetensors.torch import save_file

    save_file(state, path, metadata={"format": "pt"})  # as peft's save_pretrained writes it


def snapshot_adapter(writer: CheckpointWriter, peft_model, output_dir: Path) -> None:
    """A checkpoint's adapter files (``adapter_config.json``, ``adapter_model.safetensors``: the LoRA
    weights and the fully trained ``modules_to_save``), as peft's ``save_pretrained`` writes them, with
    the weights copied to host memory here and written by ``writer``'s thread.

    Under ZeRO-1/2 the Trainer would first copy the whole model's state dict to host memory
    (accelerate's ``get_state_dict``: 16 GB for 8B, on every rank) only for peft to keep the adapter's
    part of it; this copies only that part (peft's own selection, ``get_peft_model_state_dict``, of
    the live tensors). The model card (README.md) peft adds is left to the final model.
    Not for ZeRO-3, whose partitioned weights must be gathered first (the Trainer's own path)."""
    from peft.utils import get_peft_model_state_dict

    name = peft_model.active_adapter
    config = peft_model.peft_config[name]
    state = get_peft_model_state_dict(peft_model, adapter_name=name)  # views of the live tensors: no copy yet
    host = {key: writer.buffers.copy(tensor) for key, tensor in state.items()}
    output_dir.mkdir(parents=True, exist_ok=True)
    if config.base_model_name_or_path is None:  # as peft's save_pretrained fills it
        config.base_model_name_or_path = peft_model.base_model.model.__dict__.get("name_or_path", None) or None
    inference_mode, config.inference_mode = config.inference_mode, True  # the saved config is for inference, as peft writes it
    try:
        config.save_pretrained(str(output_dir))
    finally:
        config.inference_mode = inference_mode
    writer.snapshots.append((host, str(output_dir / "adapter_model.safetensors"), _safetensors_save))


_ENGINE = None


def _snapshot_engine_class():
    """``SnapshotEngine``, built on first use (importing DeepSpeed only in the worker)."""
    global _ENGINE
    if _ENGINE is not None:
        return _ENGINE
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SnapshotEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine whose ``save`` only copies the state to host memory;
        ``CheckpointWriter`` writes the copies in a thread."""

        def __init__(self, writer: CheckpointWriter, replaced):
            super().__init__(None)
            self.writer = writer
            self.zipfile_serialization = getattr(replaced, "zipfile_serialization", self.zipfile_serialization)

        def save(self, state_dict, path: str):
            # A copy of every tensor on the host, and of every container (the optimizer's param groups
            # are dicts the scheduler changes at the next step); a GPU tensor is copied off the device.
            write = functools.partial(_torch_save, zipfile=self.zipfile_serialization)
            self.writer.snapshots.append((host_copy(state_dict, self.writer.buffers), path, write))

        def preserves_storage_sharing(self):
            return False  # DeepSpeed would clone module states itself first: save() copies everything once

    _ENGINE = SnapshotEngine
    return _ENGINE
