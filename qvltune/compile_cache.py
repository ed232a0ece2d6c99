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

import os
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


def cache_environment(environ: os._Environ | dict[str, str] | None = None, version: str | None = None) -> dict[str, str]:
    """The variables to set (those not set already) so that inductor and Triton cache on disk."""
    environ = os.environ if environ is None else environ
    root = Path(environ["TORCHINDUCTOR_CACHE_DIR"]) if environ.get("TORCHINDUCTOR_CACHE_DIR") else compile_cache_dir(version)
    wanted = {
        "TORCHINDUCTOR_CACHE_DIR": str(root),
        "TRITON_CACHE_DIR": str(root / "triton"),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
    }
    return {k: v for k, v in wanted.items() if not environ.get(k)}


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
