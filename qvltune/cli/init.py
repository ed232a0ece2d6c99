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
    stage: str = typer.Option(None, "--stage", metavar="sft|dpo", help="sft: supervised fine-tuning on answers (the default); dpo: preference tuning on chosen/rejected pairs."),
    from_run: Path = typer.Option(None, "--from", metavar="RUN", help="Start from a finished run's final model or adapter (runs/NAME): sets --model to RUN/final."),
    gpu: str = typer.Option(None, "--gpu", help="Plan for another machine's GPU (H200, H100, A100, 4090, ...) instead of the detected ones."),
    gpu_count: int = typer.Option(None, "--gpu-count", min=1, help="GPUs per node to plan for (default: all detected; 1 with --gpu)."),
    gpu_memory: float = typer.Option(None, "--gpu-memory", min=1, help="Memory per GPU in GB, for a GPU --gpu does not know or to override it."),
    answers_file: Path = typer.Option(None, "--answers", help="Replay an answers file (qvltune-answers.yaml); flags override it."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Ask nothing: take flags, the answers file and recommended defaults."),
    explain: bool = typer.Option(False, "--explain", help="Print the full reasoning of every decision, the parameters and the memory table (always written to qvltune-plan.txt)."),
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
    from qvltune.estimate_inputs import Machine
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
        "stage": o.stage,
    }
    if o.stage is not None and o.stage not in ("sft", "dpo"):
        raise typer.BadParameter(f"'{o.stage}' is not one of sft, dpo", param_hint="--stage")
    if o.from_run is not None:
        if o.model is not None:
            raise UserError("give --from or --model, not both", "--from RUN starts from RUN/final", exit_code=2)
        flags["model"] = start_from(o.from_run)
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
    from qvltune.data.mixture import parse_mixture

    try:
        parse_mixture(answers.data)  # a bad percentage or setting: one line here, not a traceback later
    except ValueError as e:
        raise UserError(f"--data: {e}", "write a mixture as a.jsonl%50,b.jsonl[image_root=DIR,max_image_tokens=256]") from None
    from qvltune.preference.data import is_preference_data

    pairs = is_preference_data(answers.data)
    if o.stage is None and pairs and answers.stage == "sft":
        answers.stage = "dpo"
        console.note("stage: dpo (the data holds chosen/rejected pairs; --stage sft|dpo to choose)")
    elif pairs != (answers.stage == "dpo"):
        raise UserError(f"--stage {answers.stage}: the data {'holds preference pairs (chosen/rejected)' if pairs else 'holds no preference pairs'}", f"use --stage {'dpo' if pairs else 'sft'}, or other data")
    from qvltune import scaffold

    out_dir = Path(answers.out)
    existing = existing_files(out_dir)
    if existing and not o.force and not interactive:  # refused before any slow work or output
        raise UserError(f"{out_dir} already holds {', '.join(p.name for p in existing)}", "pass --force to overwrite, or choose another --out")
    machine = machine_of(answers)

    from qvltune.cli.estimate import dataset_summary, load_stats

    with console.status("reading the model's config and the dataset's token counts"):
        stats, source = load_stats(answers.model)
        lo, hi, _ = pixel_budget(answers)
        summary = dataset_summary(answers.data, answers.image_root, lo, hi)
    with console.status("planning: estimating memory for each candidate"):
        plan = make_plan(answers, machine, stats, summary)
    if not planned and o.gpu_count is not None and o.gpu_count < len(inv.gpus):
        # Planned for fewer GPUs than this node has: launch that many, not all (batch, ZeRO stage).
        plan.doc["launch"]["gpus"] = plan.config.launch.gpus = o.gpu_count
    full = plan_text(plan, source, summary)
    if o.explain:
        console.out.print(full, markup=False, highlight=False, end="")
    else:
        render_compact(plan, source, summary, console.out)
        console.out.print(f"[dim]full reasoning, parameters and memory: {out_dir / scaffold.PLAN_NAME} (or --explain)[/]")

    if existing and not o.force:
        listed = ", ".join(p.name for p in existing)
        if not wizard.confirm(f"Overwrite {listed} in {out_dir}?", default=False):
            console.out.print("nothing written")
            return 0
    elif interactive and not wizard.confirm(f"Write qvltune.yaml, ds_zero.json, launch.sh and the answers to {out_dir}?", default=True):
        console.out.print("nothing written")
        return 0
    written = write_files(plan, answers, out_dir, full)
    console.out.print("wrote " + ", ".join(str(p) for p in written))
    config_path = out_dir / scaffold.CONFIG_NAME
    console.out.print(f"next: qvltune estimate {config_path}   then: qvltune check-data --config {config_path}   then: qvltune train {config_path}")
    if not plan.fits:
        console.warn("the plan does not fit this machine: see the options above before training")
    return 0


def start_from(run: Path) -> str:
    """The model a run saved (``RUN/final``: a full model folder, or a LoRA adapter that training
    loads onto its base and merges before adding new adapters); a clear error when there is none."""
    final = run / "final" if (run / "final").is_dir() else run
    if not (final / "config.json").exists() and not (final / "adapter_config.json").exists():
        raise UserError(f"--from {run}: no finished model in {final} (neither config.json nor adapter_config.json)", "finish that run first (qvltune train CONFIG --resume), or give --model")
    return str(final.resolve())


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
        from qvltune.data.mixture import rewrite_paths

        try:
            a.data = rewrite_paths(a.data, absolute)  # a.jsonl%50[image_root=imgs] keeps its percent and settings
        except ValueError as e:
            raise UserError(f"--data: {e}", "write a mixture as a.jsonl%50,b.jsonl[image_root=DIR,max_image_tokens=256]") from None
    if a.image_root:
        a.image_root = absolute(a.image_root)
    if a.model and not a.model.startswith("builtin:") and Path(a.model).expanduser().exists():
        a.model = absolute(a.model)
    a.out = absolute(a.out)
    return a


def existing_files(out_dir: Path) -> list[Path]:
    from qvltune import scaffold

    names = (scaffold.CONFIG_NAME, scaffold.DEEPSPEED_NAME, scaffold.LAUNCH_NAME, scaffold.ANSWERS_NAME, scaffold.PLAN_NAME, scaffold.SBATCH_NAME)  # train.sbatch: often edited by hand (partition, account)
    return [out_dir / n for n in names if (out_dir / n).exists()]


def write_files(plan, answers, out_dir: Path, plan_text: str | None = None) -> list[Path]:
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
    if plan_text is not None:
        files[out_dir / scaffold.PLAN_NAME] = plan_text
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
    same = inv.gpus and len({(g.name, g.memory_total, g.compute_capability) for g in inv.gpus}) == 1
    if same and (planned or len(inv.gpus) > 2):
        # Identical GPUs: one line (eight table rows would push the plan off an 80x24 screen).
        g = inv.gpus[0]
        free = min(x.memory_free for x in inv.gpus) / 2**30
        where = "planned, not detected" if planned else f"least free {free:.0f} GiB"
        out.print(f"GPUs: {len(inv.gpus)} x {console.escape(g.name)}, {g.memory_total / 2**30:.0f} GiB, compute {g.compute_capability}, bf16 {'yes' if g.bf16 else 'no'} [dim]({where})[/]")
    elif inv.gpus:
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
    from qvltune.data.check import CheckOptions, check_dataset

    try:
        report = check_dataset(data, CheckOptions(image_root=Path(image_root) if image_root else None, min_pixels=min_pixels, max_pixels=max_pixels))
    except (ValueError, UserError) as e:  # a malformed mixture, a missing file
        console.warn(f"cannot read {data}: {getattr(e, 'message', e)}")
        return
    # The plan uses these estimated counts whatever the model; exact ones are check-data's job.
    report.counting = "estimated (Qwen3-VL geometry for images, ~3.5 characters per text token); `qvltune check-data DATA --model MODEL` counts exactly"
    render(report, min_pixels, max_pixels, strict=False)


def _data_line(summary) -> str:
    return f"data: {summary.records:,} records; tokens p50 {summary.p50:,}, p99 {summary.p99:,}, max {summary.longest:,} (estimated)"


def _footer(plan) -> list[str]:
    """Memory verdict, batch and time: the lines both the compact and the full plan end with."""
    from qvltune.units import format_bytes, format_duration

    est, cfg = plan.estimate, plan.config
    where = "process" if plan.machine.is_cpu else "GPU"
    lines = [f"memory per {where}: {format_bytes(est.per_gpu)} of {format_bytes(plan.machine.gpu_memory)} — {'fits' if plan.fits else 'does not fit'}" + (f"; host memory {format_bytes(est.host_total)}" if est.host_total else "")]
    if est.seconds_per_epoch is not None:
        lines.append(f"time: ~{format_duration(est.seconds_per_epoch)} per epoch, ~{format_duration(est.seconds_per_epoch * cfg.optim.epochs)} for {cfg.optim.epochs:g} epochs (the step's FLOPs at an assumed share of the GPUs' peak)")
    return lines


_SHORT_TOPICS = {"gradient checkpointing": "checkpointing"}


def render_compact(plan, source: str, summary, out) -> None:
    """The plan in ~20 lines: each value with a one-line reason (fits 80x24 with the prompt)."""
    cfg = plan.config
    out.print(f"[bold]Plan[/] for {console.escape(cfg.model.path)} [dim]({console.escape(source)})[/]")
    if summary:
        out.print(console.escape(_data_line(summary)))
    machine = plan.decision("machine")
    out.print(f"machine: {console.escape(plan.machine.label())}; [dim]{console.escape(machine.short)}[/]")
    table = Table.grid(padding=(0, 1))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(max_width=14)  # long values (ZeRO-3 + offload ...) wrap rather than push the reasons off
    table.add_column(style="dim", ratio=1)
    for d in plan.decisions:
        if d.topic != "machine":
            table.add_row(f"  {_SHORT_TOPICS.get(d.topic, d.topic)}", console.escape(d.choice), console.escape(d.short or d.why))
    out.print(table)
    est = plan.estimate
    out.print(f"parameters: {est.total_params:,}, {est.trainable_params:,} trained")
    for i, line in enumerate(_footer(plan)):
        out.print(("[green]" if plan.fits else "[red]") + console.escape(line) + "[/]" if i == 0 else console.escape(line))
    for s in plan.suggestions:
        out.print(f"[yellow]option:[/] {console.escape(s)}")
    for w in plan.warnings:
        console.warn(w)


def plan_text(plan, source: str, summary, width: int = 100) -> str:
    """The full plan as plain text: every decision with its whole reasoning, the parameters and the
    memory table (qvltune-plan.txt, ``--explain``)."""
    import io

    from rich.console import Console

    from qvltune.cli.estimate import render_memory, render_params

    buffer = Console(file=io.StringIO(), width=width, color_system=None, highlight=False, record=True)
    buffer.print(f"Plan for {console.escape(plan.config.model.path)} ({console.escape(source)})")
    if summary:
        buffer.print(console.escape(_data_line(summary)))
    table = Table(box=None, padding=(0, 1), show_header=True)
    table.add_column("decision", no_wrap=True)
    table.add_column("value", no_wrap=True)
    table.add_column("why", ratio=1)
    for d in plan.decisions:
        table.add_row(d.topic, console.escape(d.choice), console.escape(d.why))
    buffer.print(table)
    buffer.print(render_params(plan.estimate))
    render_memory(plan.estimate, plan.machine, console=buffer)
    for line in _footer(plan):
        buffer.print(console.escape(line))
    for s in plan.suggestions:
        buffer.print(f"option: {console.escape(s)}")
    for w in plan.warnings:
        buffer.print(f"warning: {console.escape(w)}")
    return "\n".join(line.rstrip() for line in buffer.export_text().splitlines()) + "\n"
