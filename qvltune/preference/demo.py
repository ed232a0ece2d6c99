"""``qvltune demo --stage dpo``: preference tuning of the SFT demo's model, shown on held-out pairs.

The SFT demo teaches the tiny model to answer a colour question with the bare colour ("red"). The
preference set (``qvltune.tiny.make_preference_dataset``, new images drawn the same way) prefers
the right colour in a phrasing SFT never taught ("red it is.") over the bare answer, and over the
same phrasing with the other colour of the picture ("orange it is."). Before and after: preference
accuracy on the held-out pairs, DPO's reward accuracy, and what the model generates.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.table import Table

from qvltune import console
from qvltune.errors import UserError


def dpo_demo_config(out: Path, sft_final: Path, train: Path, evals: Path, gpus: list) -> dict:
    """Full fine-tuning of the tiny SFT model's language model (nothing to switch off, so the
    reference log-probs are precomputed once): three epochs of batches of 2 packed rows (about 6
    pairs), lr 1e-3, beta 0.5, rpo_alpha 1. What the choices rest on, measured on the 2-core CPU:

    - rpo_alpha 1 adds the chosen answers' cross-entropy: the phrasing's tokens after the colour
      start far below anything the SFT model says, where DPO alone raises the chosen rewards by
      lowering everything else (without it: 0% of answers in the phrasing, the colour right in
      77.5% of them, down from 97.5%);
    - beta 0.5 rather than 0.1: the pairs that differ only in the colour need DPO's own push (the
      cross-entropy raises both answers' shared phrasing); at 0.1 DPO's reward won 72.5% of the
      held-out pairs, against 85% at 0.5;
    - the merger and DeepStack mergers frozen: the preference is about the language, and trained
      they let the colours drift (the right colour in 78-88% of the answers on 60 held-out pairs,
      two seeds, against 92-93% frozen);
    - lr 1e-3, not the SFT demo's 2e-3 (which broke the colours), in batches of 2 rows rather than
      4 for enough steps to finish the phrasing (30 steps of 4 rows left "red is the the ...",
      on an earlier, longer phrasing)."""
    bf16 = bool(gpus) and all(g.bf16 for g in gpus)
    return {
        "name": "demo-dpo",
        "output_dir": str(out / "runs"),
        "stage": "dpo",
        "model": {"path": str(sft_final)},
        "data": {"train": str(train), "eval": str(evals), "max_seq_length": 256, "num_workers": 1, "packing": True},
        "strategy": "full",
        "components": {"merger": "frozen", "deepstack": "frozen"},
        "dpo": {"beta": 0.5, "loss": "sigmoid", "label_smoothing": 0.0, "rpo_alpha": 1.0, "reference": "precomputed"},
        "optim": {
            "learning_rate": 1e-3, "warmup_ratio": 0.1, "per_device_batch": 2, "grad_accum": 1, "epochs": 3, "bf16": bf16,
            "optimizer": "adamw_torch_fused" if gpus else "adamw_torch", "gradient_checkpointing": False, "seed": 0,
        },
        "schedule": {"log_steps": 5, "eval_steps": 25, "save_steps": 50, "save_total_limit": 1},
        "deepspeed": {"stage": 2},
        "launch": {"gpus": 1, "cpu_processes": 1},
    }


def scores(report, pairs) -> dict[str, float]:
    """What the model generates on the held-out pairs: the preferred phrasing with the right colour,
    the SFT demo's bare answer, and the right colour first in any phrasing."""
    from qvltune.infer import normalise
    from qvltune.tiny import colours_in

    n = max(1, len(report.answers))
    right = {i: colours_in(pairs[i].chosen.messages[-1].text())[0] for i in report.answers}
    return {
        "preferred": sum(normalise(a) == normalise(pairs[i].chosen.messages[-1].text()) for i, a in report.answers.items()) / n,
        "bare": sum(normalise(a) == right[i] for i, a in report.answers.items()) / n,
        "colour": sum(colours_in(a)[:1] == [right[i]] for i, a in report.answers.items()) / n,
    }


def run(out: Path, *, train_samples: int, eval_samples: int, pairs: int, eval_pairs: int, no_live: bool) -> int:
    from qvltune.config import parse_config
    from qvltune.hardware import detect_gpus
    from qvltune.infer import load_for_inference
    from qvltune.preference.data import load_pairs
    from qvltune.preference.evaluate import evaluate_pairs
    from qvltune.tiny import make_preference_dataset
    from qvltune.train import run_training

    import yaml

    t0 = time.time()
    sft_final = out / "runs" / "demo" / "final"
    if not (sft_final / "model.safetensors").exists():
        from qvltune.cli.demo import command as sft_demo

        console.out.print(f"no SFT demo model in {sft_final}: training it first")
        sft_demo(out=out, train_samples=train_samples, eval_samples=eval_samples, grounding_every=0, no_live=no_live, stage="sft", pairs=pairs, eval_pairs=eval_pairs)
    else:
        console.out.print(f"starting from the SFT demo's model: {sft_final}")
    data_dir = out / "data"
    marker = data_dir / "demo-pairs.json"
    made_with = {"pairs": pairs, "eval_pairs": eval_pairs}
    if marker.exists() and json.loads(marker.read_text()) == made_with:
        train, evals = data_dir / "pref_train.jsonl", data_dir / "pref_eval.jsonl"
    else:
        train, evals = make_preference_dataset(data_dir, pairs, eval_pairs)
        marker.write_text(json.dumps(made_with))
    gpus = detect_gpus()[0][:1]
    doc = dpo_demo_config(out.resolve(), sft_final.resolve(), train.resolve(), evals.resolve(), gpus)
    (out / "demo-dpo.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    cfg = parse_config(doc, str(out / "demo-dpo.yaml"))
    console.out.print(f"demo: {pairs} preference pairs for training and {eval_pairs} held out in {data_dir}; config {out / 'demo-dpo.yaml'}")

    held_out = load_pairs(str(evals))
    with console.status("held-out preferences of the SFT model") as status:
        model, processor = load_for_inference(str(sft_final))
        before = evaluate_pairs(model, processor, held_out, max_new_tokens=8, batch_size=64, progress=status.report)
    del model
    outcome = run_training(cfg, resume=False, live=not no_live and console.err.is_terminal, force=True, gpus=gpus)
    if outcome.exit_code != 0 or outcome.state.status != "completed":
        from qvltune.cli.train import report

        report(outcome, cfg, out / "demo-dpo.yaml")
        raise UserError("the demo's preference-tuning run did not complete", f"see {cfg.run_dir / 'train.log'}")
    with console.status("held-out preferences after DPO") as status:
        model, processor = load_for_inference(str(cfg.run_dir / "final"))
        reference = load_for_inference(str(sft_final))[0]
        after = evaluate_pairs(model, processor, held_out, reference=reference, beta=cfg.preference().beta, max_new_tokens=8, batch_size=64, progress=status.report)

    b, a = scores(before, held_out), scores(after, held_out)
    table = Table(title=f"Held-out pairs ({len(held_out)}): SFT model vs after DPO", title_justify="left")
    table.add_column("")
    table.add_column("SFT", justify="right")
    table.add_column("DPO", justify="right")
    table.add_row("preference accuracy (log p chosen > rejected)", f"{before.accuracy:.1%}", f"[bold]{after.accuracy:.1%}[/]")
    table.add_row("reward accuracy (DPO's reward vs the SFT model)", "-", f"[bold]{after.reward_accuracy:.1%}[/]")
    table.add_row("answers in the preferred phrasing", f"{b['preferred']:.1%}", f"[bold]{a['preferred']:.1%}[/]")
    table.add_row("answers as SFT taught (bare colour)", f"{b['bare']:.1%}", f"{a['bare']:.1%}")
    table.add_row("right colour, any phrasing", f"{b['colour']:.1%}", f"{a['colour']:.1%}")
    console.out.print(table)
    console.out.print("Answers, SFT -> DPO:")
    for i in list(after.answers)[:4]:
        q = held_out[i].chosen.messages[-2].text().strip()
        console.out.print(f"  {console.escape(q)}  {console.escape(repr(before.answers.get(i, '')))} -> {console.escape(repr(after.answers[i]))}  (preferred {console.escape(repr(held_out[i].chosen.messages[-1].text()))})")
    console.out.print(f"final model: {cfg.run_dir / 'final'}   wall time {time.time() - t0:.0f} s")
    return 0
