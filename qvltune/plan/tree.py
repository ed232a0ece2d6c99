"""The decision tree ``qvltune init`` walks: (answers, machine, model, dataset) -> run config + why.

Pure: the machine comes as an ``estimate_inputs.Machine`` (from the NVML inventory or ``--gpu`` flags),
the model as ``model_stats.ModelStats`` (its config.json built on the meta device), the dataset as an
``estimate_inputs.DatasetSummary`` (check-data's report). Every branch records a ``Decision`` whose reason
is built (``qvltune.plan.reasons``) from the same numbers that chose its value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from qvltune.catalog import KNOWN_MODELS, builtin_config
from qvltune.config import STRATEGY_PRESETS, RunConfig, parse_config
from qvltune.estimate import SAFETY_MARGIN, Estimate, estimate
from qvltune.estimate_inputs import DatasetSummary, Machine, workload_for
from qvltune.model_stats import ModelStats, model_stats
from qvltune.pixels import TOKEN_PIXELS
from qvltune.plan import reasons
from qvltune.plan.answers import Answers
from qvltune.units import format_bytes
from qvltune.plan.rules import *  # noqa: F403 (the constants and small decisions the tree walks)
from qvltune.plan.rules import builtin_param_count, compiles, ladder, unit_of
from qvltune.tiny import BUILTIN_TINY
from qvltune.zero import Zero3Sizes, zero3_tuning


@dataclass(frozen=True)
class Decision:
    topic: str
    choice: str
    why: str  # the full reasoning (the plan file, --explain)
    short: str = ""  # one line for the compact plan


@dataclass
class Plan:
    config: RunConfig
    doc: dict[str, Any]  # the run config document, exactly as validated
    decisions: list[Decision]
    estimate: Estimate
    machine: Machine
    fits: bool
    suggestions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def effective_batch(self) -> int:
        o = self.config.optim
        return o.per_device_batch * o.grad_accum * self.machine.world_size

    def decision(self, topic: str) -> Decision:
        return next(d for d in self.decisions if d.topic == topic)




# ----------------------------------------------------------------------------------------------
# The tree


@dataclass
class _Choice:
    """A candidate run: what varies while searching memory."""

    strategy: str
    vision: str
    rung: Rung
    checkpointing: bool
    per_device_batch: int
    max_seq_length: int
    min_pixels: int
    max_pixels: int
    learning_rate: float | None = None  # None: by strategy


def _doc(answers: Answers, c: _Choice, *, machine: Machine, packing: bool, skip_long: bool, rows_target: int, data: DatasetSummary | None, name: str) -> dict[str, Any]:
    """The run config document of one candidate (validated by ``parse_config``)."""
    W = machine.world_size
    grad_accum = max(1, round(rows_target / (c.per_device_batch * W)))  # the nearest to the target
    scale = DPO_LR_FACTOR if answers.stage == "dpo" else 1.0  # every rate, the vision tower's too
    lr = c.learning_rate if c.learning_rate is not None else (LR_FULL if c.strategy == "full" else LR_LORA) * scale  # the decision's rate is scaled already
    component_lr: dict[str, float] = {}
    components: dict[str, str] = {}
    if c.vision != STRATEGY_PRESETS[c.strategy]["vision"]:
        components["vision"] = c.vision
    if c.vision == "full":
        component_lr["vision"] = LR_VISION_FULL * scale
    elif c.vision == "lora":
        component_lr["vision"] = LR_VISION_LORA * scale
    data_doc: dict[str, Any] = {"train": answers.data or "data/train.jsonl"}
    if answers.image_root:
        data_doc["image_root"] = answers.image_root
    if data and data.records >= EVAL_MIN_RECORDS:
        data_doc["eval_split"] = EVAL_SPLIT
    data_doc.update({"min_pixels": c.min_pixels, "max_pixels": c.max_pixels, "max_seq_length": c.max_seq_length, "packing": packing})
    if skip_long:
        data_doc["on_bad_sample"] = "skip"
    rows = None
    if data and data.records:
        per_row = max(1, int(c.max_seq_length // max(1.0, data.mean))) if packing else 1
        rows = max(1, data.records // per_row)
    steps = max(1, rows // (c.per_device_batch * grad_accum * W)) if rows else None
    every = min(500, max(10, steps // 2)) if steps else 200
    doc: dict[str, Any] = {
        "name": name,
        "output_dir": "runs",
        "model": {"path": answers.model or BUILTIN_TINY, "attn_implementation": "auto"},
        "data": data_doc,
        "strategy": c.strategy,
    }
    if answers.stage == "dpo":
        # The reference is the starting model: LoRA switched off each step, or (full fine-tuning,
        # nothing to switch off) its log-probs computed once before training.
        doc["stage"] = "dpo"
        doc["dpo"] = {"beta": 0.1, "loss": "sigmoid", "label_smoothing": 0.0, "reference": "precomputed" if c.strategy == "full" else "adapter_off"}
    if components:
        doc["components"] = components
    doc["optim"] = {
        "learning_rate": lr,
        **({"component_lr": component_lr} if component_lr else {}),
        "optimizer": "adamw_torch" if machine.is_cpu else "adamw_torch_fused",
        "scheduler": "cosine",
        "warmup_ratio": 0.03,
        "weight_decay": 0.01,
        "max_grad_norm": 1.0,
        "epochs": answers.epochs,
        "per_device_batch": c.per_device_batch,
        "grad_accum": grad_accum,
        "effective_batch": c.per_device_batch * grad_accum * W,
        "bf16": machine.bf16 and not machine.is_cpu,
        "gradient_checkpointing": c.checkpointing,
        "compile": compiles(machine, c.rung),
    }
    doc["schedule"] = {"log_steps": min(10, every), "eval_steps": every, "save_steps": every, "save_total_limit": 3}
    doc["deepspeed"] = {"stage": c.rung.stage, "offload_optimizer": c.rung.offload_optimizer, "offload_params": c.rung.offload_params}
    launch: dict[str, Any] = {"gpus": "all"} if not machine.is_cpu else {"cpu_processes": machine.cpu_processes}
    if answers.nodes > 1:
        launch.update({"nodes": answers.nodes, "hostfile": "hostfile"})
    doc["launch"] = launch
    return doc


def _config(doc: dict[str, Any]) -> RunConfig:
    return parse_config(doc, "planned config")


class _Search:
    """Builds and estimates candidate configs against the machine."""

    def __init__(self, answers: Answers, machine: Machine, stats: ModelStats, data: DatasetSummary | None, *, packing: bool, skip_long: bool, rows_target: int, name: str):
        self.answers, self.machine, self.stats, self.data = answers, machine, stats, data
        self.packing, self.skip_long, self.rows_target, self.name = packing, skip_long, rows_target, name

    def doc(self, c: _Choice, machine: Machine | None = None) -> dict[str, Any]:
        return _doc(self.answers, c, machine=machine or self.machine, packing=self.packing, skip_long=self.skip_long, rows_target=self.rows_target, data=self.data, name=self.name)

    def estimate(self, c: _Choice, machine: Machine | None = None, stats: ModelStats | None = None) -> tuple[RunConfig, Estimate]:
        machine = machine or self.machine
        cfg = _config(self.doc(c, machine))
        return cfg, estimate(cfg, stats or self.stats, machine, workload_for(cfg, self.data))

    def fits(self, est: Estimate, machine: Machine | None = None) -> bool:
        machine = machine or self.machine
        return est.fits(machine.gpu_memory) and est.host_fits(machine.host_ram)

    def first_fit(self, c: _Choice, *, offload: bool = True, machine: Machine | None = None, stats: ModelStats | None = None) -> tuple[_Choice, RunConfig, Estimate] | None:
        """The cheapest rung, checkpointing off before on (it recomputes the forward: slower)."""
        machine, stats = machine or self.machine, stats or self.stats
        for rung in ladder(stats, machine, offload):
            for ckpt in (False, True):
                cand = replace(c, rung=rung, checkpointing=ckpt)
                cfg, est = self.estimate(cand, machine, stats)
                if self.fits(est, machine):
                    return cand, cfg, est
        return None


def make_plan(
    answers: Answers,
    machine: Machine,
    stats: ModelStats,
    data: DatasetSummary | None = None,
    *,
    stats_for: Callable[[str], ModelStats] | None = None,
) -> Plan:
    """Walk the tree; ``stats_for(size)`` gives other catalog sizes' stats (for 'a smaller model').

    Sequence length and packing come first (they set the activations every later branch weighs);
    packed rows start at 8192 tokens and are halved until the plan fits."""
    stats_for = stats_for or (lambda size: model_stats(builtin_config(size)))
    seq, skip_long, _ = choose_max_seq_length(answers, data)
    basis = seq_basis(answers, data)
    packing, _ = choose_packing(answers, data, seq)
    options = row_lengths(answers, data, seq, packing)
    if packing and data and data.mean and len(options) > 1:
        # Rows so long that one per GPU already exceeds the effective batch only make steps coarser.
        target = effective_batch_target(answers, data)[0]
        options = [r for r in options if machine.world_size * samples_per_row(r, data) <= target] or options[-1:]
    # The longest packed row that fits without gradient checkpointing (recomputing the forward costs
    # ~1/3 more compute), down to MIN_ROW_WITHOUT_CHECKPOINTING; else the longest row that fits at all.
    plans: list[tuple[int, Plan]] = []
    for n, row in enumerate(options):
        longer = row > max(seq, PACKED_ROW_TOKENS)  # beyond the guide's 8192: only without checkpointing
        if longer:
            how = "packed_longer"
        elif row == PACKED_ROW_TOKENS and row != seq:
            how = "packed_guide"
        elif row != seq:
            how = "packed_halved"
        elif packing and n:
            how = "packed_fallback"
        else:
            how = basis
        plan = _plan_for(answers, machine, stats, data, stats_for, row, skip_long, how, packing, packing_row(answers, seq))
        if longer and not (plan.fits and not plan.config.optim.gradient_checkpointing):
            continue
        first = not plans
        plans.append((row, plan))
        if plan.fits and not plan.config.optim.gradient_checkpointing and (row >= MIN_ROW_WITHOUT_CHECKPOINTING or first):
            return plan
    return next((p for _, p in plans if p.fits), plans[-1][1])


def _plan_for(
    answers: Answers,
    machine: Machine,
    stats: ModelStats,
    data: DatasetSummary | None,
    stats_for: Callable[[str], ModelStats],
    seq: int,
    skip_long: bool,
    seq_how: str,
    packing: bool,
    considered_row: int,
) -> Plan:
    """One plan for packed rows (or samples) of ``seq`` tokens; ``seq_how`` says what set it."""
    decisions: list[Decision] = []
    warnings: list[str] = []

    def decide(topic: str, choice: str, reason: reasons.Reason) -> None:
        decisions.append(Decision(topic, choice, reason.why, reason.short))

    tiny = answers.model == BUILTIN_TINY
    cpu_practical = tiny or stats.total <= CPU_PRACTICAL_PARAMS
    unit = unit_of(machine)
    decide("machine", "CPU" if machine.is_cpu else machine.label(), reasons.machine(machine.label(), cpu=machine.is_cpu, bf16=machine.bf16, total_gpus=machine.world_size if machine.nodes > 1 else None))
    if machine.is_cpu and not cpu_practical:
        warnings.append(f"training {answers.model} on a CPU is impractically slow: run `qvltune init` on the GPU machine, or plan for it here with --gpu H200 --gpu-count 8")

    lo, hi, _ = pixel_budget(answers)
    target, batch_why = effective_batch_target(answers, data)
    per_row = samples_per_row(seq, data) if packing else 1
    rows_target = max(1, round(target / per_row))
    base = _Choice("mixed", "frozen", Rung(2), False, 1, seq, lo, hi)
    name = default_name(answers, "plan")
    search = _Search(answers, machine, stats, data, packing=packing, skip_long=skip_long, rows_target=rows_target, name=name)

    # 1. Strategy. The guide's tree: "Need fast turnaround? Yes -> LoRA + frozen vision";
    #    "Do you have 8x A100 (80GB)? Yes -> Full fine-tuning (best quality); No -> LoRA".
    figures: dict[str, Any] = {}
    if answers.strategy != "auto":
        strategy, how = answers.strategy, "given"
    elif answers.fast:
        strategy, how = "lora", "fast"
    else:
        full = search.first_fit(replace(base, strategy="full", vision="full" if answers.domain_shift else "frozen"), offload=False)
        if full:
            strategy, how = "full", "full_fits"
            figures = {"fits_gib": format_bytes(full[2].per_gpu), "rung": full[0].rung.label()}
        else:
            _, best = search.estimate(replace(base, strategy="full", rung=ladder(stats, machine, offload=False)[-1], checkpointing=True))
            strategy, how = "mixed", "mixed"
            figures = {"need_gib": format_bytes(best.per_gpu)}

    # 2. Vision tower. The guide: train it for a "new visual domain (medical scans, satellite imagery)",
    #    not for "general images (pre-trained weights already excellent)".
    vision = ("full" if strategy == "full" else "lora") if answers.domain_shift else "frozen"
    scale = DPO_LR_FACTOR if answers.stage == "dpo" else 1.0
    vision_lr = LR_VISION_FULL * scale if vision == "full" else LR_VISION_LORA * scale if vision == "lora" else None
    decide("strategy", strategy, reasons.strategy(strategy, vision, how=how, unit=unit, have_gib=format_bytes(machine.gpu_memory), cpu=machine.is_cpu, **figures))
    decide("vision", vision, reasons.vision(vision, strategy, domain_shift=answers.domain_shift, fast=answers.fast, lr=vision_lr))

    lr = (TINY_LR if tiny else LR_FULL if strategy == "full" else LR_LORA) * scale
    decide("learning rate", f"{lr:g}", reasons.learning_rate(lr, tiny=tiny, dpo_factor=DPO_LR_FACTOR if answers.stage == "dpo" else None))
    bf16 = machine.bf16 and not machine.is_cpu
    decide("precision", "bf16" if bf16 else "fp32", reasons.precision(bf16))
    decide("resolution", "fixed" if lo == hi else "variable", reasons.resolution(lo, hi, given_tokens=answers.max_image_tokens, tiny=tiny and not answers.max_image_tokens))
    longest, p99 = (data.longest, data.p99) if data and data.records else (None, None)
    decide("max_seq_length", str(seq), reasons.max_seq_length(seq, how=seq_how, longest=longest, p99=p99))
    given = answers.packing if answers.packing != "auto" else None
    has_data = bool(data and data.records)
    decide("packing", "on" if packing else "off", reasons.packing(packing, given=given, row=seq, p50=data.p50 if has_data else None, per_row=per_row, considered_row=considered_row))

    # 3. Memory: the cheapest ZeRO stage and checkpointing setting that fit with the margin.
    chosen = replace(base, strategy=strategy, vision=vision, learning_rate=lr)
    found = search.first_fit(chosen)
    suggestions: list[str] = []
    if found:
        chosen, cfg, est = found
        # A larger micro-batch where memory allows (fewer, larger matmuls); never past the target.
        if not packing:
            for pdb in (2, 4, 8):
                if pdb * machine.world_size > rows_target:
                    break
                cand = replace(chosen, per_device_batch=pdb)
                c2, e2 = search.estimate(cand)
                if not search.fits(e2):
                    break
                chosen, cfg, est = cand, c2, e2
        fits = True
        decide("zero", chosen.rung.label(), reasons.zero(chosen.rung.label(), fits=True, per_gpu=format_bytes(est.per_gpu), memory=format_bytes(machine.gpu_memory), unit=unit, margin=SAFETY_MARGIN, moe=stats.is_moe))
        _decide_zero3(decide, chosen, stats, cfg)
        if chosen.checkpointing:
            _, off = search.estimate(replace(chosen, checkpointing=False))
            decide("gradient checkpointing", "on", reasons.checkpointing(True, without=format_bytes(off.per_gpu), unit=unit))
        else:
            decide("gradient checkpointing", "off", reasons.checkpointing(False))
        if compiles(machine, chosen.rung):
            decide("compile", "on", reasons.compile_layers())
        elif machine.bf16 and not machine.is_cpu:
            decide("compile", "off", reasons.compile_layers(offload_params=True))
    else:
        chosen = replace(chosen, rung=ladder(stats, machine)[-1], checkpointing=True)
        cfg, est = search.estimate(chosen)
        fits = False
        host = format_bytes(est.host_total) if est.host_total else None
        decide("zero", chosen.rung.label(), reasons.zero(chosen.rung.label(), fits=False, per_gpu=format_bytes(est.per_gpu), memory=format_bytes(machine.gpu_memory), unit=unit, margin=SAFETY_MARGIN, moe=stats.is_moe, host=host))
        _decide_zero3(decide, chosen, stats, cfg)
        decide("gradient checkpointing", "on", reasons.checkpointing(True, fits=False))
        suggestions = _suggestions(search, chosen, stats, machine, stats_for, data)

    # 4. Batch: effective = per-device batch x accumulation x GPUs (the guide's formula).
    o = cfg.optim
    eff = o.per_device_batch * o.grad_accum * machine.world_size
    decide(
        "effective batch",
        str(eff),
        reasons.effective_batch(eff, per_device=o.per_device_batch, accum=o.grad_accum, world=machine.world_size, cpu=machine.is_cpu, packing=packing, per_row=per_row, target=target, target_why=batch_why, rows_target=rows_target),
    )
    if answers.nodes > 1:
        decide("nodes", str(answers.nodes), reasons.nodes(answers.nodes))

    final_name = default_name(answers, strategy)
    doc = search.doc(chosen)
    doc["name"] = final_name
    if chosen.rung.stage == 3:
        doc["deepspeed"]["zero3"] = zero3_tuning(Zero3Sizes.of(stats, cfg)).values()
    cfg = _config(doc)
    if est.host_total and machine.host_ram and not est.host_fits(machine.host_ram):
        warnings.append(f"CPU offload needs {format_bytes(est.host_total)} of host memory; this node has {format_bytes(machine.host_ram)}")
    elif est.host_total and machine.host_ram is None:
        warnings.append(f"CPU offload needs {format_bytes(est.host_total)} of host memory per node (not checked: the machine's memory is unknown here)")
    return Plan(cfg, doc, decisions, est, machine, fits and not (machine.is_cpu and not cpu_practical), suggestions, warnings)


def _decide_zero3(decide: Callable[[str, str, reasons.Reason], None], chosen: _Choice, stats: ModelStats, cfg: RunConfig) -> None:
    """ZeRO-3's gather and reduce settings, from the model's sizes (written to deepspeed.zero3)."""
    if chosen.rung.stage == 3:
        tuning = zero3_tuning(Zero3Sizes.of(stats, cfg))
        decide("zero-3 settings", "tuned", reasons.zero3_settings(tuning.values(), tuning.why))


def _suggestions(search: _Search, chosen: _Choice, stats: ModelStats, machine: Machine, stats_for: Callable[[str], ModelStats], data: DatasetSummary | None) -> list[str]:
    """The nearest options that would fit, each checked with the estimator."""
    out: list[str] = []
    if machine.is_cpu:
        return ["plan for a GPU machine: --gpu H200 --gpu-count 8 (or run `qvltune init` there)"]
    # More GPUs of the same kind (ZeRO-3 partitions weights and states; -2 for the MoE model).
    for total in (2, 4, 8, 16, 32, 64):
        if total <= machine.world_size:
            continue
        per_node = min(total, max(machine.gpus_per_node, 8))
        bigger = replace(machine, gpus_per_node=per_node, nodes=-(-total // per_node))
        hit = search.first_fit(chosen, offload=False, machine=bigger)
        if hit:
            out.append(f"more GPUs: {total} x {machine.gpu_name} would fit ({hit[0].rung.label()}, {format_bytes(hit[2].per_gpu)} per GPU)")
            break
    # LoRA instead of full / a frozen vision tower.
    if chosen.strategy == "full":
        hit = search.first_fit(replace(chosen, strategy="mixed", vision="lora" if chosen.vision != "frozen" else "frozen"))
        if hit:
            out.append(f"LoRA: --strategy mixed would fit ({hit[0].rung.label()}, {format_bytes(hit[2].per_gpu)} per GPU)")
    if chosen.vision != "frozen":
        hit = search.first_fit(replace(chosen, vision="frozen"))
        if hit:
            out.append(f"a frozen vision tower (--no-domain-shift) would fit ({hit[0].rung.label()}, {format_bytes(hit[2].per_gpu)} per GPU)")
    # A smaller model of the same family.
    for km in sorted(KNOWN_MODELS, key=lambda k: -builtin_param_count(k.size)):
        if builtin_param_count(km.size) >= stats.total * 0.95:
            continue
        other = stats_for(km.size)
        hit = search.first_fit(chosen, stats=other)
        if hit:
            out.append(f"a smaller model: --model {km.hub_id} would fit ({hit[0].rung.label()}, {format_bytes(hit[2].per_gpu)} per GPU)")
            break
    # Fewer image tokens (matters when the vision tower trains or images fill the rows).
    tokens = chosen.max_pixels // TOKEN_PIXELS
    while tokens > 64:
        tokens //= 2
        hit = search.first_fit(replace(chosen, max_pixels=tokens * TOKEN_PIXELS, min_pixels=min(chosen.min_pixels, tokens * TOKEN_PIXELS)))
        if hit:
            out.append(f"lower max_pixels: --max-image-tokens {tokens} ({tokens * TOKEN_PIXELS:,} pixels) would fit ({hit[0].rung.label()}, {format_bytes(hit[2].per_gpu)} per GPU)")
            break
    # Shorter rows.
    seq = chosen.max_seq_length
    while seq > 512:
        seq //= 2
        hit = search.first_fit(replace(chosen, max_seq_length=seq))
        if hit:
            longer = f"; records longer than {seq} would be skipped" if data and data.longest > seq else ""
            out.append(f"shorter rows: --max-seq-length {seq} would fit ({hit[0].rung.label()}, {format_bytes(hit[2].per_gpu)} per GPU){longer}")
            break
    if not out:
        out.append("no nearby option fits this machine: use a machine with more GPU memory")
    return out



def machine_for(inventory: Any, nodes: int = 1, gpu_count: int | None = None) -> Machine:
    """The planning machine from a ``hardware.Inventory`` (other nodes assumed identical)."""
    return Machine.from_inventory(inventory, nodes=nodes, gpu_count=gpu_count)
