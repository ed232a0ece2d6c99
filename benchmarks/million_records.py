"""``qvltune check-data`` on 1,000,000 records: wall time and peak memory of the whole process tree.

The synthetic dataset (made once into --workdir, deterministic): JSONL records in the Qwen format,
questions of 3-40 words and answers of 1-200 words, each with one image from a pool of --images
distinct PNG files of varied sizes (64..1024 px per side; every file really has its pixels). The
check reads image headers (no --deep) and estimates text tokens (no --model). Memory is the summed
proportional set size (PSS: each shared page split among the processes sharing it) of the CLI process
and its forked worker processes, sampled every 0.2 s.

    python benchmarks/million_records.py [--records 1000000] [--images 10000] [--workers 2] [--workdir /tmp/qvltune-million]
    python benchmarks/million_records.py --prepare --records 20000   # training's data preparation, first vs cached
    python benchmarks/million_records.py --train                     # qvltune train to its first step, first and second run

``--prepare`` times what ``qvltune train`` does before launching (``prepare_data``: exact counts with
the tiny model's processor) on a fresh index cache, then again with the cache beside the data.

``--train`` runs ``qvltune train`` (tiny model, CPU, packed rows, 2 steps) on the dataset twice: first
with no index cache beside the data (every record checked and counted with the model's processor,
in every core), then again (the cache reused); each time it reports the seconds from the command's
start to its first training step (the first ``train`` record of metrics.jsonl), the start-up phases
the run logged, and the peak memory of the whole process tree.

Targets (issue 20): check-data under 5 minutes and 4 GB; a second ``qvltune train`` reaches its first
step in under 2 minutes; on the 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

WORDS_Q = ["what", "is", "shown", "in", "the", "image", "describe", "colour", "where", "how", "many"]
WORDS_A = ["a", "red", "car", "on", "the", "road", "with", "trees", "two", "people", "near", "house"]


def make_dataset(workdir: Path, n: int, n_images: int) -> Path:
    data = workdir / f"data-{n}-{n_images}.jsonl"
    if data.exists():
        return data
    from PIL import Image

    rng = random.Random(0)
    images = workdir / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        path = images / f"{i:06d}.png"
        if not path.exists():
            Image.new("RGB", (rng.randint(64, 1024), rng.randint(64, 1024)), (i % 256, 80, 160)).save(path)
    tmp = data.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in range(n):
            question = " ".join(rng.choice(WORDS_Q) for _ in range(rng.randint(3, 40)))
            answer = " ".join(rng.choice(WORDS_A) for _ in range(rng.randint(1, 200)))
            image = f"images/{rng.randrange(n_images):06d}.png"
            f.write(json.dumps({"image": image, "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}) + "\n")
    tmp.replace(data)
    return data


def tree_rss(pid: int, field: str = "Pss:") -> int:
    """Proportional set size (``field`` "Rss:": resident set size) of ``pid`` and its descendants,
    summed, in bytes (from /proc). Summed RSS counts pages shared by forked workers once per process."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))
        except (OSError, StopIteration):
            pass
    return total


def run(cmd: list[str]) -> tuple[float, int, str, float, int]:
    """(wall seconds, peak PSS bytes, stdout, CPU seconds of the whole process tree, peak summed RSS bytes)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = peak_rss = 0
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    done = threading.Event()

    def sample():
        nonlocal peak, peak_rss
        while not done.is_set():
            peak = max(peak, tree_rss(proc.pid))
            peak_rss = max(peak_rss, tree_rss(proc.pid, "Rss:"))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    done.set()
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # includes the CLI's own (waited) workers
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return time.perf_counter() - t0, peak, out, cpu, peak_rss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qvltune-million"))
    ap.add_argument("--prepare", action="store_true", help="time training's data preparation (first run, then from the index cache)")
    ap.add_argument("--train", action="store_true", help="time qvltune train to its first step (first run, then from the index cache)")
    ap.add_argument("--keep-cache", action="store_true", help="--train: keep an index cache from before (only the second run)")
    args = ap.parse_args()
    if args.prepare:
        return prepare(args)
    if args.train:
        return train_start(args)
    t0 = time.perf_counter()
    data = make_dataset(args.workdir, args.records, args.images)
    print(f"dataset: {data} ({data.stat().st_size / 1e6:.0f} MB), made or found in {time.perf_counter() - t0:.0f} s")
    cmd = [sys.executable, "-m", "qvltune", "check-data", str(data), "--json", "--workers", str(args.workers)]
    load = os.getloadavg()[0]
    wall, peak, out, cpu, peak_rss = run(cmd)
    doc = json.loads(out)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; load average before / after: {load:.1f} / {os.getloadavg()[0]:.1f}")
    print(f"command: qvltune check-data {data.name} --json --workers {args.workers}")
    print(f"records: {doc['records']:,} (valid {doc['valid_records']:,}), images checked: {doc['image_sizes']['count']:,}, duplicates: {sum(p['code'] == 'duplicate' for p in doc['problems']):,}")
    print(f"wall time {wall:.1f} s, CPU time of the process tree {cpu:.1f} s ({cpu / args.records * 1e6:.0f} us per record), peak memory of the process tree: PSS {peak / 2**30:.2f} GiB, summed RSS {peak_rss / 2**30:.2f} GiB")


def prepare(args) -> None:
    import shutil

    from qvltune.config import parse_config
    from qvltune.data.dataset import prepare_data
    from qvltune.model import load_processor

    data = make_dataset(args.workdir, args.records, args.images)
    shutil.rmtree(data.parent / ".qvltune-index", ignore_errors=True)
    cfg = parse_config({"name": "bench", "model": {"path": "builtin:tiny"}, "data": {"train": str(data), "max_seq_length": 4096}, "optim": {"bf16": False, "optimizer": "adamw_torch"}})
    processor = load_processor("builtin:tiny", *cfg.data.pixel_budget())
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")
    for run in ("first run (checks and counts every record)", "second run (index cache)"):
        t0, c0 = time.perf_counter(), time.process_time()
        index = prepare_data(cfg, processor)
        print(f"{run}: {len(index.train):,} records, wall {time.perf_counter() - t0:.1f} s, CPU {time.process_time() - c0:.1f} s, from cache: {index.from_cache}")


def train_start(args) -> None:
    import shutil

    import yaml

    data = make_dataset(args.workdir, args.records, args.images)
    print(f"dataset: {data} ({data.stat().st_size / 1e6:.0f} MB, {args.records:,} records)")
    if not args.keep_cache:
        shutil.rmtree(data.parent / ".qvltune-index", ignore_errors=True)
    config = args.workdir / "train.yaml"
    runs = args.workdir / "runs"
    config.write_text(yaml.safe_dump({
        "name": "million", "output_dir": str(runs), "model": {"path": "builtin:tiny"},
        "data": {"train": str(data), "max_seq_length": 4096, "packing": True, "num_workers": 2},
        "strategy": "lora",
        "optim": {"bf16": False, "optimizer": "adamw_torch", "per_device_batch": 1, "grad_accum": 1, "max_steps": 2, "warmup_ratio": 0.0},
        "schedule": {"log_steps": 1, "save_steps": None},
        "deepspeed": {"stage": 0},
    }))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"command: qvltune train {config} --no-live --force (tiny model, CPU, packed rows of 4096 tokens, 2 steps, 2 data loader workers)")
    for name in (["second run (index cache beside the data)"] if args.keep_cache else ["first run (no index cache)", "second run (index cache beside the data)"]):
        metrics = runs / "million" / "metrics.jsonl"
        load = os.getloadavg()[0]
        first_step, peak, wall, code = first_step_time([sys.executable, "-m", "qvltune", "train", str(config), "--no-live", "--force"], metrics)
        log = (runs / "million" / "train.log").read_text().split("qvltune: launching:")[-1]  # this run's part of the log
        phases = [line.split("qvltune: ", 1)[1].strip() for line in log.splitlines() if " in " in line and line.startswith("qvltune: ") and line.rstrip().endswith(" s")]
        print(f"{name}: exit {code}; first step after {first_step:.1f} s (whole command {wall:.1f} s); peak memory of the process tree: PSS {peak[0] / 2**30:.2f} GiB, summed RSS {peak[1] / 2**30:.2f} GiB; load average before {load:.1f}, after {os.getloadavg()[0]:.1f}")
        print("    worker phases: " + "; ".join(phases))


def first_step_time(cmd: list[str], metrics: Path) -> tuple[float, tuple[int, int], float, int]:
    """(seconds to the first train record in ``metrics``, peak PSS and summed RSS bytes, wall seconds, exit code)."""
    metrics.unlink(missing_ok=True)
    t0 = time.perf_counter()
    # DeepSpeed builds its CPU communication op on first use into TORCH_EXTENSIONS_DIR; a folder of the
    # benchmark's own, so the second run finds it built (as a user's would) whatever else runs here.
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(metrics.parents[2] / "torch_extensions")}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    peak, peak_rss, first = 0, 0, float("nan")
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        peak_rss = max(peak_rss, tree_rss(proc.pid, "Rss:"))
        if first != first and metrics.exists() and '"kind": "train"' in metrics.read_text().replace('"kind":"train"', '"kind": "train"'):
            first = time.perf_counter() - t0
        time.sleep(1.0)  # the /proc walk costs CPU of its own: sampled each second
    if first != first and metrics.exists() and '"kind": "train"' in metrics.read_text().replace('"kind":"train"', '"kind": "train"'):
        first = time.perf_counter() - t0
    return first, (peak, peak_rss), time.perf_counter() - t0, proc.returncode


if __name__ == "__main__":
    main()
