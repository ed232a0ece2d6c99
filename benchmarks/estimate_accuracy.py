"""Predicted (qvltune.estimate) vs measured peak GPU memory, on real-size Qwen3-VL shapes.

Each case builds a Qwen3-VL 2B- or 8B-shaped model from its released config (qvltune.catalog) with
random bf16 weights (``model.random_init``: ``_from_config`` on the GPU; the cost of a step does not
depend on the weights' values), with the tiny model's tokenizer and processors (its token ids are
written into the config; the 151,936-row embedding and lm_head stay real size). It then trains a few
steps through qvltune's own path — ``qvltune.train.validate`` / ``prepare_run`` and the exact
``deepspeed`` launcher command of ``qvltune train`` running ``qvltune.worker`` (Trainer + DeepSpeed +
peft, the fused loss, varlen attention) — and reads ``torch.cuda.max_memory_allocated`` from the
metrics rank 0 logs at every step. The prediction is ``estimate()`` for the same config with the
batch's exact token counts. The run is stopped after the logged steps (no final save).

Every record is one 896x896 image (exactly 784 LLM tokens under a fixed 802,816-pixel budget) and
one long answer, so every row has the same exact length (``max_seq_length`` is set to it) and the
micro-batch is known exactly.

    python benchmarks/estimate_accuracy.py --out $OUT                   # every case this machine's GPUs allow
    python benchmarks/estimate_accuracy.py --out $OUT --cases 2b-lora,8b-lora-ckpt --steps 6 --seq 4096
    python benchmarks/estimate_accuracy.py --list
    python benchmarks/estimate_accuracy.py --out /tmp/x --dry-run --gpu H200   # predictions only (CPU is fine)

Prints a Markdown table (predicted vs measured GiB, error %, and tokens/s predicted at the assumed
MFU vs measured) and writes results.json and each case's train.log tail to --out. Calibrate by
adjusting the named constants in qvltune/estimate.py (ACT_LLM_SCALE, ACT_VISION_SCALE, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

IMAGE_SIDE = 896  # 28 x 28 = 784 LLM image tokens (one per 32x32 pixels)
IMAGE_PIXELS = IMAGE_SIDE * IMAGE_SIDE
WORDS = "the a is of to in on and with what which colour shape image picture red green blue yellow car tree house road sky water left right top bottom large small one two three".split()


@dataclass(frozen=True)
class Case:
    name: str
    size: str  # catalog size: 2B, 8B (or "tiny" for a CPU smoke run)
    strategy: str
    checkpointing: bool
    stage: int = 2
    gpus: int = 1
    offload: bool = False
    vision: str | None = None  # components.vision override (e.g. "lora": the vision tower trains)
    fused_loss: bool = True
    per_device_batch: int = 1


# At least 2B and 8B, LoRA and full, with and without checkpointing; plus the terms a plan can pick
# (ZeRO-3, CPU offload, a trained vision tower, the plain loss). 8B full needs 2+ GPUs.
CASES = [
    Case("2b-lora", "2B", "lora", False),
    Case("2b-lora-ckpt", "2B", "lora", True),
    Case("2b-full", "2B", "full", False),
    Case("2b-full-ckpt", "2B", "full", True),
    Case("2b-mixed-vision-lora", "2B", "mixed", False, vision="lora"),
    Case("2b-lora-plain-loss", "2B", "lora", False, fused_loss=False),
    Case("2b-lora-batch2", "2B", "lora", True, per_device_batch=2),
    Case("2b-full-offload-ckpt", "2B", "full", True, offload=True),
    Case("8b-lora", "8B", "lora", False),
    Case("8b-lora-ckpt", "8B", "lora", True),
    Case("8b-mixed", "8B", "mixed", False),
    Case("8b-full-z3-ckpt-2gpu", "8B", "full", True, stage=3, gpus=2),
    Case("8b-full-z2-ckpt-2gpu", "8B", "full", True, stage=2, gpus=2),
    Case("tiny-full", "tiny", "full", False),  # CPU smoke run of the measuring path (no GPU numbers)
]
DEFAULT_CASES = [c.name for c in CASES if c.size != "tiny"]


# ----------------------------------------------------------------------------------------------
# Model folders and data (CPU)


@lru_cache(maxsize=8)
def _model_config_json(size: str) -> str:
    return json.dumps(_model_config(size))


def model_config(size: str) -> dict[str, Any]:
    return json.loads(_model_config_json(size))


def _model_config(size: str) -> dict[str, Any]:
    """The catalog's config.json of a size, with the tiny tokenizer's special-token ids."""
    from qvltune.catalog import builtin_config
    from qvltune.model import read_model_config
    from qvltune.tiny import BUILTIN_TINY, build_tokenizer

    if size == "tiny":
        return read_model_config(BUILTIN_TINY)
    doc = builtin_config(size)
    tok = build_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>", "<|im_end|>")}
    doc.update(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    doc["text_config"].update(pad_token_id=ids["<|endoftext|>"], bos_token_id=None, eos_token_id=ids["<|im_end|>"])
    return doc


def make_model_folder(dest: Path, size: str) -> Path:
    """config.json of the shape + the tiny model's tokenizer and processors (no weights: random_init)."""
    from transformers import CONFIG_MAPPING, AutoProcessor

    from qvltune.tiny import tiny_model_path

    if (dest / "config.json").exists() and (dest / "tokenizer_config.json").exists():
        return dest
    doc = model_config(size)
    dest.mkdir(parents=True, exist_ok=True)
    CONFIG_MAPPING[doc["model_type"]].from_dict({k: v for k, v in doc.items() if k != "model_type"}).save_pretrained(dest)
    AutoProcessor.from_pretrained(tiny_model_path()).save_pretrained(dest)
    return dest


def make_data(dest: Path, records: int, answer_words: int) -> Path:
    """``records`` records of one 896x896 image (each its own colour) and the same long answer."""
    from PIL import Image

    path = dest / f"train-{answer_words}.jsonl"
    if path.exists() and sum(1 for _ in open(path)) == records:
        return path
    (dest / "images").mkdir(parents=True, exist_ok=True)
    answer = " ".join(WORDS[i % len(WORDS)] for i in range(answer_words))
    with open(path, "w") as f:
        for i in range(records):
            name = f"images/{i:04d}.png"
            if not (dest / name).exists():
                Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)).save(dest / name)
            f.write(json.dumps({"image": name, "conversations": [{"from": "human", "value": "<image>\nDescribe the picture."}, {"from": "gpt", "value": answer}]}) + "\n")
    return path


def exact_lengths(data: Path, model_dir: Path, pixels: int) -> tuple[int, int]:
    """(tokens per record, labelled tokens per record), exactly as training counts them."""
    from qvltune.data.check import CheckOptions, check_dataset
    from qvltune.model import load_processor

    processor = load_processor(str(model_dir), pixels, pixels)
    report = check_dataset(str(data), CheckOptions(processor=processor, min_pixels=pixels, max_pixels=pixels))
    if report.errors:
        raise SystemExit(f"benchmark data has errors: {report.errors[0].message}")
    lengths = {u[2] for u in report.usable}
    trained = {u[3] for u in report.usable}
    assert len(lengths) == 1 and len(trained) == 1, "every record must have the same length"
    return lengths.pop(), trained.pop()


def answer_words_for(seq: int) -> int:
    """Answer length (words of the tiny tokenizer's vocabulary, ~1 token each) for rows of ~``seq`` tokens."""
    return max(8, seq - 784 - 40)


# ----------------------------------------------------------------------------------------------
# Config, prediction, measurement


def case_config(case: Case, model_dir: Path, data: Path, seq: int, work: Path, steps: int) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": case.name,
        "output_dir": str(work / "runs"),
        "model": {"path": str(model_dir), "random_init": True, "attn_implementation": "auto"},
        "data": {"train": str(data), "min_pixels": IMAGE_PIXELS if case.size != "tiny" else 4096, "max_pixels": IMAGE_PIXELS if case.size != "tiny" else 65536, "max_seq_length": seq, "num_workers": 2},
        "strategy": case.strategy,
        "optim": {
            "learning_rate": 1e-5,
            "per_device_batch": case.per_device_batch,
            "grad_accum": 1,
            "max_steps": steps,
            "warmup_ratio": 0.0,
            "bf16": case.size != "tiny",
            "optimizer": "adamw_torch_fused" if case.size != "tiny" else "adamw_torch",
            "gradient_checkpointing": case.checkpointing,
            "fused_loss": case.fused_loss,
        },
        "schedule": {"log_steps": 1, "eval_steps": 100000, "save_steps": None},
        "deepspeed": {"stage": case.stage, "offload_optimizer": case.offload},
        "launch": {"gpus": case.gpus, "cpu_processes": 1},
    }
    if case.vision:
        doc["components"] = {"vision": case.vision}
    return doc


def predict(case: Case, cfg, seq: int, trained: int, gpu: str, gpu_memory: float | None) -> Any:
    from qvltune.estimate import estimate
    from qvltune.estimate_inputs import Machine, Workload
    from qvltune.hardware import planned_gpus
    from qvltune.model_stats import model_stats

    stats = model_stats(model_config(case.size))
    g = planned_gpus(gpu, case.gpus, gpu_memory)[0]
    machine = Machine(g.name, g.memory_total, case.gpus, 1, None, g.peak_tflops, True)
    rows = case.per_device_batch
    image = 784 * rows if case.size != "tiny" else 0
    workload = Workload(tokens=rows * seq, image_tokens=image, rows=rows, assumption="benchmark rows", label_share=trained / seq)
    return estimate(cfg, stats, machine, workload)


def measure(cfg, steps: int, timeout: float) -> dict[str, Any]:
    """Train through qvltune's launcher path; stop after ``steps`` logged steps (no final save)."""
    from qvltune.hardware import detect_gpus
    from qvltune.launch import free_port, remove_shm_buffers, start
    from qvltune.train import launch_command, prepare_run, validate

    gpus = detect_gpus()[0]
    validate(cfg, gpus)
    prepare_run(cfg, resume=False, force=True)
    port = free_port()
    argv, env = launch_command(cfg, len(gpus), resume=False, master_port=port)
    log = cfg.run_dir / "train.log"
    child = start(argv, env, log, cfg.run_dir)
    metrics = cfg.run_dir / "metrics.jsonl"
    t0 = time.time()
    train: list[dict] = []
    try:
        while child.poll() is None and time.time() - t0 < timeout:
            child.read_output()
            if metrics.exists():
                recs = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
                train = [r for r in recs if r.get("kind") == "train"]
                if len(train) >= steps:
                    break
            time.sleep(1.0)
    finally:
        child.terminate(timeout=20)
        remove_shm_buffers(port)  # the ranks stopped here leave DeepSpeed's CPU all-reduce buffers
    tail = log.read_text().splitlines()[-40:] if log.exists() else []
    if not train:
        return {"error": "no step logged", "log_tail": tail}
    warm = train[2:] or train  # first steps include compilation/allocation warm-up
    tps = [r["tokens_per_s"] for r in warm if r.get("tokens_per_s")]
    peaks = [r["mem_peak_gb"] for r in train if r.get("mem_peak_gb") is not None]
    return {
        "measured_gib": max(peaks) if peaks else None,
        "tokens_per_s": sum(tps) / len(tps) if tps else None,
        "steps": len(train),
        "log_tail": tail,
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| case | model | strategy | ckpt | ZeRO | GPUs | tokens/GPU | predicted GiB | measured GiB | error | tok/s predicted | tok/s measured |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r.get("measured_gib")
        err = f"{100 * (r['predicted_gib'] - m) / m:+.1f}%" if m else "-"
        tpp = f"{r['predicted_tokens_per_s']:,.0f}" if r.get("predicted_tokens_per_s") else "-"
        tpm = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
        lines.append(
            f"| {r['case']} | {r['size']} | {r['strategy']}{' +vision ' + r['vision'] if r.get('vision') else ''} | {'on' if r['checkpointing'] else 'off'} | "
            f"{r['stage']}{' +offload' if r['offload'] else ''} | {r['gpus']} | {r['tokens']:,} | {r['predicted_gib']:.1f} | {f'{m:.1f}' if m else (r.get('error') or '-')} | {err} | {tpp} | {tpm} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="where results.json and logs go")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qvltune-estimate-bench"))
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES), help="comma-separated case names (--list)")
    ap.add_argument("--steps", type=int, default=6, help="logged optimizer steps per case")
    ap.add_argument("--seq", type=int, default=4096, help="approximate tokens per row (set exactly from the data)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    ap.add_argument("--gpu", default=None, help="GPU name for predictions (default: the detected one; H200 with --dry-run)")
    ap.add_argument("--gpu-memory", type=float, default=None)
    ap.add_argument("--dry-run", action="store_true", help="predictions only, nothing is trained")
    ap.add_argument("--allow-cpu", action="store_true", help="run the tiny-full case without a GPU (checks the measuring path)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=True, help="run 1-GPU cases side by side, one per GPU (peak memory is per process)")
    args = ap.parse_args(argv)
    if args.list:
        for c in CASES:
            print(f"{c.name:26} {json.dumps(asdict(c))}")
        return 0
    known = {c.name: c for c in CASES}
    unknown = [n for n in args.cases.split(",") if n not in known]
    if unknown:
        print(f"unknown case(s): {', '.join(unknown)} (--list shows them)", file=sys.stderr)
        return 2
    cases = [known[n] for n in args.cases.split(",")]

    from qvltune.config import parse_config
    from qvltune.estimate import ASSUMED_UTILIZATION
    from qvltune.hardware import detect_gpus, peak_tflops

    gpus = detect_gpus()[0]
    if not gpus and not (args.dry_run or args.allow_cpu):
        print("no GPU here: use --dry-run for predictions only, or --allow-cpu --cases tiny-full to check the measuring path", file=sys.stderr)
        return 2
    gpu_name = args.gpu or (gpus[0].name if gpus else "H200")
    out = args.out or args.work / "results"
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    todo: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (row, config document) to measure
    for case in cases:
        if not args.dry_run and case.gpus > max(1, len(gpus)):
            print(f"skip {case.name}: needs {case.gpus} GPUs, {len(gpus)} here", file=sys.stderr)
            continue
        model_dir = make_model_folder(args.work / f"model-{case.size.lower()}", case.size)
        if case.size == "tiny":
            from qvltune.tiny import make_demo_dataset

            data, _ = make_demo_dataset(args.work / "tiny-data", 64, 8)
            seq, trained = 256, 8
        else:
            records = args.steps * case.per_device_batch * case.gpus + 8
            data = make_data(args.work / "data", records, answer_words_for(args.seq))
            seq, trained = exact_lengths(data, model_dir, IMAGE_PIXELS)
        doc = case_config(case, model_dir, data, seq, args.work, args.steps + 2)
        cfg = parse_config(doc, case.name)
        est = predict(case, cfg, seq, trained, gpu_name, args.gpu_memory)
        row: dict[str, Any] = {**asdict(case), "case": case.name, "tokens": seq * case.per_device_batch, "predicted_gib": est.peak_allocated / 2**30}
        peak = peak_tflops(gpu_name)
        row["predicted_tokens_per_s"] = case.gpus * peak * 1e12 * ASSUMED_UTILIZATION / est.step_flops_per_token if peak else None
        row["terms"] = {t.name: round(t.bytes / 2**30, 3) for t in est.gpu_terms}
        rows.append(row)
        if args.dry_run:
            print(json.dumps({k: v for k, v in row.items() if k != "terms"}), flush=True)
        else:
            todo.append((row, doc))

    def run_case(row: dict[str, Any], doc: dict[str, Any], device: int | None) -> None:
        if device is not None:  # pin a 1-GPU case to one device so cases can run side by side
            doc = {**doc, "launch": {**doc["launch"], "gpus": [device]}}
        t0 = time.time()
        result = measure(parse_config(doc, row["case"]), args.steps, args.timeout)
        (out / f"{row['case']}.log").write_text("\n".join(result.pop("log_tail", [])) + "\n")
        row.update(result, wall_s=round(time.time() - t0, 1))
        print(json.dumps({k: v for k, v in row.items() if k != "terms"}), flush=True)
        (out / "results.json").write_text(json.dumps(rows, indent=2))

    single = [(r, d) for r, d in todo if r["gpus"] == 1]
    if args.parallel and len(gpus) > 1 and len(single) > 1:
        import queue
        from concurrent.futures import ThreadPoolExecutor

        free: queue.Queue[int] = queue.Queue()
        for i in range(len(gpus)):
            free.put(i)

        def on_free_gpu(row: dict[str, Any], doc: dict[str, Any]) -> None:
            device = free.get()
            try:
                run_case(row, doc, device)
            finally:
                free.put(device)

        with ThreadPoolExecutor(len(gpus)) as pool:
            list(pool.map(lambda rd: on_free_gpu(*rd), single))
        todo = [(r, d) for r, d in todo if r["gpus"] > 1]
    for row, doc in todo:
        run_case(row, doc, None)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print()
    print(f"Machine: {gpu_name} x {len(gpus) or 'none (predictions only)'}; rows of exactly the tokens shown (one 896x896 image = 784 tokens + one answer); "
          f"measured = max torch.cuda.max_memory_allocated over {args.steps} logged steps (rank 0); tokens/s predicted with the step's FLOPs at {ASSUMED_UTILIZATION:.0%} of the peak.")
    print()
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
