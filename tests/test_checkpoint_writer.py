"""Background checkpoint writing (qvltune.checkpoint_writer): training waits only for host copies;
the completeness marker comes after every rank's files are on disk, and never before."""

from __future__ import annotations

import errno
import threading
import time

import pytest
import torch

from qvltune import checkpoint_writer
from qvltune.checkpoint_writer import RANK_DONE, CheckpointWriter
from qvltune.checkpoints import COMPLETE_MARKER, is_complete, latest_complete_checkpoint


def _snapshot(writer: CheckpointWriter, target, name, tensor):
    """What SnapshotEngine.save leaves: a host copy and its path."""
    writer.snapshots.append(({"t": tensor.clone()}, str(target / name), checkpoint_writer._torch_save))


def test_the_marker_waits_for_every_rank_and_comes_last(tmp_path):
    target = tmp_path / "checkpoint-4"
    target.mkdir()
    done = []
    rank0 = CheckpointWriter(0, 2, on_complete=lambda *a: done.append(a))
    rank1 = CheckpointWriter(1, 2)
    _snapshot(rank0, target, "rank0.pt", torch.ones(3))
    rank0.start(4, target, blocking_seconds=0.5, parts={"model files": 0.4})
    time.sleep(0.3)
    assert (target / "rank0.pt").exists() and (target / RANK_DONE.format(0)).exists()
    assert not is_complete(target) and not done  # rank 1 has not written its part yet
    _snapshot(rank1, target, "rank1.pt", torch.zeros(2))
    rank1.start(4, target, blocking_seconds=0.5)
    rank1.wait()
    rank0.wait()
    assert is_complete(target) and torch.load(target / "rank1.pt")["t"].equal(torch.zeros(2))
    assert not list(target.glob(".saved-rank-*"))  # the coordination files are gone
    step, path, blocking, background, parts = done[0]
    assert (step, path, blocking, parts) == (4, target, 0.5, {"model files": 0.4}) and background > 0


def test_training_goes_on_while_the_write_is_slow_and_a_crash_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    old = tmp_path / "checkpoint-2"
    old.mkdir()
    (old / COMPLETE_MARKER).write_text("{}")
    target = tmp_path / "checkpoint-4"
    target.mkdir()
    gate = threading.Event()
    real_sync = checkpoint_writer.fsync_tree
    monkeypatch.setattr(checkpoint_writer, "fsync_tree", lambda p: (gate.wait(10), real_sync(p)))
    writer = CheckpointWriter(0, 1)
    engine = checkpoint_writer._snapshot_engine_class()(writer, None)  # what DeepSpeed's save_checkpoint calls
    writer.begin()
    weights, groups = torch.arange(4.0), [{"lr": 1.0}]
    engine.save({"t": weights, "param_groups": groups}, str(target / "optim.pt"))
    started = time.time()
    writer.start(4, target, blocking_seconds=0.0)
    assert time.time() - started < 0.5  # start() returns at once
    weights.add_(100)  # training changes the live tensors and the scheduler the groups: the checkpoint keeps the snapshot
    groups[0]["lr"] = 0.5
    time.sleep(0.2)
    # Mid-write (the sync has not returned): a crash now resumes from the previous checkpoint.
    assert not is_complete(target) and latest_complete_checkpoint(tmp_path) == old
    gate.set()
    writer.wait()
    assert latest_complete_checkpoint(tmp_path) == target
    saved = torch.load(target / "optim.pt")
    assert saved["t"].equal(torch.arange(4.0)) and saved["param_groups"][0]["lr"] == 1.0


def test_a_failed_write_is_raised_in_the_training_thread_with_its_step_and_leaves_no_marker(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint-6"
    target.mkdir()

    def full(obj, path, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(torch, "save", full)
    writer = CheckpointWriter(0, 1)
    _snapshot(writer, target, "optim.pt", torch.ones(1))
    writer.start(6, target, blocking_seconds=0.0)
    writer.current.done.wait(5)
    assert writer.in_error()
    with pytest.raises(OSError) as e:
        writer.wait()
    assert e.value.errno == errno.ENOSPC and e.value.checkpoint_step == 6
    assert not is_complete(target)
    writer.wait()  # reported once


def _wait_in_thread(writer: CheckpointWriter, seconds: float = 10.0) -> BaseException | None:
    """``writer.wait()`` with a time limit: what it raised (None if nothing); fails if it still waits."""
    raised = []

    def wait():
        try:
            writer.wait()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            raised.append(e)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "wait() still waits"
    return raised[0] if raised else None


def test_a_rank_that_cannot_write_its_part_stops_rank_0_waiting_and_is_named(tmp_path, monkeypatch):
    """Rank 1's write fails: rank 0's thread, waiting for rank 1's part, raises with rank 1's cause
    instead of waiting for ever (every rank joins its save once one failed: rank 0 hung there)."""
    target = tmp_path / "checkpoint-8"
    target.mkdir()
    done = []
    rank0, rank1 = CheckpointWriter(0, 2, on_complete=lambda *a: done.append(a)), CheckpointWriter(1, 2)
    _snapshot(rank0, target, "rank0.pt", torch.ones(1))
    rank0.start(8, target, blocking_seconds=0.0)

    def full(obj, path, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(torch, "save", full)
    _snapshot(rank1, target, "rank1.pt", torch.ones(1))
    rank1.start(8, target, blocking_seconds=0.0)
    assert isinstance(_wait_in_thread(rank1), OSError)
    error = _wait_in_thread(rank0)
    assert isinstance(error, OSError) and error.checkpoint_step == 8
    assert "rank 1 could not write its part of checkpoint-8 (OSError: [Errno 28] No space left on device" in str(error)
    assert not is_complete(target) and not done


def test_a_save_abandoned_by_a_failing_run_is_not_reported_complete(tmp_path):
    target = tmp_path / "checkpoint-3"
    target.mkdir()
    done = []
    rank0 = CheckpointWriter(0, 2, on_complete=lambda *a: done.append(a))  # rank 1 is gone: its part never comes
    _snapshot(rank0, target, "rank0.pt", torch.ones(1))
    rank0.start(3, target, blocking_seconds=0.0)
    rank0.settle(timeout=0.3)
    assert isinstance(_wait_in_thread(rank0), checkpoint_writer.SaveAbandoned)
    assert not is_complete(target) and not done


def test_a_write_back_error_at_fsync_leaves_no_marker(tmp_path, monkeypatch):
    """ENOSPC / EIO that only shows when the data is synced (network file systems) is the save's error."""
    target = tmp_path / "checkpoint-5"
    target.mkdir()
    real_fsync = checkpoint_writer.os.fsync

    def fsync(fd):
        if checkpoint_writer.os.path.isfile(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(checkpoint_writer.os, "fsync", fsync)
    writer = CheckpointWriter(0, 1)
    _snapshot(writer, target, "optim.pt", torch.ones(1))
    writer.start(5, target, blocking_seconds=0.0)
    error = _wait_in_thread(writer)
    assert isinstance(error, OSError) and error.errno == errno.EIO and error.checkpoint_step == 5
    assert not is_complete(target)


def test_synchronous_mode_writes_before_returning(tmp_path):
    target = tmp_path / "checkpoint-1"
    target.mkdir()
    writer = CheckpointWriter(0, 1, enabled=False)
    _snapshot(writer, target, "optim.pt", torch.ones(1))
    writer.start(1, target, blocking_seconds=0.0)
    assert is_complete(target)


def test_snapshots_only_while_a_checkpoint_is_saved(tmp_path):
    from types import SimpleNamespace

    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    original = TorchCheckpointEngine()
    engine = SimpleNamespace(checkpoint_engine=original)
    writer = CheckpointWriter(0, 1)
    writer.begin()
    with writer.capturing(engine):
        engine.checkpoint_engine.save({"t": torch.ones(2)}, str(tmp_path / "x.pt"))
        assert engine.checkpoint_engine is not original and not (tmp_path / "x.pt").exists()
    assert engine.checkpoint_engine is original and len(writer.snapshots) == 1  # the final model is saved by DeepSpeed's own engine
    with CheckpointWriter(0, 1, enabled=False).capturing(engine):
        assert engine.checkpoint_engine is original


def _state(weights, moments):
    """The shape of a DeepSpeed state dict: nested containers, a view, a scalar tensor, a torch.Size."""
    return {
        "module": {"w": weights, "w_t": weights.t()},
        "optimizer": {"state": {0: {"exp_avg": moments, "step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1.0, "params": [0]}]},
        "shapes": torch.Size([3, 4]),
    }


def test_buffers_reused_from_save_to_save_write_the_bytes_fresh_copies_would(tmp_path):
    """Host buffers are reused (the same memory at every save) and each file is byte for byte what
    torch.save of fresh host copies writes, also after training changed the values between saves."""
    from qvltune.host_buffers import host_copy

    writer = CheckpointWriter(0, 1)
    engine = checkpoint_writer._snapshot_engine_class()(writer, None)
    engine.zipfile_serialization = True  # torch's format (the legacy one names storages by their address)
    weights, moments = torch.arange(12.0).reshape(3, 4), torch.ones(5)
    first_pointers = None
    for step in (2, 4, 6):
        target = tmp_path / f"checkpoint-{step}"
        target.mkdir()
        writer.begin()
        engine.save(_state(weights, moments), str(target / "optim.pt"))
        pointers = [b.data_ptr() for b in writer.buffers.buffers]
        writer.start(step, target, blocking_seconds=0.0)
        weights.add_(1)  # the next step changes the live tensors while the file is written
        moments.mul_(2)
        writer.wait()
        fresh = tmp_path / f"fresh-{step}" / "optim.pt"  # the same name: torch's zip records are named after the file
        fresh.parent.mkdir()
        checkpoint_writer._torch_save(host_copy(_state(weights - 1, moments / 2)), str(fresh), engine.zipfile_serialization)
        assert (target / "optim.pt").read_bytes() == fresh.read_bytes(), step
        first_pointers = first_pointers or pointers
        assert pointers == first_pointers and len(pointers) == 4  # reused, one per tensor


@pytest.mark.parametrize("held_in", ["_torch_save", "fsync_tree"])
def test_a_save_cannot_take_the_buffers_while_the_previous_write_reads_them(tmp_path, monkeypatch, held_in):
    """Refused while the files are written and while they are synced: the buffers are released once,
    when the write's thread ends."""
    reached, gate = threading.Event(), threading.Event()
    real = getattr(checkpoint_writer, held_in)
    monkeypatch.setattr(checkpoint_writer, held_in, lambda *a, **k: (reached.set(), gate.wait(10), real(*a, **k)))
    writer = CheckpointWriter(0, 1)
    engine = checkpoint_writer._snapshot_engine_class()(writer, None)
    target = tmp_path / "checkpoint-2"
    target.mkdir()
    writer.begin()
    engine.save({"t": torch.ones(3)}, str(target / "optim.pt"))
    writer.start(2, target, blocking_seconds=0.0)
    assert reached.wait(10)  # the write's thread is there
    with pytest.raises(RuntimeError, match="still in use"):
        writer.begin()  # a save that did not wait for the previous write would overwrite what it writes
    gate.set()
    writer.wait()
    writer.begin()  # free again once written
    assert writer.buffers.busy  # and this save's hold is its own
    assert torch.load(target / "optim.pt")["t"].equal(torch.ones(3))


def test_host_buffers_are_freed_after_training_and_the_pinned_cap_counts_every_block_held():
    """free() gives every buffer back and empties torch's pinned-memory cache; a pinned block is
    counted against the cap until then (a replaced buffer's block stays cached by torch)."""
    import weakref

    from qvltune.host_buffers import HostBuffers

    writer = CheckpointWriter(0, 1)
    buffers = writer.buffers
    buffers.begin()
    held = [weakref.ref(buffers.copy(t)) for t in (torch.ones(1000), torch.zeros(3, 4))]
    with pytest.raises(RuntimeError, match="still in use"):
        writer.free_buffers()  # never under a write
    buffers.release()
    assert all(r() is not None for r in held)  # kept from save to save
    writer.free_buffers()
    assert buffers.buffers == [] and buffers.pinned_bytes == 0 and all(r() is None for r in held)
    buffers.begin()  # a later save (none in the worker) would allocate again
    assert buffers.copy(torch.ones(2)).equal(torch.ones(2))
    buffers.release()

    capped = HostBuffers(pin_limit_bytes=8192)  # the accounting a GPU's pinned copies go through
    assert capped._reserve(3000) and capped.pinned_bytes == 3000
    assert capped._reserve(4096) and not capped._reserve(2000)  # past the cap: pageable
    assert capped.pinned_bytes == 7096  # nothing is given back before free()
    capped.free()
    assert capped.pinned_bytes == 0 and capped._reserve(8192)


def test_a_failed_save_leaves_the_final_model_to_the_trainers_own_save(tmp_path, tiny_model_dir):
    """A checkpoint save that raised (here: the previous save's write failed) leaves no save in
    progress behind: the final model's save_model writes the adapter files themselves, not host
    copies for a checkpoint thread that never runs."""
    from transformers import TrainingArguments

    from qvltune.checkpoint_writer import SaveParts
    from qvltune.config import parse_config
    from qvltune.model import apply_strategy, load_model
    from qvltune.trainer import make_trainer_class

    cfg = parse_config({"name": "t", "model": {"path": str(tiny_model_dir)}, "data": {"train": "d.jsonl"}, "strategy": "lora", "optim": {"bf16": False}})
    model = apply_strategy(load_model(str(tiny_model_dir), dtype="float32", attn_implementation="sdpa"), cfg)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], per_device_train_batch_size=1)
    trainer = make_trainer_class()(model=model, args=args, run_cfg=cfg)
    assert trainer._adapter_snapshot()  # a checkpoint of this model would take the snapshot path
    previous = tmp_path / "run" / "checkpoint-2"  # its write fails: the folder is gone
    trainer.checkpointer.snapshots.append(({"t": torch.ones(1)}, str(previous / "optim.pt"), checkpoint_writer._torch_save))
    trainer.checkpointer.start(2, previous, blocking_seconds=0.0)
    with pytest.raises(RuntimeError, match="does not exist"):
        trainer._save_checkpoint(trainer.model, None)  # raised by finish_saves, before the buffers are taken
    assert trainer.save_parts is None
    for name, save_parts in (("final", None), ("final-2", SaveParts())):
        trainer.save_parts = save_parts  # set without this save taking the buffers: not a checkpoint's save either
        trainer.save_model(str(tmp_path / name))
        assert (tmp_path / name / "adapter_model.safetensors").exists() and (tmp_path / name / "adapter_config.json").exists(), name


def _trained_mixed_model(tiny_model_dir):
    """(config, peft model) of the mixed strategy with every trained tensor moved: LoRA B no longer
    zero, the merger and DeepStack mergers (modules_to_save) changed."""
    from qvltune.config import parse_config
    from qvltune.model import apply_strategy, load_model

    cfg = parse_config({"name": "t", "model": {"path": str(tiny_model_dir)}, "data": {"train": "d.jsonl"}, "strategy": "mixed", "optim": {"bf16": False}})
    model = apply_strategy(load_model(str(tiny_model_dir), dtype="float32", attn_implementation="sdpa"), cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))  # trained: LoRA B is no longer zero, the mergers moved
    return cfg, model


def test_a_checkpoint_adapter_is_what_peft_saves(tmp_path, tiny_model_dir):
    """snapshot_adapter (the adapter's tensors alone, written by the thread) writes the files peft's
    save_pretrained writes from the whole model's state dict, byte for byte: the LoRA weights and the
    mixed strategy's fully trained merger and DeepStack mergers (modules_to_save)."""
    _, model = _trained_mixed_model(tiny_model_dir)
    model.save_pretrained(str(tmp_path / "peft"))
    writer = CheckpointWriter(0, 1)
    target = tmp_path / "checkpoint-2"
    writer.begin()
    checkpoint_writer.snapshot_adapter(writer, model, target)
    writer.start(2, target, blocking_seconds=0.0)
    writer.wait()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (target / name).read_bytes() == (tmp_path / "peft" / name).read_bytes(), name
    from safetensors.torch import load_file

    names = load_file(str(target / "adapter_model.safetensors"))
    assert any("lora_B" in k for k in names) and any("merger" in k and "lora_" not in k for k in names)
    assert not model.peft_config["default"].inference_mode  # the training model's config is left as it was


def test_the_final_adapter_is_saved_without_the_whole_models_state_dict(tmp_path, tiny_model_dir, monkeypatch):
    """The final model's adapter (outside a checkpoint) skips the Trainer's save_model, whose DeepSpeed
    path copies the whole model's state dict to host memory first, and its files are byte for byte
    what peft writes from that whole state dict: the LoRA weights and the mixed strategy's mergers."""
    import transformers
    from transformers import TrainingArguments

    from qvltune.trainer import make_trainer_class

    cfg, model = _trained_mixed_model(tiny_model_dir)
    trainer = make_trainer_class()(model=model, args=TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[]), run_cfg=cfg)

    def whole_model_path(*args, **kwargs):
        raise AssertionError("the Trainer's save_model (the whole model's state dict under DeepSpeed)")

    monkeypatch.setattr(transformers.Trainer, "save_model", whole_model_path)
    trainer.save_model(str(tmp_path / "final"))
    model.save_pretrained(str(tmp_path / "whole"), state_dict=model.state_dict())
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "final" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert (tmp_path / "final" / "training_args.bin").exists()


def test_pinned_snapshot_memory_is_capped_per_rank_and_counted_as_allocated(monkeypatch):
    """A quarter of the node's RAM split among its ranks, counted in the power-of-two blocks torch's
    pinned-memory allocator hands out (a 3 GiB buffer takes 4 GiB)."""
    import os

    from qvltune.host_buffers import PINNED_SHARE, pin_limit, pinned_size

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert pin_limit(1) == int(ram * PINNED_SHARE) and pin_limit(4) == int(ram * PINNED_SHARE) // 4
    monkeypatch.setenv("LOCAL_SIZE", "8")  # what DeepSpeed's launcher tells each rank
    assert pin_limit() == int(ram * PINNED_SHARE) // 8
    assert pinned_size(3 * 2**30) == 4 * 2**30 and pinned_size(4096) == 4096 and pinned_size(4097) == 8192
