"""Training throughput on one GPU: the plain recipe vs `qvltune train` as shipped, on identical data.

Real-size Qwen3-VL shapes (2B, 8B, the 30B-A3B MoE) are built from their released configs
(qvltune's catalog) with random bf16 weights (`model.random_init`), with the tiny model's tokenizer
and processors (token ids below its 769-token vocabulary; the 151,936-row embedding and lm_head are
real size; the image processor's size set to the default pixel budget, 49-1024 tokens). The data is shaped like real fine-tuning data: images from 352x352 to 1280x960 under
the default variable budget (49-784 tokens), prompts of tens to hundreds of tokens, answers of 8 to
1000 tokens, 10% text-only records.

Variants, each run through `qvltune train` (DeepSpeed ZeRO-2, the real launcher path):
- plain:   what a user writes from the transformers docs: one sample per row padded to the longest
           in a batch of 4, masked sdpa, full-vocabulary logits, gradient checkpointing on.
- qvltune: the run config `qvltune init` writes for this model, data and one H200 (effective batch
           64 samples): packed rows of the length the planner picks (the longest that fits without
           gradient checkpointing), varlen attention, fused answer-only loss, compiled decoder
           layers (the planner's choice on bf16 GPUs); run for --steps.
- qvltune-eager / qvltune-compile: the same with `optim.compile` forced off / on.
- qvltune-8k-checkpointed: qvltune's path with the plain recipe's memory settings (8k packed rows,
           gradient checkpointing on, eager), for peak memory at equal tokens per micro-batch.
- llamafactory / llamafactory-packed: LLaMA-Factory 0.9.5, the most used peer, on the same data (in
           its sharegpt layout) and the same random weights (saved once as a model folder), with its
           defaults (sdpa, gradient checkpointing, full-vocabulary logits), LoRA r64 on every LLM
           linear alone (lora) or with the projector trained (mixed), or the LLM and projector
           trained (full); the vision tower frozen, the same pixel budget; padded batches of 4, and
           its `neat_packing` into 8k rows. Needs --llamafactory-site: a folder with LLaMA-Factory
           and its pinned stack (`pip install --target`), kept apart from qvltune's
           (benchmarks/llamafactory_run.py).

Real (non-pad) tokens/s and samples/s are averaged over the logged steps after warm-up; MFU counts
6 x the language model's non-embedding parameters a token passes through (for the MoE: attention,
router and 8 of 128 experts) against 989 TFLOP/s (H100/H200 dense bf16). Prints a Markdown table;
writes results.json and logs to --out.

    python benchmarks/gpu_throughput.py --out $OUT [--shapes 2b,8b,30b-a3b] [--strategies lora,mixed,full] [--variants plain,qvltune,qvltune-eager,llamafactory,llamafactory-packed --llamafactory-site DIR] [--steps 16]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

# Real Qwen3-VL shapes: the released config.json values from qvltune's catalog.
SHAPES = {"2b": "2B", "8b": "8B", "30b-a3b": "30B-A3B"}
WORDS = "the a is of to in on and with what which colour shape image picture red green blue yellow car tree house road sky water left right top bottom large small one two three".split()


def make_model_folder(dest: Path, shape: str) -> Path:
    """config.json of a released shape (token ids remapped to the tiny tokenizer's) + the tiny
    model's tokenizer and processors."""
    from transformers import AutoConfig, AutoProcessor

    from qvltune.catalog import builtin_config
    from qvltune.pixels import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
    from qvltune.tiny import tiny_model_path

    if (dest / "config.json").exists():
        return dest
    processor = AutoProcessor.from_pretrained(tiny_model_path())
    tok = processor.tokenizer
    doc = builtin_config(SHAPES[shape])
    doc["text_config"].update(bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)
    for key, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        doc[key] = tok.convert_tokens_to_ids(token)
    doc.pop("architectures")
    config = AutoConfig.for_model(doc.pop("model_type"), **doc)
    # The tiny model's processor caps images at 65,536 pixels (64 tokens). A peer that calls the
    # processor without a pixel budget (LLaMA-Factory resizes to its image_max_pixels, then calls the
    # processor as saved) would train on images of <= 64 tokens where qvltune's runs see the
    # planner's budget (up to 1024 tokens): the folder's processor gets that budget.
    processor.image_processor.size = {"shortest_edge": DEFAULT_MIN_PIXELS, "longest_edge": DEFAULT_MAX_PIXELS}
    dest.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(dest)
    processor.save_pretrained(dest)
    return dest


def write_weights(folder: Path, dest: Path) -> Path:
    """Random bf16 weights of ``folder``'s config, saved once as a model folder (in a child process,
    so the calling script holds no GPU memory while the runs measure theirs)."""
    if (dest / "model.safetensors.index.json").exists() or (dest / "model.safetensors").exists():
        return dest
    code = (
        "import sys, torch; from transformers import AutoProcessor; from qvltune.model import load_model\n"
        "torch.manual_seed(0)\n"
        "m = load_model(sys.argv[1], dtype='bfloat16', attn_implementation='sdpa', random_init=True)\n"
        "m.save_pretrained(sys.argv[2]); AutoProcessor.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(folder), str(dest)], check=True)
    return dest


IMAGE_SIZES = [(352, 352), (448, 448), (640, 480), (800, 600), (1024, 768), (1280, 960), (480, 640), (960, 1280)]


def words(rng: random.Random, lo: int, hi: int) -> str:
    """Between ``lo`` and ``hi`` random words, the count log-uniform (many short texts, a few long)."""
    return " ".join(rng.choice(WORDS) for _ in range(int(lo * (hi / lo) ** rng.random())))


def save_image(rng: random.Random, dest: Path, i: int, sizes: list[tuple[int, int]]) -> str:
    """Record ``i``'s image: a JPEG of one random colour at one of ``sizes``, under ``dest/images``;
    returns its path relative to ``dest``."""
    from PIL import Image

    w, h = rng.choice(sizes)
    name = f"images/{i:05d}.jpg"
    Image.new("RGB", (w, h), (rng.randrange(256), rng.randrange(256), rng.randrange(256))).save(dest / name, quality=80)
    return name


def make_data(dest: Path, n: int, seed: int = 0) -> Path:
    path = dest / "train.jsonl"
    if path.exists():
        return path
    rng = random.Random(seed)
    (dest / "images").mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 200)))
            answer = words(rng, 8, 1000)
            if rng.random() < 0.1:
                f.write(json.dumps({"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}) + "\n")
                continue
            name = save_image(rng, dest, i, IMAGE_SIZES)
            f.write(json.dumps({"image": name, "conversations": [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]}) + "\n")
    return path


H200_MEMORY_GIB = 139.8  # what NVML reports for one H200 (141 GB)


def planned(model: Path, data: Path, strategy: str, effective_batch: int, stage: str = "sft", gpu_memory_gib: float = H200_MEMORY_GIB):
    """The plan `qvltune init` makes for this model, data and one H200 (the planner decides the
    packed row length, gradient checkpointing, ZeRO stage and accumulation). ``gpu_memory_gib``: an
    H200 with only that much memory, as `qvltune init --gpu H200 --gpu-memory GB` plans it."""
    from qvltune.cli.estimate import dataset_summary, load_stats
    from qvltune.estimate_inputs import Machine
    from qvltune.plan import Answers, make_plan, pixel_budget
    from qvltune.units import GiB

    answers = Answers(model=str(model), data=str(data), strategy=strategy, resolution="variable", effective_batch=effective_batch, stage=stage)
    lo, hi, _ = pixel_budget(answers)
    machine = Machine("NVIDIA H200", int(gpu_memory_gib * GiB), 1, 1, 128 * GiB, 989.0, True)
    return make_plan(answers, machine, load_stats(str(model))[0], dataset_summary(str(data), None, lo, hi, quiet=True))


def planned_doc(model: Path, data: Path, strategy: str, effective_batch: int, stage: str = "sft") -> dict:
    """The run config `qvltune init` writes for this model, data and one H200."""
    return planned(model, data, strategy, effective_batch, stage).doc


def run_config(name: str, model: Path, data: Path, out: Path, strategy: str, variant: str, steps: int, profile: bool, stage: int | None, effective_batch: int) -> dict:
    """plain: the recipe from the transformers docs. qvltune*: the planner's config, run for ``steps``."""
    schedule = {"log_steps": 2, "eval_steps": 100000, "save_steps": None, "profile_steps": [steps - 4, 2] if profile else None}
    if variant == "plain":
        return {
            "name": name,
            "output_dir": str(out / "runs"),
            "model": {"path": str(model), "random_init": True, "attn_implementation": "sdpa"},
            "data": {"train": str(data), "max_seq_length": 8192, "packing": False, "num_workers": 4},
            "strategy": strategy,
            "optim": {"learning_rate": 1e-5, "per_device_batch": 4, "grad_accum": 1, "max_steps": steps, "bf16": True, "gradient_checkpointing": True, "fused_loss": False, "warmup_ratio": 0.0},
            "schedule": schedule,
            "deepspeed": {"stage": stage or 2},
            "launch": {"gpus": 1},
        }
    doc = planned_doc(model, data, strategy, effective_batch)
    doc.update(name=name, output_dir=str(out / "runs"), schedule=schedule, launch={"gpus": 1})
    doc["model"] = {**doc["model"], "random_init": True}
    doc["data"] = {**doc["data"], "eval_split": 0.0, "num_workers": 4}
    doc["optim"] = {**doc["optim"], "max_steps": steps, "warmup_ratio": 0.0}
    if variant in ("qvltune-eager", "qvltune-compile"):
        doc["optim"]["compile"] = variant == "qvltune-compile"
    if variant == "qvltune-8k-checkpointed":  # the plain recipe's memory settings on qvltune's path
        doc["data"]["max_seq_length"] = 8192
        doc["optim"].update(grad_accum=1, gradient_checkpointing=True, compile=False)
    doc["optim"].pop("effective_batch", None)
    if stage is not None:
        doc["deepspeed"] = {**doc["deepspeed"], "stage": stage}
    return doc


def llamafactory_data(data: Path) -> Path:
    """The same records in LLaMA-Factory's sharegpt layout (absolute image paths), + dataset_info.json."""
    dest = data.parent / "llamafactory"
    if (dest / "dataset_info.json").exists():
        return dest
    records = []
    for line in data.read_text().splitlines():
        r = json.loads(line)
        records.append({"conversations": r["conversations"], "images": [str((data.parent / r["image"]).resolve())] if "image" in r else []})
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "train.json").write_text(json.dumps(records))
    info = {"bench": {"file_name": "train.json", "formatting": "sharegpt", "columns": {"messages": "conversations", "images": "images"}}}
    (dest / "dataset_info.json").write_text(json.dumps(info))
    return dest


def llamafactory_args(weights: Path, data: Path, out: Path, strategy: str, variant: str, steps: int, pixels: tuple[int, int]) -> dict:
    """LLaMA-Factory's training arguments for one variant (its defaults where not named here)."""
    tuning = {"finetuning_type": "lora", "lora_rank": 64, "lora_alpha": 128, "lora_dropout": 0.05, "lora_target": "all"} if strategy in ("lora", "mixed") else {"finetuning_type": "full"}
    packed = variant == "llamafactory-packed"
    return {
        "stage": "sft", "do_train": True, "model_name_or_path": str(weights), "template": "qwen3_vl_nothink",
        "dataset": "bench", "dataset_dir": str(llamafactory_data(data)), "cutoff_len": 8192, "overwrite_cache": True, "preprocessing_num_workers": 8,
        **tuning, "freeze_vision_tower": True, "freeze_multi_modal_projector": strategy == "lora",
        "image_min_pixels": pixels[0], "image_max_pixels": pixels[1], "flash_attn": "sdpa",
        "per_device_train_batch_size": 1 if packed else 4, "gradient_accumulation_steps": 1, "neat_packing": packed,
        "learning_rate": 1e-4, "max_steps": steps, "bf16": True, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
        "output_dir": str(out), "overwrite_output_dir": True, "dataloader_num_workers": 4,
    }


def peer_env(site: Path) -> dict:
    """The environment of a peer's run: its pinned stack in ``site`` first on the path, and
    LLaMA-Factory's check of that stack's versions off."""
    return {**os.environ, "DISABLE_VERSION_CHECK": "1", "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def launch_llamafactory(name: str, args: dict, work: Path, site: Path, log: Path) -> tuple[subprocess.CompletedProcess, Path, float]:
    """LLaMA-Factory with ``args`` in its own process and stack (llamafactory_run.py, its output in
    ``log``) -> (the process, its per-step records file, the wall seconds)."""
    metrics = Path(args["output_dir"]) / "steps.jsonl"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    spec = work / f"{name}.json"
    spec.write_text(json.dumps({"args": args, "metrics": str(metrics)}))
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("llamafactory_run.py")), str(spec)], capture_output=True, text=True, env=peer_env(site))
    log.write_text(proc.stdout + proc.stderr)
    return proc, metrics, time.time() - t0


def run_llamafactory(name: str, weights: Path, data: Path, work: Path, strategy: str, variant: str, steps: int, pixels: tuple[int, int], site: Path, log: Path) -> dict:
    """One LLaMA-Factory run in its own process and stack -> its results row."""
    args = llamafactory_args(weights, data, work / "runs" / name, strategy, variant, steps, pixels)
    proc, metrics, seconds = launch_llamafactory(name, args, work, site, log)
    row = {"variant": name, "wall_s": round(seconds, 1), "exit": proc.returncode, "row_tokens": args["cutoff_len"], "packing": args["neat_packing"],
           "batch": f"{args['per_device_train_batch_size']}x{args['gradient_accumulation_steps']}", "checkpointing": True, "compile": False}  # its default: checkpointing on
    return {**row, **summarise_steps(metrics, warmup=4, weights=weights)}


def run_qvltune(name: str, cfg: dict, work: Path, out: Path, warmup: int = 4) -> dict:
    """One `qvltune train` run of ``cfg`` -> its results row (logs and any profile copied to ``out``)."""
    cfg_path = work / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "qvltune", "train", str(cfg_path), "--no-live", "--force"], capture_output=True, text=True)
    run_dir = work / "runs" / name
    train_log = run_dir / "train.log"
    tail = "\n--- train.log tail ---\n" + "\n".join(train_log.read_text().splitlines()[-60:]) if train_log.exists() else ""
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr + tail)
    if (run_dir / "profile.txt").exists():
        (out / f"{name}-profile.txt").write_text((run_dir / "profile.txt").read_text())
    o = cfg["optim"]
    row = {"variant": name, "wall_s": round(time.time() - t0, 1), "exit": proc.returncode, "row_tokens": cfg["data"]["max_seq_length"], "packing": cfg["data"]["packing"],
           "batch": f"{o['per_device_batch']}x{o['grad_accum']}", "checkpointing": o["gradient_checkpointing"], "compile": o.get("compile", False)}
    return {**row, **(summarise(run_dir / "metrics.jsonl", warmup=warmup) if (run_dir / "metrics.jsonl").exists() else {"error": "no metrics"})}


def summarise_steps(metrics: Path, warmup: int, weights: Path) -> dict:
    """llamafactory_run.py's per-step counts: real tokens/s and samples/s over the steps after warm-up."""
    from qvltune.model_stats import model_stats

    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    steady = [r for r in recs if r["step"] > warmup]
    if not steady:
        return {"error": "no steps logged"}
    seconds = sum(r["seconds"] for r in steady)
    tokens = sum(r["tokens"] for r in steady)
    flops = 6.0 * model_stats(json.loads((weights / "config.json").read_text())).llm_active_params()  # the worker's MFU rule
    return {
        "tokens_per_s": tokens / seconds,
        "samples_per_s": sum(r["samples"] for r in steady) / seconds,
        "mfu": tokens / seconds * flops / 989e12,
        "mem_peak_gb": max(r.get("mem_peak_gb", 0) for r in recs),
        "padding": 1 - tokens / max(1, sum(r["slots"] for r in steady)),
        "status": "completed" if len(recs) >= warmup else "stopped",
    }


def summarise(metrics: Path, warmup: int) -> dict:
    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    start = next((r for r in recs if r["kind"] == "start"), {})
    train = [r for r in recs if r["kind"] == "train" and r["step"] > warmup]
    end = next((r for r in recs if r["kind"] == "end"), {})
    if not train:
        return {"error": end.get("message", "no steps logged")}
    mean = lambda key: sum(r[key] for r in train if r.get(key) is not None) / max(1, sum(1 for r in train if r.get(key) is not None))  # noqa: E731
    return {
        "tokens_per_s": mean("tokens_per_s"),
        "samples_per_s": mean("samples_per_s"),
        "mfu": mean("mfu") if any(r.get("mfu") is not None for r in train) else None,
        "mem_peak_gb": max((r.get("mem_peak_gb") or 0) for r in train),
        "padding": start.get("padding"),
        "padding_unpacked": start.get("padding_unpacked"),
        "status": end.get("status"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qvltune-gpu-bench"))
    ap.add_argument("--shapes", default="2b,8b")
    ap.add_argument("--strategies", default="mixed,full")
    ap.add_argument("--variants", default="plain,qvltune")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--effective-batch", type=int, default=64, help="samples per optimizer step given to the planner (its default for datasets of 1,280+ records)")
    ap.add_argument("--profile", default="", help="variant names (shape-strategy-variant) to profile")
    ap.add_argument("--stages", default="", help="ZeRO stages to compare, e.g. 0,1,2 (default: the planner's)")
    ap.add_argument("--llamafactory-site", type=Path, help="folder holding LLaMA-Factory 0.9.5 and its pinned stack (for the llamafactory variants)")
    ap.add_argument("--skip", default="8b-full", help="shape-strategy or shape-strategy-variant names to skip (8B full does not fit one GPU)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = make_data(args.work / "data", args.samples)
    rows = []
    for shape in args.shapes.split(","):
        model = make_model_folder(args.work / f"model-{shape}", shape)
        for strategy in args.strategies.split(","):
            if f"{shape}-{strategy}" in args.skip.split(","):
                continue
            for variant, stage in [(v, int(z) if z else None) for v in args.variants.split(",") for z in args.stages.split(",")]:
                name = f"{shape}-{strategy}-{variant}" + (f"-zero{stage}" if stage is not None else "")
                if name in args.skip.split(","):
                    continue
                if variant.startswith("llamafactory"):
                    if not args.llamafactory_site:
                        raise SystemExit(f"{name}: give --llamafactory-site (a folder with LLaMA-Factory 0.9.5 and its pinned stack)")
                    from qvltune.config import parse_config

                    weights = write_weights(model, args.work / f"weights-{shape}")
                    pixels = parse_config(planned_doc(model, data, strategy, args.effective_batch)).data.pixel_budget()  # the budget qvltune's runs use
                    row = run_llamafactory(name, weights, data, args.work, strategy, variant, args.steps, pixels, args.llamafactory_site, args.out / f"{name}.log")
                else:
                    cfg = run_config(name, model, data, args.work, strategy, variant, args.steps, name in args.profile.split(","), stage, args.effective_batch)
                    row = run_qvltune(name, cfg, args.work, args.out)
                rows.append(row)
                print(json.dumps(row), flush=True)
                (args.out / "results.json").write_text(json.dumps(rows, indent=2))  # after every run: a cut call keeps what finished
    print("\n| variant | rows (tokens x batch x accum) | ckpt | real tok/s | samples/s | MFU | peak GiB | padding | exit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{r['mfu'] * 100:.1f}%" if r.get("mfu") else "-"
        pad = f"{r['padding'] * 100:.1f}%" if r.get("padding") is not None else "-"
        print(f"| {r['variant']} | {r['row_tokens']:,} x {r['batch']} | {'on' if r['checkpointing'] else 'off'} | {r.get('tokens_per_s', 0):,.0f} | {r.get('samples_per_s', 0):.2f} | {mfu} | {r.get('mem_peak_gb', 0):.1f} | {pad} | {r['exit']} |")


if __name__ == "__main__":
    main()
