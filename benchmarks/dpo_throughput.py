"""DPO throughput on one GPU: qvltune vs TRL's DPOTrainer vs LLaMA-Factory's DPO, same data and weights.

Real-size Qwen3-VL shapes with random bf16 weights and the tiny model's tokenizer, exactly as
gpu_throughput.py builds them (its helpers are reused). The data is a synthetic preference mix shaped
like that benchmark's SFT mix: images from 352x352 to 1280x960 (10% text-only pairs), prompts of 10
to 200 words, chosen and rejected answers each of 8 to 1000 words (log-uniform, independent).

Variants (LoRA r64 on every LLM linear, alpha 128, the vision tower frozen; ``mixed`` also trains
the projector, which peft keeps beside the adapters; sigmoid loss, beta 0.1; reference = the same
model with adapters off in all three):
- qvltune:       `qvltune train` with the config `qvltune init --stage dpo` writes for this model and
                 data on one H200 (packed rows of whole pairs, varlen attention, the fused answer-only
                 DPO head, compile as planned), run for --steps optimizer steps.
- trl:           TRL 0.24's DPOTrainer (LLaMA-Factory's pinned stack), its defaults: padded chosen +
                 rejected concatenated in one batch, full-vocabulary logits, gradient checkpointing,
                 per-device batch 4 pairs (benchmarks/dpo_peer_run.py).
- llamafactory:  LLaMA-Factory 0.9.5 ``stage: dpo`` on the same pairs in its sharegpt ranking
                 layout, its defaults (sdpa, gradient checkpointing), per-device batch 4 pairs.
TRL and LLaMA-Factory run from --llamafactory-site (benchmarks/llamafactory_wheels.sh; trl==0.24.0
is in that set), each in its own process; a forward pre-hook counts real tokens per step from the
attention mask (benchmarks/llamafactory_run.py's StepTimer), and pairs = rows / 2.

Reported: pairs/s and real (non-pad) tokens/s over the steps after warm-up, and peak GPU memory.
The target (issue 19): qvltune >= 2.5x the faster peer's pairs/s at no higher peak memory.

    python benchmarks/dpo_throughput.py --out $OUT --llamafactory-site /tmp/lfsite [--shapes 2b,8b] [--strategies lora,mixed] [--variants qvltune,trl,llamafactory] [--steps 16]
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

sys.path.insert(0, str(Path(__file__).parent))
from gpu_throughput import WORDS, make_model_folder, run_qvltune, summarise_steps, write_weights  # noqa: E402

BETA = 0.1
PEER_PAIRS = 4  # pairs per device batch for the peers (their padded batches)


def words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(int(lo * (hi / lo) ** rng.random())))


def make_pairs(dest: Path, n: int, seed: int = 0) -> Path:
    """``pairs.jsonl`` in LLaMA-Factory's preference layout (qvltune reads it as is)."""
    from PIL import Image

    path = dest / "pairs.jsonl"
    if path.exists():
        return path
    rng = random.Random(seed)
    (dest / "images").mkdir(parents=True, exist_ok=True)
    sizes = [(352, 352), (448, 448), (640, 480), (800, 600), (1024, 768), (1280, 960), (480, 640), (960, 1280)]
    with open(path, "w") as f:
        for i in range(n):
            question = words(rng, 10, 200)
            record = {"conversations": [{"from": "human", "value": question}], "chosen": {"from": "gpt", "value": words(rng, 8, 1000)}, "rejected": {"from": "gpt", "value": words(rng, 8, 1000)}}
            if rng.random() >= 0.1:
                w, h = rng.choice(sizes)
                name = f"images/{i:05d}.jpg"
                Image.new("RGB", (w, h), (rng.randrange(256), rng.randrange(256), rng.randrange(256))).save(dest / name, quality=80)
                record["conversations"][0]["value"] = "<image>\n" + question
                record["images"] = [str((dest / name).resolve())]
            f.write(json.dumps(record) + "\n")
    return path


def qvltune_config(name: str, model: Path, data: Path, work: Path, strategy: str, steps: int, effective_batch: int) -> dict:
    """What `qvltune init --stage dpo` plans for this model and data on one H200, run for ``steps``."""
    from qvltune.cli.estimate import dataset_summary, load_stats
    from qvltune.estimate import GiB, Machine
    from qvltune.plan import Answers, make_plan, pixel_budget

    answers = Answers(model=str(model), data=str(data), strategy=strategy, resolution="variable", effective_batch=effective_batch, stage="dpo")
    lo, hi, _ = pixel_budget(answers)
    machine = Machine("NVIDIA H200", int(139.8 * GiB), 1, 1, 128 * GiB, 989.0, True)
    doc = make_plan(answers, machine, load_stats(str(model))[0], dataset_summary(str(data), None, lo, hi, quiet=True)).doc
    doc.update(name=name, output_dir=str(work / "runs"), schedule={"log_steps": 2, "eval_steps": 100000, "save_steps": None}, launch={"gpus": 1})
    doc["model"] = {**doc["model"], "random_init": True}
    doc["data"] = {**doc["data"], "eval_split": 0.0, "num_workers": 4}
    doc["optim"] = {**doc["optim"], "max_steps": steps, "warmup_ratio": 0.0}
    doc["optim"].pop("effective_batch", None)
    doc["lora"] = {"rank": 64, "alpha": 128, "dropout": 0.05}
    doc["dpo"] = {"beta": BETA, "loss": "sigmoid", "label_smoothing": 0.0, "reference": "adapter_off"}
    return doc


def peer_spec(variant: str, weights: Path, data: Path, out: Path, strategy: str, steps: int, pixels: tuple[int, int], max_length: int) -> dict:
    """The arguments of one peer run (dpo_peer_run.py): LLaMA-Factory's, or TRL's DPOConfig."""
    lora = {"lora_rank": 64, "lora_alpha": 128, "lora_dropout": 0.05}
    if variant == "llamafactory":
        dataset_dir = out.parent / "lf-data"
        dataset_dir.mkdir(parents=True, exist_ok=True)
        columns = {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "images": "images"}
        (dataset_dir / "dataset_info.json").write_text(json.dumps({"pairs": {"file_name": str(data), "formatting": "sharegpt", "ranking": True, "columns": columns}}))
        return {"runner": "llamafactory", "args": {
            "stage": "dpo", "do_train": True, "model_name_or_path": str(weights), "template": "qwen3_vl_nothink", "dataset": "pairs", "dataset_dir": str(dataset_dir),
            "cutoff_len": max_length, "overwrite_cache": True, "preprocessing_num_workers": 8, "finetuning_type": "lora", **lora, "lora_target": "all",
            "freeze_vision_tower": True, "freeze_multi_modal_projector": strategy == "lora", "image_min_pixels": pixels[0], "image_max_pixels": pixels[1], "flash_attn": "sdpa",
            "pref_beta": BETA, "pref_loss": "sigmoid", "per_device_train_batch_size": PEER_PAIRS, "gradient_accumulation_steps": 1, "learning_rate": 5e-6,
            "max_steps": steps, "bf16": True, "logging_steps": 1, "save_strategy": "no", "report_to": "none", "output_dir": str(out), "overwrite_output_dir": True, "dataloader_num_workers": 4,
        }}
    return {"runner": "trl", "model": str(weights), "data": str(data), "strategy": strategy, "lora": lora, "pixels": list(pixels), "args": {
        "output_dir": str(out), "beta": BETA, "loss_type": "sigmoid", "max_length": max_length, "per_device_train_batch_size": PEER_PAIRS, "gradient_accumulation_steps": 1,
        "learning_rate": 5e-6, "max_steps": steps, "bf16": True, "gradient_checkpointing": True, "logging_steps": 1, "save_strategy": "no", "report_to": "none", "dataloader_num_workers": 4,
    }}


def run_peer(name: str, spec: dict, work: Path, weights: Path, site: Path, log: Path) -> dict:
    metrics = work / "runs" / name / "steps.jsonl"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    spec_path = work / f"{name}.json"
    spec_path.write_text(json.dumps({**spec, "metrics": str(metrics)}))
    env = {**os.environ, "DISABLE_VERSION_CHECK": "1", "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("dpo_peer_run.py")), str(spec_path)], capture_output=True, text=True, env=env)
    log.write_text(proc.stdout + proc.stderr)
    row = {"variant": name, "wall_s": round(time.time() - t0, 1), "exit": proc.returncode}
    stats = summarise_steps(metrics, warmup=4, weights=weights)
    if "samples_per_s" in stats:
        stats["pairs_per_s"] = stats.pop("samples_per_s") / 2  # rows: chosen and rejected of each pair
    return {**row, **stats}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qvltune-dpo-bench"))
    ap.add_argument("--shapes", default="2b,8b")
    ap.add_argument("--strategies", default="lora,mixed")
    ap.add_argument("--variants", default="qvltune,trl,llamafactory")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument("--effective-batch", type=int, default=32, help="pairs per optimizer step given to the planner")
    ap.add_argument("--max-length", type=int, default=4096, help="the peers' cutoff per sequence (prompt + one answer); qvltune's max_seq_length is the planner's")
    ap.add_argument("--llamafactory-site", type=Path, help="folder holding LLaMA-Factory 0.9.5, TRL 0.24 and their pinned stack")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = make_pairs(args.work / "data", args.pairs)
    rows = []
    for shape in args.shapes.split(","):
        model = make_model_folder(args.work / f"model-{shape}", shape)
        for strategy in args.strategies.split(","):
            cfg = None
            for variant in args.variants.split(","):
                name = f"{shape}-{strategy}-dpo-{variant}"
                cfg = cfg or qvltune_config(f"{shape}-{strategy}-dpo-qvltune", model, data, args.work, strategy, args.steps, args.effective_batch)
                if variant == "qvltune":
                    row = run_qvltune(name, cfg, args.work, args.out)
                    if "samples_per_s" in row:
                        row["pairs_per_s"] = row.pop("samples_per_s")  # qvltune counts pairs as the samples of a DPO run
                else:
                    if not args.llamafactory_site:
                        raise SystemExit(f"{name}: give --llamafactory-site (LLaMA-Factory 0.9.5 and TRL 0.24 with their pinned stack)")
                    from qvltune.config import parse_config

                    weights = write_weights(model, args.work / f"weights-{shape}")
                    pixels = parse_config(cfg).data.pixel_budget()  # the budget qvltune's run uses
                    spec = peer_spec(variant, weights, data, args.work / "runs" / name, strategy, args.steps, pixels, args.max_length)
                    row = run_peer(name, spec, args.work, weights, args.llamafactory_site, args.out / f"{name}.log")
                rows.append(row)
                print(json.dumps(row), flush=True)
                (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print("\n| variant | pairs/s | real tok/s | peak GiB | exit |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r.get('pairs_per_s', 0):.2f} | {r.get('tokens_per_s', 0):,.0f} | {r.get('mem_peak_gb', 0):.1f} | {r['exit']} |")


if __name__ == "__main__":
    main()
