"""``qvltune demo``: the whole flow on the embedded tiny model and a synthetic task."""

from __future__ import annotations

from pathlib import Path

import typer

from qvltune import console


def command(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for the demo data and run."),
) -> int:
    """Build the tiny Qwen3-VL, generate the synthetic task and check it."""
    from qvltune.data.check import check_dataset
    from qvltune.model import load_processor
    from qvltune.tiny import BUILTIN_TINY, make_demo_dataset, tiny_model_path

    console.note(f"tiny model: {tiny_model_path()}")
    train, evals = make_demo_dataset(out / "data")
    report = check_dataset(str(train), processor=load_processor(BUILTIN_TINY), model_name=BUILTIN_TINY)
    console.out.print(f"demo data: {report.valid} training records in {train}, eval set {evals}")
    return 0 if report.ok() else 1
