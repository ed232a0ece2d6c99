"""Predicted (qvltune.estimate) vs measured peak memory of the GPU training runs recorded in
RESULTS.md (gpu_throughput.py's and multi_gpu.py's runs), recomputed for the same configs and data
on any CPU:

    python benchmarks/estimate_vs_throughput_runs.py

Each run is pinned to the rows it ran with (the planner has since chosen longer rows for some).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import gpu_throughput as gt
import multi_gpu as mg

from qvltune.config import parse_config
from qvltune.data.check import CheckOptions, check_dataset
from qvltune.estimate import estimate
from qvltune.estimate_inputs import Machine, summarize_report, workload_for
from qvltune.model import load_processor
from qvltune.model_stats import model_stats
from qvltune.units import GiB

WORK = Path("/tmp/qvltune-estimate-cmp")

# (label, shape, strategy, variant, packed row tokens, accumulation, compiled, measured GiB): max
# torch.cuda.max_memory_allocated of rank 0, from benchmarks/results/*.json. Rows, accumulation and
# compile are pinned for the `qvltune` variant only; the others fix their own.
THROUGHPUT_RUNS = [
    ("plain recipe, padded batch of 4", "2b", "mixed", "plain", None, None, False, 18.18),
    ("plain recipe, padded batch of 4", "2b", "full", "plain", None, None, False, 36.34),
    ("plain recipe, padded batch of 4", "8b", "mixed", "plain", None, None, False, 33.89),
    ("packed 8k rows, eager", "2b", "mixed", "qvltune", 8192, 1, False, 40.01),
    ("packed 8k rows, eager", "2b", "full", "qvltune", 8192, 1, False, 54.8),
    ("packed 8k rows, eager", "8b", "mixed", "qvltune", 8192, 1, False, 99.76),
    ("packed 16k rows, compiled", "2b", "mixed", "qvltune", 16384, 4, True, 59.04),
    ("packed 16k rows, compiled", "2b", "full", "qvltune", 16384, 4, True, 66.73),
    ("packed 8k rows, compiled", "8b", "mixed", "qvltune", 8192, 7, True, 85.76),
    ("packed 32k rows, compiled", "2b", "mixed", "qvltune", 32768, 2, True, 108.55),
    ("packed 32k rows, compiled", "2b", "full", "qvltune", 32768, 2, True, 101.02),
    ("packed 32k rows, compiled", "2b", "lora", "qvltune", 32768, 2, True, 103.88),
    ("plain recipe, padded batch of 4", "2b", "lora", "plain", None, None, False, 16.65),
    ("packed 8k rows, compiled", "8b", "lora", "qvltune", 8192, 7, True, 82.52),
    ("plain recipe, padded batch of 4", "8b", "lora", "plain", None, None, False, 31.54),
    ("packed 4k rows, compiled", "30b-a3b", "lora", "qvltune", 4096, 16, True, 87.26),
    ("packed 4k rows, eager", "30b-a3b", "lora", "qvltune", 4096, 16, False, 92.72),
    ("plain recipe, padded batch of 4", "30b-a3b", "lora", "plain", None, None, False, 70.85),
    ("packed 8k rows, checkpointing, eager", "2b", "mixed", "qvltune-8k-checkpointed", None, None, False, 11.01),
    ("packed 8k rows, checkpointing, eager", "8b", "mixed", "qvltune-8k-checkpointed", None, None, False, 28.255),
]
# (label, multi_gpu variant, compiled, measured GiB): 2B mixed, packed 16k rows, 4 rows per step.
MULTI_GPU_RUNS = [
    ("eager", "1gpu-z2", False, 70.42),
    ("eager", "2gpu-z2", False, 68.89),
    ("per-module gathers", "2gpu-z3", False, 77.39),
    ("per-module gathers", "2gpu-z3-offload", False, 76.28),
    ("compiled", "1gpu-z2", True, 59.04),
    ("compiled", "2gpu-z2", True, 57.52),
    ("block gathers", "2gpu-z3", False, 77.65),
    ("block gathers", "2gpu-z3-offload", False, 76.53),
]
# Equal tokens per micro-batch: the plain recipe vs qvltune's path with the plain recipe's memory
# settings (gpu_throughput.py's qvltune-8k-checkpointed: 8,192-token rows, checkpointing on), same
# image tokens and answer share, predicted.
H200 = Machine("NVIDIA H200", int(139.8 * GiB), 1, 1, None, 989.0, True)


def row(label: str, predicted: float, measured: float) -> str:
    return f"| {label} | {predicted:.1f} | {measured:.1f} | {100 * (predicted - measured) / measured:+.0f}% |"


def main() -> None:
    data = gt.make_data(WORK / "data", 400)
    print("| run | predicted GiB | measured GiB | error |\n|---|---|---|---|")
    for label, shape, strategy, variant, rows, accum, compiled, measured in THROUGHPUT_RUNS:
        model = gt.make_model_folder(WORK / f"model-{shape}", shape)
        doc = gt.run_config("run", model, data, WORK, strategy, variant, 14, False, None, 64)
        if variant == "qvltune":
            doc["data"]["max_seq_length"] = rows
            doc["optim"].update(grad_accum=accum, gradient_checkpointing=False, compile=compiled)
        cfg = parse_config(doc)
        lo, hi = cfg.data.pixel_budget()
        report = check_dataset(str(data), CheckOptions(processor=load_processor(str(model), lo, hi), max_seq_length=cfg.data.max_seq_length))
        est = estimate(cfg, model_stats(json.loads((model / "config.json").read_text())), H200, workload_for(cfg, summarize_report(report, lo, hi)))
        print(row(f"{shape.upper()} {strategy}, {label}, 1 GPU", est.peak_allocated / GiB, measured))
    model = gt.make_model_folder(WORK / "model-2b", "2b")
    base = gt.planned_doc(model, data, "mixed", 64)
    base["data"]["max_seq_length"] = 16384
    base["optim"]["grad_accum"] = 4
    for label, name, compiled, measured in MULTI_GPU_RUNS:
        doc = mg.variant_doc(name, base, WORK, 10, None)
        doc["optim"]["compile"] = compiled
        gpus, stage, offload = mg.VARIANTS[name]
        print(row(f"2B mixed, 16k rows, {gpus} GPU{'s' if gpus > 1 else ''}, ZeRO-{stage}{' + offload' if offload else ''}, {label}", mg.predicted_gib(doc, model, gpus), measured))
    print("\n| 8,192 tokens per micro-batch, checkpointing on | plain recipe (padded, sdpa, full logits) | qvltune (packed, varlen, fused loss) | qvltune compiled |\n|---|---|---|---|")
    for shape, strategy in (("2b", "mixed"), ("2b", "full"), ("8b", "mixed")):
        model = gt.make_model_folder(WORK / f"model-{shape}", shape)
        stats = model_stats(json.loads((model / "config.json").read_text()))
        ours = gt.run_config("run", model, data, WORK, strategy, "qvltune-8k-checkpointed", 14, False, None, 64)
        cfg = parse_config(ours)
        lo, hi = cfg.data.pixel_budget()
        wl = workload_for(cfg, summarize_report(check_dataset(str(data), CheckOptions(processor=load_processor(str(model), lo, hi), max_seq_length=cfg.data.max_seq_length)), lo, hi))
        plain = parse_config(gt.run_config("run", model, data, WORK, strategy, "plain", 14, False, None, 64))
        compiled = parse_config({**ours, "optim": {**ours["optim"], "compile": True}})
        gib = [estimate(c, stats, H200, wl).peak_allocated / GiB for c in (plain, cfg, compiled)]
        print(f"| {shape.upper()} {strategy} | {gib[0]:.1f} GiB | {gib[1]:.1f} GiB | {gib[2]:.1f} GiB |")


if __name__ == "__main__":
    main()
