"""Time from `qvltune train` to the first step, phase by phase, of two source trees side by side
(e.g. main and a branch): the start-up cuts of issue 21 measured on the same data, same config and
the same machine, runs interleaved so that the load of a shared machine falls on both alike.

The run is one uncompiled optimizer step of the tiny model on records shaped like the GPU
benchmark's mix (gpu_throughput.make_data: JPEGs of 352x352 to 1280x960, 10% text-only), as
`qvltune init --strategy mixed` plans it, after `qvltune check-data --model` on the same data, so
the phases before the model (the data check, the launcher, the imports, the process group) are
what a user waits for and the first step is short.

    python benchmarks/startup.py --out $OUT --before /path/to/other/tree [--runs 5] [--samples 600]
    python benchmarks/startup.py --out $OUT --launcher-only [--runs 7]   # the launcher phase alone

`--before` is another source tree of qvltune (its root, e.g. `git archive main | tar -x -C DIR`);
the tree this script lives in is `after`. Prints a table of median seconds per phase and the ratio
after/before; writes startup.json (every run's phases) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
import gpu_throughput as gt  # noqa: E402

HERE = Path(__file__).resolve().parent.parent


def qvltune(tree: Path, *args: str, log: Path) -> tuple[int, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "COLUMNS": "200"}
    t0 = time.time()
    # cwd: `python -m` puts the current folder first on sys.path, for the ranks too
    proc = subprocess.run([sys.executable, "-m", "qvltune", *map(str, args)], capture_output=True, text=True, env=env, cwd=tree)
    seconds = time.time() - t0
    with open(log, "a") as f:
        f.write(f"$ PYTHONPATH={tree} qvltune {' '.join(map(str, args))}\n{proc.stdout}{proc.stderr}\n[exit {proc.returncode}, {seconds:.1f} s]\n\n")
    return proc.returncode, seconds


def prepare(work: Path, samples: int, log: Path) -> Path:
    """Data, check-data, and a config of one uncompiled step (shared by both trees)."""
    from qvltune.tiny import tiny_model_path

    config = work / "plan" / "qvltune.yaml"
    if config.exists():
        return config
    data = gt.make_data(work / "data", samples)
    model = tiny_model_path()
    qvltune(HERE, "check-data", data, "--model", model, "--json", log=log)
    code, _ = qvltune(HERE, "init", "--yes", "--model", model, "--data", data, "--strategy", "mixed", "--epochs", "1", "--out", work / "plan", "--name", "startup", "--resolution", "variable", log=log)
    if code != 0:
        raise SystemExit(f"init failed, see {log}")
    doc = yaml.safe_load(config.read_text())
    doc["optim"]["max_steps"] = 1
    doc["optim"]["compile"] = False
    doc["data"]["max_pixels"] = 200704  # a short first step: the phases before it are what is measured
    doc["data"]["max_seq_length"] = 4096
    doc["schedule"]["log_steps"] = 1
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    return config


def phases_of(config: Path) -> dict | None:
    doc = yaml.safe_load(config.read_text())
    metrics = config.parent / doc["output_dir"] / doc["name"] / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    record = next((r for r in records if r.get("kind") == "phases"), None)
    if record is None:
        return None
    return summary(record)


def summary(record: dict) -> dict:
    """A phases record as {phase: seconds}, with ``model and data ready``: from the command until the
    weights are loaded and the data index is ready (the consecutive phases up to the wait for the
    data index, or the model load; pure)."""
    names = [p["name"] for p in record["phases"]]
    last = "waiting for the data index" if "waiting for the data index" in names else "model load"
    upto = names.index(last) + 1 if last in names else len(names)
    ready = sum(p["seconds"] for p in record["phases"][:upto] if not p.get("parallel"))
    row = {"to_first_step": record["to_first_step"], "model and data ready": round(ready, 3)}
    row.update({p["name"] + (" (in parallel)" if p.get("parallel") else ""): p["seconds"] for p in record["phases"]})
    return row


PROBE = "import sys, time; open(sys.argv[-1], 'w').write(repr(time.time()))"


def launcher_only(runs: int, work: Path) -> dict[str, list[float]]:
    """Seconds from starting the ranks to the first line of the rank's module, three ways: DeepSpeed's
    runner (``deepspeed --num_gpus 1 ...``), its per-node launcher directly
    (``qvltune.launch.one_node_launch``), and qvltune's guard starting the ranks of that launcher
    command itself (``qvltune.node_ranks``, what ``qvltune train`` runs on one node): the launcher
    phase alone, without a data check beside it."""
    from qvltune.launch import deepspeed_launcher, one_node_launch

    probe = work / "probe_rank.py"
    probe.write_text(PROBE.replace("; ", "\n") + "\n")
    forms = ("runner", "direct", "ranks")
    out: dict[str, list[float]] = {form: [] for form in forms}
    for i in range(runs):
        for form in forms if i % 2 == 0 else forms[::-1]:
            stamp = work / f"probe-{form}-{i}"
            argv = [*deepspeed_launcher(), "--num_gpus", "1", "--master_port", str(29650 + i), "--module", "probe_rank", str(stamp)]
            if form != "runner":
                argv = one_node_launch(argv)
            if form == "ranks":
                argv = [sys.executable, "-m", "qvltune.launch", str(work), *argv]
            t0 = time.time()
            subprocess.run(argv, cwd=work, env={**os.environ, "PYTHONPATH": f"{work}{os.pathsep}{HERE}", "OMP_NUM_THREADS": "1"}, capture_output=True, check=True)
            out[form].append(round(float(stamp.read_text()) - t0, 3))
            print(json.dumps({"form": form, "run": i, "seconds": out[form][-1]}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--before", type=Path, help="the other source tree (its root)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qvltune-startup"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--samples", type=int, default=600)
    ap.add_argument("--launcher-only", action="store_true", help="time only the launcher: DeepSpeed's runner, its launcher started directly, qvltune starting the ranks")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.launcher_only:
        seconds = launcher_only(args.runs, args.work)
        (args.out / "launcher.json").write_text(json.dumps(seconds, indent=2))
        med = {k: statistics.median(v) for k, v in seconds.items()}
        print(f"\nlauncher to the rank's first line, median of {args.runs}: " + ", ".join(f"{k} {v:.2f} s ({v / med['runner']:.2f}x)" for k, v in med.items()))
        return
    if args.before is None:
        ap.error("--before is required (unless --launcher-only)")
    log = args.out / "startup.log"
    config = prepare(args.work, args.samples, log)
    trees = {"before": args.before.resolve(), "after": HERE}
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for i in range(args.runs):
        for name in ("before", "after") if i % 2 == 0 else ("after", "before"):  # interleaved, alternating order
            code, seconds = qvltune(trees[name], "train", config, "--no-live", "--force", log=log)
            row = phases_of(config) if code == 0 else None
            if row is None:
                raise SystemExit(f"{name} run {i} failed (exit {code}), see {log}")
            row["whole command"] = round(seconds, 2)
            row["load average"] = os.getloadavg()[0]
            runs[name].append(row)
            print(json.dumps({"tree": name, "run": i, **row}), flush=True)
    (args.out / "startup.json").write_text(json.dumps(runs, indent=2))
    names = list(dict.fromkeys(k for rows in runs.values() for row in rows for k in row))
    print("\n| phase (median s) | before | after | after / before |\n|---|---|---|---|")
    for key in names:
        med = {t: statistics.median([r[key] for r in rows if key in r]) if any(key in r for r in rows) else None for t, rows in runs.items()}
        ratio = f"{med['after'] / med['before']:.2f}" if med["before"] and med["after"] is not None else "-"
        cell = {t: "-" if v is None else f"{v:.1f}" for t, v in med.items()}
        print(f"| {key} | {cell['before']} | {cell['after']} | {ratio} |")


if __name__ == "__main__":
    main()
