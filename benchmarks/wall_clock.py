"""Wall clock from the command to the model: one epoch of `qvltune train` as `qvltune init` plans it,
twice (cold, then warm caches), on two data mixes.

For each shape (2B, 8B: released configs with random bf16 weights saved as model folders, as in
gpu_flow.py; `tiny`: the tiny model on the CPU) and mix:

  bench   gpu_throughput.make_data: images 352x352 to 1280x960 under the default variable budget,
          prompts of 10-200 words, answers of 8-1000 words (log-uniform), 10% text-only
  issue   shaped like the independent measurement of issue 21: the same image sizes under a
          1,200-token budget (`--max-image-tokens 1200`), ~800 real tokens per sample, 10% text-only

`init --yes --strategy mixed --epochs 1` writes the config (log_steps set to 1 so every step is
timed; everything else as planned), then `train --no-live --force` runs it: `cold` with an empty
compile cache and the weights evicted from the page cache (as on a machine that has not read them
since boot), `warm` with the caches the cold run filled. (`check-data` runs first, as a user's first
step, but does not write the data index cache: its settings are not the run's. The first `train` on
the data fills it and later ones reuse it.) Prints per run: the phases to the first step, steady
median/mean real tok/s, the slowest step against the median (and stall records), each save's
blocking and background time, eval time, and the whole command against its steady steps; after a
cold compiled unit, what Inductor generated (``generated``: Triton and C++ kernels).

The peer (`--runs llamafactory --llamafactory-site DIR`, DIR as benchmarks/llamafactory_wheels.sh
prepares it): LLaMA-Factory 0.9.5 on the same records, random weights and pixel budget for one epoch,
its defaults with `neat_packing` into 8k rows (as gpu_throughput.py's llamafactory-packed, LoRA r64
on the LLM and a trained projector, as mixed trains), from the command to its saved model. A run
that fails is a result: its status names the error.

    python benchmarks/wall_clock.py --out $OUT [--shapes 2b,8b] [--mixes bench,issue] [--runs cold,warm,llamafactory] [--samples 2400]
    python benchmarks/wall_clock.py --out $OUT --shapes tiny --samples 160 --max-steps 16 --compile on   # CPU

Each (shape, mix, run) is one unit: finished units are recorded in --work/units.json and skipped,
so the whole matrix can be spread over several calls (each well under 600 s: pick one shape, mix
and run per call for 8B, after a `--runs prepare` call that writes the random weights, the data,
the index cache and the config without training). Results accumulate in --out/wall_clock.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
import gpu_flow  # noqa: E402
import gpu_throughput as gt  # noqa: E402

from qvltune.phases import format_compile  # noqa: E402
from qvltune.weights_prefetch import weight_files  # noqa: E402

SIZES = [(352, 352), (448, 448), (640, 480), (800, 600), (1024, 768), (1280, 960)]
ISSUE_MAX_IMAGE_TOKENS = 1200  # 1280x960 at 32x32 pixels per token: the largest image is not scaled down


def make_issue_data(dest: Path, n: int, seed: int = 0) -> Path:
    """Records shaped like issue 21's second mix: ~800 real tokens per sample (images of 121 to 1,200
    tokens, ~500 on average, and ~300 text tokens), 10% text-only."""
    path = dest / "train.jsonl"
    if path.exists():
        return path
    rng = random.Random(seed)
    (dest / "images").mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            question = " ".join(rng.choice(gt.WORDS) for _ in range(rng.randint(10, 60)))
            answer = gt.words(rng, 8, 800)
            if rng.random() < 0.1:
                # text-only records are longer, as instructions without an image tend to be
                question = " ".join(rng.choice(gt.WORDS) for _ in range(rng.randint(100, 500)))
                f.write(json.dumps({"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}) + "\n")
                continue
            name = gt.save_image(rng, dest, i, SIZES)
            f.write(json.dumps({"image": name, "conversations": [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]}) + "\n")
    return path


def mix_data(work: Path, shape: str, mix: str, samples: int) -> tuple[Path, list[str]]:
    """(train file, extra `init` arguments) of a mix."""
    if shape == "tiny":
        from qvltune.tiny import make_demo_dataset

        existing = work / "demo-data" / "train.jsonl"
        if existing.exists():  # written again, every image would be new to the index cache
            return existing, []
        return make_demo_dataset(work / "demo-data", n_train=samples, n_eval=8, seed=1)[0], []
    if mix == "issue":
        return make_issue_data(work / "data-issue", samples), ["--resolution", "variable", "--max-image-tokens", str(ISSUE_MAX_IMAGE_TOKENS)]
    return gt.make_data(work / "data-bench", samples), ["--resolution", "variable"]


def summarize(records: list[dict], wall_s: float, started: float, ranks: list[dict] | None = None) -> dict:
    """The figures of one run from its metrics.jsonl records, ``wall_s`` the whole `qvltune train`
    command and ``started`` when it began, ``ranks`` its ranks' records (qvltune.rank) (pure)."""
    phases = next((r for r in records if r["kind"] == "phases"), None)
    train = [r for r in records if r["kind"] == "train"]
    saves = [r for r in records if r["kind"] == "save"]
    done = {r["step"]: r for r in records if r["kind"] == "checkpoint"}
    evals = [r for r in records if r["kind"] == "eval"]
    stalls = [r for r in records if r["kind"] == "stall"]
    end = next((r for r in reversed(records) if r["kind"] == "end"), {})
    # Step times from consecutive train records (log_steps 1), less the evals and saves between them.
    times = []
    for prev, cur in zip(train, train[1:]):
        busy = sum(e.get("seconds") or 0 for e in evals + saves if prev["time"] < e["time"] <= cur["time"])
        times.append((cur["step"], (cur["time"] - prev["time"] - busy) / max(1, cur["step"] - prev["step"])))
    steady = [t for _, t in times[1:]] or [t for _, t in times]  # the second timed step on
    median = statistics.median(steady) if steady else None
    slowest = max(times[1:] or times, key=lambda x: x[1]) if times else (None, None)
    tok = [r["tokens_per_s"] for r in train[2:] if r.get("tokens_per_s")]
    steps = train[-1]["step"] if train else 0
    steady_total = median * steps if median else None
    first_step_end = next((r["time"] for r in records if r["kind"] in ("step", "train")), None)
    return {
        "status": end.get("status"),
        "steps": steps,
        "wall_s": round(wall_s, 1),
        "to_first_step_s": phases["to_first_step"] if phases else (round(first_step_end - started, 1) if first_step_end else None),
        "phases": {p["name"]: p["seconds"] for p in phases["phases"]} if phases else {},
        "compile": (phases or {}).get("compile"),  # the first step's compile, split (qvltune.compile_cache)
        "first_step": (phases or {}).get("first_step"),  # compiling, waiting for batches, the rest
        "steady_step_median_s": median,
        "tok_s_median": statistics.median(tok) if tok else None,
        "tok_s_mean": statistics.fmean(tok) if tok else None,
        "slowest_step": slowest[0],
        "slowest_step_s": slowest[1],
        "slowest_vs_median": slowest[1] / median if median and slowest[1] else None,
        "stalls": [{k: s[k] for k in ("step", "seconds", "ratio", "gc_seconds")} for s in stalls],
        "save_blocking_s": [round(s.get("seconds") or 0, 2) for s in saves],
        "save_background_s": [round(done[s["step"]].get("background_seconds") or 0, 2) if s["step"] in done else None for s in saves],
        "save_parts": [s.get("parts") or {} for s in saves],  # where each save's blocking time went
        "eval_s": [round(e.get("seconds") or 0, 2) for e in evals],
        "steady_total_s": steady_total,
        "wall_vs_steady": wall_s / steady_total if steady_total else None,
        # After the last step: its eval and save, the final model, the ranks' exit, the command's end.
        "last_step_to_end_record_s": round(end["time"] - train[-1]["time"], 1) if train and end.get("time") else None,
        "end_record_to_exit_s": round(started + wall_s - end["time"], 1) if end.get("time") else None,
        "after_end_record": after_end_record(end.get("time"), started + wall_s, ranks or []),
    }


def after_end_record(end: float | None, exited: float, ranks: list[dict]) -> dict | None:
    """Where the time from rank 0's ``end`` record to the command's exit went, from the ranks' records:
    the worker's return (the process group's end), its exit handlers, the process's own end (the
    driver releasing the GPU), and qvltune train after the last rank (the loss plot, the summary)."""
    first = next((r for r in ranks if r.get("rank") == 0), None)
    if end is None or not first or not all(first.get(k) for k in ("returned", "exiting", "ended")):
        return None
    last = max(r["ended"] for r in ranks if r.get("ended"))
    parts = {
        "worker's return (process group)": first["returned"] - end,
        "exit handlers": first["exiting"] - first["returned"],
        "process end": first["ended"] - first["exiting"],
        "other ranks' end": last - first["ended"],
        "qvltune train after the ranks": exited - last,
    }
    return {k: round(v, 2) for k, v in parts.items()}


def compiled_code(root: Path) -> dict:
    """What Inductor generated into a compile cache folder (emptied before each cold unit, so after
    one it holds that run's training and eval graphs): its wrapper modules, the Triton kernels they
    define and any C++ kernels (``cpp_fused_*``: ops on CPU tensors, built with the C++ compiler), by
    name. On an H200 the cold 2B forward compile spent 24 s in the C++ compiler: this names what it
    built."""
    import re

    wrappers, triton, cpp = 0, set(), set()
    for path in root.rglob("*.py"):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if "async_compile" not in text:
            continue  # not a compiled graph's module
        wrappers += 1
        triton |= set(re.findall(r"^(triton_\w+) = async_compile\.triton\(", text, re.M))
        cpp |= set(re.findall(r"\b(cpp_fused_\w+)\b", text))
    return {"wrappers": wrappers, "triton_kernels": len(triton), "cpp_kernels": sorted(cpp), "cpp_sources": sum(1 for _ in root.rglob("*.cpp"))}


def evict_page_cache(files: list[Path]) -> int:
    """Drop ``files`` from the page cache (clean pages; no root needed), as on a machine that has not
    read them since boot; returns their bytes."""
    total = 0
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def planned_config(shape: str, mix: str, work: Path, log: Path, samples: int, max_steps: int | None, compile_: str) -> Path | None:
    """The unit's config as `init --yes --strategy mixed --epochs 1` plans it (every step logged),
    written once per shape and mix; None when init fails (its output is in ``log``)."""
    model = gpu_flow.model_folder(work, shape)
    data, init_args = mix_data(work, shape, mix, samples)
    plan_dir = work / f"plan-{shape}-{mix}"
    config = plan_dir / "qvltune.yaml"
    if not config.exists():
        gpu_flow.cli(log, "check-data", data, "--model", model, "--json")  # a user's first step (it leaves no index cache: the first train fills it)
        code, _, _ = gpu_flow.cli(log, "init", "--yes", "--model", model, "--data", data, "--strategy", "mixed", "--epochs", "1", "--out", plan_dir, "--name", f"wall-{shape}-{mix}", *init_args)
        if code != 0:
            return None
        doc = yaml.safe_load(config.read_text())
        doc["schedule"]["log_steps"] = 1  # every step timed
        if max_steps:
            doc["optim"]["max_steps"] = max_steps
        if compile_ != "planned":  # e.g. the compile cache through a whole run on a CPU, where init plans no compile
            doc["optim"]["compile"] = compile_ == "on"
        config.write_text(yaml.safe_dump(doc, sort_keys=False))
    return config


def run_unit(shape: str, mix: str, run: str, work: Path, out: Path, samples: int, max_steps: int | None, compile_: str = "planned", site: Path | None = None) -> dict:
    log = out / f"wall-{shape}-{mix}-{run}.log"
    config = planned_config(shape, mix, work, log, samples, max_steps, compile_)
    if config is None:
        return {"shape": shape, "mix": mix, "run": run, "error": f"init failed (see {log.name})"}
    doc = yaml.safe_load(config.read_text())
    if run == "prepare":  # the weights, data, index cache and config only (8B: its own call)
        return {"shape": shape, "mix": mix, "run": run, "config": str(config)}
    if run == "llamafactory":
        return {"shape": shape, "mix": mix, "run": run, **run_peer(shape, mix, doc, work, log, samples, site)}
    cache = Path(os.environ["QVLTUNE_CACHE"])  # the compile cache lives here (qvltune.compile_cache)
    if run == "cold":
        shutil.rmtree(cache / "compile", ignore_errors=True)
        evicted = evict_page_cache(weight_files(gpu_flow.model_folder(work, shape)))  # a cold machine's disk: the weights not in memory
        print(f"cold: compile cache emptied, {evicted / 1e9:.1f} GB of weights evicted from the page cache", flush=True)
    run_dir = Path(doc["output_dir"]) / doc["name"]
    run_dir = run_dir if run_dir.is_absolute() else config.parent / run_dir
    started = time.time()
    code, seconds, _ = gpu_flow.cli(log, "train", config, "--no-live", "--force")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()] if (run_dir / "metrics.jsonl").exists() else []
    generated = compiled_code(cache / "compile") if run == "cold" and doc["optim"].get("compile") else None
    ranks = [json.loads(p.read_text()) for p in sorted((run_dir / "ranks").glob("node*-rank*.json"))]
    return {"shape": shape, "mix": mix, "run": run, "exit": code, **summarize(records, seconds, started, ranks), "generated": generated, "config": {k: doc[k] for k in ("data", "optim", "schedule", "deepspeed")}}


def run_peer(shape: str, mix: str, doc: dict, work: Path, log: Path, samples: int, site: Path | None) -> dict:
    """LLaMA-Factory's epoch on the unit's records, weights and pixel budget, in its own process and
    stack (benchmarks/llamafactory_run.py): from the command to its saved model."""
    if site is None:
        raise SystemExit("the llamafactory unit needs --llamafactory-site (benchmarks/llamafactory_wheels.sh)")
    data, _ = mix_data(work, shape, mix, samples)
    run_dir = work / "runs" / f"llamafactory-{shape}-{mix}"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = peer_args(gpu_flow.model_folder(work, shape), data, run_dir, doc)
    started = time.time()
    proc, metrics, wall = gt.launch_llamafactory(f"llamafactory-{shape}-{mix}", args, work, site, log)
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    return summarize_peer(records, wall, started, proc.returncode, proc.stderr, saved=any(run_dir.glob("adapter_model.safetensors")))


def peer_args(model: Path, data: Path, run_dir: Path, doc: dict) -> dict:
    """LLaMA-Factory's arguments for the epoch a qvltune unit's config ``doc`` plans: its packed
    variant of gpu_throughput.py (mixed: LoRA on the LLM, the projector trained, the vision tower
    frozen), the same pixel budget and epochs, its model saved when training ends."""
    args = gt.llamafactory_args(model, data, run_dir, "mixed", "llamafactory-packed", 0, (doc["data"]["min_pixels"], doc["data"]["max_pixels"]))
    del args["max_steps"]  # save_strategy stays "no": it saves the final model when training ends
    args["num_train_epochs"] = float(doc["optim"]["epochs"])
    return args


def traceback_error(stderr: str) -> str | None:
    """The exception line of the last Python traceback in ``stderr`` (pure): the first unindented
    line after its frames, so a warning printed after it is not taken for the error; the
    ``[rank0]:`` prefix torch.distributed puts on each line is dropped."""
    import re

    lines = [re.sub(r"^\[rank\d+\]:\s?", "", line) for line in stderr.splitlines()]
    last = max((i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")), default=None)
    if last is None:
        return None
    return next((line.strip() for line in lines[last + 1 :] if line.strip() and not line.startswith((" ", "\t"))), None)


def summarize_peer(records: list[dict], wall_s: float, started: float, exit_code: int, stderr: str, saved: bool) -> dict:
    """A peer's epoch from llamafactory_run.py's step records (pure): the figures the qvltune units
    report where the peer has them, and how it ended (a failure's last error line)."""
    rates = [r["tokens"] / r["seconds"] for r in records[2:] if r.get("seconds")]  # from the third step, as the qvltune units
    error = traceback_error(stderr)
    if exit_code == 0 and saved:
        status = "completed"
    elif error:
        status = f"failed at step {len(records) + 1}: {error}"
    else:
        status = f"exit {exit_code} after step {len(records)}" + ("" if saved else ", no saved adapter")
    return {
        "exit": exit_code,
        "status": status,
        "steps": len(records),
        "wall_s": round(wall_s, 1),
        "to_first_step_s": round(records[0]["time"] - started, 1) if records else None,
        "tok_s_median": statistics.median(rates) if rates else None,
        "tok_s_mean": statistics.fmean(rates) if rates else None,
        "saved_model": saved,
    }


KEYS = ["shape", "mix", "run", "exit", "steps", "wall_s", "to_first_step_s", "tok_s_median", "tok_s_mean", "slowest_step", "slowest_vs_median", "save_blocking_s", "save_background_s", "eval_s", "wall_vs_steady", "status"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qvltune-wallclock"))
    ap.add_argument("--shapes", default="2b,8b")
    ap.add_argument("--mixes", default="bench,issue")
    ap.add_argument("--runs", default="cold,warm")
    ap.add_argument("--samples", type=int, default=2400)
    ap.add_argument("--max-steps", type=int, default=None, help="cap the epoch (CPU smoke runs)")
    ap.add_argument("--compile", choices=["planned", "on", "off"], default="planned", help="optim.compile: as init plans it (GPU: on), or forced")
    ap.add_argument("--llamafactory-site", type=Path, help="LLaMA-Factory 0.9.5 and its pinned stack (the llamafactory run)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    os.environ["QVLTUNE_CACHE"] = str(args.work / "qvltune-cache")  # every command's (and the compile cache's) cache folder
    units_file = args.work / "units.json"
    done = json.loads(units_file.read_text()) if units_file.exists() else {}
    rows = []
    for shape in args.shapes.split(","):
        for mix in args.mixes.split(",") if shape != "tiny" else ["demo"]:
            for run in args.runs.split(","):
                key = f"{shape}/{mix}/{run}"
                if key in done:
                    rows.append(done[key])
                    continue
                row = run_unit(shape, mix, run, args.work, args.out, args.samples, args.max_steps, args.compile, args.llamafactory_site)
                if run == "prepare":
                    print(json.dumps(row), flush=True)
                    continue
                done[key] = row
                units_file.write_text(json.dumps(done, indent=2))
                gpu_flow._append(args.out / "wall_clock.json", [row])
                print(json.dumps(row), flush=True)
                rows.append(row)
                if row.get("phases"):
                    gpu_flow._table([{"unit": key, "phase": k, "seconds": v} for k, v in row["phases"].items()], ["unit", "phase", "seconds"])
                if row.get("compile"):
                    print(format_compile(row["compile"]), flush=True)
    gpu_flow._table(rows, KEYS)


if __name__ == "__main__":
    main()
