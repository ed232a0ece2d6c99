"""``qvltune convert-boxes``: rewrite absolute-pixel boxes and points into Qwen3-VL's 0-1000 convention."""

from __future__ import annotations

from pathlib import Path

import typer

from qvltune import console
from qvltune.errors import UserError

MAX_LISTED = 50


def command(
    data: Path = typer.Argument(..., metavar="DATA", help="Dataset file (.jsonl or .json) whose answers hold absolute-pixel boxes."),
    out: Path = typer.Option(..., "--out", metavar="FILE", help="Where to write the converted dataset (the input is never modified)."),
    source: str = typer.Option("pixels", "--from", metavar="pixels|qwen25", help="pixels: of the original image; qwen25: of the image as Qwen2.5-VL's processor resized it."),
    image_root: Path = typer.Option(None, "--image-root", help="Folder that relative media paths resolve against (default: the file's folder)."),
    qwen25_min_pixels: int = typer.Option(56 * 56, "--qwen25-min-pixels", help="With --from qwen25: the min_pixels the data was made with."),
    qwen25_max_pixels: int = typer.Option(28 * 28 * 16384, "--qwen25-max-pixels", help="With --from qwen25: the max_pixels the data was made with."),
    allow_outside_root: bool = typer.Option(False, "--allow-outside-root", help="Accept media paths outside the image root."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
) -> int:
    """Convert grounding boxes from absolute pixels to 0-1000 relative coordinates (Qwen3-VL)."""
    from qvltune.data.boxes import convert_dataset

    if source not in ("pixels", "qwen25"):
        raise typer.BadParameter(f"'{source}' is not one of pixels, qwen25", param_hint="--from")
    report = convert_dataset(
        data, out, source=source, image_root=image_root, allow_outside_root=allow_outside_root,
        min_pixels=qwen25_min_pixels, max_pixels=qwen25_max_pixels, force=force,
    )
    if report.problems:
        for p in report.problems[:MAX_LISTED]:
            console.out.print(f"[red]error[/] {console.escape(str(p))}")
        if len(report.problems) > MAX_LISTED:
            console.out.print(f"... and {len(report.problems) - MAX_LISTED} more")
        raise UserError(f"{len(report.problems)} record(s) of {data} cannot be converted; nothing was written", "fix or remove them, then run convert-boxes again")
    what = "pixels of the original images" if source == "pixels" else "pixels of Qwen2.5-VL's resized images"
    console.out.print(f"converted {report.coordinates:,} box(es)/point(s) in {report.converted_records:,} of {report.records:,} records from {what} to 0-1000")
    console.out.print(f"wrote {out} ({data} unchanged)")
    console.note(f"next: qvltune check-data {out}")
    return 0
