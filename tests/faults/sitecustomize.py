"""Fault injection for tests/test_faults.py: loaded by every Python process of a test run through
PYTHONPATH; acts only when QVLTUNE_TEST_FAULT names a fault, and only inside the training worker.

It stands in for what cannot be produced on demand here (a full disk, a GPU out of memory, a rank
crashing, a slow disk) by patching the worker after it is imported; qvltune's own code is unchanged.

QVLTUNE_TEST_FAULT=kind:arg, kind one of
  slow_save:SECONDS       every checkpoint's final sync takes SECONDS (a window to kill mid-save)
  enospc:STEP             writing checkpoint-STEP fails with "No space left on device"
  oom:CALL                the CALL-th loss computation raises torch.OutOfMemoryError
  nan:CALL                the CALL-th loss is NaN
  die:CALL                rank 1 exits with code 17 at its CALL-th loss computation
  compile_fail:0          torch.compile's backend fails (as it does without triton or a C compiler)
"""

import functools
import importlib.abc
import importlib.machinery
import os
import sys

FAULT = os.environ.get("QVLTUNE_TEST_FAULT", "")


def _patch(worker):
    import errno
    import time

    import torch

    kind, _, arg = FAULT.partition(":")
    if kind == "slow_save":
        import qvltune.checkpoint_writer as checkpoint_writer

        original = checkpoint_writer.fsync_tree

        def slow(path):
            original(path)
            time.sleep(float(arg))

        checkpoint_writer.fsync_tree = slow  # checkpoints' sync (CheckpointWriter, before the marker)
    elif kind == "enospc":
        original_save = torch.save

        def save(obj, f, *a, **k):
            if f"checkpoint-{arg}" in str(f):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            return original_save(obj, f, *a, **k)

        torch.save = save
    elif kind == "compile_fail":

        def broken_backend(gm, example_inputs):
            raise RuntimeError("Cannot find a working triton installation (injected)")

        worker.compile_blocks = functools.partial(worker.compile_blocks, backend=broken_backend)
    elif kind in ("oom", "nan", "die"):
        make = worker.make_trainer_class
        target = int(arg)

        def make_faulty():
            base = make()

            class Faulty(base):
                calls = 0

                def compute_loss(self, model, inputs, *a, **k):
                    if model.training:
                        Faulty.calls += 1
                    hit = model.training and Faulty.calls == target
                    if hit and kind == "oom":
                        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
                    if hit and kind == "die" and os.environ.get("LOCAL_RANK") == "1":
                        os._exit(17)
                    result = super().compute_loss(model, inputs, *a, **k)
                    if hit and kind == "nan":
                        result = result * float("nan")
                    return result

            return Faulty

        worker.make_trainer_class = make_faulty


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "qvltune.worker":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = patched
        return spec


if FAULT:
    sys.meta_path.insert(0, _Hook())
