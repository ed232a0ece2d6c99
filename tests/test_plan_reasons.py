"""Every reason of the plan describes the value it stands beside: a table of cases, each checked
against the written config and the numbers that chose it (qvltune.plan.reasons)."""

from __future__ import annotations

import re

import pytest

from qvltune.estimate_inputs import DatasetSummary
from qvltune.pixels import TOKEN_PIXELS
from qvltune.plan import Answers, effective_batch_target, make_plan
from qvltune.plan.reasons import vision_phrase
from qvltune.units import format_bytes
from test_plan import DATA, MACHINES, SHORT, stats

# The demo data as check-data summarises it: 100 records of ~34 tokens (the case).
TINY_DATA = DatasetSummary(records=100, p50=34, p99=47, longest=47, mean=34.25, tokens=3425, image_tokens=2400, max_images_per_record=1, suggested_max_seq_length=256, trained_tokens=300)
# A long tail: p99 sets the row, the few longer records are skipped.
OUTLIERS = DatasetSummary(records=4000, p50=900, p99=1500, longest=6000, mean=950.0, tokens=3_800_000, image_tokens=1_000_000, max_images_per_record=1, suggested_max_seq_length=1536, trained_tokens=200_000)
H100 = MACHINES["1xA100"].__class__("NVIDIA H100 80GB HBM3", 81559 * 1024**2, 1, 1, 256 * 1024**3, 989.0)

CASES = [
    # (id, machine, size, data, answers)
    ("tiny on CPU, fixed resolution (the default)", MACHINES["cpu"], "tiny", TINY_DATA, {}),
    ("tiny on CPU, variable resolution", MACHINES["cpu"], "tiny", TINY_DATA, {"resolution": "variable"}),
    ("tiny, packing off", MACHINES["cpu"], "tiny", TINY_DATA, {"packing": "off"}),
    ("H100 8B domain shift: mixed with a LoRA vision tower", H100, "8B", DATA, {"domain_shift": True}),
    ("H100 8B short records: packed rows", H100, "8B", SHORT, {}),
    ("8xH200 8B short records", MACHINES["8xH200"], "8B", SHORT, {}),
    ("8xA100 8B long records: full, unpacked", MACHINES["8xA100"], "8B", DATA, {}),
    ("8xA100 2B domain shift: full with a trained tower", MACHINES["8xA100"], "2B", DATA, {"domain_shift": True}),
    ("fast turnaround", MACHINES["1xH200"], "8B", SHORT, {"fast": True}),
    ("given --max-seq-length and --packing on", MACHINES["1xH200"], "2B", SHORT, {"max_seq_length": 2048, "packing": "on"}),
    ("given --max-image-tokens, variable", MACHINES["1xH200"], "2B", DATA, {"resolution": "variable", "max_image_tokens": 128}),
    ("outliers skipped", MACHINES["1xH200"], "8B", OUTLIERS, {"packing": "off"}),
    ("checkpointing needed", MACHINES["1xA6000"], "8B", DATA, {}),
    ("nothing fits", MACHINES["1x4090"], "32B", DATA, {}),
    ("no dataset summary", MACHINES["1xH200"], "2B", None, {}),
]


def plan_of(machine, size, data, answers):
    model = "builtin:tiny" if size == "tiny" else f"Qwen/Qwen3-VL-{size}-Instruct"
    if size == "tiny":
        from qvltune.model_stats import model_stats, resolve_model_config

        st = model_stats(resolve_model_config("builtin:tiny")[0])
    else:
        st = stats(size)
    a = Answers(model=model, data="/data/train.jsonl", **answers)
    return a, make_plan(a, machine, st, data)


def disagreements(answers: Answers, plan, data: DatasetSummary | None) -> list[str]:
    """Every statement of a reason that contradicts the config or another reason."""
    cfg, problems = plan.config, []
    why = {d.topic: d.why for d in plan.decisions}
    choice = {d.topic: d.choice for d in plan.decisions}
    every = " ".join(why.values())
    seq, lo, hi = cfg.data.max_seq_length, cfg.data.min_pixels, cfg.data.max_pixels

    # resolution: as answered, with the budget written in the config
    if choice["resolution"] != answers.resolution or (lo == hi) != (answers.resolution == "fixed"):
        problems.append(f"resolution {choice['resolution']} (config {lo}-{hi}) but answered {answers.resolution}")
    tokens = f"{hi // TOKEN_PIXELS} tokens" if lo == hi else f"{lo // TOKEN_PIXELS}-{hi // TOKEN_PIXELS} tokens"
    if tokens not in why["resolution"]:
        problems.append(f"resolution reason does not say {tokens}: {why['resolution']}")

    # row lengths: every row a reason speaks of is the row in the config
    if choice["max_seq_length"] != str(seq):
        problems.append(f"max_seq_length {choice['max_seq_length']} but config {seq}")
    for topic in ("max_seq_length", "packing", "effective batch"):
        if topic == "packing" and not cfg.data.packing:
            continue
        for n in re.findall(r"rows? of ([\d,]+) tokens|([\d,]+)-token row", why[topic]):
            value = int((n[0] or n[1]).replace(",", ""))
            if value != seq:
                problems.append(f"{topic} speaks of a row of {value} tokens; the row is {seq}: {why[topic]}")
    if data and data.records:
        m = re.search(r"longest (?:record )?\(?([\d,]+) tokens", why["max_seq_length"])
        if m and int(m.group(1).replace(",", "")) > seq and "skipped" not in why["max_seq_length"]:
            problems.append(f"max_seq_length says a record of {m.group(1)} tokens fits a row of {seq}")

    # packing and the batch: the same samples per row in both
    if choice["packing"] != ("on" if cfg.data.packing else "off"):
        problems.append(f"packing {choice['packing']} but config {cfg.data.packing}")
    o = cfg.optim
    eff = o.per_device_batch * o.grad_accum * plan.machine.world_size
    if choice["effective batch"] != str(eff):
        problems.append(f"effective batch {choice['effective batch']} but config {eff}")
    if f"{o.per_device_batch} per device x {o.grad_accum} accumulation x {plan.machine.world_size} " not in why["effective batch"]:
        problems.append(f"effective batch arithmetic wrong: {why['effective batch']}")
    target = effective_batch_target(answers, data)[0]
    if f"target of {target:,}" not in why["effective batch"]:
        problems.append(f"effective batch does not name its target {target}: {why['effective batch']}")
    if cfg.data.packing and data and data.records:
        per_row = max(1, int(seq // data.mean))
        for topic in ("packing", "effective batch"):
            if f"~{per_row} samples" not in why[topic] and "--packing" not in why[topic]:
                problems.append(f"{topic} does not say ~{per_row} samples per row: {why[topic]}")
        if f"~{eff * per_row:,} samples per step" not in why["effective batch"]:
            problems.append(f"effective batch does not say ~{eff * per_row} samples per step: {why['effective batch']}")

    # the vision tower: the strategy's reason names the tower the vision decision chose, and no other
    vision = cfg.modes()["vision"]
    if choice["vision"] != vision or choice["strategy"] != cfg.strategy:
        problems.append(f"vision/strategy {choice['vision']}/{choice['strategy']} but config {vision}/{cfg.strategy}")
    for mode in ("frozen", "lora", "full"):
        if mode != vision and vision_phrase(mode) in every:
            problems.append(f"a reason speaks of {vision_phrase(mode)} but the tower is {vision}")
    if vision_phrase(vision) not in why["strategy"]:
        problems.append(f"strategy reason does not name the tower ({vision}): {why['strategy']}")

    # memory: the estimate of the written config, per the right unit
    unit = "process" if plan.machine.is_cpu else "GPU"
    if f"{format_bytes(plan.estimate.per_gpu)} " not in why["zero"] or f"per {unit}" not in why["zero"]:
        problems.append(f"zero reason does not give {format_bytes(plan.estimate.per_gpu)} per {unit}: {why['zero']}")
    if plan.machine.is_cpu and ("A100" in every or "per GPU" in every):
        problems.append("a CPU plan speaks of GPUs")
    if choice["gradient checkpointing"] != ("on" if o.gradient_checkpointing else "off"):
        problems.append("gradient checkpointing disagrees with the config")
    # ZeRO-3's settings: the reason gives each value the config carries, and only under ZeRO-3
    z3 = {k: v for k, v in cfg.deepspeed.zero3.model_dump().items() if v is not None}
    if (cfg.deepspeed.stage == 3) != ("zero-3 settings" in why) or (cfg.deepspeed.stage == 3 and len(z3) != 6):
        problems.append(f"zero-3 settings: stage {cfg.deepspeed.stage} with settings {z3} and reason {why.get('zero-3 settings')!r}")
    for key, value in z3.items():
        if f"{key} {value}:" not in why.get("zero-3 settings", ""):
            problems.append(f"zero-3 settings do not give {key} {value}: {why.get('zero-3 settings')}")
    # the compact plan: value and one line at 80 columns
    for d in plan.decisions:
        if not d.short or len(d.short) > 44:
            problems.append(f"{d.topic}: short reason missing or too long for 80 columns: {d.short!r}")
    return problems


@pytest.mark.parametrize("machine, size, data, answers", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_reason_describes_its_value(machine, size, data, answers):
    a, p = plan_of(machine, size, data, answers)
    assert disagreements(a, p, data) == []
