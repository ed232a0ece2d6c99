"""``qvltune predict``: answer a prompt (with images), or every record of a dataset, with a model."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from qvltune import console

MODEL_HELP = "A merged or fully trained model folder, an adapter folder (final/, checkpoint-N/), a run folder (runs/NAME), a Hub id or builtin:tiny."


def torch_dtype(dtype: str | None) -> str | None:
    """--dtype's bf16|fp16|fp32 (predict, eval, merge) as the torch dtype name (None: the device's default)."""
    from qvltune.infer import DTYPES

    if dtype is not None and dtype not in DTYPES:
        raise typer.BadParameter(f"'{dtype}' is not one of bf16, fp16, fp32", param_hint="--dtype")
    return DTYPES[dtype] if dtype else None


def command(
    model: str = typer.Argument(..., metavar="MODEL", help=MODEL_HELP),
    image: list[Path] = typer.Option(None, "--image", metavar="IMG", help="An image for --prompt (repeat for several)."),
    prompt: str = typer.Option(None, "--prompt", metavar="TEXT", help="The question to answer."),
    data: str = typer.Option(None, "--data", metavar="FILE", help="Answer the last question of every record of this dataset instead."),
    base: str = typer.Option(None, "--base", metavar="MODEL", help="Base model for an adapter (default: the one it records)."),
    image_root: Path = typer.Option(None, "--image-root", help="Folder that relative media paths in --data resolve against (default: the file's folder)."),
    limit: int = typer.Option(None, "--limit", min=1, help="Only the first N records of --data."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Longest answer, in tokens."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Prompts generated together."),
    device: str = typer.Option(None, "--device", metavar="cpu|cuda", help="Where to run (default: the GPU when there is one, else the CPU)."),
    dtype: str = typer.Option(None, "--dtype", metavar="bf16|fp16|fp32", help="Weight dtype (default: fp32 on CPU, bf16 on GPU)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document and nothing else."),
) -> int:
    """Generate answers with the model's chat template (greedy), on a merged model or base + adapter."""
    from qvltune.infer import InferenceOptions, predict

    if (prompt is None) == (data is None):
        raise typer.BadParameter("give either --prompt (with --image) or --data", param_hint="--prompt/--data")
    if image and data is not None:
        raise typer.BadParameter("--image goes with --prompt; records of --data name their own images", param_hint="--image")
    options = InferenceOptions(
        base=base, device=device, dtype=torch_dtype(dtype), image_root=image_root, max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit
    )
    with console.status(f"loading {model}") as status:
        predictions = predict(model, options, prompt=prompt, images=list(image or []), data=data, progress=status.report)
    if as_json:
        console.print_json([p.to_json() for p in predictions])
    elif prompt is not None:
        console.out.print(predictions[0].answer, markup=False, highlight=False)
    else:
        render(predictions)
    return 0


def render(predictions) -> None:
    table = Table(title_justify="left", box=None, padding=(0, 2))
    table.add_column("record")
    table.add_column("question", overflow="fold", max_width=48)
    table.add_column("answer", overflow="fold")
    table.add_column("expected", overflow="fold")
    for p in predictions:
        answer = console.escape(p.answer) if p.answer else "[dim](empty)[/]"
        table.add_row(console.escape(p.where), console.escape(p.prompt), answer, console.escape(p.expected or "-"))
    console.out.print(table)
