"""torch.compile's caches persist in the user cache dir (qvltune.compile_cache): a second process
reuses what the first compiled instead of compiling again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from qvltune.compile_cache import cache_environment, cache_size, compile_cache_dir, torch_default_dir

# What a worker does: qvltune.worker sets the cache folder on import; transformers' Trainer is
# imported after it (that import makes inductor fix its /tmp default if nothing is set by then).
CHILD = r"""
import json
import qvltune.worker
from transformers import Trainer
import torch
from torch._dynamo.utils import counters
from torch._inductor.runtime.cache_dir_utils import cache_dir
import time
from qvltune.compile_cache import compile_breakdown, compile_seconds
f = torch.compile(lambda x: torch.sin(x) * 2 + 1)
t = time.perf_counter()
f(torch.randn(8, requires_grad=True)).sum().backward()  # the first call compiles both halves
first = time.perf_counter() - t
print(json.dumps({"dir": cache_dir(), "hit": counters["inductor"]["fxgraph_cache_hit"], "miss": counters["inductor"]["fxgraph_cache_miss"],
                  "first": first, "breakdown": compile_breakdown(), "parts": compile_seconds(compile_breakdown())}))
"""


def test_one_folder_per_torch_version_and_the_users_own_settings_win(tmp_path, monkeypatch):
    monkeypatch.setenv("QVLTUNE_CACHE", str(tmp_path))
    assert compile_cache_dir("2.14.1+cu130") == tmp_path / "compile" / "torch-2.14.1-cu130"
    assert compile_cache_dir("2.14.1+cu130") != compile_cache_dir("2.15.0+cu130")
    env = cache_environment({}, "2.14.1")
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compile" / "torch-2.14.1")
    assert env["TRITON_CACHE_DIR"] == str(tmp_path / "compile" / "torch-2.14.1" / "triton")
    assert env["TORCHINDUCTOR_FX_GRAPH_CACHE"] == env["TORCHINDUCTOR_AUTOGRAD_CACHE"] == "1"
    # A folder the user chose is kept, and Triton's goes inside it.
    mine = cache_environment({"TORCHINDUCTOR_CACHE_DIR": "/scratch/ind", "TORCHINDUCTOR_FX_GRAPH_CACHE": "0"}, "2.14.1")
    assert "TORCHINDUCTOR_CACHE_DIR" not in mine and "TORCHINDUCTOR_FX_GRAPH_CACHE" not in mine
    assert mine["TRITON_CACHE_DIR"] == "/scratch/ind/triton"
    # torch's own /tmp default, written into the environment by an import in a parent process, is not a choice.
    inherited = cache_environment({"TORCHINDUCTOR_CACHE_DIR": torch_default_dir()}, "2.14.1")
    assert inherited["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compile" / "torch-2.14.1")


def test_a_second_worker_process_reuses_what_the_first_compiled_from_the_user_cache_dir(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "TRITON_"))}
    env["QVLTUNE_CACHE"] = str(tmp_path)
    runs = [json.loads(subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, check=True, timeout=300).stdout.splitlines()[-1]) for _ in range(2)]
    root = tmp_path / "compile" / compile_cache_dir().name
    # Inductor's folder is the persistent one (not /tmp), though Trainer was imported: the worker set it first.
    assert all(Path(r["dir"]) == root for r in runs), runs
    assert cache_size(root) > 0
    assert runs[0]["miss"] >= 1 and runs[0]["hit"] == 0, runs
    assert runs[1]["hit"] >= 1 and runs[1]["miss"] == 0, runs
    # The first step's compile, split (qvltune.compile_cache.compile_breakdown): the parts account
    # for the first call's time (it is almost all compiling), each cache's hits and misses as seen.
    for run in runs:
        b = run["breakdown"]
        parts = run["parts"]
        assert 0.7 * run["first"] <= parts <= run["first"] * 1.02, run
        assert b["graphs"] == 1 and b["kernels_wait_s"] <= parts, run
        assert (b["fx_hits"], b["fx_misses"]) == (run["hit"], run["miss"]), run
    cold, warm = runs[0]["breakdown"], runs[1]["breakdown"]
    assert cold["forward_s"] > 0 and cold["backward_s"] > 0 and cold["aot_misses"] >= 1, runs
    # On the CPU the kernels are C++: the compiler's runs are counted (their seconds added up).
    assert cold["kernels"] > 0 and cold["cxx_runs"] >= 2 and cold["cxx_s"] > 0, runs
    # Cold, the first call is all compiling: the parts hold all of it, also when (as here, static
    # shapes) the backward compiles at the first backward(), outside the forward's compile.
    assert runs[0]["parts"] >= 0.95 * runs[0]["first"], runs
    # Warm, AOTAutograd's cache hands both compiled halves over: Inductor compiles neither.
    assert warm["forward_s"] == warm["backward_s"] == 0 and warm["aot_hits"] >= 1 and warm["aot_misses"] == 0, runs
