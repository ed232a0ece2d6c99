"""Where a checkpoint save's blocking time goes, on the CPU: the ``parts`` of each ``checkpoint`` record.

The tiny Qwen3-VL scaled up so that the sizes matter (the LLM ~100M parameters, fp32 on the CPU;
the mixed strategy trains the merger and the DeepStack mergers fully and the LLM with LoRA, as for
8B: the model is several times larger than its trained part, whose fp32 master weights and Adam
moments make DeepSpeed's files), saved once as a model folder; `qvltune train` of the demo task,
ZeRO-2, one process, a checkpoint every 2 steps. Prints per checkpoint what training waited for
(the parts: the model/adapter files, DeepSpeed's state copied to host memory, the ranks meeting,
the other Trainer files) and the background write, and the sizes of the files written.

    python benchmarks/save_breakdown.py --out /tmp/save-breakdown/result.json [--work /tmp/save-breakdown] [--steps 6] [--before SRC_TREE]

`--before` runs the same measurement with another source tree of qvltune (its root; this script's
tree otherwise), as benchmarks/startup.py does. RESULTS.md's "before" is this tree with the save's
two cuts switched off by benchmarks/save_cuts_off.patch (the checkpoint's adapter through the
Trainer's own save_model: accelerate's get_state_dict of the whole model, then peft's save; DeepSpeed's
state into fresh pageable copies instead of the reused buffers); the parts are still timed:

    git worktree add --detach /tmp/save-before HEAD      # or: git archive HEAD | tar -x -C /tmp/save-before
    git -C /tmp/save-before apply benchmarks/save_cuts_off.patch
    python benchmarks/save_breakdown.py --before /tmp/save-before --out /tmp/save-breakdown/before-0.json

The machine is shared and has 2 cores: compare the shares, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parents[1]  # this script's source tree

# The scaled model: Qwen3-VL's geometry, sizes between the tiny model and 2B.
TEXT = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8, head_dim=64)
MROPE = [12, 10, 10]  # head_dim / 2 = 32, split like the released models' [24, 20, 20]
VISION = dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, out_hidden_size=1024, deepstack_visual_indexes=[0, 1, 2])


def model_folder(dest: Path) -> Path:
    """The scaled model with random fp32 weights and the tiny model's tokenizer and processors."""
    if (dest / "model.safetensors").exists():
        return dest
    import torch
    from transformers import AutoConfig, AutoProcessor, Qwen3VLForConditionalGeneration

    from qvltune.tiny import tiny_model_path

    tiny = tiny_model_path()
    config = AutoConfig.from_pretrained(tiny)
    for key, value in TEXT.items():
        setattr(config.text_config, key, value)
    config.text_config.rope_parameters["mrope_section"] = MROPE
    for key, value in VISION.items():
        setattr(config.vision_config, key, value)
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    AutoProcessor.from_pretrained(tiny).save_pretrained(dest)
    return dest


def write_config(work: Path, model: Path, steps: int, processes: int) -> Path:
    from qvltune.tiny import make_demo_dataset

    train, evals = make_demo_dataset(work / "data", n_train=64, n_eval=8, seed=1)
    doc = {
        "name": "save",
        "output_dir": str(work / "runs"),
        "model": {"path": str(model)},
        "data": {"train": str(train), "eval": str(evals), "max_seq_length": 256, "num_workers": 0},
        "strategy": "mixed",
        "optim": {"learning_rate": 1e-4, "bf16": False, "optimizer": "adamw_torch", "per_device_batch": 1, "grad_accum": 1, "max_steps": steps, "warmup_ratio": 0.0},
        "schedule": {"log_steps": 1, "eval_steps": 10_000, "save_steps": 2, "save_total_limit": 10},
        "deepspeed": {"stage": 2},
        "launch": {"cpu_processes": processes},
    }
    path = work / "save.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def sizes(checkpoint: Path) -> dict[str, int]:
    """Bytes written per kind of file: the adapter (model files), DeepSpeed's, the rest."""
    out = {"adapter": 0, "deepspeed": 0, "other": 0}
    for f in checkpoint.rglob("*"):
        if f.is_file():
            kind = "adapter" if f.name.startswith("adapter_") else "deepspeed" if f.parent.name.startswith("global_step") else "other"
            out[kind] += f.stat().st_size
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/save-breakdown"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--before", type=Path, help="run another source tree of qvltune (its root) instead of this one")
    args = parser.parse_args()
    tree = (args.before or HERE).resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    model = model_folder(args.work / "model")
    config = write_config(args.work, model, args.steps, args.processes)
    started = time.time()
    # cwd: `python -m` puts the current folder first on sys.path, for the ranks too
    env = {**os.environ, "PYTHONPATH": str(tree), "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "qvltune", "train", str(config), "--no-live", "--force"], capture_output=True, text=True, env=env, cwd=tree)
    if result.returncode != 0:
        sys.exit(result.stdout[-3000:] + result.stderr[-3000:])
    run = args.work / "runs" / "save"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["time"] for r in records if r["kind"] == "train"]
    step_s = sorted(b - a for a, b in zip(steps, steps[1:]))
    saves = []
    for r in records:
        if r["kind"] != "checkpoint":
            continue
        path = Path(r["path"])
        saves.append({"step": r["step"], "blocking_s": r["seconds"], "background_s": r["background_seconds"], "parts": r.get("parts") or {}, "bytes": sizes(path) if path.exists() else None})
    summary = {
        "command": f"python benchmarks/save_breakdown.py --out {args.out} --steps {args.steps} --processes {args.processes}" + (f" --before {args.before}" if args.before else ""),
        "tree": str(tree),
        "model": {"text": TEXT, "vision": VISION},
        "run_s": round(time.time() - started, 1),
        "median_step_s": step_s[len(step_s) // 2] if step_s else None,
        "saves": saves,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    print(f"median step {summary['median_step_s']:.2f} s" if step_s else "")
    for s in saves:
        total = s["blocking_s"] or 1e-9
        parts = ", ".join(f"{k} {v:.2f} s ({v / total:.0%})" for k, v in s["parts"].items())
        mb = {k: f"{v / 2**20:.0f} MB" for k, v in (s["bytes"] or {}).items()}
        print(f"checkpoint-{s['step']}: training waited {s['blocking_s']:.2f} s [{parts}]; background {s['background_s']:.2f} s; files {mb}")


if __name__ == "__main__":
    main()
