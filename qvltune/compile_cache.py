"""Where torch.compile keeps what it compiled, so a second run (or a resume) does not compile again.

``optim.compile`` compiles the decoder layers at the first step (about a minute for 8B on an H200).
Inductor can reuse that work from disk: its FX graph cache (the generated kernels of a graph),
the AOTAutograd cache (the joint forward/backward graph) and Triton's cache (compiled kernels).
By default they live in ``/tmp/torchinductor_<user>``, which a reboot, a fresh container or a
cluster node's cleanup empties; qvltune puts them in the user cache dir instead:

    ~/.cache/qvltune/compile/torch-<version>/   (QVLTUNE_CACHE or XDG_CACHE_HOME move it)
        fxgraph/, aotautograd/, triton/ ...    (written by torch; safe to delete at any time)

One folder per torch version, so two environments never read each other's entries (inductor keys
its entries by version too; the folder keeps an upgraded environment from reading, and growing, the
old one's). Variables a user already set win: they are torch's documented switches
(``TORCHINDUCTOR_CACHE_DIR``, ``TRITON_CACHE_DIR``, ``TORCHINDUCTOR_FX_GRAPH_CACHE``,
``TORCHINDUCTOR_AUTOGRAD_CACHE``). Torch-free: the parent and ``qvltune doctor`` may call it.
"""

from __future__ import annotations

import getpass
import os
import re
import tempfile
from importlib import metadata
from pathlib import Path

from qvltune.tiny import cache_dir

CACHE_ENV = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE")


def torch_version() -> str:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "unknown"


def compile_cache_dir(version: str | None = None) -> Path:
    """This torch version's compile cache folder under the user cache dir."""
    tag = (version or torch_version()).replace("+", "-").replace("/", "-")
    return cache_dir() / "compile" / f"torch-{tag}"


def torch_default_dir() -> str:
    """Inductor's own default folder (``/tmp/torchinductor_<user>``), as torch computes it."""
    try:
        user = getpass.getuser()
    except (KeyError, ModuleNotFoundError, OSError):
        user = f"uid_{os.getuid()}" if hasattr(os, "getuid") else "unknown_user"
    return os.path.join(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))


def cache_environment(environ: os._Environ | dict[str, str] | None = None, version: str | None = None) -> dict[str, str]:
    """The variables to set (those not set already) so that inductor and Triton cache on disk.

    A ``TORCHINDUCTOR_CACHE_DIR`` equal to torch's own /tmp default counts as unset: inductor writes
    it into the environment on first use (``from transformers import Trainer`` is enough), so a
    parent process that imported transformers hands it down to the ranks as if a user had chosen it."""
    environ = os.environ if environ is None else environ
    chosen = environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and os.path.abspath(chosen) == torch_default_dir():
        chosen = None
    root = Path(chosen) if chosen else compile_cache_dir(version)
    wanted = {
        "TORCHINDUCTOR_CACHE_DIR": str(root),
        "TRITON_CACHE_DIR": str(root / "triton"),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
    }
    return {k: v for k, v in wanted.items() if not environ.get(k) or (k == "TORCHINDUCTOR_CACHE_DIR" and not chosen)}


def use_persistent_compile_cache(environ: os._Environ | dict[str, str] | None = None) -> Path:
    """Point torch's compile caches at the persistent folder; returns it. Call it before torch is
    imported: inductor reads ``TORCHINDUCTOR_CACHE_DIR`` on first use and, when it is unset, writes
    its ``/tmp`` default into the environment (importing DeepSpeed is enough), which this function
    would then take for the user's own choice."""
    environ = os.environ if environ is None else environ
    for key, value in cache_environment(environ).items():
        environ[key] = value
    root = Path(environ["TORCHINDUCTOR_CACHE_DIR"])
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_size(root: Path | None = None) -> int:
    """Bytes in the compile cache folder (0 when there is none)."""
    root = root or compile_cache_dir()
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, name))
            except OSError:
                pass
    return total
