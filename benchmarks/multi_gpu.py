"""Multi-GPU runs through `qvltune train`: ZeRO-2 / ZeRO-3 / ZeRO-3 + optimizer offload on N GPUs
against one GPU at the same effective batch (scaling and loss-curve equivalence), a ZeRO-3
checkpoint resumed and merged, and the estimator's per-GPU prediction for each run.

One Qwen3-VL shape (2B by default) with random bf16 weights is written ONCE as an ordinary model
folder (safetensors + the tiny model's tokenizer/processors), so every run starts from identical
weights through the normal ``from_pretrained`` path (a random init per run would differ between
ZeRO-2 and ZeRO-3, which initialises partitioned). The data is gpu_throughput.py's realistic mix.
Each run takes the config `qvltune init` writes for 1 GPU (packed rows, checkpointing, accumulation
for an effective batch of 64 samples) and divides the accumulation by N, so every variant sees the
same rows in each optimizer step.

    python benchmarks/multi_gpu.py --out $OUT [--shape 2b] [--strategy mixed] [--steps 12]
        [--variants 1gpu-z2,2gpu-z2,2gpu-z3,2gpu-z3-offload] [--rows N --accum N] [--resume-check] [--merge]

Real tokens/s are counted over all ranks (non-pad tokens / wall time, steps after --warmup);
per-GPU scaling = (tokens/s at N GPUs / N) / (tokens/s on 1 GPU). Loss curves are compared step by
step with the first variant. Prints Markdown tables last; writes results.json and logs to --out
after every run (a timed-out call still returns what finished).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
import gpu_throughput as gt  # shared shapes, data and the planner's config

VARIANTS = {  # name: (GPUs, ZeRO stage, optimizer offload)
    "1gpu-z2": (1, 2, False),
    "1gpu-z3": (1, 3, False),
    "2gpu-z2": (2, 2, False),
    "2gpu-z3": (2, 3, False),
    "2gpu-z3-offload": (2, 3, True),
    "4gpu-z2": (4, 2, False),
    "4gpu-z3": (4, 3, False),
}


def variant_doc(name: str, base: dict, work: Path, steps: int, save_steps: int | None) -> dict:
    gpus, stage, offload = VARIANTS[name]
    doc = json.loads(json.dumps(base))
    accum = doc["optim"]["grad_accum"]
    if accum % gpus:
        raise SystemExit(f"{name}: the 1-GPU plan accumulates {accum} rows, not divisible by {gpus} GPUs")
    doc.update(name=name, output_dir=str(work / "runs"), launch={"gpus": gpus})
    doc["model"] = {**doc["model"], "random_init": False}
    doc["data"] = {**doc["data"], "eval_split": 0.0, "num_workers": 4}
    # Compiled decoder layers where the planner compiles them (every stage on bf16 GPUs; under ZeRO-3
    # the layers' forward only, see compiled_layers.compile_blocks). Runs before that ran ZeRO-3 eager.
    compiled = doc["optim"].get("compile", False)
    doc["optim"] = {**doc["optim"], "grad_accum": accum // gpus, "max_steps": steps, "warmup_ratio": 0.0, "compile": compiled}
    doc["optim"].pop("effective_batch", None)
    doc["schedule"] = {"log_steps": 1, "eval_steps": 100000, "save_steps": save_steps, "save_total_limit": 3}
    doc["deepspeed"] = {"stage": stage, "offload_optimizer": offload, "offload_params": False}
    return doc


def predicted_gib(doc: dict, model: Path, gpus: int) -> float:
    """qvltune.estimate's peak allocated per GPU for this config (what max_memory_allocated reads)."""
    from qvltune.config import parse_config
    from qvltune.estimate import estimate
    from qvltune.estimate_inputs import Machine, workload_for
    from qvltune.model_stats import model_stats
    from qvltune.units import GiB

    cfg = parse_config(doc)
    machine = Machine("NVIDIA H200", int(139.8 * GiB), gpus, 1, 256 * GiB, 989.0, True)
    est = estimate(cfg, model_stats(json.loads((model / "config.json").read_text())), machine, workload_for(cfg))
    return est.peak_allocated / GiB


def train(cfg_path: Path, log: Path, *extra: str) -> int:
    proc = subprocess.run([sys.executable, "-m", "qvltune", "train", str(cfg_path), "--no-live", *extra], capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    return proc.returncode


def losses(metrics: Path) -> dict[str, float]:
    """{step: loss} of the logged optimizer steps (string keys, as in results.json)."""
    recs = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
    return {str(r["step"]): r["loss"] for r in recs if r.get("kind") == "train"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qvltune-multi-gpu"))
    ap.add_argument("--shape", default="2b", choices=sorted(gt.SHAPES))
    ap.add_argument("--strategy", default="mixed")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4, help="steps left out of the throughput mean")
    ap.add_argument("--variants", default="1gpu-z2,2gpu-z2,2gpu-z3,2gpu-z3-offload")
    ap.add_argument("--rows", type=int, help="pin the packed row length (default: the planner's)")
    ap.add_argument("--accum", type=int, help="pin the 1-GPU accumulation (default: the planner's)")
    ap.add_argument("--resume-check", action="store_true", help="resume the ZeRO-3 run from its middle checkpoint and compare the rest of the curve")
    ap.add_argument("--merge", action="store_true", help="merge the ZeRO-3 run's adapter (qvltune merge verifies logits)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    data = gt.make_data(args.work / "data", 400)
    model = gt.write_weights(gt.make_model_folder(args.work / f"config-{args.shape}", args.shape), args.work / f"model-{args.shape}")
    base = gt.planned_doc(model, data, args.strategy, 64)
    if args.rows:
        base["data"]["max_seq_length"] = args.rows
    if args.accum:
        base["optim"]["grad_accum"] = args.accum
    results_path = args.work / "results.json"
    rows: dict[str, dict] = json.loads(results_path.read_text()) if results_path.exists() else {}

    def record(name: str, row: dict) -> None:
        rows[name] = row
        results_path.write_text(json.dumps(rows, indent=2))
        shutil.copy(results_path, args.out / "results.json")
        print(json.dumps({"variant": name, **{k: v for k, v in row.items() if k != "losses"}}), flush=True)

    z3 = next((v for v in args.variants.split(",") if v.endswith("z3") and VARIANTS[v][0] > 1), None)
    for name in args.variants.split(","):
        gpus, stage, offload = VARIANTS[name]
        if name in rows and rows[name].get("exit") == 0:
            continue
        save = args.steps // 2 if name == z3 and args.resume_check else None
        doc = variant_doc(name, base, args.work, args.steps, save)
        cfg_path = args.work / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        t0 = time.time()
        code = train(cfg_path, args.out / f"{name}.log", "--force")
        summary = gt.summarise(args.work / "runs" / name / "metrics.jsonl", args.warmup)
        record(name, {
            "gpus": gpus, "stage": stage, "offload": offload, "exit": code, "wall_s": round(time.time() - t0, 1),
            "row_tokens": doc["data"]["max_seq_length"], "batch": f"{doc['optim']['per_device_batch']}x{doc['optim']['grad_accum']}x{gpus}",
            "checkpointing": doc["optim"]["gradient_checkpointing"], "predicted_gib": round(predicted_gib(doc, model, gpus), 2),
            **summary, "losses": losses(args.work / "runs" / name / "metrics.jsonl"),
        })

    if args.resume_check and z3 and rows.get(z3, {}).get("exit") == 0:
        # The ZeRO-3 run saved checkpoint-(steps/2): resume a copy of it from there and compare.
        src, name = args.work / "runs" / z3, f"{z3}-resumed"
        dst = args.work / "runs" / name
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(f"checkpoint-{args.steps}", "final", "merged"))
        kept = losses(src / "metrics.jsonl")
        (dst / "metrics.jsonl").write_text("".join(json.dumps({"kind": "train", "step": int(s), "loss": v}) + "\n" for s, v in kept.items() if int(s) <= args.steps // 2))
        doc = yaml.safe_load((args.work / f"{z3}.yaml").read_text())
        doc["name"] = name
        cfg_path = args.work / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        t0 = time.time()
        code = train(cfg_path, args.out / f"{name}.log", "--resume")
        after = {s: v for s, v in losses(dst / "metrics.jsonl").items() if int(s) > args.steps // 2}
        ref = rows[z3]["losses"]
        diff = max((abs(v - ref[s]) / abs(ref[s]) for s, v in after.items() if s in ref), default=None)
        record(name, {"exit": code, "wall_s": round(time.time() - t0, 1), "resumed_steps": sorted(map(int, after)), "max_rel_loss_diff_vs_uninterrupted": diff, "losses": after})

    if args.merge and z3 and rows.get(z3, {}).get("exit") == 0:
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "qvltune", "merge", str(args.work / "runs" / z3), "--out", str(args.work / "merged"), "--force", "--device", "cuda", "--json"], capture_output=True, text=True)
        (args.out / "merge.log").write_text(proc.stdout + proc.stderr)
        try:
            report = json.loads(proc.stdout)
        except ValueError:
            report = {"error": proc.stderr.strip().splitlines()[-1:]}
        record("merge", {"exit": proc.returncode, "wall_s": round(time.time() - t0, 1), "report": report})

    print_tables(rows, args.variants.split(","))
    return 0


def print_tables(rows: dict[str, dict], order: list[str]) -> None:
    one = rows.get("1gpu-z2", {}).get("tokens_per_s")
    ref_name = next((n for n in order if rows.get(n, {}).get("losses")), None)
    ref = rows[ref_name]["losses"] if ref_name else {}
    print("\n| variant | GPUs | ZeRO | rows (tokens x batch x accum x GPUs) | real tok/s (all GPUs) | per GPU | scaling vs 1 GPU | MFU | peak GiB measured | predicted | error | max loss diff vs " + (ref_name or "-") + " |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in order:
        r = rows.get(name)
        if not r:
            continue
        tps = r.get("tokens_per_s")
        per = tps / r["gpus"] if tps else None
        scale = f"{100 * per / one:.0f}%" if per and one else "-"
        m, p = r.get("mem_peak_gb"), r.get("predicted_gib")
        err = f"{100 * (p - m) / m:+.0f}%" if m and p else "-"
        common = [s for s in r.get("losses", {}) if s in ref]
        diff = max((abs(r["losses"][s] - ref[s]) / abs(ref[s]) for s in common), default=None)
        zero = f"{r['stage']}{' +offload' if r['offload'] else ''}"
        print(
            f"| {name} | {r['gpus']} | {zero} | {r['row_tokens']:,} x {r['batch']} | {tps or 0:,.0f} | {per or 0:,.0f} | {scale} | "
            f"{(r.get('mfu') or 0) * 100:.1f}% | {m or 0:.1f} | {p:.1f} | {err} | {f'{diff:.2e}' if diff is not None else '-'} |"
        )
    for name in order:
        if rows.get(name, {}).get("exit") not in (0, None):
            print(f"{name}: exit {rows[name]['exit']} {rows[name].get('error', '')}")
    resumed = [r for n, r in rows.items() if n.endswith("-resumed")]
    for r in resumed:
        print(f"\nZeRO-3 resume: steps {r.get('resumed_steps')} after resuming; largest relative loss difference vs the uninterrupted run: {r.get('max_rel_loss_diff_vs_uninterrupted')}")
    if "merge" in rows:
        print(f"merge: exit {rows['merge']['exit']}: {json.dumps(rows['merge']['report'])[:600]}")


if __name__ == "__main__":
    sys.exit(main())
