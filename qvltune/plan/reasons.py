"""The sentence beside each value of the plan, built from the numbers that chose the value.

Every function takes the chosen value and the figures the decision used, and nothing else, so a
reason cannot describe another row length, batch or vision tower than the one it stands beside
(tests/test_plan.py checks them against the config, case by case). Each gives a ``Reason``: a
one-line ``short`` for the compact plan and the full ``why`` (the run folder's plan file,
``qvltune init --explain``).
"""

from __future__ import annotations

from dataclasses import dataclass

from qvltune.pixels import TOKEN_PIXELS


@dataclass(frozen=True)
class Reason:
    short: str
    why: str


GUIDE_PACKING = "the guide: packing is '30-50% faster training, same final quality'"


def _s(n: int | float, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "es" if word.endswith("s") else "s")


def machine(label: str, *, cpu: bool, bf16: bool, total_gpus: int | None) -> Reason:
    if cpu:
        return Reason("CPU mode: tiny test models only", "no NVIDIA GPU found: CPU mode (gloo backend, fp32), practical for tiny test models only")
    why = (f"{total_gpus} GPUs in total; " if total_gpus else "") + ("bf16 on every GPU" if bf16 else "at least one GPU has no bf16 (compute capability < 8.0)")
    return Reason(why, why)


def vision_phrase(vision: str) -> str:
    return {"frozen": "a frozen vision tower", "lora": "LoRA on the vision tower", "full": "a fully trained vision tower"}[vision]


def strategy(strategy: str, vision: str, *, how: str, unit: str, fits_gib: str | None = None, need_gib: str | None = None, have_gib: str | None = None, rung: str | None = None, cpu: bool = False) -> Reason:
    """``how``: given | fast | full_fits | mixed (full needs too much)."""
    tower = vision_phrase(vision)
    if how == "given":
        return Reason(f"--strategy {strategy}, with {tower}", f"chosen with --strategy {strategy}; {tower} (see vision)")
    if how == "fast":
        return Reason(
            "fast turnaround: LoRA, 2-3x faster",
            f"fast turnaround: LoRA on the LLM trains 2-3x faster than full fine-tuning, with {tower} "
            "(the guide: 'Need fast turnaround? Yes -> LoRA + frozen vision')",
        )
    if how == "full_fits":
        source = "" if cpu else " (the guide: 'Do you have 8x A100 (80GB)? Yes -> Full fine-tuning (best quality)')"
        return Reason(
            f"fits: {fits_gib} of {have_gib} per {unit}",
            f"full fine-tuning fits without CPU offload: {fits_gib} of {have_gib} per {unit} with {rung}; every weight trains, with {tower}{source}",
        )
    return Reason(
        f"full would need {need_gib} per {unit}",
        f"full fine-tuning would need {need_gib} per {unit} without CPU offload ({have_gib} available); mixed: {tower}, a fully trained "
        "merger, LoRA on the LLM (the guide's recommended strategy: 'LoRA on LLM gives 80% of full fine-tuning quality at 20% cost')",
    )


def vision(vision: str, strategy: str, *, domain_shift: bool, fast: bool, lr: float | None) -> Reason:
    if not domain_shift:
        return Reason("images like ordinary photos", "images like ordinary photos: the pre-trained vision tower is kept frozen (the guide: 'Vision encoder rarely needs changes')")
    if vision == "full":
        return Reason(f"new visual domain: trains at {lr:g}", f"images far from pre-training: the vision tower trains fully, at a lower learning rate ({lr:g})")
    why = f"images far from pre-training: LoRA on the vision tower adapts it at a fraction of full training's memory (learning rate {lr:g})"
    if fast:
        why += "; this overrides the fast-turnaround rule of a frozen tower"
    return Reason(f"new visual domain: LoRA at {lr:g}", why)


def learning_rate(lr: float, *, tiny: bool, dpo_factor: float | None = None) -> Reason:
    """``dpo_factor``: preference tuning's scale of every rate (None for SFT)."""
    dpo_short = f", x{dpo_factor:g} for preference tuning" if dpo_factor else ""
    dpo_why = f"; x{dpo_factor:g} for preference tuning, which moves the model less than SFT (the vision tower's rate too)" if dpo_factor else ""
    if tiny:
        return Reason(
            f"the tiny model's rate (measured){dpo_short}",
            f"the tiny model's rate (measured by `qvltune demo`: real models use the guide's 1e-4 LoRA / 5e-5 full){dpo_why}; cosine schedule, 3% warmup",
        )
    return Reason(f"the guide's rate{dpo_short}; cosine, 3% warmup", f"the guide: 'LoRA: 1e-4, Full: 5e-5'{dpo_why}; cosine schedule, 3% warmup, weight decay 0.01")


def precision(bf16: bool) -> Reason:
    if bf16:
        return Reason("GPUs of compute capability 8.0+", "bf16 on GPUs of compute capability 8.0+ (the guide: '--bf16 True')")
    return Reason("no bf16 here", "no bf16 here: fp32 (twice the memory of bf16)")


def resolution(lo: int, hi: int, *, given_tokens: int | None, tiny: bool) -> Reason:
    source = "--max-image-tokens" if given_tokens else "tiny model" if tiny else None
    if lo == hi:
        why = (
            f"fixed: every image resized to about {hi:,} pixels = {hi // TOKEN_PIXELS} tokens; predictable memory, easy to debug "
            "(the guide: 'Start with fixed, switch to variable once stable')"
        )
        short = f"{hi // TOKEN_PIXELS} tokens per image"
    else:
        why = (
            f"variable: {lo:,}-{hi:,} pixels = {lo // TOKEN_PIXELS}-{hi // TOKEN_PIXELS} tokens per image, aspect kept; "
            "matches variable-resolution inference (the guide: 'Trains model to handle diverse inputs')"
        )
        short = f"{lo // TOKEN_PIXELS}-{hi // TOKEN_PIXELS} tokens per image"
    if source:
        why += f"; size from {source}"
        short += f" ({source})"
    return Reason(short, why)


def max_seq_length(row: int, *, how: str, longest: int | None = None, p99: int | None = None, shortest_fit: int | None = None) -> Reason:
    """``how``: given | default (no data) | longest (every record fits) | p99 (longer ones skipped) |
    packed_longer (beyond 8192, no checkpointing) | packed_guide (8192) | packed_halved | packed_fallback
    (longer packed rows do not fit)."""
    records = ""
    if longest is not None:
        records = f"every record fits (longest {longest:,} tokens)" if longest <= row else f"records longer than {row:,} tokens (p99 {p99:,}, longest {longest:,}) are skipped"
    if how == "given":
        return Reason("given with --max-seq-length", "given with --max-seq-length" + (f"; {records}" if records else ""))
    if how == "default":
        return Reason("no dataset summary: the default", f"no dataset summary: the default {row:,}; `qvltune check-data` suggests one from your data")
    if how == "longest":
        return Reason(
            f"longest record {longest:,} tokens",
            f"the longest record ({longest:,} tokens; p99 {p99:,}) rounded up to a multiple of 256: no record is cut or skipped",
        )
    if how == "p99":
        return Reason(
            f"p99 {p99:,} tokens; longer ones skipped",
            f"p99 of the dataset's token lengths ({p99:,}) rounded up to {row:,}: a few outliers (longest {longest:,}) would double "
            "every row's memory; records longer than this are skipped (data.on_bad_sample: skip)",
        )
    if how == "packed_longer":
        return Reason(
            "longest packed row that fits",
            f"packed rows of {row:,} tokens: the longest row (from 32,768) that fits without gradient checkpointing and keeps one "
            f"row per GPU within the effective batch; with varlen attention longer rows cost no extra attention, and fewer, larger "
            f"micro-batches keep the GPU ahead of the host; {records}",
        )
    if how == "packed_guide":
        return Reason("the guide's packed row", f"packed rows of {row:,} tokens (the guide's packing example: --max_seq_length 8192); {records}")
    if how == "packed_halved":
        return Reason(
            "halved from 8,192 to fit the batch",
            f"packed rows of {row:,} tokens: halved from the guide's 8192 until one row per device stays within the effective batch "
            f"and the plan fits without gradient checkpointing if it can; {records}",
        )
    return Reason(f"longest record {longest:,} tokens", f"packed rows of {row:,} tokens, the shortest that holds every record: longer packed rows do not fit; {records}")


def packing(on: bool, *, given: str | None, row: int, p50: int | None = None, per_row: int | None = None, considered_row: int | None = None) -> Reason:
    """``row``: the row length the plan chose (what the reason must speak of); ``per_row``: the
    samples per packed row the batch arithmetic uses; ``considered_row``: the packed row an "off"
    decision weighed (the row actually chosen is then one unpacked sample)."""
    if given:
        tail = f": ~{_s(per_row, 'sample')} per {row:,}-token row" if on and per_row else ""
        return Reason(f"--packing {given}", f"chosen with --packing {given}{tail}")
    if p50 is None:
        return Reason("no dataset summary", "no dataset summary: cannot tell whether records are short (give --packing on to force it)")
    if on:
        return Reason(
            f"~{_s(per_row, 'sample')} per {row:,}-token row",
            f"the median record ({p50:,} tokens) is {p50 / row:.0%} of a {row:,}-token row: ~{_s(per_row, 'sample')} share each row "
            f"instead of one padded row each ({GUIDE_PACKING})",
        )
    return Reason(
        f"median {p50:,} tokens: little to gain",
        f"the median record ({p50:,} tokens) is over a quarter of the {considered_row:,}-token row packing would use: little to gain",
    )


def zero(label: str, *, fits: bool, per_gpu: str, memory: str, unit: str, margin: float, moe: bool, host: str | None = None) -> Reason:
    if not fits:
        host_text = f" and {host} of host memory" if host else ""
        return Reason(
            f"nothing fits: needs {per_gpu} per {unit}",
            f"nothing fits: even the most frugal setting needs {per_gpu} per {unit} ({memory} available){host_text}",
        )
    why = (
        f"the cheapest stage that fits: {per_gpu} of {memory} per {unit}, with a {margin:.0%} safety margin "
        "(the guide: 'Stage 2: Good for 7B-30B models', 'Stage 3 + Offload: extreme memory savings')"
    )
    if moe:
        why += "; never ZeRO-3 for the MoE model (every expert is gathered each step)"
    return Reason(f"cheapest that fits: {per_gpu} of {memory}", why)


def zero3_settings(values: dict, why: dict[str, str]) -> Reason:
    """``values``/``why``: ``qvltune.zero.zero3_tuning``'s settings and the reason for each."""

    def count(n: int) -> str:
        return f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"

    short = f"prefetch {count(values['prefetch_bucket_size'])}, persist {count(values['param_persistence_threshold'])}, bucket {count(values['reduce_bucket_size'])}"
    return Reason(short, "; ".join(f"{key} {values[key]}: {why[key]}" for key in values))


def checkpointing(on: bool, *, fits: bool = True, without: str | None = None, unit: str = "GPU") -> Reason:
    if not fits:
        return Reason("the most memory-saving setting", "the most memory-saving setting")
    if on:
        return Reason(f"without it: {without} per {unit}", f"without it this stage needs {without} per {unit} (the guide's first OOM fix: '--gradient_checkpointing True')")
    return Reason("memory allows it off (faster)", "memory allows it: no recomputed forward pass (about a third more compute saved)")


def compile_layers(offload_params: bool = False) -> Reason:
    if offload_params:
        return Reason("not with parameters offloaded", "compiled decoder layers have not been measured with ZeRO-3's parameters offloaded to the host "
                      "(they have under ZeRO-2 and ZeRO-3 on the GPU; see benchmarks/RESULTS.md): layers run eagerly; `optim.compile: true` tries it")
    why = ("torch.compile of each decoder layer fuses its small element-wise kernels (one compilation, 1-2 minutes on an H200, at the first step; "
           "later runs and resumes reuse it from the compile cache in ~/.cache/qvltune/compile)")
    return Reason("fused kernels; 1-2 min at step 1", why)


def effective_batch(eff: int, *, per_device: int, accum: int, world: int, cpu: bool, packing: bool, per_row: int, target: int, target_why: str, rows_target: int) -> Reason:
    """``target`` is in samples; ``eff`` and ``rows_target`` (the target in whole rows) in rows
    (packed) or samples."""
    devices = _s(world, "process" if cpu else "GPU")
    arithmetic = f"{eff} = {per_device} per device x {accum} accumulation x {devices}"
    if packing:
        samples = eff * per_row
        short = f"~{samples:,} samples per step (target {target:,})"
        why = f"{_s(eff, 'packed row')} of ~{_s(per_row, 'sample')} = ~{samples:,} samples per step, the nearest to a target of {target:,} ({target_why}); {arithmetic}"
    else:
        short = f"{_s(eff, 'sample')} per step (target {target:,})"
        why = f"{_s(eff, 'sample')} per step, for a target of {target:,} ({target_why}); {arithmetic}"
    if eff > rows_target:
        why += f" (above the target: every {'process' if cpu else 'GPU'} needs at least one {'row' if packing else 'sample'} per step)"
    return Reason(short, why)


def nodes(n: int) -> Reason:
    return Reason("hostfile, train.sbatch or --node-rank", "multi-node: ssh/pdsh through `hostfile` ('host slots=N'), Slurm through `train.sbatch`, or `qvltune train --node-rank N --master-addr HOST` on each node; every node needs the same GPUs and the data at the same path, the run folder on shared storage")
