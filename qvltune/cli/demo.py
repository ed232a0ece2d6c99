"""``qvltune demo``: the whole flow on the embedded tiny model and a synthetic task, non-interactively.

config -> train with the live panel -> held-out accuracy before vs after, per question type.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
import yaml
from rich.table import Table

from qvltune import console
from qvltune.errors import UserError


def demo_config(out: Path, train: Path, evals: Path, gpus: list) -> dict:
    """The demo's run config: the tiny model trained fully (it has 1.5 M parameters) for three epochs.

    Batch 32 at lr 2e-3 for three epochs takes the tiny model from 0% to about 98% held-out accuracy
    on both colour questions (measured on a 2-core CPU; one epoch reaches ~95% on the background but
    only ~50% on the shape's colour)."""
    bf16 = bool(gpus) and all(g.bf16 for g in gpus)
    return {
        "name": "demo",
        "output_dir": str(out / "runs"),
        "model": {"path": "builtin:tiny"},
        "data": {"train": str(train), "eval": str(evals), "max_seq_length": 256, "num_workers": 1},
        "strategy": "full",
        "optim": {
            "learning_rate": 2e-3,
            "warmup_ratio": 0.05,
            "per_device_batch": 32,
            "grad_accum": 1,
            "epochs": 3,
            "bf16": bf16,
            "optimizer": "adamw_torch_fused" if gpus else "adamw_torch",
            "gradient_checkpointing": False,
            "seed": 0,
        },
        "schedule": {"log_steps": 5, "eval_steps": 50, "save_steps": 50, "save_total_limit": 2},
        "deepspeed": {"stage": 2},
        "launch": {"gpus": 1, "cpu_processes": 1},
    }


def command(
    out: Path = typer.Option(Path("qvltune-demo"), "--out", help="Folder for the demo data, config and run."),
    train_samples: int = typer.Option(3000, "--train-samples", min=1, help="Synthetic training records."),
    eval_samples: int = typer.Option(300, "--eval-samples", min=1, help="Held-out records for accuracy."),
    grounding_every: int = typer.Option(6, "--grounding-every", min=0, help="Every Nth record asks for the shape's box (0: colour questions only)."),
    no_live: bool = typer.Option(False, "--no-live", help="Plain log lines instead of the live panel."),
    stage: str = typer.Option("sft", "--stage", metavar="sft|dpo", help="dpo: preference-tune the SFT demo's model (trained first when missing) and show held-out preferences before and after."),
    pairs: int = typer.Option(160, "--pairs", min=2, help="--stage dpo: preference pairs to train on."),
    eval_pairs: int = typer.Option(60, "--eval-pairs", min=1, help="--stage dpo: held-out preference pairs."),
) -> int:
    """Train the tiny Qwen3-VL on a synthetic colour and grounding task and show held-out scores before and after."""
    if stage not in ("sft", "dpo"):
        raise typer.BadParameter(f"'{stage}' is not one of sft, dpo", param_hint="--stage")
    if stage == "dpo":
        from qvltune.preference.demo import run

        return run(out, train_samples=train_samples, eval_samples=eval_samples, pairs=pairs, eval_pairs=eval_pairs, no_live=no_live)
    from qvltune.config import parse_config
    from qvltune.hardware import detect_gpus
    from qvltune.infer import evaluate, load_for_inference, load_records
    from qvltune.tiny import BUILTIN_TINY, GROUNDING_TYPE, make_demo_dataset, tiny_model_path
    from qvltune.train import run_training

    t0 = time.time()
    console.note(f"tiny model: {tiny_model_path()}")
    data_dir = out / "data"
    marker = data_dir / "demo-data.json"  # what the existing data was made with: reuse it only if unchanged
    made_with = {"train": train_samples, "eval": eval_samples, "grounding_every": grounding_every}
    if marker.exists() and json.loads(marker.read_text()) == made_with:
        train, evals = data_dir / "train.jsonl", data_dir / "eval.jsonl"
    else:
        train, evals = make_demo_dataset(data_dir, train_samples, eval_samples, grounding_every=grounding_every)
        marker.write_text(json.dumps(made_with))
    gpus = detect_gpus()[0][:1]
    doc = demo_config(out.resolve(), train.resolve(), evals.resolve(), gpus)
    (out / "demo.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    cfg = parse_config(doc, str(out / "demo.yaml"))
    console.out.print(f"demo: {train_samples} training and {eval_samples} held-out records in {data_dir}; config {out / 'demo.yaml'}")

    records = load_records(str(evals))
    with console.status("held-out accuracy before training") as status:
        model, processor = load_for_inference(BUILTIN_TINY)
        before = evaluate(model, processor, records, max_new_tokens=4, batch_size=64, with_loss=False, progress=status.report)
    del model
    console.out.print(f"held-out accuracy before training: {before.accuracy:.1%} (chance: 1 in 6 = 16.7%)")

    outcome = run_training(cfg, resume=False, live=not no_live and console.err.is_terminal, force=True, gpus=gpus)
    if outcome.exit_code != 0 or outcome.state.status != "completed":
        from qvltune.cli.train import report

        report(outcome, cfg, out / "demo.yaml")
        raise UserError("the demo's training run did not complete", f"see {cfg.run_dir / 'train.log'}")
    with console.status("held-out accuracy after training") as status:
        model, processor = load_for_inference(str(cfg.run_dir / "final"))
        after = evaluate(model, processor, records, max_new_tokens=4, batch_size=64, with_loss=False, progress=status.report)

    table = Table(title="Held-out accuracy (exact match; boxes: IoU >= 0.5)", title_justify="left")
    table.add_column("question")
    table.add_column("n", justify="right")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for qtype, stats in after.by_type.items():
        key = "accuracy" if "accuracy" in stats else "accuracy_iou50"
        table.add_row(qtype.replace("_", " "), str(int(stats["n"])), f"{before.by_type.get(qtype, {}).get(key, 0):.1%}", f"{stats[key]:.1%}")
    table.add_row("all", str(after.short_answers), f"{before.accuracy:.1%}", f"[bold]{after.accuracy:.1%}[/]")
    console.out.print(table)
    if after.boxes:
        console.out.print(f"{GROUNDING_TYPE.replace('_', ' ')}: mean IoU {before.boxes['mean_iou']:.3f} before, {after.boxes['mean_iou']:.3f} after ('all' counts the colour questions, scored by exact match)")
    from qvltune.cli.eval import render_examples

    render_examples(after.examples, console.out)
    console.out.print(f"final model: {cfg.run_dir / 'final'}   loss curve: {cfg.run_dir / 'loss.png'}   wall time {time.time() - t0:.0f} s")
    return 0
