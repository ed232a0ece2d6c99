"""torch.compile's caches persist in the user cache dir (qvltune.compile_cache): a second process
reuses what the first compiled instead of compiling again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from qvltune.compile_cache import cache_environment, cache_size, compile_cache_dir

CHILD = r"""
import json, time
from qvltune.compile_cache import use_persistent_compile_cache
use_persistent_compile_cache()
import torch
from torch._dynamo.utils import counters
lin = torch.nn.Linear(16, 16)
f = torch.compile(lambda x: torch.nn.functional.gelu(lin(x)).sum(), dynamic=True)
t = time.time()
f(torch.randn(4, 16)).backward()
print(json.dumps({"s": time.time() - t, "hit": counters["inductor"]["fxgraph_cache_hit"], "miss": counters["inductor"]["fxgraph_cache_miss"]}))
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


def test_a_second_process_reuses_the_first_ones_compiled_graph(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "TRITON_"))}
    env["QVLTUNE_CACHE"] = str(tmp_path)
    runs = [json.loads(subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, check=True, timeout=300).stdout.splitlines()[-1]) for _ in range(2)]
    root = next((tmp_path / "compile").iterdir())
    assert root.name.startswith("torch-") and cache_size(root) > 0  # the persistent folder, not /tmp
    assert runs[0]["miss"] >= 1 and runs[0]["hit"] == 0, runs
    assert runs[1]["hit"] >= 1 and runs[1]["miss"] == 0, runs


def test_the_worker_points_inductor_at_the_persistent_folder_before_torch_can_pick_tmp(tmp_path):
    """Inductor writes its /tmp default into the environment on first use (importing
    transformers.Trainer is enough): the worker must set the folder before that, or every run of a
    real `qvltune train` compiles into /tmp after all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "TRITON_"))}
    env["QVLTUNE_CACHE"] = str(tmp_path)
    code = "import qvltune.worker, deepspeed\nfrom transformers import Trainer\nfrom torch._inductor.runtime.cache_dir_utils import cache_dir\nprint(cache_dir())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, timeout=300).stdout.splitlines()[-1]
    assert Path(out) == tmp_path / "compile" / compile_cache_dir().name
