"""DPO throughput on one GPU: qvltune vs TRL's DPOTrainer vs LLaMA-Factory's DPO, same data and weights.

Real-size Qwen3-VL shapes with random bf16 weights and the tiny model's tokenizer, exactly as
gpu_throughput.py builds them (its helpers are reused). The data is a synthetic preference mix shaped
like that benchmark's SFT mix: images from 352x352 to 1280x960 (10% text-only pairs), prompts of 10
to 200 words, chosen and rejected answers each of 8 to 1000 words (log-uniform, independent).

Variants (LoRA r64 on every LLM linear, alpha 128, the vision tower frozen; ``mixed`` also trains
the merger and the DeepStack mergers whole, which peft keeps beside the adapters (modules_to_save;
LLaMA-Factory's additional_target); sigmoid loss, beta 0.1; reference = the same model with adapters
off in all three):
- qvltune:       `qvltune train` with the config `qvltune init --stage dpo` writes for this model and
                 data on one H200 (packed rows of whole pairs, varlen attention, the fused answer-only
                 DPO head, compile as planned), run for --steps optimizer steps.
- qvltune-matched: the same, planned for an H200 with only the faster successful peer's measured
                 peak memory (same shape and strategy) as its memory, as `qvltune init --stage dpo
                 --gpu H200 --gpu-memory GB` plans it: the planner keeps its own 10% margin below that
                 budget, so it takes shorter rows or gradient checkpointing where the full H200's rows
                 would not fit. The budget: --match-memory-gb, else the peer's row from this call or
                 from an earlier call with the same --work (its results.json); the variant runs after
                 the peers of its shape and strategy.
- trl:           TRL 0.24's DPOTrainer (LLaMA-Factory's pinned stack), its defaults: padded chosen +
                 rejected concatenated in one batch, full-vocabulary logits, gradient checkpointing,
                 per-device batch 4 pairs (benchmarks/dpo_peer_run.py). TRL 0.24 cannot train Qwen3-VL
                 on these pairs (its vision preprocessing fails on a text-only pair, and on image pairs
                 it keeps one patch row and no image_grid_thw, so the model's forward fails): the row
                 records its exception and where it came from.
- llamafactory:  LLaMA-Factory 0.9.5 ``stage: dpo`` on the same pairs in its sharegpt ranking
                 layout, its defaults (sdpa, gradient checkpointing), per-device batch 4 pairs.
TRL and LLaMA-Factory run from --llamafactory-site (benchmarks/llamafactory_wheels.sh; trl==0.24.0
is in that set), each in its own process; a forward pre-hook counts the real tokens and the image
patch rows of each trained forward (not the reference's, which runs without gradients) from the
attention mask (benchmarks/llamafactory_run.py's StepTimer), and pairs = rows / 2.

Reported: pairs/s and real (non-pad) tokens/s over the steps after --warmup, peak GPU memory, the
planner's estimate of it for qvltune's rows, and qvltune's pairs/s and peak as multiples of the
faster successful peer's; a variant that fails is a row with its error, and the table prints even
when the call is cut (SIGTERM). The target (issue 19): qvltune >= 2.5x the faster peer's pairs/s at
no higher peak memory.

    python benchmarks/dpo_throughput.py --out $OUT --llamafactory-site /tmp/lfsite [--shapes 2b,8b] [--strategies lora,mixed] [--variants qvltune,qvltune-matched,trl,llamafactory] [--steps 16] [--match-memory-gb GB]

``--shapes tiny`` is the script's own check on CPU, not a measurement: the built-in tiny model (its
own fp32 weights), small images and answers of a few words, one process; only what a CPU forces
differs from the GPU path (fp32, unfused Adam, no compile, no data workers):

    python benchmarks/dpo_throughput.py --out /tmp/dpo-cpu --work /tmp/dpo-cpu --llamafactory-site /tmp/lfsite --shapes tiny --steps 6 --warmup 2 --pairs 64
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from gpu_throughput import H200_MEMORY_GIB, IMAGE_SIZES, SHAPES, make_model_folder, peer_env, planned, run_qvltune, save_image, summarise_steps, words, write_weights  # noqa: E402

BETA = 0.1
VARIANTS = ["qvltune", "qvltune-matched", "trl", "llamafactory"]
PEERS = ["trl", "llamafactory"]
PEER_PAIRS = 4  # pairs per device batch for the peers (their padded batches)


def make_pairs(dest: Path, n: int, seed: int = 0, tiny: bool = False) -> Path:
    """``pairs.jsonl`` in LLaMA-Factory's preference layout (qvltune reads it as is). ``tiny``: the CPU
    check's mix, small images and prompts and answers of a few words, so a step takes seconds."""
    path = dest / "pairs.jsonl"
    if path.exists():
        return path
    rng = random.Random(seed)
    (dest / "images").mkdir(parents=True, exist_ok=True)
    sizes = [(64, 64), (96, 64), (64, 96), (128, 96)] if tiny else IMAGE_SIZES
    prompt, answer = ((4, 20), (4, 24)) if tiny else ((10, 200), (8, 1000))
    with open(path, "w") as f:
        for i in range(n):
            question = words(rng, *prompt)
            record = {"conversations": [{"from": "human", "value": question}], "chosen": {"from": "gpt", "value": words(rng, *answer)}, "rejected": {"from": "gpt", "value": words(rng, *answer)}}
            if rng.random() >= 0.1:
                name = save_image(rng, dest, i, sizes)
                record["conversations"][0]["value"] = "<image>\n" + question
                record["images"] = [str((dest / name).resolve())]
            f.write(json.dumps(record) + "\n")
    return path


def qvltune_plan(model: Path, data: Path, strategy: str, effective_batch: int, gpu_memory_gib: float = H200_MEMORY_GIB):
    """The plan of `qvltune init --stage dpo` for this model and data on one H200 (``gpu_memory_gib``:
    one given only that much memory, `init --gpu H200 --gpu-memory GB`)."""
    return planned(model, data, strategy, effective_batch, stage="dpo", gpu_memory_gib=gpu_memory_gib)


def qvltune_config(name: str, model: Path, data: Path, work: Path, strategy: str, steps: int, effective_batch: int, cpu: bool = False, plan=None) -> dict:
    """The config of ``plan`` (by default what `qvltune init --stage dpo` plans for this model and
    data on one H200), run for ``steps`` (``cpu``: with only what a CPU forces changed)."""
    doc = copy.deepcopy((plan or qvltune_plan(model, data, strategy, effective_batch)).doc)
    doc.update(name=name, output_dir=str(work / "runs"), schedule={"log_steps": 2, "eval_steps": 100000, "save_steps": None}, launch={"gpus": 1})
    doc["model"] = {**doc["model"], "random_init": True}
    doc["data"] = {**doc["data"], "eval_split": 0.0, "num_workers": 4}
    doc["optim"] = {**doc["optim"], "max_steps": steps, "warmup_ratio": 0.0}
    doc["optim"].pop("effective_batch", None)
    doc["lora"] = {"rank": 64, "alpha": 128, "dropout": 0.05}
    doc["dpo"] = {"beta": BETA, "loss": "sigmoid", "label_smoothing": 0.0, "reference": "adapter_off"}
    if cpu:  # what the CPU check forces: fp32, unfused Adam, one process, no data workers, eager, the tiny model's own weights
        doc["optim"].update(bf16=False, optimizer="adamw_torch", compile=False)
        doc["data"]["num_workers"] = 0
        doc["launch"] = {"cpu_processes": 1}
        doc["model"]["random_init"] = False
    return doc


def peer_spec(variant: str, weights: Path, data: Path, out: Path, strategy: str, steps: int, pixels: tuple[int, int], max_length: int, cpu: bool = False) -> dict:
    """The arguments of one peer run (dpo_peer_run.py): LLaMA-Factory's, or TRL's DPOConfig. ``cpu``:
    fp32 and no worker processes, the rest as on the GPU."""
    lora = {"lora_rank": 64, "lora_alpha": 128, "lora_dropout": 0.05}
    beside = trained_beside_lora(weights) if strategy == "mixed" else []
    workers = 0 if cpu else 4
    if variant == "llamafactory":
        dataset_dir = out.parent / "lf-data"
        dataset_dir.mkdir(parents=True, exist_ok=True)
        columns = {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "images": "images"}
        (dataset_dir / "dataset_info.json").write_text(json.dumps({"pairs": {"file_name": str(data), "formatting": "sharegpt", "ranking": True, "columns": columns}}))
        return {"runner": "llamafactory", "args": {
            "stage": "dpo", "do_train": True, "model_name_or_path": str(weights), "template": "qwen3_vl_nothink", "dataset": "pairs", "dataset_dir": str(dataset_dir),
            "cutoff_len": max_length, "overwrite_cache": True, "preprocessing_num_workers": None if cpu else 8, "finetuning_type": "lora", **lora, "lora_target": "all",
            # With LoRA, freeze_multi_modal_projector: false trains nothing more (it acts in freeze tuning
            # only); the projector trains as a peft modules_to_save, LLaMA-Factory's additional_target.
            "additional_target": ",".join(beside) or None, "freeze_vision_tower": True, "freeze_multi_modal_projector": strategy == "lora", "image_min_pixels": pixels[0], "image_max_pixels": pixels[1], "flash_attn": "sdpa",
            "pref_beta": BETA, "pref_loss": "sigmoid", "per_device_train_batch_size": PEER_PAIRS, "gradient_accumulation_steps": 1, "learning_rate": 5e-6,
            "max_steps": steps, "bf16": not cpu, "logging_steps": 1, "save_strategy": "no", "report_to": "none", "output_dir": str(out), "overwrite_output_dir": True, "dataloader_num_workers": workers,
        }}
    return {"runner": "trl", "model": str(weights), "data": str(data), "modules_to_save": beside, "lora": lora, "pixels": list(pixels), "dtype": "float32" if cpu else "bfloat16", "args": {
        "output_dir": str(out), "beta": BETA, "loss_type": "sigmoid", "max_length": max_length, "max_prompt_length": None, "max_completion_length": None, "per_device_train_batch_size": PEER_PAIRS, "gradient_accumulation_steps": 1,
        "learning_rate": 5e-6, "max_steps": steps, "bf16": not cpu, "gradient_checkpointing": True, "logging_steps": 1, "save_strategy": "no", "report_to": "none", "dataloader_num_workers": workers,
        # TRL 0.24 keeps only its text columns otherwise and drops pixel_values: the images would never
        # reach the model (LLaMA-Factory sets the same, "important for multimodal dataset").
        "remove_unused_columns": False,
    }}


def trained_beside_lora(model: Path) -> list[str]:
    """What ``mixed`` trains whole beside the LoRA adapters, as peft ``modules_to_save`` names: the
    merger and each DeepStack merger (the list qvltune.model.modules_to_save builds for ``mixed``,
    read here from config.json so that no model is loaded)."""
    deepstack = json.loads((model / "config.json").read_text())["vision_config"].get("deepstack_visual_indexes", [])
    return ["merger"] + [f"deepstack_merger_list.{i}" for i in range(len(deepstack))]


def run_peer(name: str, spec: dict, work: Path, weights: Path, site: Path, log: Path, warmup: int = 4) -> dict:
    metrics = work / "runs" / name / "steps.jsonl"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    spec_path = work / f"{name}.json"
    spec_path.write_text(json.dumps({**spec, "metrics": str(metrics)}))
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("dpo_peer_run.py")), str(spec_path)], capture_output=True, text=True, env=peer_env(site))
    log.write_text(proc.stdout + proc.stderr)
    row = {"variant": name, "wall_s": round(time.time() - t0, 1), "exit": proc.returncode}
    stats = summarise_steps(metrics, warmup=warmup, weights=weights)
    if "samples_per_s" in stats:
        stats["pairs_per_s"] = stats.pop("samples_per_s") / 2  # rows: chosen and rejected of each pair
    if proc.returncode:
        stats["error"] = last_error(proc.stderr)
    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    stats["image_patches"] = sum(r.get("image_patches", 0) for r in recs)  # 0 on image pairs: the peer dropped the images
    return {**row, **stats}


def last_error(text: str) -> str:
    """A failed run's exception (the last traceback's last line) and the innermost frame it came from,
    and the peer's own innermost frame, e.g. ``IndexError: list index out of range
    (transformers/image_transforms.py:974, from trl/trainer/dpo_trainer.py:762)``."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    frames = [i for i, line in enumerate(lines) if line.startswith('File "')]
    if not frames:
        return lines[-1] if lines else "(no output)"
    # The exception line is the first one after the last frame that is neither code nor a caret marker.
    error = next((line for line in lines[frames[-1] + 1 :] if ":" in line and not line.startswith(("~", "^")) and line.split(":")[0].replace(".", "").isidentifier()), lines[-1])

    def place(i: int) -> str:
        parts = lines[i].split('"')
        return "/".join(parts[1].split("/")[-3:]) + ":" + parts[2].split("line ")[-1].split(",")[0]

    # ... and the innermost frame of the peer itself (TRL or LLaMA-Factory), where it called into that.
    own = [i for i in frames if any(f"/{pkg}/" in lines[i] for pkg in ("trl", "llamafactory"))]
    via = f", from {place(own[-1])}" if own and own[-1] != frames[-1] else ""
    return f"{error} ({place(frames[-1])}{via})"


def model_for(shape: str, work: Path) -> Path:
    """The model folder of a shape: a released shape's config with the tiny tokenizer, or (``tiny``)
    the built-in tiny model itself."""
    if shape == "tiny":
        from qvltune.tiny import tiny_model_path

        return Path(tiny_model_path())
    return make_model_folder(work / f"model-{shape}", shape)


def run_variant(variant: str, name: str, shape: str, strategy: str, model: Path, data: Path, cfg: dict, args: argparse.Namespace) -> dict:
    """One variant's results row (its log in --out)."""
    if variant == "qvltune":
        row = run_qvltune(name, cfg, args.work, args.out, args.warmup)
        if "samples_per_s" in row:
            row["pairs_per_s"] = row.pop("samples_per_s")  # qvltune counts pairs as the samples of a DPO run
        if row["exit"]:
            row["error"] = last_error((args.out / f"{name}.log").read_text())
        return row
    if not args.llamafactory_site:
        raise SystemExit(f"{name}: give --llamafactory-site (LLaMA-Factory 0.9.5 and TRL 0.24 with their pinned stack)")
    from qvltune.config import parse_config

    # The tiny model's own fp32 weights (qvltune's run loads them too); a released shape's random bf16 ones.
    weights = model if shape == "tiny" else write_weights(model, args.work / f"weights-{shape}")
    pixels = parse_config(cfg).data.pixel_budget()  # the budget qvltune's run uses
    spec = peer_spec(variant, weights, data, args.work / "runs" / name, strategy, args.steps, pixels, args.max_length, cpu=shape == "tiny")
    return run_peer(name, spec, args.work, weights, args.llamafactory_site, args.out / f"{name}.log", args.warmup)


def faster_peer(shape_strategy: str, rows: list[dict]) -> dict | None:
    """The successful peer row of ``shape_strategy`` (e.g. ``2b-lora``) with the most pairs/s; of rows
    of one name the last counts (a later call's). A peer whose forwards got no image is no comparison."""
    latest = {r["variant"]: r for r in rows}
    peers = [latest[n] for n in (f"{shape_strategy}-dpo-{p}" for p in PEERS) if n in latest]
    done = [r for r in peers if r.get("exit") == 0 and r.get("pairs_per_s") and r.get("image_patches") != 0]
    return max(done, key=lambda r: r["pairs_per_s"], default=None)


def memory_budget(shape_strategy: str, rows: list[dict], given: float | None) -> tuple[float, str] | None:
    """(GiB, where from) qvltune-matched is planned to: ``given`` (--match-memory-gb), else the faster
    successful peer's measured peak; None when there is neither (a CPU run measures no peak)."""
    if given is not None:
        return given, "--match-memory-gb"
    peer = faster_peer(shape_strategy, rows)
    return (peer["mem_peak_gb"], peer["variant"]) if peer and peer.get("mem_peak_gb") else None


def run_matched(name: str, shape: str, strategy: str, model: Path, data: Path, known: list[dict], args: argparse.Namespace) -> dict:
    """qvltune-matched's row: the plan for an H200 of the peer's peak memory, run like qvltune's."""
    from qvltune.units import GiB

    budget = memory_budget(f"{shape}-{strategy}", known, args.match_memory_gb)
    if budget is None:
        return {"variant": name, "wall_s": 0.0, "exit": None, "error": f"no peer peak memory for {shape}-{strategy}: run a peer first (same --work) or give --match-memory-gb GB"}
    gib, source = budget
    plan = qvltune_plan(model, data, strategy, args.effective_batch, gpu_memory_gib=gib)
    info = {"memory_budget_gb": gib, "budget_from": source, "planned_peak_gb": plan.estimate.per_gpu / GiB, "zero": zero_label(plan.doc)}
    if not plan.fits:
        return {"variant": name, "wall_s": 0.0, "exit": None, **info, "error": f"no plan fits {gib:.1f} GiB (the planner's smallest needs {info['planned_peak_gb']:.1f} GiB)"}
    cfg = qvltune_config(name, model, data, args.work, strategy, args.steps, args.effective_batch, cpu=shape == "tiny", plan=plan)
    return {**run_variant("qvltune", name, shape, strategy, model, data, cfg, args), **info}


def zero_label(cfg: dict) -> str:
    """The ZeRO setting of a run config, e.g. ``ZeRO-2`` or ``ZeRO-3 + offload``."""
    ds = cfg["deepspeed"]
    return f"ZeRO-{ds['stage']}" + (" + offload" if ds.get("offload_optimizer") or ds.get("offload_params") else "")


def earlier_rows(work: Path) -> list[dict]:
    """The rows earlier calls with this --work recorded (the peers qvltune-matched can be planned to)."""
    path = work / "results.json"
    return json.loads(path.read_text()) if path.exists() else []


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qvltune-dpo-bench"))
    ap.add_argument("--shapes", default="2b,8b", help="2b, 8b (GPU) or tiny (the built-in tiny model on CPU: the script's own check)")
    ap.add_argument("--strategies", default="lora,mixed")
    ap.add_argument("--variants", default="qvltune,trl,llamafactory")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=4, help="optimizer steps left out of the averages")
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument("--effective-batch", type=int, default=32, help="pairs per optimizer step given to the planner")
    ap.add_argument("--max-length", type=int, default=4096, help="the peers' cutoff per sequence (prompt + one answer); qvltune's max_seq_length is the planner's")
    ap.add_argument("--llamafactory-site", type=Path, help="folder holding LLaMA-Factory 0.9.5, TRL 0.24 and their pinned stack")
    ap.add_argument("--match-memory-gb", type=float, help="the GPU memory (GiB) qvltune-matched is planned to, for every shape and strategy of the call; default: the faster peer's measured peak of the same shape and strategy, from this call or an earlier one with the same --work")
    args = ap.parse_args()
    shapes, strategies, variants = (v.split(",") for v in (args.shapes, args.strategies, args.variants))
    for bad, known, flag in ((set(shapes) - {"tiny", *SHAPES}, ["tiny", *SHAPES], "--shapes"), (set(strategies) - {"lora", "mixed"}, ["lora", "mixed"], "--strategies"), (set(variants) - set(VARIANTS), VARIANTS, "--variants")):
        if bad:
            ap.error(f"{flag}: unknown {', '.join(sorted(bad))} (known: {', '.join(known)})")
    if set(variants) & set(PEERS) and not args.llamafactory_site:
        ap.error("--llamafactory-site is needed for the trl and llamafactory variants (LLaMA-Factory 0.9.5 and TRL 0.24 with their pinned stack)")
    if args.match_memory_gb is not None and args.match_memory_gb <= 0:
        ap.error("--match-memory-gb: give the memory in GiB, e.g. 28.8")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    earlier = earlier_rows(args.work)
    rows: list[dict] = []
    # A call cut by its time limit (SIGTERM) still prints what finished (results.json has it too).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    try:
        run_all(args, shapes, strategies, variants, rows, earlier)
    finally:
        print("\n" + table(rows, earlier + rows), flush=True)


def run_all(args: argparse.Namespace, shapes: list[str], strategies: list[str], variants: list[str], rows: list[dict], earlier: list[dict]) -> None:
    from qvltune.units import GiB

    for shape in shapes:
        tiny = shape == "tiny"
        data = make_pairs(args.work / ("tiny-data" if tiny else "data"), args.pairs, tiny=tiny)
        model = model_for(shape, args.work)
        for strategy in strategies:
            plan = qvltune_plan(model, data, strategy, args.effective_batch)
            cfg = qvltune_config(f"{shape}-{strategy}-dpo-qvltune", model, data, args.work, strategy, args.steps, args.effective_batch, cpu=tiny, plan=plan)
            # qvltune-matched last: it is planned to the memory the peers measure.
            for variant in sorted(variants, key=lambda v: v == "qvltune-matched"):
                name = f"{shape}-{strategy}-dpo-{variant}"
                t0 = time.time()
                try:
                    if variant == "qvltune-matched":
                        row = run_matched(name, shape, strategy, model, data, earlier + rows, args)
                    else:
                        row = run_variant(variant, name, shape, strategy, model, data, cfg, args)
                    if variant == "qvltune":
                        row.update(memory_budget_gb=H200_MEMORY_GIB, planned_peak_gb=plan.estimate.per_gpu / GiB, zero=zero_label(cfg))
                except Exception as e:  # noqa: BLE001 - a variant that cannot start is a row too; the others still run
                    row = {"variant": name, "wall_s": round(time.time() - t0, 1), "exit": None, "error": f"{type(e).__name__}: {e}"}
                rows.append(row)
                print(json.dumps(row), flush=True)
                # After every run (a cut call keeps what finished); --work's copy keeps the earlier calls'
                # rows too, for a later call's qvltune-matched.
                (args.out / "results.json").write_text(json.dumps(rows, indent=2))
                (args.work / "results.json").write_text(json.dumps(list({r["variant"]: r for r in earlier + rows}.values()), indent=2))


def table(rows: list[dict], known: list[dict] | None = None) -> str:
    """The Markdown table of the rows; a failed variant shows its error (the last line of its log).
    qvltune's rows name the memory they were planned to and their plan, and give their pairs/s and
    peak as multiples of the faster successful peer's of the same shape and strategy among ``known``
    (default: the rows)."""
    known = rows if known is None else known
    # A CPU run measures no peak ("-").
    lines = ["| variant | pairs/s | real tok/s | peak GiB | planned GiB | pairs/s vs peer | peak vs peer | wall s | exit |", "|---|---|---|---|---|---|---|---|---|"]
    compared: dict[str, str] = {}
    for r in rows:
        name, planned_gib, vs_pairs, vs_peak = r["variant"], "", "", ""
        if r.get("image_patches") == 0 and "pairs_per_s" in r:
            name += " (no image reached the model)"
        if "memory_budget_gb" in r:
            plan = f": {r['row_tokens']:,}-token rows, batch {r['batch']}{', checkpointed' if r['checkpointing'] else ''}, {r.get('zero', 'ZeRO-2')}" if "row_tokens" in r else ""
            name += f" (planned to {r['memory_budget_gb']:.1f} GiB{plan})"
            planned_gib = f"{r['planned_peak_gb']:.1f}"
            shape_strategy = r["variant"].rsplit("-dpo-", 1)[0]
            peer = faster_peer(shape_strategy, known)
            if peer and "pairs_per_s" in r:
                compared[shape_strategy] = peer["variant"]
                vs_pairs = f"{r['pairs_per_s'] / peer['pairs_per_s']:.2f}x"
                vs_peak = f"{r['mem_peak_gb'] / peer['mem_peak_gb']:.2f}x" if r.get("mem_peak_gb") and peer.get("mem_peak_gb") else "-"
        if "pairs_per_s" in r:
            peak = f"{r['mem_peak_gb']:.1f}" if r.get("mem_peak_gb") else "-"
            lines.append(f"| {name} | {r['pairs_per_s']:.2f} | {r.get('tokens_per_s', 0):,.0f} | {peak} | {planned_gib} | {vs_pairs} | {vs_peak} | {r['wall_s']} | {r['exit']} |")
        else:
            lines.append(f"| {name} | failed: {str(r.get('error', '?'))[:160]} | | | {planned_gib} | | | {r['wall_s']} | {r['exit']} |")
    if compared:
        lines.append("\nvs peer: against " + ", ".join(compared.values()) + " (the faster successful peer)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
