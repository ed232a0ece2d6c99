"""``qvltune init``: ask (or take flags), plan, show the plan, write the run files.

Shows the GPUs -> questions (``qvltune.wizard``) or flags / an answers file -> the plan
(``qvltune.plan``) with its memory and time estimate -> confirmation -> ``qvltune.yaml``,
``ds_zero.json``, ``launch.sh`` and ``qvltune-answers.yaml`` (``qvltune.scaffold``, all-or-nothing).
``--yes``, or stdin that is not a terminal, never prompts: missing answers take the recommended
default, or fail naming the flags to give.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import typer
import yaml
from rich.table import Table

from qvltune import console
from qvltune.errors import UserError


class Resolution(str, Enum):
    fixed = "fixed"
    variable = "variable"


class Packing(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


class StrategyChoice(str, Enum):
    auto = "auto"
    lora = "lora"
    mixed = "mixed"
    full = "full"


def command(
    model: str = typer.Option(None, "--model", help="Qwen3-VL Hub id (Qwen/Qwen3-VL-8B-Instruct), a local model folder, or builtin:tiny. Default: the largest size that suits the GPUs."),
    data: str = typer.Option(None, "--data", help="Training data: a.jsonl, or a mixture a.jsonl%50,b.json. Required without a terminal."),
    image_root: str = typer.Option(None, "--image-root", help="Folder that relative media paths resolve against (default: each dataset's folder)."),
    domain_shift: bool = typer.Option(None, "--domain-shift/--no-domain-shift", help="Images far from ordinary photos (medical, satellite, documents, industrial): train the vision tower too. Default: no."),
    fast: bool = typer.Option(None, "--fast/--no-fast", help="Fast turnaround: LoRA with a frozen vision tower. Default: no."),
    resolution: Resolution = typer.Option(None, "--resolution", help="fixed (predictable memory; the default) or variable image resolution."),
    max_image_tokens: int = typer.Option(None, "--max-image-tokens", min=1, help="Largest image in LLM tokens (one per 32x32 pixels). Default: 196 fixed, 784 variable."),
    packing: Packing = typer.Option(None, "--packing", help="Pack short samples into rows: auto (the default), on, off."),
    out: str = typer.Option(None, "--out", help="Folder for qvltune.yaml, ds_zero.json, launch.sh and runs/. Default: the current folder."),
    nodes: int = typer.Option(None, "--nodes", min=1, help="Machines to train on (a hostfile lists them). Default: 1."),
    name: str = typer.Option(None, "--name", help="Run name. Default: from the model and strategy."),
    strategy: StrategyChoice = typer.Option(None, "--strategy", help="Override the planned strategy: lora, mixed or full (default: auto)."),
    effective_batch: int = typer.Option(None, "--effective-batch", min=1, help="Samples per optimizer step (default 64, fewer for small datasets)."),
    epochs: float = typer.Option(None, "--epochs", min=0.01, help="Passes over the data (default 2)."),
    max_seq_length: int = typer.Option(None, "--max-seq-length", min=64, help="Tokens per row (default: from the dataset's lengths)."),
    gpu: str = typer.Option(None, "--gpu", help="Plan for another machine's GPU (H200, H100, A100, 4090, ...) instead of the detected ones."),
    gpu_count: int = typer.Option(None, "--gpu-count", min=1, help="GPUs per node to plan for (default: all detected; 1 with --gpu)."),
    gpu_memory: float = typer.Option(None, "--gpu-memory", min=1, help="Memory per GPU in GB, for a GPU --gpu does not know or to override it."),
    answers_file: Path = typer.Option(None, "--answers", help="Replay an answers file (qvltune-answers.yaml); flags override it."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Ask nothing: take flags, the answers file and recommended defaults."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing qvltune.yaml / ds_zero.json / launch.sh / answers in --out."),
) -> int:
    """Plan a fine-tuning run for your GPUs and data; write qvltune.yaml, ds_zero.json, launch.sh and the answers."""
    options = SimpleNamespace(**locals())
    try:
        return _init(options)
    except KeyboardInterrupt:
        # Files are written all-or-nothing (qvltune.scaffold), so an interrupt leaves none half-written.
        raise UserError("interrupted: nothing was written", exit_code=130) from None


def _init(o: SimpleNamespace) -> int:
    from qvltune import wizard
    from qvltune.estimate import Machine
    from qvltune.plan import ANSWER_FLAGS, make_plan, parse_answers, pixel_budget, recommend_model

    flags = {
        "model": o.model,
        "data": o.data,
        "image_root": o.image_root,
        "domain_shift": o.domain_shift,
        "fast": o.fast,
        "resolution": o.resolution.value if o.resolution else None,
        "max_image_tokens": o.max_image_tokens,
        "packing": o.packing.value if o.packing else None,
        "out": o.out,
        "nodes": o.nodes,
        "name": o.name,
        "strategy": o.strategy.value if o.strategy else None,
        "effective_batch": o.effective_batch,
        "epochs": o.epochs,
        "max_seq_length": o.max_seq_length,
    }
    answers = parse_answers({**read_answers(o.answers_file), **{k: v for k, v in flags.items() if v is not None}}, str(o.answers_file or "flags"))

    inv, planned = _inventory(o.gpu, o.gpu_count, o.gpu_memory, answers.out)
    show_machine(inv, planned)

    def machine_of(a):
        return Machine.from_inventory(inv, nodes=a.nodes, gpu_count=None if planned else o.gpu_count)

    interactive = not o.yes and sys.stdin.isatty()
    if interactive:
        answers = wizard.ask(answers, recommended_model=recommend_model(machine_of(answers)), on_dataset=lambda d: show_dataset(d, answers.image_root, *pixel_budget(answers)[:2]))
    else:
        if answers.model is None:
            answers.model = recommend_model(machine_of(answers))
            console.note(f"model: {answers.model} (recommended for these GPUs; --model to choose)")
        missing = [k for k in ("data",) if getattr(answers, k) is None]
        if missing:
            raise UserError(
                "missing answer(s): " + ", ".join(f"{k} ({ANSWER_FLAGS[k]})" for k in missing),
                "give them as flags or in --answers FILE, or run `qvltune init` in a terminal to be asked",
                exit_code=2,
            )
    answers = absolutize(answers)
    valid = wizard.data_exists(answers.data)
    if valid is not True:
        raise UserError(f"--data: {valid}", "give a JSON/JSONL dataset file (`qvltune check-data FILE` checks it)")
    machine = machine_of(answers)

    from qvltune.cli.estimate import dataset_summary, load_stats, render_memory, render_params

    stats, source = load_stats(answers.model)
    lo, hi, _ = pixel_budget(answers)
    summary = dataset_summary(answers.data, answers.image_root, lo, hi)
    plan = make_plan(answers, machine, stats, summary)
    render_plan(plan, source, summary, render_params, render_memory)

    from qvltune import scaffold

    out_dir = Path(answers.out)
    targets = [out_dir / n for n in (scaffold.CONFIG_NAME, scaffold.DEEPSPEED_NAME, scaffold.LAUNCH_NAME, scaffold.ANSWERS_NAME)]
    existing = [p for p in targets if p.exists()]
    if existing and not o.force:
        listed = ", ".join(p.name for p in existing)
        if not interactive:
            raise UserError(f"{out_dir} already holds {listed}", "pass --force to overwrite, or choose another --out")
        if not wizard.confirm(f"Overwrite {listed} in {out_dir}?", default=False):
            console.out.print("nothing written")
            return 0
    elif interactive and not wizard.confirm(f"Write qvltune.yaml, ds_zero.json, launch.sh and the answers to {out_dir}?", default=True):
        console.out.print("nothing written")
        return 0
    written = write_files(plan, answers, out_dir)
    console.out.print("wrote " + ", ".join(str(p) for p in written))
    config_path = out_dir / scaffold.CONFIG_NAME
    console.out.print(f"next: qvltune estimate {config_path}   then: qvltune train {config_path}")
    if not plan.fits:
        console.warn("the plan does not fit this machine: see the options above before training")
    return 0


def read_answers(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    if not path.is_file():
        raise UserError(f"answers file not found: {path}", "write one with `qvltune init` (it saves qvltune-answers.yaml)")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML: {getattr(e, 'problem', None) or e}", "fix the YAML syntax") from None
    from qvltune.plan import parse_answers

    return parse_answers(doc, str(path)).model_dump(exclude_unset=True)


def _inventory(gpu: str | None, gpu_count: int | None, gpu_memory: float | None, out: str):
    from qvltune.hardware import inventory, planned_inventory

    if gpu or gpu_memory:
        try:
            return planned_inventory(gpu, gpu_count or 1, gpu_memory), True
        except ValueError as e:
            raise UserError(f"--gpu: {e}", "add --gpu-memory GB for a GPU qvltune does not know") from None
    return inventory(out), False


def absolutize(answers):
    """Paths in the answers and the config are absolute, so both work from any folder."""
    a = answers.model_copy()

    def absolute(p: str) -> str:
        return str(Path(p).expanduser().resolve())

    if a.data:
        parts = []
        for part in a.data.split(","):
            head, sep, pct = part.strip().partition("%")
            parts.append(absolute(head) + sep + pct)
        a.data = ",".join(parts)
    if a.image_root:
        a.image_root = absolute(a.image_root)
    if a.model and not a.model.startswith("builtin:") and Path(a.model).expanduser().exists():
        a.model = absolute(a.model)
    a.out = absolute(a.out)
    return a


def write_files(plan, answers, out_dir: Path) -> list[Path]:
    from qvltune import scaffold
    from qvltune.config import _anchor_paths, parse_config

    config_path = out_dir / scaffold.CONFIG_NAME
    # The config exactly as `qvltune train` will load it (relative paths anchored at its folder).
    anchored = _anchor_paths(parse_config(plan.doc, str(config_path)), out_dir.resolve())
    gpu_count = 0 if plan.machine.is_cpu else plan.machine.gpus_per_node
    files = {
        config_path: scaffold.config_text(plan.doc, plan.decisions, plan.fits),
        out_dir / scaffold.DEEPSPEED_NAME: scaffold.deepspeed_text(plan.config),
        out_dir / scaffold.LAUNCH_NAME: scaffold.launch_text(anchored, config_path=config_path, gpu_count=gpu_count),
        out_dir / scaffold.ANSWERS_NAME: scaffold.answers_text(answers.model_dump(mode="json")),
    }
    hostfile = out_dir / scaffold.HOSTFILE_NAME
    if plan.config.launch.nodes > 1 and not hostfile.exists():
        files[hostfile] = scaffold.hostfile_text(plan.config.launch.nodes, plan.machine.gpus_per_node or 1)
    if plan.config.launch.nodes > 1:
        from qvltune.nodes import slurm_script

        files[out_dir / scaffold.SBATCH_NAME] = slurm_script(anchored, config_path=config_path.resolve(), nodes=plan.config.launch.nodes, gpus_per_node=gpu_count, python=sys.executable)
    return scaffold.write_all(files, executable={out_dir / scaffold.LAUNCH_NAME})


# ----------------------------------------------------------------------------------------------
# Rendering


def show_machine(inv, planned: bool) -> None:
    out = console.out
    if inv.gpus:
        title = "GPUs (planned, not detected)" if planned else "GPUs"
        table = Table(title=title, title_justify="left", box=None, padding=(0, 2))
        for col in ("#", "name", "memory", "free", "compute", "bf16"):
            table.add_column(col, justify="right" if col in ("#", "memory", "free") else "left")
        for g in inv.gpus:
            table.add_row(str(g.index), g.name, f"{g.memory_total / 2**30:.0f} GiB", f"{g.memory_free / 2**30:.0f} GiB", g.compute_capability, "yes" if g.bf16 else "no")
        out.print(table)
        if inv.driver:
            out.print(f"[dim]driver {inv.driver}, CUDA {inv.cuda}[/]")
    else:
        out.print(f"[yellow]{console.escape(inv.note or 'no GPU found')}[/]")
    if inv.host:
        h = inv.host
        out.print(f"[dim]host: {h.cpus} CPUs, {h.ram_total / 2**30:.0f} GiB RAM, {h.disk_free / 2**30:.0f} GiB free disk[/]")


def show_dataset(data: str, image_root: str | None, min_pixels: int, max_pixels: int) -> None:
    """check-data's report, inline (after the dataset question)."""
    from qvltune.cli.check_data import render
    from qvltune.data.check import check_dataset

    try:
        report = check_dataset(data, image_root=Path(image_root) if image_root else None, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as e:
        console.warn(f"cannot read {data}: {e}")
        return
    render(report, min_pixels, max_pixels, strict=False)


def render_plan(plan, source: str, summary, render_params, render_memory) -> None:
    from qvltune.estimate import format_bytes, format_duration

    out = console.out
    cfg = plan.config
    out.print()
    out.print(f"[bold]Plan[/] for {console.escape(cfg.model.path)} [dim]({console.escape(source)})[/]")
    if summary:
        out.print(
            f"data: {summary.records:,} usable records, tokens p50 {summary.p50:,} / p99 {summary.p99:,} / max {summary.longest:,}, "
            f"{summary.tokens:,} per epoch [dim](estimated counts)[/]"
        )
    for d in plan.decisions:
        out.print(f"  [bold]{d.topic:<24}[/]{console.escape(d.choice):<13} [dim]{console.escape(d.why)}[/]")
    out.print(render_params(plan.estimate))
    render_memory(plan.estimate, plan.machine)
    est = plan.estimate
    where = "process" if plan.machine.is_cpu else "GPU"
    verdict = "[green]fits[/]" if plan.fits else "[red]does not fit[/]"
    out.print(f"memory per {where}: {format_bytes(est.per_gpu)} of {format_bytes(plan.machine.gpu_memory)} — {verdict}" + (f"; host memory {format_bytes(est.host_total)}" if est.host_total else ""))
    out.print(f"effective batch: {plan.effective_batch} = {cfg.optim.per_device_batch} x {cfg.optim.grad_accum} x {plan.machine.world_size}")
    if est.seconds_per_epoch is not None:
        out.print(f"time: ~{format_duration(est.seconds_per_epoch)} per epoch, ~{format_duration(est.seconds_per_epoch * cfg.optim.epochs)} for {cfg.optim.epochs:g} epochs [dim](at an assumed MFU; `qvltune estimate` shows the assumptions)[/]")
    for s in plan.suggestions:
        out.print(f"[yellow]option:[/] {console.escape(s)}")
    for w in plan.warnings:
        console.warn(w)
