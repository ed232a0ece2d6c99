"""The estimator's predicted peak (qvltune.estimate) next to the peaks measured by gpu_throughput.py.

Rebuilds each measured variant's run config and the same synthetic data (deterministic), predicts
`torch.cuda.max_memory_allocated` for one H200, and prints predicted vs measured (the measured
figures are copied from benchmarks/results/gpu-run*.json). Runs on a CPU in about a minute.

    python benchmarks/estimate_vs_throughput_runs.py
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import gpu_throughput as g
from qvltune.config import parse_config
from qvltune.estimate import estimate, model_stats, Machine, workload_for, summarize_report, GiB
from qvltune.data.check import check_dataset
from qvltune.model import load_processor
data = g.make_data(Path("/tmp/qvltune-estimate-cmp/data"), 400)
measured = {"2b-mixed-plain": 18.18, "2b-mixed-qvltune": 40.01, "2b-full-plain": 36.34, "2b-full-qvltune": 54.8, "8b-mixed-plain": 33.89, "8b-mixed-qvltune": 99.76}
machine = Machine("NVIDIA H200", int(139.8 * GiB), 1, 1, None, 989.0, True)
print("| variant | predicted GiB | measured GiB | error |\n|---|---|---|---|")
for name, meas in measured.items():
    shape, strategy, variant = name.split("-")
    model = g.make_model_folder(Path(f"/tmp/qvltune-estimate-cmp/model-{shape}"), shape)
    cfg = parse_config(g.run_config(name, model, data, Path("/tmp/qvltune-estimate-cmp"), strategy, variant, 14, True, False))
    lo, hi = cfg.data.pixel_budget()
    rep = check_dataset(str(data), processor=load_processor(str(model), lo, hi), max_seq_length=8192)
    ds = summarize_report(rep, lo, hi)
    cfgj = json.loads((model / "config.json").read_text())
    est = estimate(cfg, model_stats(cfgj), machine, workload_for(cfg, ds))
    p = est.peak_allocated / GiB
    print(f"| {name} | {p:.1f} | {meas:.1f} | {100*(p-meas)/meas:+.0f}% |")
