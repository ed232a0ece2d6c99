"""What a user runs, end to end, on real-size shapes: every command through the CLI, timed phase by
phase, with every exit code. Run it on a GPU machine whenever training, merge or inference changes.

For each shape (2B, 8B: the released configs with random bf16 weights, saved once as an ordinary
model folder with the tiny model's tokenizer and processors; `tiny` runs the same flow on the CPU):

  flow     check-data --model -> init --yes (mixed) -> train -> merge -> eval -> predict
           The run is init's plan for --steps optimizer steps, with one checkpoint and one evaluation
           half-way and an evaluation of the last step (init plans for datasets far larger than this
           one). Phases: start to first step, the first (compiling) step, steady steps,
           evaluations, checkpoint saves, merge, reload + eval, predict.
  cases    merge verification on the other strategies (--cases): mixed, lora and mixed with
           `vision: lora` adapters (made by applying the strategy to the base and moving every trained
           tensor by a random step the size a short training makes), and a ZeRO-3 checkpoint of a real
           short run (mixed, vision: lora, 3 steps, uncompiled), merged from the checkpoint folder.
  faults   the flow's adapter (else a synthetic mixed one) merged with each planted mistake (benchmarks/merge_faults.py): the
           verification must fail on each, and pass without.

    python benchmarks/gpu_flow.py --out $OUT [--shapes 2b,8b] [--parts flow,cases,faults] [--samples 600]

Phases already done in --work are skipped, so one shape's parts can be split over several calls.
Prints a Markdown table per part; writes flow.json, cases.json and faults.json to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
import gpu_throughput as gt  # noqa: E402
import merge_faults  # noqa: E402

QVLTUNE = [sys.executable, "-m", "qvltune"]


def cli(log: Path, *args: str, timeout: int = 3600) -> tuple[int, float, str]:
    """Run one qvltune command -> (exit code, seconds, stdout); stdout + stderr kept in ``log``."""
    t0 = time.time()
    proc = subprocess.run([*QVLTUNE, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    seconds = time.time() - t0
    with open(log, "a") as f:
        f.write(f"$ qvltune {' '.join(map(str, args))}\n{proc.stdout}{proc.stderr}\n[exit {proc.returncode}, {seconds:.1f} s]\n\n")
    return proc.returncode, seconds, proc.stdout


def model_folder(work: Path, shape: str) -> Path:
    if shape == "tiny":
        from qvltune.tiny import tiny_model_path

        return tiny_model_path()
    return gt.write_weights(gt.make_model_folder(work / f"config-{shape}", shape), work / f"weights-{shape}")


def flow_data(work: Path, shape: str, samples: int) -> Path:
    """The benchmark's realistic mix (gpu_throughput.make_data); the demo task for the tiny model on a CPU."""
    if shape == "tiny":
        from qvltune.tiny import make_demo_dataset

        train, _ = make_demo_dataset(work / "demo-data", n_train=samples, n_eval=8, seed=1)
        return train
    return gt.make_data(work / "data", samples)


def split_eval(data: Path, n_eval: int) -> tuple[Path, Path]:
    """The last ``n_eval`` records of ``data`` held out (image paths stay relative to the same folder)."""
    lines = data.read_text().splitlines()
    train, evals = data.with_name("flow-train.jsonl"), data.with_name("flow-eval.jsonl")
    train.write_text("\n".join(lines[:-n_eval]) + "\n")
    evals.write_text("\n".join(lines[-n_eval:]) + "\n")
    return train, evals


def steps_of(metrics: Path) -> dict:
    """Phase times from a run's metrics.jsonl (the worker writes when each step, eval and save ended)."""
    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    start = next(r for r in recs if r["kind"] == "start")
    train = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    saves = [r for r in recs if r["kind"] == "checkpoint"]
    # Each train record is written at the end of its (logged) step: step time = gap to the one before,
    # less any eval or save that happened in between.
    times, prev = [], train[0]["time"] if train else None
    for r in train[1:]:
        busy = sum(e.get("seconds") or 0 for e in evals + saves if prev < e["time"] <= r["time"])
        times.append(r["time"] - prev - busy)
        prev = r["time"]
    steady = times[1:] or times  # the second logged step on: compiled, warm
    end = next((r for r in recs if r["kind"] == "end"), {})
    phases = next((r for r in recs if r["kind"] == "phases"), None)
    return {
        "to_first_step_s": phases["to_first_step"] if phases else None,
        "phases": {p["name"]: p["seconds"] for p in phases["phases"]} if phases else None,
        "compile": phases.get("compile") if phases else None,
        "steps": train[-1]["step"] if train else 0,
        "first_step_s": train[0]["time"] - start["time"] if train else None,
        "steady_step_median_s": statistics.median(steady) if steady else None,
        "steady_step_max_s": max(steady) if steady else None,
        "steady_tok_s_median": statistics.median(r["tokens_per_s"] for r in train[2:]) if len(train) > 2 else None,
        "evals_s": [round(e.get("seconds") or 0, 1) for e in evals],
        "saves_s": [round(s.get("seconds") or 0, 1) for s in saves],
        "last_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "status": end.get("status"),
        "start_time": start["time"],
    }


def flow(shape: str, work: Path, out: Path, samples: int, steps: int) -> dict:
    log = out / f"flow-{shape}.log"
    model = model_folder(work, shape)
    data = flow_data(work, shape, samples)
    train_file, eval_file = split_eval(data, max(8, samples // 40))
    row: dict = {"shape": shape}
    partial = out / f"flow-{shape}.partial.json"  # the row so far: a call's time limit keeps what finished

    def keep(row: dict) -> dict:
        partial.write_text(json.dumps(row, indent=2))
        return row

    row["check_data_exit"], row["check_data_s"], _ = cli(log, "check-data", train_file, "--model", model, "--json")
    plan_dir = work / f"flow-{shape}"
    shutil.rmtree(plan_dir, ignore_errors=True)
    row["init_exit"], row["init_s"], _ = cli(log, "init", "--yes", "--model", model, "--data", train_file, "--strategy", "mixed", "--epochs", "1", "--out", plan_dir, "--name", f"flow-{shape}")
    config = plan_dir / "qvltune.yaml"
    doc = yaml.safe_load(config.read_text())
    # A fixed number of steps (the data may end an epoch sooner: the Trainer goes on into the next),
    # with one checkpoint and one evaluation half-way and an evaluation of the last step.
    doc["data"]["eval"] = str(eval_file)
    doc["data"].pop("eval_split", None)
    doc["optim"].pop("epochs", None)
    doc["optim"]["max_steps"] = steps
    doc["schedule"].update(log_steps=1, eval_steps=steps // 2, save_steps=steps // 2)
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    run_dir = Path(doc["output_dir"]) / doc["name"]
    if not run_dir.is_absolute():
        run_dir = plan_dir / run_dir
    t0 = time.time()
    code, seconds, _ = cli(log, "train", config, "--no-live")
    row["train_exit"], row["train_s"] = code, seconds
    if (run_dir / "metrics.jsonl").exists():
        phases = steps_of(run_dir / "metrics.jsonl")
        row["to_start_record_s"] = phases.pop("start_time") - t0
        row.update(phases)
    if code != 0:
        return keep(row)
    keep(row)
    merged = work / f"merged-{shape}"
    row["merge_exit"], row["merge_s"], _ = cli(log, "merge", run_dir, "--out", merged, "--force")
    provenance = merged / "qvltune-merge.json"
    if provenance.exists():
        lg = json.loads(provenance.read_text())["logits"]
        row.update(merge_ok=lg["ok"], merge_fp32_rms=lg["merge_rms"], merge_fp32_ratio=lg["merge_ratio"], merge_saved_rms=lg["saved_rms"], merge_cast_rms=lg["cast_rms"],
                   merge_saved_ratio=lg["ratio"], merge_unmerged_rms=lg["unmerged_rms"], merge_training_effect=lg["training_effect"])
    keep(row)
    code, row["eval_s"], stdout = cli(log, "eval", merged, "--data", eval_file, "--json")
    row["eval_exit"] = code
    if code == 0:
        report = json.loads(stdout)
        row["eval_loss"] = report["loss"]
        row["eval_accuracy"] = report["accuracy"]
    keep(row)
    row["predict_exit"], row["predict_s"], _ = cli(log, "predict", merged, "--data", eval_file, "--limit", "8", "--json")
    row["run_dir"] = str(run_dir)
    return keep(row)


def synthetic_adapter(base: Path, dest: Path, strategy: str, components: dict) -> Path:
    """A LoRA adapter of ``strategy`` on ``base`` whose every trained tensor moved by a random step,
    as a short training leaves it (LoRA B from zero to ~1e-3, fully trained modules by ~1e-3 relative)."""
    if (dest / "adapter_config.json").exists():
        return dest
    code = (
        "import sys, json, torch\n"
        "from qvltune.config import parse_config\n"
        "from qvltune.model import apply_strategy, load_model\n"
        "base, dest, strategy, components = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])\n"
        "cfg = parse_config({'name': 'x', 'model': {'path': base}, 'data': {'train': 'x.jsonl'}, 'strategy': strategy, 'components': components})\n"
        "torch.manual_seed(0)\n"
        "model = apply_strategy(load_model(base, dtype='bfloat16').to('cuda' if torch.cuda.is_available() else 'cpu'), cfg)\n"
        "with torch.no_grad():\n"
        "    for name, p in model.named_parameters():\n"
        "        if p.requires_grad:\n"
        "            p.add_(torch.randn_like(p) * (1e-3 if 'lora_B' in name else 1e-3 * p.float().std().item()))\n"
        "model.save_pretrained(dest)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(base), str(dest), strategy, json.dumps(components)], check=True)
    return dest


def zero3_checkpoint(shape: str, base: Path, data: Path, work: Path, log: Path) -> Path | None:
    """A real short ZeRO-3 run (mixed, vision: lora): its last checkpoint folder (None if it failed)."""
    name = f"zero3-{shape}"
    doc = {
        "name": name, "output_dir": str(work / "runs"),
        "model": {"path": str(base)},
        "data": {"train": str(data), "max_seq_length": 8192, "packing": True, "num_workers": 4},
        "strategy": "mixed", "components": {"vision": "lora"},
        "optim": {"learning_rate": 1e-3, "per_device_batch": 1, "grad_accum": 1, "max_steps": 3, "warmup_ratio": 0.0, "bf16": shape != "tiny", "compile": False, "gradient_checkpointing": shape != "tiny"},
        "schedule": {"log_steps": 1, "eval_steps": 10**6, "save_steps": 3},
        "deepspeed": {"stage": 3},
        "launch": {"gpus": 1} if shape != "tiny" else {"cpu_processes": 1},
    }
    if shape == "tiny":
        doc["optim"]["optimizer"] = "adamw_torch"
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    checkpoint = work / "runs" / name / "checkpoint-3"
    if not (checkpoint / "qvltune-complete").exists():
        code, _, _ = cli(log, "train", config, "--no-live", "--force")
        if code != 0:
            return None
    return checkpoint


def cases(shape: str, work: Path, out: Path, samples: int, which: list[str]) -> list[dict]:
    from qvltune.merge import merge

    log = out / f"cases-{shape}.log"
    base = model_folder(work, shape)
    data = flow_data(work, shape, samples)
    makers = {
        "mixed": lambda: synthetic_adapter(base, work / f"adapter-{shape}-mixed", "mixed", {}),
        "lora": lambda: synthetic_adapter(base, work / f"adapter-{shape}-lora", "lora", {}),
        "vision-lora": lambda: synthetic_adapter(base, work / f"adapter-{shape}-vision-lora", "mixed", {"vision": "lora"}),
        "zero3": lambda: zero3_checkpoint(shape, base, data, work, log),
    }
    adapters = {name: makers[name]() for name in which}
    flow_run = work / f"flow-{shape}" / "runs" / f"flow-{shape}"
    if (flow_run / "final").exists():
        adapters = {"mixed (the flow's run)": flow_run / "final", **adapters}
    rows = []
    for case, adapter in adapters.items():
        if adapter is None:
            rows.append({"shape": shape, "case": case, "ok": None, "error": f"training failed (see {log.name})"})
            continue
        result = merge(str(adapter), work / f"case-{shape}", dtype="bfloat16", force=True)
        lg = result.logits
        rows.append({"shape": shape, "case": case, "ok": result.ok, "merge_rms": lg.merge_rms, "merge_ratio": lg.merge_ratio, "saved_rms": lg.saved_rms,
                     "cast_rms": lg.cast_rms, "ratio": lg.ratio, "unmerged_rms": lg.unmerged_rms, "training_effect": lg.training_effect, "top1": lg.top1_agreement,
                     "weights_changed": result.weights.changed, "weights_ok": result.weights.ok, "seconds": round(result.seconds, 1), "device": result.device})
        shutil.rmtree(result.out, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qvltune-flow"))
    ap.add_argument("--shapes", default="2b,8b")
    ap.add_argument("--parts", default="flow,cases,faults")
    ap.add_argument("--samples", type=int, default=600)
    ap.add_argument("--cases", default="lora,vision-lora,zero3", help="adapters for the cases part: mixed, lora, vision-lora (synthetic), zero3 (a short run)")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps of the flow's training run (even)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    parts = args.parts.split(",")
    for shape in args.shapes.split(","):
        if "flow" in parts:
            row = flow(shape, args.work, args.out, args.samples, args.steps)
            _append(args.out / "flow.json", [row])
            print(json.dumps(row), flush=True)
            if row.get("phases"):
                _table([{"shape": shape, "phase": k, "seconds": v} for k, v in row["phases"].items()], ["shape", "phase", "seconds"])
        if "cases" in parts:
            rows = cases(shape, args.work, args.out, args.samples, args.cases.split(","))
            _append(args.out / "cases.json", rows)
            _table(rows, ["shape", "case", "ok", "merge_rms", "merge_ratio", "saved_rms", "cast_rms", "ratio", "unmerged_rms", "training_effect", "top1", "weights_changed", "seconds"])
        if "faults" in parts:
            final = args.work / f"flow-{shape}" / "runs" / f"flow-{shape}" / "final"
            if not final.exists():  # no flow run in this work folder: a synthetic mixed adapter
                final = synthetic_adapter(model_folder(args.work, shape), args.work / f"adapter-{shape}-mixed", "mixed", {})
            rows = [{"shape": shape, **r} for r in merge_faults.run(str(final), args.work / "faults", "bfloat16", list(merge_faults.FAULTS))]
            _append(args.out / "faults.json", rows)
            _table(rows, ["shape", "fault", "passed_verification", "merge_rms", "merge_ratio", "saved_rms", "cast_rms", "ratio", "not_merged", "seconds"])


def _append(path: Path, rows: list[dict]) -> None:
    old = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(old + rows, indent=2))


def _table(rows: list[dict], keys: list[str]) -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if not math.isnan(v) else "nan"
        return str(v)

    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(fmt(r.get(k)) for k in keys) + " |", flush=True)


if __name__ == "__main__":
    main()
