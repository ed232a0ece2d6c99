"""Where torch.compile keeps what it compiled, so a second run (or a resume) does not compile again.

``optim.compile`` compiles the decoder layers at the first step (1-2 minutes at 2B and 8B on an H200).
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


def compile_breakdown() -> dict[str, float | int] | None:
    """Where this process's torch.compile time went so far, and what the caches above served; None
    when nothing was compiled. Read from Dynamo's own timers and counters (without importing torch:
    an uncompiled run has none), so the first step's ``phases`` record can split its compile:

    - ``tracing_s``: Dynamo turning the layer's bytecode into a graph (and its guards); a warm cache
      does not skip it;
    - ``aot_s``: AOTAutograd tracing the joint forward/backward graph and partitioning it, or, on a
      hit of its cache, loading both compiled halves;
    - ``forward_s``, ``backward_s``: Inductor compiling each half into kernels, or loading them from
      its own cache (0 when AOTAutograd's cache served them);
    - ``kernels_wait_s``: of those, the time spent waiting for generated kernels to compile (Triton on
      a GPU, C++ on the CPU: the part a warm cache removes);
    - ``fx_hits``/``fx_misses`` (Inductor's graph cache), ``aot_hits``/``aot_misses`` (AOTAutograd's);
    - ``kernels``: the kernels of the compiled graphs (generated, or loaded from Inductor's cache);
      ``cxx_runs``/``cxx_s``: how often this process ran the C++ compiler, and those runs' seconds
      added up (runs on several threads overlap; on the 2-core CPU a cold compile of the tiny model:
      17 runs, 10.9 s, of an 11.5 s compile; on a GPU only host-side code is C++, yet an H200 run at
      2B spent 24 s of its 91 s forward compile there);
    - ``timers``: Dynamo's 16 largest timers (nested, so they overlap), for what the parts above do
      not name.

    AOTAutograd compiles the backward inside the forward's compile when the backward needs symbolic
    sizes (the decoder layers: dynamic shapes), else at the first ``backward()`` (timed apart, as
    ``backward._backward_impl``); ``aot_s`` is AOTAutograd's time less both halves either way, and
    the parts add up to the whole compile (``compile_seconds``). Timer names a torch version lacks
    read as 0."""
    import sys

    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None or not utils.counters["stats"]["unique_graphs"]:
        return None
    seconds = {name: sum(times) for name, times in utils.compilation_time_metrics.items()}
    dynamo = seconds.get("_compile.compile_inner", 0.0)  # every frame's compile, the backend's included
    backend = seconds.get("OutputGraph.call_user_compiler", 0.0)
    forward = seconds.get("compile_fx.<locals>.fw_compiler_base", 0.0)
    backward = seconds.get("compile_fx.<locals>.bw_compiler", 0.0)
    lazy = seconds.get("backward._backward_impl", 0.0)  # a backward compiled at its first call (holds bw_compiler)
    inductor, aot = utils.counters["inductor"], utils.counters["aot_autograd"]
    return {
        "graphs": int(utils.counters["stats"]["unique_graphs"]),
        "tracing_s": round(max(0.0, dynamo - backend), 3),
        "aot_s": round(max(0.0, backend + lazy - forward - backward), 3),  # the whole compile (dynamo + lazy) less the other parts
        "forward_s": round(forward, 3),
        "backward_s": round(backward, 3),
        "kernels_wait_s": round(seconds.get("async_compile.wait", 0.0), 3),
        "fx_hits": int(inductor["fxgraph_cache_hit"]),
        "fx_misses": int(inductor["fxgraph_cache_miss"]),
        "aot_hits": int(aot["autograd_cache_hit"]),
        "aot_misses": int(aot["autograd_cache_miss"]),
        "kernels": _generated_kernels(),
        "cxx_runs": len(utils.compilation_time_metrics.get("compile_file", ())),
        "cxx_s": round(seconds.get("compile_file", 0.0), 3),
        "timers": {name: round(s, 3) for name, s in sorted(seconds.items(), key=lambda kv: -kv[1])[:16]},
    }


def _generated_kernels() -> int | None:
    """Kernels Inductor generated in this process; None where this torch does not count them."""
    import sys

    count = getattr(sys.modules.get("torch._inductor.metrics"), "generated_kernel_count", None)
    return int(count) if count is not None else None


def compile_seconds(breakdown: dict[str, float | int] | None) -> float:
    """The whole compile of a ``compile_breakdown``: its parts added up (0 without one)."""
    if not breakdown:
        return 0.0
    return float(breakdown["tracing_s"] + breakdown["aot_s"] + breakdown["forward_s"] + breakdown["backward_s"])
