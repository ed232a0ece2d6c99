"""What ZeRO-3 costs on one GPU: ZeRO-2 vs ZeRO-3 at the planner's rows, through `qvltune train`.

One GPU still runs all of ZeRO-3's machinery (partitioned parameters gathered before each block,
released after it, gradients reduced into partitions), so the ZeRO-3 / ZeRO-2 ratio on one GPU is
the overhead a multi-GPU ZeRO-3 run starts from. Shapes (real-size, random bf16 weights, the data of
gpu_throughput.py, the run config `qvltune init` writes for one H200 with the stage forced):

- 2b-mixed, 8b-mixed: the planner's rows for one H200 (packed rows, accumulation, checkpointing).
- 8b-full: 8B full fine-tuning needs ~131 GiB of weights, gradients and Adam states: it fits one
  H200 under no ZeRO stage (ZeRO-3 at one GPU partitions nothing), and with the optimizer offloaded
  it needs more host memory than the machine has. Its row is the 8B shape with the decoder layers
  cut to the most that fit ZeRO-2 on one H200 (every layer keeps 8B's size, which is what the
  per-layer gathers and reductions scale with), at the planner's rows for that model.
- tiny-mixed: the built-in tiny model on CPU (DeepSpeed's CPU accelerator, gloo): the script's own
  check, not a measurement.

Variants (the stage, ZeRO-3 settings and compile forced on the planner's config; nothing else):
- z2:          ZeRO-2 as planned (decoder layers compiled on GPUs, as the planner does).
- z2-eager:    ZeRO-2 with compile off: the same kernels as the eager ZeRO-3 variants.
- z3:          ZeRO-3 as the planner now writes it: qvltune's settings (`qvltune.zero.zero3_tuning`,
               from the model's sizes) and compiled decoder layers (their forward only).
- z3-eager:    z3 with compile off: ZeRO-3's machinery against z2-eager.
- z3-defaults: ZeRO-3 with the Trainer's "auto" values written out (prefetch 0.9 x hidden^2,
               persistence 10 x hidden, reduce bucket hidden^2), eager: qvltune's ZeRO-3 before.

Rows: the planner fills one H200 under ZeRO-2, often with activations not checkpointed (2B mixed:
32,768-token rows, 131 GiB); ZeRO-3's gather buffers do not fit beside such a row. So by default
(`--checkpointing on`) every variant checkpoints activations at the planner's rows: the same rows
and the same recomputation in both stages, only ZeRO's machinery differs. `--checkpointing planned`
keeps the planner's choice.

Each run: `--steps` optimizer steps, logged every 2; real tokens/s and step time averaged over the
steps after the warm-up (--warmup, which also leaves out the compilation). Peak memory is rank 0's
`torch.cuda.max_memory_allocated`. `--profile` profiles one optimizer step of each ZeRO-3 variant
(torch.profiler with Python frames) and prints where its time goes, grouped: gathers, gradient
reductions, host syncs, copies, allocation, DeepSpeed's ZeRO-3 Python (hooks, fetch/prefetch,
release, gradient hooks), compute kernels.

Results accumulate in --work/results.json: a later call with the same --work skips what is done
(--rerun repeats it) and prints the table of everything measured so far, so each call can take one
shape (or one variant) and stay within a time limit.

    python benchmarks/zero3_overhead.py --out $OUT --work /tmp/z3 --shapes 2b-mixed --variants z2,z3,z3-defaults [--profile] [--steps 10]
    python benchmarks/zero3_overhead.py --out /tmp/z3-cpu --work /tmp/z3-cpu --shapes tiny-mixed   # CPU
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


sys.path.insert(0, str(Path(__file__).parent))
import gpu_throughput as gt  # noqa: E402

from qvltune.profiling import union_us  # noqa: E402

SHAPES = {"2b-mixed": ("2b", "mixed"), "8b-mixed": ("8b", "mixed"), "8b-full": ("8b", "full"), "tiny-mixed": ("tiny", "mixed")}
VARIANTS = ("z2", "z2-eager", "z3", "z3-eager", "z3-defaults")
H200 = dict(gpu_name="NVIDIA H200", gpu_memory_gib=139.8, host_ram_gib=128)


# ----------------------------------------------------------------------------------------------
# Models and configs (pure but for the model folders)


def h200():
    from qvltune.estimate_inputs import Machine
    from qvltune.units import GiB

    return Machine(H200["gpu_name"], int(H200["gpu_memory_gib"] * GiB), 1, 1, int(H200["host_ram_gib"] * GiB), 989.0, True)


def cut_layers(folder: Path, layers: int) -> Path:
    """``folder``'s model with its decoder layers cut to ``layers`` (a sibling folder)."""
    dest = folder.with_name(f"{folder.name}-{layers}layers")
    if not (dest / "config.json").exists():
        import shutil

        shutil.copytree(folder, dest, dirs_exist_ok=True)
        doc = json.loads((folder / "config.json").read_text())
        doc["text_config"]["num_hidden_layers"] = layers
        (dest / "config.json").write_text(json.dumps(doc, indent=2))
    return dest


def plan_fits_zero2(model: Path, data: Path, strategy: str, effective_batch: int) -> bool:
    """Does the planner fit this model on one H200 with ZeRO-2 and no offload?"""
    from qvltune.cli.estimate import dataset_summary, load_stats
    from qvltune.plan import Answers, make_plan, pixel_budget

    answers = Answers(model=str(model), data=str(data), strategy=strategy, resolution="variable", effective_batch=effective_batch)
    lo, hi, _ = pixel_budget(answers)
    plan = make_plan(answers, h200(), load_stats(str(model))[0], dataset_summary(str(data), None, lo, hi, quiet=True))
    ds = plan.config.deepspeed
    return plan.fits and ds.stage == 2 and not ds.offload_optimizer


def model_for(shape: str, work: Path, data: Path, effective_batch: int) -> tuple[Path, str]:
    """(model folder, label) of a shape; 8b-full cut to the most decoder layers ZeRO-2 fits."""
    size, strategy = SHAPES[shape]
    if size == "tiny":
        from qvltune.tiny import tiny_model_path

        return tiny_model_path(), "tiny mixed (CPU)"
    folder = gt.make_model_folder(work / f"model-{size}", size)
    if plan_fits_zero2(folder, data, strategy, effective_batch):
        return folder, f"{size.upper()} {strategy}"
    total = json.loads((folder / "config.json").read_text())["text_config"]["num_hidden_layers"]
    lo, hi = 0, total  # fits with lo layers (0: none found yet), not with hi; memory grows with layers
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if plan_fits_zero2(cut_layers(folder, mid), data, strategy, effective_batch) else (lo, mid)
    if not lo:
        raise SystemExit(f"{shape}: no layer count fits ZeRO-2 on one H200")
    return cut_layers(folder, lo), f"{size.upper()} {strategy}, {lo} of {total} layers"


def trainer_defaults(hidden: int) -> dict[str, Any]:
    """The values the Trainer fills in for ZeRO-3's "auto" (transformers/integrations/deepspeed.py),
    with qvltune's live budget: qvltune's ZeRO-3 before its settings were derived from the model."""
    from qvltune.zero import STAGE3_MAX_LIVE_PARAMETERS

    live = int(STAGE3_MAX_LIVE_PARAMETERS)
    return {"prefetch_bucket_size": int(0.9 * hidden * hidden), "param_persistence_threshold": 10 * hidden, "max_live_parameters": live, "max_reuse_distance": live, "reduce_bucket_size": hidden * hidden, "overlap_comm": True}


def variant_doc(name: str, variant: str, model: Path, data: Path, work: Path, strategy: str, steps: int, profile: bool, effective_batch: int, checkpointing: str = "on") -> dict:
    """The planner's config for one H200 with ``variant``'s stage, ZeRO-3 settings and compile;
    ``checkpointing="on"`` checkpoints activations in every variant (see the module's docstring)."""
    from qvltune.config import parse_config
    from qvltune.model_stats import model_stats, resolve_model_config
    from qvltune.zero import Zero3Sizes, zero3_tuning

    stage = 2 if variant.startswith("z2") else 3
    doc = gt.run_config(name, model, data, work, strategy, "qvltune", steps, False, stage, effective_batch)
    # The profiled step is the second last (global step index steps - 2); summarise stops before it.
    doc["schedule"].update(log_steps=2, profile_steps=[steps - 2, 1] if profile and stage == 3 else None, profile_python=profile and stage == 3)
    cpu = "tiny" in str(model)
    if cpu:  # the CPU path: fp32, unfused Adam, one process, no data workers
        doc["optim"].update(bf16=False, optimizer="adamw_torch")
        doc["data"]["num_workers"] = 0
        doc["launch"] = {"cpu_processes": 1}
        doc["model"]["random_init"] = False
    if variant.endswith(("-eager", "-defaults")) or cpu:  # z2 and z3 keep the planner's choice on GPUs (compiled)
        doc["optim"]["compile"] = False
    if checkpointing == "on":
        doc["optim"]["gradient_checkpointing"] = True
    doc["deepspeed"] = {"stage": stage, "offload_optimizer": False, "offload_params": False}
    if stage == 3:
        stats = model_stats(resolve_model_config(str(model))[0])
        tuned = zero3_tuning(Zero3Sizes.of(stats, parse_config(doc))).values()
        doc["deepspeed"]["zero3"] = trainer_defaults(stats.hidden) if variant == "z3-defaults" else tuned
    return doc


# ----------------------------------------------------------------------------------------------
# Results


def summarise(run_dir: Path, warmup: int, profiled: int | None = None) -> dict[str, Any]:
    """Real tokens/s, seconds per optimizer step, peak memory and the logged losses of one run, over
    the logged steps after ``warmup`` and before ``profiled`` (the profiled step's record and those
    after it are left out)."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()] if (run_dir / "metrics.jsonl").exists() else []
    train = [r for r in recs if r["kind"] == "train" and (profiled is None or r["step"] < profiled)]
    end = next((r for r in recs if r["kind"] == "end"), {})
    steady = [r for r in train if r["step"] > warmup]
    if not steady:
        return {"error": end.get("message", "no steps logged after the warm-up"), "status": end.get("status")}
    first = max((r for r in train if r["step"] <= warmup), key=lambda r: r["step"], default=None)
    steps = steady[-1]["step"] - (first["step"] if first else 0)
    seconds = steady[-1]["time"] - (first["time"] if first else recs[0]["time"])
    return {
        "tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady),
        "step_s": seconds / max(1, steps),
        "mem_peak_gb": max((r.get("mem_peak_gb") or 0) for r in train) or None,
        "losses": {r["step"]: r["loss"] for r in train},
        "status": end.get("status"),
    }


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row's tokens/s over its shape's z2 (and z2-eager) row."""
    out = []
    for r in rows:
        base = {v: x.get("tokens_per_s") for x in rows if x["shape"] == r["shape"] for v in [x["variant"]]}
        r = dict(r)
        for ref in ("z2", "z2-eager"):
            if base.get(ref) and r.get("tokens_per_s"):
                r[f"vs_{ref}"] = r["tokens_per_s"] / base[ref]
        out.append(r)
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| shape | variant | rows (tokens x batch x accum) | ckpt | compiled | real tok/s | s/step | peak GiB | vs z2 | vs z2-eager | first logged loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in with_ratios(rows):
        ratio = lambda k: f"{r[k]:.2f}" if r.get(k) else "-"  # noqa: E731
        loss = next(iter(r.get("losses", {}).values()), None)
        if r.get("tokens_per_s") is None:
            lines.append(f"| {r['label']} | {r['variant']} | {r['rows']} | {r['ckpt']} | {r['compile']} | {r.get('error', 'failed')} (exit {r.get('exit')}) | | | | | |")
            continue
        mem = f"{r['mem_peak_gb']:.1f}" if r.get("mem_peak_gb") else "-"
        lines.append(f"| {r['label']} | {r['variant']} | {r['rows']} | {r['ckpt']} | {r['compile']} | {r['tokens_per_s']:,.0f} | {r['step_s']:.2f} | {mem} | {ratio('vs_z2')} | {ratio('vs_z2-eager')} | {loss:.4f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The profile, grouped


# (group, what matches: a regex over the event name, and the trace category it must have or None)
PROFILE_GROUPS: tuple[tuple[str, str, str | None], ...] = (
    ("ZeRO-3 gather (fetch + prefetch)", r"deepspeed/runtime/zero/partitioned_param_coordinator\.py\(\d+\): (fetch_sub_module|_fetch_sub_module_impl)", "python_function"),
    ("ZeRO-3 release", r"deepspeed/runtime/zero/partitioned_param_coordinator\.py\(\d+\): release_sub_module", "python_function"),
    ("ZeRO-3 module hooks (other)", r"deepspeed/runtime/zero/parameter_offload\.py\(\d+\)", "python_function"),
    ("ZeRO-3 gradient hooks and reduction", r"deepspeed/runtime/zero/stage3\.py\(\d+\)", "python_function"),
    ("all-gather (communication)", r"all_?gather", None),
    ("reduce-scatter / all-reduce (communication)", r"reduce_?scatter|all_?reduce", None),
    ("host syncs", r"^(cudaStreamSynchronize|cudaDeviceSynchronize|cudaEventSynchronize|aten::item|aten::_local_scalar_dense)$", None),
    ("copies", r"^(aten::copy_|Memcpy.*|cudaMemcpyAsync)$", None),
    ("allocation", r"^(cudaMalloc|cudaFree|aten::empty|aten::empty_strided)$", None),
)


def profile_groups(events: list[dict]) -> list[dict]:
    """Time per group of a chrome trace's events (torch.profiler's export), in ms: on the host (the
    union of the matching events' intervals per thread, so nested frames count once) and on the
    device (kernels and copies the group launched: matched by name). ``compute kernels`` is every
    other device kernel. Also the profiled span itself (``step``)."""
    host: dict[str, list] = defaultdict(list)
    device: dict[str, list] = defaultdict(list)
    calls: dict[str, int] = defaultdict(int)
    span = [float("inf"), float("-inf")]
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        name, cat, ts, dur = e.get("name", ""), e.get("cat", ""), float(e["ts"]), float(e["dur"])
        span = [min(span[0], ts), max(span[1], ts + dur)]
        on_device = cat in ("kernel", "gpu_memcpy", "gpu_memset")
        group = next((g for g, pattern, need in PROFILE_GROUPS if (need is None or need == cat) and re.search(pattern, name, re.IGNORECASE)), None)
        if group is None and on_device:
            group = "compute kernels"
        if group is None:
            continue
        (device if on_device else host)[group].append((ts, ts + dur, e.get("tid")))
        calls[group] += 1
    out = []
    for group in [g for g, _, _ in PROFILE_GROUPS] + ["compute kernels"]:
        if not calls[group]:
            continue
        by = lambda items: sum(union_us([(a, b) for a, b, t in items if t == tid]) for tid in {t for _, _, t in items}) / 1e3  # noqa: E731
        out.append({"group": group, "host_ms": by(host[group]), "device_ms": by(device[group]), "calls": calls[group]})
    if span[1] > span[0]:
        out.append({"group": "profiled span", "host_ms": (span[1] - span[0]) / 1e3, "device_ms": 0.0, "calls": 0})
    return out


def profile_table(groups: list[dict]) -> str:
    lines = ["| where the time goes | host ms | device ms | events |", "|---|---|---|---|"]
    lines += [f"| {g['group']} | {g['host_ms']:,.1f} | {g['device_ms']:,.1f} | {g['calls']:,} |" for g in groups]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qvltune-zero3"))
    ap.add_argument("--shapes", default="2b-mixed", help=f"any of {','.join(SHAPES)}")
    ap.add_argument("--variants", default="z2,z3,z3-eager,z2-eager,z3-defaults", help=f"any of {','.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=4, help="logged steps left out of the averages (compilation, first gathers)")
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--effective-batch", type=int, default=64)
    ap.add_argument("--profile", action="store_true", help="profile one step of each ZeRO-3 variant, grouped")
    ap.add_argument("--checkpointing", choices=("on", "planned"), default="on", help="on: every variant checkpoints activations (rows both stages fit); planned: the planner's choice")
    ap.add_argument("--rerun", action="store_true", help="repeat runs already in --work/results.json")
    args = ap.parse_args(argv)
    for s in args.shapes.split(","):
        if s not in SHAPES:
            ap.error(f"--shapes: unknown shape {s!r} (known: {', '.join(SHAPES)})")
    for v in args.variants.split(","):
        if v not in VARIANTS:
            ap.error(f"--variants: unknown variant {v!r} (known: {', '.join(VARIANTS)})")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    store = args.work / "results.json"
    done: dict[str, dict] = {r["name"]: r for r in json.loads(store.read_text())} if store.exists() else {}
    for shape in args.shapes.split(","):
        size, strategy = SHAPES[shape]
        if size == "tiny":
            from qvltune.tiny import make_demo_dataset

            data = args.work / "tiny-data" / "train.jsonl"
            if not data.exists():
                make_demo_dataset(data.parent, n_train=64, n_eval=0, seed=1)
        else:
            data = gt.make_data(args.work / "data", args.samples)
        model, label = model_for(shape, args.work, data, args.effective_batch)
        for variant in args.variants.split(","):
            name = f"{shape}-{variant}"
            if name in done and not args.rerun and done[name].get("tokens_per_s") is not None:
                continue
            doc = variant_doc(name, variant, model, data, args.work, strategy, args.steps, args.profile, args.effective_batch, args.checkpointing)
            run = gt.run_qvltune(name, doc, args.work, args.out)
            o = doc["optim"]
            row = {
                "name": name, "shape": shape, "variant": variant, "label": label, "exit": run["exit"], "wall_s": run["wall_s"],
                "rows": f"{doc['data']['max_seq_length']:,} x {o['per_device_batch']} x {o['grad_accum']}",
                "ckpt": "on" if o["gradient_checkpointing"] else "off", "compile": "yes" if o.get("compile") else "no",
                "zero3": doc["deepspeed"].get("zero3"), **summarise(args.work / "runs" / name, args.warmup, doc["schedule"]["profile_steps"][0] if doc["schedule"]["profile_steps"] else None),
            }
            trace = args.work / "runs" / name / "profile-trace.json"
            if trace.exists():
                row["profile"] = profile_groups(json.loads(trace.read_text()).get("traceEvents", []))
                (args.out / f"{name}-profile.md").write_text(profile_table(row["profile"]) + "\n")
            done[name] = row
            store.write_text(json.dumps(list(done.values()), indent=2))  # after every run: a cut call keeps what finished
            print(json.dumps({k: v for k, v in row.items() if k not in ("profile", "losses")}), flush=True)
    rows = list(done.values())
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print("\n" + table(rows))
    for r in rows:
        if r.get("profile"):
            print(f"\n{r['label']}, {r['variant']}: one optimizer step\n\n{profile_table(r['profile'])}")


if __name__ == "__main__":
    main()
