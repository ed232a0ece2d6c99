"""``qvltune eval``: loss and perplexity on the assistant tokens, exact-match accuracy on short answers."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from qvltune import console
from qvltune.cli.predict import MODEL_HELP, torch_dtype


def command(
    model: str = typer.Argument(..., metavar="MODEL", help=MODEL_HELP),
    data: str = typer.Option(..., "--data", metavar="FILE", help="Dataset with answers (any format check-data accepts; a.jsonl%50,b.jsonl mixes)."),
    base: str = typer.Option(None, "--base", metavar="MODEL", help="Base model for an adapter (default: the one it records)."),
    image_root: Path = typer.Option(None, "--image-root", help="Folder that relative media paths resolve against (default: the file's folder)."),
    limit: int = typer.Option(None, "--limit", min=1, help="Only the first N records."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="Longest generated answer for exact match, in tokens."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Records generated together."),
    device: str = typer.Option(None, "--device", metavar="cpu|cuda", help="Where to run (default: the GPU when there is one, else the CPU)."),
    dtype: str = typer.Option(None, "--dtype", metavar="bf16|fp16|fp32", help="Weight dtype (default: fp32 on CPU, bf16 on GPU)."),
    reference: str = typer.Option(None, "--reference", metavar="MODEL", help="Preference pairs: also score DPO's implicit reward against this reference model (e.g. the SFT model)."),
    beta: float = typer.Option(0.1, "--beta", min=0.0, help="Preference pairs with --reference: DPO's beta for the reward margin."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document and nothing else."),
) -> int:
    """Score a model on a dataset: loss/perplexity on the answers and, for short answers, exact-match accuracy; on preference pairs, preference accuracy."""
    from qvltune.infer import InferenceOptions, evaluate_model
    from qvltune.preference.data import is_preference_data

    options = InferenceOptions(
        base=base, device=device, dtype=torch_dtype(dtype), image_root=image_root, max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit
    )
    if is_preference_data(data):
        from qvltune.preference.evaluate import evaluate_pairs_model

        with console.status(f"evaluating {model} on preference pairs") as status:
            pref = evaluate_pairs_model(model, data, options, reference=reference, beta=beta, progress=status.report)
        if as_json:
            console.print_json({"model": model, "data": data, **pref.to_json()})
        else:
            render_preference(pref, model, data)
        return 0
    with console.status(f"evaluating {model}") as status:
        report = evaluate_model(model, data, options, progress=status.report)
    if as_json:
        console.print_json({"model": model, "data": data, **report.to_json()})
    else:
        render(report, model, data)
    return 0


def render(report, model: str, data: str) -> None:
    out = console.out
    table = Table(title=f"Evaluation of {model} on {data}", title_justify="left", show_header=False, box=None, padding=(0, 2))
    table.add_row("records", str(report.records))
    table.add_row("loss (assistant tokens)", f"{report.loss:.4f}" if report.loss is not None else "-")
    table.add_row("perplexity", f"{report.perplexity:.3f}" if report.perplexity is not None else "-")
    if report.accuracy is not None:
        table.add_row("exact-match accuracy", f"[bold]{report.accuracy:.1%}[/] of {report.short_answers} short answer(s)")
    elif not report.boxes:
        table.add_row("exact-match accuracy", "- (no short answers: exact match is not meaningful for long ones)")
    if report.boxes:
        b = report.boxes
        table.add_row("boxes: mean IoU", f"{b['mean_iou']:.3f} over {int(b['n'])} box answer(s)")
        table.add_row("boxes: IoU >= 0.5", f"[bold]{b['accuracy_iou50']:.1%}[/]")
    out.print(table)
    if report.by_type:
        by_type = Table(title="By question type", title_justify="left", box=None, padding=(0, 2))
        by_type.add_column("question type")
        by_type.add_column("n", justify="right")
        by_type.add_column("accuracy", justify="right")
        for qtype, stats in report.by_type.items():
            if "accuracy" in stats:
                score = f"{stats['accuracy']:.1%}"
            else:  # box answers
                score = f"{stats['accuracy_iou50']:.1%} at IoU >= 0.5 (mean IoU {stats['mean_iou']:.3f})"
            by_type.add_row(console.escape(qtype), str(int(stats["n"])), score)
        out.print(by_type)
    render_examples(report.examples, out)


def render_examples(examples, out) -> None:
    """A few answers under a heading that says what they are: mistakes first, marked."""
    from qvltune.infer import normalise

    if not examples:
        return
    wrong = sum(normalise(e["got"]) != normalise(e["expected"]) for e in examples[:3])
    out.print("Examples" + (" (mistakes first)" if wrong else " (all correct)") + ":")
    for ex in examples[:3]:
        mark = "[green]right[/]" if normalise(ex["got"]) == normalise(ex["expected"]) else "[red]wrong[/]"
        out.print(f"  {mark}  expected {console.escape(repr(ex['expected']))}, got {console.escape(repr(ex['got']))}")


def render_preference(report, model: str, data: str) -> None:
    out = console.out
    table = Table(title=f"Preference evaluation of {model} on {data}", title_justify="left", show_header=False, box=None, padding=(0, 2))
    table.add_row("pairs", str(report.pairs))
    table.add_row("preference accuracy", f"[bold]{report.accuracy:.1%}[/] (chosen answer more likely than rejected)")
    table.add_row("log-prob margin", f"{report.logp_margin:.3f} (mean log p(chosen) - log p(rejected))")
    if report.reward_accuracy is not None:
        table.add_row("reward accuracy", f"[bold]{report.reward_accuracy:.1%}[/] (DPO's implicit reward vs the reference, beta {report.beta:g})")
        table.add_row("reward margin", f"{report.reward_margin:.3f}")
    if report.generated:
        g = report.generated
        table.add_row("generated answers", f"{g['chosen']:.1%} chosen, {g['rejected']:.1%} rejected, {g['other']:.1%} other")
    out.print(table)
    for ex in report.examples[:3]:
        out.print(f"  chosen {console.escape(repr(ex['chosen']))}, rejected {console.escape(repr(ex['rejected']))}, got {console.escape(repr(ex['got']))}")
