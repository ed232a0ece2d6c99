"""The model's weights read into the page cache while the worker imports torch and transformers.

A worker spends its first seconds importing (torch, DeepSpeed, transformers, peft: 11-19 s on the
H200 machine, one CPU core busy, the disk idle) before ``from_pretrained`` reads the weights: 16 GB
at 8B, ~8 s at 2 GB/s from a disk whose page cache does not hold them (a fresh machine, or weights
just downloaded to another disk). The first local rank of each node asks the kernel to read the
files ahead (``posix_fadvise(WILLNEED)``) as its first act, from a thread, so the reads overlap the
imports and the load finds the weights in memory. Torch-free: it runs before torch is imported.

Only a local model folder is read ahead: a Hub id is resolved by ``from_pretrained`` later, and a
built-in tiny model has no weight files.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from qvltune.rank import run_dir_arg


def weight_files(model_path: str | os.PathLike | None) -> list[Path]:
    """The weight files of a local model folder (largest first: they take longest): its
    ``*.safetensors``, else its ``*.bin``; [] for anything else."""
    if not model_path:
        return []
    folder = Path(model_path)
    if not folder.is_dir():
        return []
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    return sorted((p for p in files if p.is_file()), key=lambda p: p.stat().st_size, reverse=True)


def read_ahead(files: list[Path]) -> None:
    """Ask the kernel to read ``files`` into the page cache (the calls may block while the reads are
    queued)."""
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def model_path_of_run(argv: list[str]) -> str | None:
    """``model.path`` of the run a worker was started for (``--run-dir DIR``: DIR/config.yaml, which
    ``qvltune train`` writes before it starts any rank); None when it cannot be read."""
    run_dir = run_dir_arg(argv)
    if run_dir is None:
        return None
    try:
        import yaml

        doc = yaml.safe_load((run_dir / "config.yaml").read_text())
        return str(doc["model"]["path"])
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return None


def start_for_worker(argv: list[str], environ: os._Environ | dict[str, str] | None = None) -> threading.Thread | None:
    """The worker's first act: a daemon thread that finds its model's weights and reads them ahead,
    on the first local rank of a node only (its peers read the same files; one reader is enough to
    fill the page cache). Everything happens in the thread, so nothing here can stop a rank: a
    folder it cannot list is only a read-ahead not done."""
    env = os.environ if environ is None else environ
    if env.get("LOCAL_RANK", "0") != "0" or not hasattr(os, "posix_fadvise"):
        return None

    def run() -> None:
        try:
            read_ahead(weight_files(model_path_of_run(argv)))
        except OSError:
            pass

    thread = threading.Thread(target=run, name="qvltune-weights-read-ahead", daemon=True)
    thread.start()
    return thread
