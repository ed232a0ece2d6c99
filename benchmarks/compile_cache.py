"""First compiled step with a cold and a warm compile cache (qvltune.compile_cache), on this machine.

Each run is a fresh process that builds the tiny Qwen3-VL (or --shape from gpu_throughput's shapes on
a GPU), compiles its decoder layers as ``optim.compile`` does (qvltune.compiled_layers.compile_blocks) and
times the first forward + backward of a packed batch, then the second (steady). The first run starts
from an empty cache folder, the second reuses it, as a second `qvltune train` (or a resume) does.

    python benchmarks/compile_cache.py [--runs 2] [--cache DIR] [--float-restart]

``--float-restart`` compiles as before ``compiled_layers.specialize_python_floats``: the layers' Python
floats symbolic, so Dynamo analyses each layer twice (the before of that change). Each run also
prints the first step's compile split (qvltune.compile_cache.compile_breakdown).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
t0 = time.time()
from qvltune.compile_cache import compile_breakdown, use_persistent_compile_cache
root = use_persistent_compile_cache()
import torch
from torch._dynamo.utils import compilation_time_metrics, counters
from qvltune.model import load_model
from qvltune.tiny import tiny_model_path
from qvltune.compiled_layers import compile_blocks
torch.manual_seed(0)
model = load_model(str(tiny_model_path()), dtype="float32")
model.train()
model.config.get_text_config().use_cache = False  # as in training: no KV cache (its guards would recompile)
n = compile_blocks(model)
if "--float-restart" in sys.argv:
    import torch._dynamo.config
    torch._dynamo.config.specialize_float = False
text = model.model.language_model
ids = torch.randint(0, 700, (1, 192))
def step():
    t = time.time()
    out = text(input_ids=ids).last_hidden_state
    out.float().pow(2).mean().backward()
    return time.time() - t
first = step()
second = step()
print(json.dumps({"layers": n, "first_step_s": first, "second_step_s": second, "process_s": time.time() - t0,
                  "fxgraph_hit": counters["inductor"]["fxgraph_cache_hit"], "fxgraph_miss": counters["inductor"]["fxgraph_cache_miss"],
                  "aotautograd_hit": counters["aot_autograd"]["autograd_cache_hit"], "aotautograd_miss": counters["aot_autograd"]["autograd_cache_miss"],
                  "analyses": sum(len(v) for k, v in compilation_time_metrics.items() if k.startswith("compile_attempt_")),
                  "compile": compile_breakdown()}))
"""


def run_once(cache: Path, float_restart: bool = False) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    out = subprocess.run([sys.executable, "-c", CHILD, *(["--float-restart"] if float_restart else [])], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=None, help="the compile cache folder (default: a new empty one)")
    ap.add_argument("--float-restart", action="store_true", help="the layers' floats symbolic, as before specialize_python_floats")
    args = ap.parse_args()
    cache = args.cache or Path(tempfile.mkdtemp(prefix="qvltune-compile-"))
    rows = []
    for i in range(args.runs):
        row = {"run": "cold" if i == 0 and not any(cache.iterdir()) else "warm", **run_once(cache, args.float_restart)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    keys = ["run", "first_step_s", "second_step_s", "process_s", "analyses", "fxgraph_hit", "fxgraph_miss", "aotautograd_hit", "aotautograd_miss"]
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
