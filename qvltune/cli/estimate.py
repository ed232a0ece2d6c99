"""``qvltune estimate CONFIG``: memory per GPU, host memory and time per epoch; fits or not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from qvltune import console
from qvltune.errors import UserError


def command(
    config: Path = typer.Argument(..., metavar="CONFIG", help="Run config (YAML), e.g. from `qvltune init`."),
    gpu: str = typer.Option(None, "--gpu", help="Estimate for this GPU instead of the detected ones: H200, H100, A100, A100-40GB, L40S, A6000, 4090, ..."),
    gpu_count: int = typer.Option(None, "--gpu-count", min=1, help="GPUs per node (default: the config's launch.gpus, else all detected; 1 with --gpu)."),
    gpu_memory: float = typer.Option(None, "--gpu-memory", min=1, help="Memory per GPU in GB (GiB), for a GPU --gpu does not know or to override it."),
    no_data: bool = typer.Option(False, "--no-data", help="Do not read the dataset (no token statistics, no time estimate)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document and nothing else."),
    nodes: int = typer.Option(None, "--nodes", min=1, help="Nodes (default: launch.nodes), for the time per step on GPUs x nodes."),
    tokens_per_s: float = typer.Option(None, "--tokens-per-s", min=1, help="Real tokens/s one GPU measured for this config (e.g. a 1-GPU run's panel); default: the step's FLOPs at an assumed share of the GPU's peak."),
    nvlink_gbs: float = typer.Option(None, "--nvlink-gbs", min=0.1, help="GPU-to-GPU bandwidth within a node, GB/s per direction (default: NVLink of the GPU, else PCIe)."),
    internode_gbs: float = typer.Option(None, "--internode-gbs", min=0.1, help="Network bandwidth per node across nodes, GB/s (default 400: 8 x 400 Gb/s InfiniBand; 2 x 100 GbE = 25)."),
) -> int:
    """Estimate GPU memory (weights, gradients, optimizer states, activations), host memory and time per epoch."""
    from qvltune.config import load_config
    from qvltune.estimate import estimate
    from qvltune.estimate_inputs import Machine, workload_for

    cfg = load_config(config)
    stats, source = load_stats(cfg.model.path, cfg.model.trust_remote_code)
    inv, planned = machine_inventory(cfg, gpu, gpu_count, gpu_memory)
    count = gpu_count or _config_gpu_count(cfg)
    machine = Machine.from_inventory(inv, nodes=nodes or cfg.launch.nodes, gpu_count=count if inv.gpus else None, cpu_processes=cfg.launch.cpu_processes)
    data = None if no_data else dataset_summary(cfg.data.train, cfg.data.image_root, *cfg.data.pixel_budget(), quiet=as_json)
    est = estimate(cfg, stats, machine, workload_for(cfg, data))
    fits = None if machine.is_cpu else est.fits(machine.gpu_memory) and est.host_fits(machine.host_ram)
    scaling = step_scaling(cfg, est, stats, machine, tokens_per_s, nvlink_gbs, internode_gbs)
    clock = run_wall_clock(cfg, est, stats.total)
    if as_json:
        doc = est.to_json()
        doc.update({"model": cfg.model.path, "model_config": source, "machine": machine.__dict__, "fits": fits, "scaling": scaling})
        if clock is not None:
            from dataclasses import asdict

            doc["wall_clock"] = {**asdict(clock), "total_s": clock.total(), "total_cached_s": clock.total(cached=True), "ratio": clock.ratio()}
        console.print_json(doc)
    else:
        if inv.note and not planned:
            console.note(inv.note)  # before the results it qualifies (e.g. no GPU: a CPU estimate)
        console.out.print(f"[bold]{console.escape(cfg.name)}[/]: {console.escape(cfg.model.path)} ({console.escape(source)}), strategy {cfg.strategy}, ZeRO-{cfg.deepspeed.stage}"
                          + (" + offload" if cfg.deepspeed.offload_optimizer or cfg.deepspeed.offload_params else "")
                          + f", gradient checkpointing {'on' if cfg.optim.gradient_checkpointing else 'off'}")
        render_estimate(est, machine, cfg.optim.epochs)
        render_wall_clock(clock)
        render_scaling(scaling, machine)
        render_fit(est, machine, inv.gpus if not planned else [])
    return 0 if fits in (None, True) else 1


def step_scaling(cfg, est, stats, machine, tokens_per_s: float | None, nvlink_gbs: float | None, internode_gbs: float | None) -> dict[str, Any] | None:
    """Time per optimizer step on this machine's GPUs x nodes (``qvltune.scaling``); None on CPU."""
    from qvltune.estimate import ASSUMED_UTILIZATION
    from qvltune.scaling import Network, assumed_rate, inputs_for, step_time

    if machine.is_cpu or not (tokens_per_s or machine.peak_tflops):
        return None
    rate = tokens_per_s or assumed_rate(est.step_flops_per_token, machine.peak_tflops, ASSUMED_UTILIZATION)
    network = Network.for_gpu(machine.gpu_name, intra_gbs=nvlink_gbs, inter_gbs=internode_gbs)
    inputs = inputs_for(cfg, est, stats, rate)
    step = step_time(inputs, machine.gpus_per_node, machine.nodes, network)
    source = "measured, --tokens-per-s" if tokens_per_s else f"assumed: the step's FLOPs at {ASSUMED_UTILIZATION:.0%} of {machine.peak_tflops:g} TFLOP/s; give a measured one with --tokens-per-s"
    return {**step.to_json(), "rate_1gpu": rate, "rate_source": source, "intra_gbs": network.intra_gbs, "inter_gbs": network.inter_gbs,
            "intra_default": nvlink_gbs is None, "inter_default": internode_gbs is None, "stage": inputs.stage}  # fmt: skip


def render_scaling(s: dict[str, Any] | None, machine) -> None:
    if s is None:
        return
    out = console.out
    where = f"{s['gpus_per_node']} x {machine.gpu_name}" + (f" x {s['nodes']} nodes" if s["nodes"] > 1 else "")
    out.print(
        f"step: {s['total']:.2f} s per optimizer step on {console.escape(where)} -> {s['tokens_per_s']:,.0f} tokens/s, "
        f"{s['efficiency']:.0%} of one GPU's rate per GPU"
    )
    out.print(
        f"  [dim]compute {s['compute']:.2f} s at {s['rate_1gpu']:,.0f} tokens/s per GPU ({console.escape(s['rate_source'])}); "
        f"ZeRO-{s['stage']} communication {s['communication']:.2f} s, {s['exposed']:.2f} s of it not hidden by compute; overhead {s['overhead']:.2f} s[/]"
    )
    nets = f"{s['intra_gbs']:g} GB/s per GPU within a node" + (" (default, --nvlink-gbs)" if s["intra_default"] else "")
    if s["nodes"] > 1:
        nets += f", {s['inter_gbs']:g} GB/s per node across nodes" + (" (default, --internode-gbs)" if s["inter_default"] else "")
    out.print(f"  [dim]interconnect: {console.escape(nets)}[/]")


def _config_gpu_count(cfg) -> int | None:
    g = cfg.launch.gpus
    return len(g) if isinstance(g, list) else g if isinstance(g, int) else None


def load_stats(path: str, trust_remote_code: bool = False):
    from qvltune.model_stats import model_stats, resolve_model_config

    config, source = resolve_model_config(path, trust_remote_code)
    try:
        return model_stats(config), source
    except ValueError as e:
        raise UserError(f"model.path: {path}: {e}", "use a Qwen3-VL model (Qwen/Qwen3-VL-8B-Instruct, a local folder, or builtin:tiny)") from None


def machine_inventory(cfg, gpu: str | None, gpu_count: int | None, gpu_memory: float | None):
    """(inventory, planned?) — the detected machine, or one given by ``--gpu/--gpu-memory``."""
    from qvltune.hardware import inventory, planned_inventory

    if gpu or gpu_memory:
        try:
            return planned_inventory(gpu, gpu_count or _config_gpu_count(cfg) or 1, gpu_memory), True
        except ValueError as e:
            raise UserError(f"--gpu: {e}", "add --gpu-memory GB for a GPU qvltune does not know") from None
    return inventory(cfg.output_dir), False


_SUMMARIES: dict[tuple, Any] = {}


def dataset_summary(train: str | list[str], image_root: str | None, min_pixels: int, max_pixels: int, quiet: bool = False):
    """Token statistics of the training data (check-data's estimated counts; cached per process)."""
    from qvltune.data.check import CheckOptions, check_dataset
    from qvltune.estimate_inputs import summarize_report

    key = (str(train), image_root, min_pixels, max_pixels)
    if key in _SUMMARIES:
        return _SUMMARIES[key]
    try:
        from qvltune.preference.data import check_pairs, is_preference_data

        check = check_pairs if is_preference_data(train) else check_dataset  # pairs: both answers' samples counted
        report = check(train, CheckOptions(image_root=Path(image_root) if image_root else None, min_pixels=min_pixels, max_pixels=max_pixels))
    except ValueError as e:
        raise UserError(f"data.train: {e}", "write mixtures as a.jsonl%50,b.jsonl") from None
    except UserError as e:  # a missing dataset file: memory can still be estimated, tokens and time not
        if not quiet:
            console.warn(f"{e.message}: token statistics and time are not estimated")
        _SUMMARIES[key] = None
        return None
    summary = summarize_report(report, min_pixels, max_pixels) if report.lengths else None
    if not quiet:
        if summary is None:
            console.warn(f"no usable record in {train}: token statistics and time are not estimated (`qvltune check-data` shows why)")
        elif report.errors:
            console.warn(f"{len(report.errors)} problem(s) in the data (`qvltune check-data` lists them); estimating from the {report.valid} good records")
    _SUMMARIES[key] = summary
    return summary


def render_params(est) -> Table:
    table = Table(title="Parameters", title_justify="left", box=None, padding=(0, 2))
    for col, just in (("component", "left"), ("mode", "left"), ("parameters", "right"), ("trainable", "right")):
        table.add_column(col, justify=just)
    for c in est.components:
        table.add_row(c.component, c.mode, f"{c.params:,}", f"{c.trainable:,}" if c.trainable else "-")
    table.add_row("[bold]total[/]", "", f"{est.total_params:,}", f"[bold]{est.trainable_params:,}[/]" + (f" (LoRA {est.lora_params:,})" if est.lora_params else ""))
    return table


def render_memory(est, machine, console=None) -> None:
    """The per-GPU breakdown, one term per line (notes say where each number comes from). A table,
    so a note wraps between words within its column at any width."""
    from qvltune import console as output
    from qvltune.estimate import overhead_term
    from qvltune.units import format_bytes

    out = console or output.out
    where = "process" if machine.is_cpu else "GPU"
    ranks = f"{est.world_size} rank{'s' if est.world_size > 1 else ''}"
    out.print(f"[bold]Memory per {where}[/] [dim]({output.escape(machine.label())}, {ranks})[/]")
    table = Table.grid(padding=(0, 2))
    table.add_column(no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    table.add_column(style="dim", ratio=1)

    def line(name: str, value: float, note: str, bold: bool = False) -> None:
        cells = (f"  {name}", f"{value / 2**30:,.2f} GiB", output.escape(note))
        table.add_row(*(f"[bold]{c}[/]" for c in cells[:2]), cells[2]) if bold else table.add_row(*cells)

    for t in est.gpu_terms:
        line(t.name, t.bytes, t.note)
    line("peak allocated", est.peak_allocated, f"what torch.cuda.max_memory_allocated would report (peak at the {est.peak_phase})", bold=True)
    if not machine.is_cpu:
        o = overhead_term(est)
        line(o.name, o.bytes, o.note)
        line("total", est.per_gpu, f"of {format_bytes(machine.gpu_memory)}", bold=True)
    out.print(table)


def format_flops(flops: float) -> str:
    """FLOPs with a unit that leaves digits to read (the tiny model does ~10 MFLOP per token)."""
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if flops >= scale:
            return f"{flops / scale:,.1f} {unit}"
    return f"{flops:,.0f} FLOP"


def render_estimate(est, machine, epochs: float | None = None) -> None:
    from qvltune.step_flops import shares_line
    from qvltune.units import format_bytes, format_duration

    out = console.out
    out.print(render_params(est))
    render_memory(est, machine)
    if est.host_terms:
        for t in est.host_terms:
            out.print(f"host memory: {t.name} {format_bytes(t.bytes)} per node [dim]({console.escape(t.note)})[/]")
        if machine.host_ram:
            out.print(f"host memory needed: {format_bytes(est.host_total)} of {format_bytes(machine.host_ram)} per node")
    wl = est.workload
    out.print(f"micro-batch: {wl.tokens:,} tokens, {wl.image_tokens:,} of them image tokens [dim]({console.escape(wl.assumption)})[/]")
    out.print(f"compute: {format_flops(est.flops_per_token)} per token by the 6N rule (MFU), {format_flops(est.step_flops_per_token)} per token per training step")
    out.print(f"  [dim]of the step: {shares_line(est.step_parts)}[/]")
    if est.seconds_per_epoch is not None:
        total = f", ~{format_duration(est.seconds_per_epoch * epochs)} for {epochs:g} epochs" if epochs and epochs != 1 else ""
        out.print(f"time: ~{format_duration(est.seconds_per_epoch)} per epoch ({wl.tokens_per_epoch:,} tokens){total}")
    elif wl.tokens_per_epoch is None:
        out.print("[dim]time: not estimated (no dataset statistics)[/]")
    else:
        out.print("[dim]time: not estimated (no GPU peak throughput known)[/]")
    for a in est.assumptions:
        if a != wl.assumption:
            console.note(a)


def run_wall_clock(cfg, est, total_params: int):
    from qvltune.wallclock import steps_per_epoch, wall_clock

    return wall_clock(cfg, est, total_params, steps_per_epoch(cfg, est) or 0)


def render_wall_clock(clock) -> None:
    """The whole run around the steady time (qvltune.wallclock)."""
    if clock is None:
        return
    from qvltune.units import format_duration

    parts = [f"start-up ~{clock.startup_s:.0f} s", f"first step ~{clock.compile_cold_s:.0f} s (~{clock.compile_warm_s:.0f} s with the compile cache)" if clock.compile_cold_s else None]
    if clock.saves:
        first = f" (the first +{clock.first_save_extra_s:.0f} s: it pins its host buffers)" if clock.first_save_extra_s >= 0.5 else ""
        parts.append(f"{clock.saves} checkpoint(s) x ~{clock.save_blocking_s:.1f} s of training time{first}")
    if clock.evals:
        parts.append(f"{clock.evals} eval(s) x ~{clock.eval_s:.0f} s")
    parts.append(f"the end ~{clock.finish_s:.0f} s (the last checkpoint's write, the final model, the exit)")
    console.out.print(
        f"whole run: ~{format_duration(clock.total())} (~{format_duration(clock.total(cached=True))} on a second run), {clock.ratio():.2f}x the steady steps: "
        + ", ".join(p for p in parts if p)
    )
    for note in clock.assumptions:
        console.note(note)


def render_fit(est, machine, gpus: list) -> None:
    from qvltune.estimate import SAFETY_MARGIN
    from qvltune.units import format_bytes

    out = console.out
    if machine.is_cpu:
        # A CPU run's memory is host memory: compare with it, as `init` does.
        ram = machine.gpu_memory
        ok = est.per_gpu <= ram * (1 - SAFETY_MARGIN)
        out.print(f"on this CPU ({machine.world_size} process(es)): {'[green]fits[/]' if ok else '[red]does not fit[/]'} ({format_bytes(est.per_gpu)} of {format_bytes(ram)} of memory per process, {SAFETY_MARGIN:.0%} kept free)")
        out.print("[dim]for a GPU machine: qvltune estimate CONFIG --gpu H200 --gpu-count 8[/]")
        return
    limit = machine.gpu_memory * (1 - SAFETY_MARGIN)
    verdict = lambda ok: "[green]fits[/]" if ok else "[red]does not fit[/]"  # noqa: E731
    rows = gpus or [None]
    for g in rows:
        memory = g.memory_total if g is not None else machine.gpu_memory
        ok = est.per_gpu <= memory * (1 - SAFETY_MARGIN)
        label = f"GPU {g.index} {g.name}" if g is not None else f"each of {machine.world_size} x {machine.gpu_name}"
        out.print(f"{console.escape(label)}: {verdict(ok)} ({format_bytes(est.per_gpu)} of {format_bytes(memory)}, {SAFETY_MARGIN:.0%} kept free)")
        if g is not None and g.memory_used > 0.1 * g.memory_total:
            console.warn(f"GPU {g.index} already has {format_bytes(g.memory_used)} in use by another process")
    if est.host_total and machine.host_ram and not est.host_fits(machine.host_ram):
        out.print(f"host memory: [red]does not fit[/] ({format_bytes(est.host_total)} of {format_bytes(machine.host_ram)})")
    if est.per_gpu > limit:
        console.err.print("[bold]Hint:[/] turn on optim.gradient_checkpointing, use deepspeed.stage 3 (+ offload), lower data.max_seq_length / max_pixels, or plan again with `qvltune init`")
