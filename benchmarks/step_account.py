"""Where a training step's time goes, by arithmetic: the steady-state runs on record (one H200),
their step's FLOPs by part (qvltune.step_flops, on the same data and config), and what share of
the measured step each part would take at the H200's measured matmul limit. Any CPU:

    python benchmarks/step_account.py [--samples 2400] [--limit-tflops 790]

The 6N rule of the MFU figure counts neither attention nor the vision tower, and it counts weight
gradients that LoRA and mixed skip; this table counts what the step computes. The share no part
takes is time the GPU spent below the matmul limit (matmuls that run below it, attention and
elementwise kernels, the optimizer, gaps between kernels): a profile of the step
(`schedule.profile_steps`, its profile.txt "by kind of kernel" table) splits it further.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import gpu_throughput as gt
import wall_clock as wc

from qvltune.config import parse_config
from qvltune.data.check import CheckOptions, check_dataset
from qvltune.estimate_inputs import summarize_report, workload_for
from qvltune.model import load_processor
from qvltune.model_stats import model_stats
from qvltune.pixels import TOKEN_PIXELS
from qvltune.step_flops import step_parts, total

WORK = Path("/tmp/qvltune-step-account")
H200_PEAK_TFLOPS = 989.0  # bf16 dense, the MFU figure's denominator

# (label, shape, strategy, mix, packed row tokens, accumulation, measured real tok/s, where, target):
# the steady steps of the current defaults (compiled decoder layers, no checkpointing).
RUNS = [
    ("2B mixed", "2b", "mixed", "bench", 32768, 2, 35_600, "wallclock/2b-bench-epoch-node-ranks.json (cold)", 40_000),
    ("2B full", "2b", "full", "bench", 32768, 2, 26_802, "gpu-run8.json, beside another run", 32_000),
    ("8B mixed", "8b", "mixed", "bench", 8192, 7, 10_357, "wallclock/8b-bench-epoch.json (cold)", 13_500),
    ("8B mixed, the issue's mix", "8b", "mixed", "issue", 8192, 7, 9_700, "the independent measurement quoted in issue 21 (median)", 12_000),
    ("8B lora", "8b", "lora", "bench", 8192, 7, 11_730, "gpu-run8.json, beside another run", None),
    ("30B-A3B lora", "30b-a3b", "lora", "bench", 4096, 16, 10_519, "gpu-run8.json, beside another run", 15_000),
]


def account(shape: str, strategy: str, mix: str, row_tokens: int, accumulation: int, samples: int):
    """(parts, 6N per token) of one run's config on its data."""
    data = wc.make_issue_data(WORK / f"data-issue-{samples}", samples) if mix == "issue" else gt.make_data(WORK / f"data-bench-{samples}", samples)
    model = gt.make_model_folder(WORK / f"model-{shape}", shape)
    doc = gt.planned_doc(model, data, strategy, 64)
    doc["data"]["max_seq_length"] = row_tokens
    if mix == "issue":  # its images keep their size up to 1280x960 (`init --max-image-tokens 1200`)
        doc["data"]["max_pixels"] = wc.ISSUE_MAX_IMAGE_TOKENS * TOKEN_PIXELS
    doc["optim"].update(grad_accum=accumulation, effective_batch=accumulation, gradient_checkpointing=False, compile=True)
    cfg = parse_config(doc)
    lo, hi = cfg.data.pixel_budget()
    report = check_dataset(str(data), CheckOptions(processor=load_processor(str(model), lo, hi), max_seq_length=row_tokens))
    stats = model_stats(json.loads((model / "config.json").read_text()))
    return step_parts(cfg, stats, workload_for(cfg, summarize_report(report, lo, hi))), 6 * stats.llm_active_params()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=2400)
    ap.add_argument("--limit-tflops", type=float, default=790.0, help="an H200's bf16 matmul limit (benchmarks/matmul_limit.py measures it)")
    args = ap.parse_args()
    limit = args.limit_tflops * 1e12
    for label, shape, strategy, mix, row_tokens, accum, measured, where, target in RUNS:
        parts, rule = account(shape, strategy, mix, row_tokens, accum, args.samples)
        step = total(parts)
        print(f"\n### {label}, {row_tokens:,}-token rows x {accum}: {measured:,} real tok/s measured ({where})\n")
        print(f"6N: {rule / 1e9:.1f} GFLOP per token, MFU {rule * measured / (H200_PEAK_TFLOPS * 1e12):.1%}; "
              f"the step computes {step / 1e9:.1f} GFLOP per token ({step / rule:.2f}x 6N), "
              f"{step * measured / 1e12:.0f} TFLOP/s = {step * measured / limit:.1%} of the matmul limit ({args.limit_tflops:g} TFLOP/s)")
        if target:
            print(f"target {target:,} tok/s: {step * target / limit:.1%} of the matmul limit")
        print("\n| part | GFLOP per token (forward + backward) | share of the step's FLOPs | share of the measured step at the matmul limit |\n|---|---|---|---|")
        for p in parts:
            print(f"| {p.name} | {p.forward / 1e9:.2f} + {p.backward / 1e9:.2f} | {p.flops / step:.1%} | {p.flops * measured / limit:.1%} |")
        print(f"| below the matmul limit (to profile) | | | {1 - step * measured / limit:.1%} |")


if __name__ == "__main__":
    main()
