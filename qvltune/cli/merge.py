"""``qvltune merge``: merge a LoRA adapter into its base model and verify the result."""

from __future__ import annotations

from pathlib import Path

import typer

from qvltune import console
from qvltune.errors import UserError


def command(
    adapter: str = typer.Argument(..., metavar="ADAPTER_OR_RUN", help="A run folder (runs/NAME: its final adapter), its final/ or a checkpoint-N/ folder."),
    out: Path = typer.Option(..., "--out", help="Folder for the merged model (created; must be empty unless --force)."),
    base: str = typer.Option(None, "--base", metavar="MODEL", help="Base model (default: the one recorded in adapter_config.json)."),
    dtype: str = typer.Option(None, "--dtype", metavar="bf16|fp16|fp32", help="Weight dtype of the merged model (default: the base's)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", metavar="SIZE", help="Largest safetensors shard, e.g. 5GB or 500MB."),
    device: str = typer.Option(None, "--device", metavar="cpu|cuda", help="Where to merge and verify (default: the GPU when there is one, else the CPU)."),
    force: bool = typer.Option(False, "--force", help="Replace the contents of a non-empty --out."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document and nothing else."),
) -> int:
    """Merge LoRA into the base (plus modules trained beside it), save safetensors + processor, and verify logits and weights."""
    from qvltune.cli.predict import torch_dtype
    from qvltune.merge import merge

    weights_dtype = torch_dtype(dtype)
    if not Path(adapter).expanduser().exists():
        raise UserError(f"adapter or run folder not found: {adapter}", "give a run folder (runs/NAME), its final/ or a checkpoint-N/ folder")
    # The inputs are checked inside merge() before anything loads; the spinner names each slow phase
    # only once they passed, so a refusal is never preceded by "merging ...".
    with console.status(f"checking {adapter}, its base and --out") as status:
        result = merge(adapter, out, base=base, dtype=weights_dtype, max_shard_size=max_shard_size, device=device, force=force, progress=status.report)
    if as_json:
        console.print_json(result.to_json())
    else:
        render(result)
    if not result.ok:
        low_precision = result.weights.not_merged and result.dtype != "float32"
        hint = "the updates are below the resolution of the dtype: merge with --dtype fp32" if low_precision else "please report it with the folder's qvltune-merge.json"
        raise UserError(f"verification failed: {'; '.join(result.problems())}; the unverified model is in {result.out}", hint)
    return 0


def render(result) -> None:
    out = console.out
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[result.dtype]
    shards = [f for f in result.files if f.endswith(".safetensors")]
    out.print(f"Merged the adapter {console.escape(str(result.adapter))} with its base {console.escape(base_name(result.base))}")
    out.print(f"  wrote [bold]{console.escape(str(result.out))}[/] ({short}, {len(shards)} shard(s), {result.size_bytes / 1e6:,.1f} MB, {result.seconds:.0f} s)")
    out.print(f"  adapter weights from {console.escape(result.weights_from)}")
    for note in result.notes:
        console.note(note)
    out.print("Verification (the saved folder reloaded with AutoModelForImageTextToText + AutoProcessor):")
    lg = result.logits
    # Stage 1: the float32 merge against base + adapter unmerged in float32 (the reference).
    out.print(f"  {_status(lg.merge_ok)}  merge      fp32 merge vs base + adapter in fp32: RMS {lg.merge_rms:.2g} {'<=' if lg.merge_ok else '>'} {lg.merge_limit:.2g}")
    # Stage 2: the saved folder against the same reference, next to the merged weights rounded once.
    out.print(f"  {_status(lg.saved_ok)}  logits     saved {short} vs the reference: RMS {lg.saved_rms:.2g}, {lg.ratio:.2f}x {short} rounding ({'<=' if lg.saved_ok else '>'} {lg.factor:g}x)")
    if result.dtype != "float32":
        out.print(f"                   (the adapter unmerged in {short}: RMS {lg.unmerged_rms:.2g})")
        if note := lg.rounding_note(result.dtype):
            console.warn(note)
    out.print(f"                   probe: 2 images + chats, {lg.positions} positions; training moved the logits by up to {lg.training_effect:.3g}; same top-1 token at {lg.top1_agreement:.1%}")
    w = result.weights
    if w.skipped:
        out.print(f"  [yellow]SKIP[/]  weights    not compared: {console.escape(w.skipped)}")
    else:
        out.print(f"  {_status(w.ok)}  weights    {w.changed} tensor(s) differ from the base where training changed them, {w.unchanged} equal to it")
        for label, names in (("trained but equal to the base", w.not_merged), ("changed though training left them", w.unexpected), ("missing", w.missing)):
            if names:
                out.print(f"                   {label} ({len(names)}): {console.escape(', '.join(names[:3]))}{' ...' if len(names) > 3 else ''}")
    processor = result.processor_problem or "tokenizer, chat template, image/video processors saved; reloaded, they encode the probe identically"
    out.print(f"  {_status(result.processor_problem is None)}  processor  {console.escape(processor)}")
    if result.ok:
        out.print(f"next: qvltune predict {result.out} --image IMG --prompt TEXT   or   qvltune eval {result.out} --data FILE")


def base_name(base: str) -> str:
    """The base as the user named it: builtin:tiny rather than its cache folder."""
    from qvltune.tiny import BUILTIN_TINY, tiny_model_path

    return BUILTIN_TINY if base in (BUILTIN_TINY, str(tiny_model_path())) else base


def _status(ok: bool) -> str:
    return "[green]OK  [/]" if ok else "[red]FAIL[/]"
