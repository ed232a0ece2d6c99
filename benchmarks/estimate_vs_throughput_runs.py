"""Predicted (qvltune.estimate) vs measured peak memory of the GPU training runs recorded in
RESULTS.md (gpu_throughput.py's 8k-row runs and multi_gpu.py's runs), recomputed for the same
configs and data on any CPU:

    python benchmarks/estimate_vs_throughput_runs.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import gpu_throughput as gt
import multi_gpu as mg

from qvltune.config import parse_config
from qvltune.data.check import check_dataset
from qvltune.estimate import GiB, Machine, estimate, model_stats, summarize_report, workload_for
from qvltune.model import load_processor

WORK = Path("/tmp/qvltune-estimate-cmp")
# max torch.cuda.max_memory_allocated (GiB, rank 0) of each run, from benchmarks/results/*.json.
THROUGHPUT_RUNS = {"2b-mixed-plain": 18.18, "2b-mixed-qvltune": 40.01, "2b-full-plain": 36.34, "2b-full-qvltune": 54.8, "8b-mixed-plain": 33.89, "8b-mixed-qvltune": 99.76}
MULTI_GPU_RUNS = {"1gpu-z2": 70.42, "2gpu-z2": 68.89, "2gpu-z3": 77.39, "2gpu-z3-offload": 76.28}


def throughput_config(name: str, model: Path, data: Path) -> dict:
    """The configs of those runs: plain as gpu_throughput.py builds it; qvltune then ran packed 8k
    rows, one per step, without checkpointing (before the planner chose longer rows)."""
    shape, strategy, variant = name.split("-")
    doc = gt.run_config(name, model, data, WORK, strategy, variant, 14, False, None, 64)
    if variant == "qvltune":
        doc["data"]["max_seq_length"] = 8192
        doc["optim"].update(grad_accum=1, gradient_checkpointing=False)
    return doc


def main() -> None:
    data = gt.make_data(WORK / "data", 400)
    print("| run | predicted GiB | measured GiB | error |\n|---|---|---|---|")
    for name, measured in THROUGHPUT_RUNS.items():
        shape = name.split("-")[0]
        model = gt.make_model_folder(WORK / f"model-{shape}", shape)
        cfg = parse_config(throughput_config(name, model, data))
        lo, hi = cfg.data.pixel_budget()
        report = check_dataset(str(data), processor=load_processor(str(model), lo, hi), max_seq_length=8192)
        machine = Machine("NVIDIA H200", int(139.8 * GiB), 1, 1, None, 989.0, True)
        est = estimate(cfg, model_stats(json.loads((model / "config.json").read_text())), machine, workload_for(cfg, summarize_report(report, lo, hi)))
        predicted = est.peak_allocated / GiB
        print(f"| {name} (1 GPU) | {predicted:.1f} | {measured:.1f} | {100 * (predicted - measured) / measured:+.0f}% |")
    model = gt.make_model_folder(WORK / "model-2b", "2b")
    base = gt.planned_doc(model, data, "mixed", 64)
    for name, measured in MULTI_GPU_RUNS.items():
        doc = mg.variant_doc(name, base, WORK, 10, None)
        predicted = mg.predicted_gib(doc, model, mg.VARIANTS[name][0])
        print(f"| 2b-mixed {name} (16k rows) | {predicted:.1f} | {measured:.1f} | {100 * (predicted - measured) / measured:+.0f}% |")


if __name__ == "__main__":
    main()
