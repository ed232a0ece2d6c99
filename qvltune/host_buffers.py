"""Host memory for checkpoint snapshots, kept from one save to the next (used by checkpoint_writer).

A save copies the trained state (adapters, trained modules, DeepSpeed's fp32 master weights and Adam
moments) from the GPU to host memory before training goes on. Copied into fresh pageable memory
(``tensor.to("cpu")``) that costs a page fault per 4 KiB and a staged, synchronous transfer per
tensor, every save; copied into page-locked (pinned) buffers that were allocated at the first save,
the transfers run at the link's speed, queued without waiting (``non_blocking``), and one
synchronisation ends them all (about ten times faster on an H200).

The buffers are reused in the order the tensors come: a save walks the same state in the same order
each time, so the i-th tensor finds the i-th buffer of its shape and dtype (a new one otherwise).
Only one save is ever in flight (the next one waits for the previous write: CheckpointWriter.wait),
so the buffers are free again when the next save begins; ``begin`` refuses them while a write may
still read them. Pinned memory cannot be swapped out: at most ``pin_limit`` bytes are pinned (a
share of the node's RAM split among its ranks, counted in the power-of-two blocks torch's pinned
allocator hands out), the rest are pageable buffers, reused all the same. The first save allocates
(and pins) them: it waits longer than the saves after it. They are held from save to save for the
whole of training; ``free`` gives them back once its last checkpoint is written (before the final
model is saved: under ZeRO-3 rank 0 gathers the whole 16-bit model in host memory then).
"""

from __future__ import annotations

import os
import threading

import torch

PINNED_SHARE = 0.25  # of the node's RAM, split among the ranks of the node, at most pinned for snapshots


def pin_limit(local_ranks: int | None = None) -> int:
    """Bytes of host memory this rank may pin for snapshots: ``PINNED_SHARE`` of the node's RAM
    divided among its ranks (``LOCAL_SIZE`` from DeepSpeed's launcher, ``LOCAL_WORLD_SIZE`` from torchrun)."""
    if local_ranks is None:
        local_ranks = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or "1")
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0
    return int(ram * PINNED_SHARE) // max(local_ranks, 1)


class HostBuffers:
    """One rank's snapshot buffers (see the module docstring)."""

    def __init__(self, pin_limit_bytes: int | None = None):
        self.limit = pin_limit() if pin_limit_bytes is None else pin_limit_bytes
        self.buffers: list[torch.Tensor] = []
        self.pinned_bytes = 0
        self.next = 0
        self.pending_device_copies = False  # non-blocking copies queued since begin(): synchronize() waits for them
        self._busy = threading.Lock()  # held from begin() until release(): the save's write reads the buffers

    def begin(self) -> None:
        """A save starts using the buffers from the first; an error if the last save's write has not
        released them (it could still be reading them)."""
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("checkpoint snapshot buffers are still in use by the previous save's write")
        self.next = 0

    def release(self) -> None:
        """The save's files are written (or it failed): the next save may overwrite the buffers."""
        if self._busy.locked():
            self._busy.release()

    @property
    def busy(self) -> bool:
        return self._busy.locked()

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``'s values in the next host buffer (same shape, dtype and layout: the files are
        byte for byte those of ``tensor.to("cpu")``)."""
        if not self.busy:
            raise RuntimeError("HostBuffers.copy outside a save (call begin() first)")
        i, self.next = self.next, self.next + 1
        buf = self.buffers[i] if i < len(self.buffers) else None
        if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype or buf.stride() != _layout(tensor):
            buf = self._allocate(tensor)
            if i < len(self.buffers):
                self.buffers[i] = buf
            else:
                self.buffers.append(buf)
        non_blocking = tensor.is_cuda and buf.is_pinned()
        buf.copy_(tensor.detach(), non_blocking=non_blocking)
        self.pending_device_copies |= non_blocking
        return buf

    def synchronize(self) -> None:
        """Wait for the queued device-to-host copies (one synchronisation for the whole save)."""
        if self.pending_device_copies:
            torch.cuda.synchronize()
            self.pending_device_copies = False

    def free(self) -> None:
        """Give the buffers back (training's last checkpoint is written): the pageable ones to the
        allocator, the pinned ones through torch's pinned-memory cache, emptied here."""
        if self.busy:
            raise RuntimeError("checkpoint snapshot buffers are still in use by a save's write")
        self.buffers, self.next, self.pending_device_copies = [], 0, False
        empty_host_cache()
        self.pinned_bytes = 0

    def _allocate(self, tensor: torch.Tensor) -> torch.Tensor:
        pin = tensor.is_cuda and self._reserve(pinned_size(tensor.numel() * tensor.element_size()))
        return torch.empty_like(tensor, device="cpu", pin_memory=pin)  # its layout, as tensor.to("cpu") keeps it

    def _reserve(self, size: int) -> bool:
        """Count ``size`` pinned bytes against the cap; False (pageable instead) past it. A replaced
        pinned buffer gives nothing back: torch's pinned-memory allocator keeps its block cached (it
        stays pinned) until ``free`` empties the cache."""
        if self.pinned_bytes + size > self.limit:
            return False
        self.pinned_bytes += size
        return True


def empty_host_cache() -> None:
    """Return the unused blocks of torch's pinned-memory cache to the system (a private torch call,
    ``torch._C._host_emptyCache``: guarded, a torch without it keeps its cache)."""
    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


def pinned_size(nbytes: int) -> int:
    """The pinned memory a buffer of ``nbytes`` takes: torch's pinned-memory allocator rounds every
    block up to a power of two, so that is what counts against the cap."""
    return 1 << max(nbytes - 1, 0).bit_length() if nbytes > 0 else 0


def _layout(tensor: torch.Tensor) -> tuple[int, ...]:
    """The strides a host copy of ``tensor`` gets (``empty_like``: kept when dense, else contiguous)."""
    return torch.empty_like(tensor, device="meta").stride()


def host_copy(item, buffers: HostBuffers | None = None):
    """A copy of ``item`` with every tensor copied to host memory (into ``buffers`` when given) and
    every container rebuilt as its own type. By hand rather than DeepSpeed's
    ``clone_tensors_for_torch_save``: that one turns every tuple subclass into a plain tuple, and
    ZeRO-3's saved ``param_shapes`` (``torch.Size``) then break ``zero_to_fp32`` (``shape.numel()``),
    so a checkpoint could not be gathered from its shards."""
    if torch.is_tensor(item):
        if buffers is not None:
            return buffers.copy(item)
        return item.detach().to("cpu", copy=True)
    if isinstance(item, torch.Size):
        return item  # immutable, holds no tensor
    if isinstance(item, dict):
        return type(item)((k, host_copy(v, buffers)) for k, v in item.items())
    if isinstance(item, list):
        return [host_copy(v, buffers) for v in item]
    if isinstance(item, tuple):
        values = [host_copy(v, buffers) for v in item]
        return type(item)(*values) if hasattr(item, "_fields") else type(item)(values)
    return item
