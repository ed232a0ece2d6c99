"""The DPO trainer in-process (no DeepSpeed): its reference log-probs are those of the untouched
starting model (adapters and the modules trained beside them switched off; or precomputed), and a
few steps move the policy towards the chosen answers."""

from __future__ import annotations

import copy

import pytest
import torch

from qvltune.config import parse_config
from qvltune.data.tokenize import Encoder
from qvltune.model import apply_strategy, load_model
from qvltune.preference.data import prepare_pairs
from qvltune.preference.loss import logits_sequence_logps
from qvltune.preference.worker import preference_parts, trainer_and_callback
from qvltune.tiny import make_preference_dataset

MODEL_INPUTS = ("input_ids", "mm_token_type_ids", "position_ids", "pixel_values", "image_grid_thw", "attention_mask", "use_cache")


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory):
    return make_preference_dataset(tmp_path_factory.mktemp("pref"), n_train=16, n_eval=8, seed=3)


def dpo_config(tmp_path, data, **over):
    train, evals = data
    doc = {
        "name": "dpo", "output_dir": str(tmp_path / "runs"), "stage": "dpo", "model": {"path": "builtin:tiny", "attn_implementation": "sdpa"},
        "data": {"train": str(train), "eval": str(evals), "max_seq_length": 128, "packing": True, "num_workers": 0},
        "strategy": "mixed", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
        "optim": {"learning_rate": 5e-3, "bf16": False, "optimizer": "adamw_torch", "per_device_batch": 4, "grad_accum": 1, "max_steps": 3, "warmup_ratio": 0.0, "gradient_checkpointing": False},
        "dpo": {"beta": 0.5},
    }
    for k, v in over.items():
        doc[k] = {**doc.get(k, {}), **v} if isinstance(v, dict) else v
    return parse_config(doc)


def build(cfg, tiny_processor):
    from transformers import TrainingArguments

    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    index = prepare_pairs(cfg, tiny_processor)
    index.save(cfg.run_dir / "data_index.json")
    torch.manual_seed(0)
    model = apply_strategy(load_model(cfg.model.path, dtype="float32", attn_implementation="sdpa"), cfg)
    model.config.use_cache = False
    encoder = Encoder(tiny_processor)
    pad = tiny_processor.tokenizer.pad_token_id
    hf_config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    _, train_set, eval_set, collator = preference_parts(cfg, index, encoder, {}, pad, hf_config, None, False, cfg.run_dir)
    cls, extra, _ = trainer_and_callback(cfg, None, train_set, eval_set)
    o = cfg.optim
    args = TrainingArguments(output_dir=str(cfg.run_dir), use_cpu=True, report_to=[], per_device_train_batch_size=o.per_device_batch, per_device_eval_batch_size=o.per_device_batch,
                             learning_rate=o.learning_rate, max_steps=o.max_steps, logging_steps=1, save_strategy="no", remove_unused_columns=False, disable_tqdm=True, lr_scheduler_type="constant", dataloader_num_workers=0)
    trainer = cls(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, data_collator=collator, run_cfg=cfg, **extra)
    return trainer, train_set, eval_set, collator


def starting_logps(batch, tiny_model_dir):
    """Every answer's log-prob under a freshly loaded, never trained model (full logits)."""
    fresh = load_model(str(tiny_model_dir), dtype="float32", attn_implementation="sdpa").eval()
    with torch.no_grad():
        logits = fresh(**{k: v for k, v in batch.items() if k in MODEL_INPUTS}).logits
    rows = logits.reshape(-1, logits.shape[-1]).index_select(0, batch["loss_index"])
    return logits_sequence_logps(rows, batch["loss_targets"], batch["pairs"].row_sample, batch["pairs"].samples).double()


@pytest.mark.parametrize("strategy,reference", [("mixed", "adapter_off"), ("full", "precomputed")])
def test_reference_is_the_untouched_starting_model_and_training_prefers_chosen(tmp_path, pref_data, tiny_processor, tiny_model_dir, strategy, reference):
    cfg = dpo_config(tmp_path, pref_data, strategy=strategy, dpo={"beta": 0.5, "reference": reference})
    trainer, train_set, eval_set, collator = build(cfg, tiny_processor)
    batch = collator([train_set[0], train_set[1]])
    want = starting_logps(copy.copy(batch), tiny_model_dir)
    before = trainer.evaluate()
    trainer.train()
    model = trainer.model
    # Training changed what the reference must not see: the adapters / the weights and the merger.
    merger = [p for n, p in model.named_parameters() if "merger" in n and p.requires_grad]
    assert merger, "the merger trains in both strategies"
    fresh = load_model(str(tiny_model_dir), dtype="float32", attn_implementation="sdpa")
    assert not torch.equal(merger[0].detach(), dict(fresh.named_parameters())[next(n for n, p in model.named_parameters() if p is merger[0]).replace("base_model.model.", "").replace("modules_to_save.default.", "")])
    b = dict(batch)
    b.pop("stats"), b.pop("labels")
    index, targets, keys, pairs = b.pop("loss_index"), b.pop("loss_targets"), b.pop("pair_keys"), b.pop("pairs")
    model.eval()
    got = trainer.reference_logps(model, b, index, targets, pairs, keys).double()
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    policy = trainer.answer_logps(model, b, index, targets, pairs).double()
    assert (policy - want).abs().max() > 1e-3  # the policy itself did move
    after = trainer.evaluate()
    assert before["eval_accuracy"] == pytest.approx(0.5, abs=0.5) and abs(before["eval_reward_margin"]) < 1e-6  # policy == reference at the start
    assert after["eval_reward_margin"] > 0.05 and after["eval_loss"] < before["eval_loss"], (before, after)
    if reference == "precomputed":
        assert (cfg.run_dir / "reference_logps.pt").exists()


@pytest.mark.slow
def test_dpo_zero3_two_processes_with_a_text_only_pair_reports_its_metrics(tmp_path, pref_data):
    """qvltune train with stage: dpo under ZeRO-3 on 2 processes, where a rank's micro-batch holds a
    text-only pair (the dummy image keeps the ranks in step): it completes, saves an adapter, and
    metrics.jsonl carries the preference records of training and evaluation."""
    import json

    from conftest import write_jsonl
    from qvltune.metrics import read_all
    from test_training import run_dir, train, write_config

    train_file, evals = pref_data
    text = write_jsonl(tmp_path / "text.jsonl", [{"prompt": [{"role": "user", "content": f"Count to {i}."}], "chosen": [{"role": "assistant", "content": " ".join(str(j) for j in range(i))}], "rejected": [{"role": "assistant", "content": "No."}]} for i in range(2, 6)])
    config = write_config(
        tmp_path, (train_file, evals), "dpo3", stage="dpo", strategy="mixed", dpo={"beta": 0.5},
        data={"train": f"{text},{train_file}", "eval": str(evals), "packing": False}, deepspeed={"stage": 3}, launch={"cpu_processes": 2},
        optim={"per_device_batch": 1, "max_steps": 4, "learning_rate": 5e-3},
    )
    result = train(config, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rd = run_dir(config)
    assert (rd / "final" / "adapter_model.safetensors").exists()
    records = read_all(rd / "metrics.jsonl")
    prefs = [r for r in records if r["kind"] == "preference"]
    train_prefs = [r for r in prefs if r["split"] == "train"]
    assert [r["step"] for r in train_prefs] == [1, 2, 3, 4]
    for r in prefs:
        for key in ("loss", "accuracy", "reward_margin", "chosen_reward", "rejected_reward", "kl"):
            assert r[key] is not None, (key, r)
        assert 0.0 <= r["accuracy"] <= 1.0 and r["reward_margin"] == pytest.approx(r["chosen_reward"] - r["rejected_reward"], abs=1e-9)
    # Step 1 starts at the reference: the loss of every pair is log 2 (sigmoid of a zero margin).
    assert train_prefs[0]["loss"] == pytest.approx(0.6931, abs=1e-3) and abs(train_prefs[0]["reward_margin"]) < 1e-4
    assert [r for r in prefs if r["split"] == "eval"]  # held-out pairs evaluated
    start = next(r for r in records if r["kind"] == "start")
    assert start["train_samples"] == 4 + 16
    assert json.loads((rd / "data_index.json").read_text())["stage"] == "dpo"


def test_panel_and_log_lines_show_the_preference_metrics():
    from qvltune.dashboard import DashboardState, format_line, render
    from test_dashboard import capture

    state = DashboardState("dpo", started=1000.0)
    records = [
        {"kind": "train", "time": 1010.0, "step": 10, "max_steps": 40, "epoch": 0.5, "loss": 0.52, "lr": 5e-6, "grad_norm": 0.7, "tokens_per_s": 900.0, "samples_per_s": 3.0},
        {"kind": "preference", "time": 1010.0, "split": "train", "step": 10, "loss": 0.52, "accuracy": 0.8125, "reward_margin": 0.734, "chosen_reward": 0.21, "rejected_reward": -0.524, "kl": 0.0123},
        {"kind": "eval", "time": 1011.0, "step": 10, "eval_loss": 0.61, "eval_ppl": 1.84},
        {"kind": "preference", "time": 1011.0, "split": "eval", "step": 10, "loss": 0.61, "accuracy": 0.75, "reward_margin": 0.512, "chosen_reward": 0.1, "rejected_reward": -0.412, "kl": 0.0101},
    ]
    for r in records:
        state.apply(r)
    text = capture(render(state, now=1012.0))
    assert "reward margin" in text and "0.734 / 0.512" in text
    assert "81.2 / 75.0 %" in text and "0.210 / -0.524" in text and "0.0123 / 0.0101" in text
    assert "ppl" not in text  # the DPO loss has no perplexity
    assert format_line(records[1]) == "step 10: reward margin 0.734 accuracy 81.2% rewards 0.210/-0.524 kl 0.0123"
    assert format_line(records[3]).startswith("eval step 10: reward margin 0.512 accuracy 75.0%")


def test_dpo_benchmark_runs_the_planners_dpo_config_and_peers_on_the_same_pairs(tmp_path):
    """benchmarks/dpo_throughput.py (run on the GPU machine): its qvltune variant is what
    `qvltune init --stage dpo` plans (a valid DPO config, the reference adapters-off), and its data
    is read by qvltune's preference checks as it is given to the peers."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import dpo_throughput as bench

    from qvltune.preference.data import check_pairs

    model = bench.make_model_folder(tmp_path / "model-2b", "2b")
    data = bench.make_pairs(tmp_path / "data", 30)
    report = check_pairs(str(data))
    assert len(report.pairs) == 30 and not report.errors
    cfg = parse_config(bench.qvltune_config("q", model, data, tmp_path, "mixed", 6, 32))
    assert cfg.stage == "dpo" and cfg.preference().reference == "adapter_off" and cfg.data.packing
    assert cfg.optim.learning_rate < 1e-4  # the planner's DPO rate
    # LLaMA-Factory calls the folder's processor as saved: its pixel budget must be the one qvltune's
    # run uses (the tiny model's processor would cap every image at 64 tokens).
    from transformers import AutoProcessor

    size = AutoProcessor.from_pretrained(model).image_processor.size
    assert (size["shortest_edge"], size["longest_edge"]) == cfg.data.pixel_budget()
    lf = bench.peer_spec("llamafactory", model, data, tmp_path / "runs" / "lf", "mixed", 6, (1, 2), 4096)
    assert lf["args"]["stage"] == "dpo" and lf["args"]["pref_beta"] == cfg.preference().beta
    # mixed trains what qvltune's mixed trains beside LoRA: the merger and the three DeepStack mergers
    # (with LoRA, LLaMA-Factory trains the projector only as an additional_target)
    beside = ["merger", "deepstack_merger_list.0", "deepstack_merger_list.1", "deepstack_merger_list.2"]
    assert lf["args"]["additional_target"] == ",".join(beside)
    assert bench.peer_spec("llamafactory", model, data, tmp_path / "runs" / "lf", "lora", 6, (1, 2), 4096)["args"]["additional_target"] is None
    trl = bench.peer_spec("trl", model, data, tmp_path / "runs" / "trl", "mixed", 6, (1, 2), 4096)
    assert trl["args"]["beta"] == cfg.preference().beta and trl["args"]["loss_type"] == "sigmoid"
    assert trl["modules_to_save"] == beside and trl["args"]["remove_unused_columns"] is False  # else TRL drops pixel_values
    # the CPU check changes only what a CPU forces
    cpu = bench.peer_spec("trl", model, data, tmp_path / "runs" / "trl", "mixed", 6, (1, 2), 4096, cpu=True)
    assert {k for k in cpu["args"] if cpu["args"][k] != trl["args"][k]} == {"bf16", "dataloader_num_workers"} and cpu["dtype"] == "float32"


def test_dpo_benchmark_table_shows_each_failed_variants_error():
    """A peer that fails is a row with its exception and where it came from, and the table still prints."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import dpo_throughput as bench

    log = """Map: 100%|##| 52/52
Traceback (most recent call last):
  File "/tmp/lfsite/trl/trainer/dpo_trainer.py", line 762, in process_row
    processed_features = processor(images=features["images"], text=features["prompt"])
  File "/tmp/lfsite/transformers/image_transforms.py", line 974, in _get_device_from_images
    return images[0].device
           ~~~~~~^^^
IndexError: list index out of range
"""
    error = bench.last_error(log)
    assert error == "IndexError: list index out of range (lfsite/transformers/image_transforms.py:974, from trl/trainer/dpo_trainer.py:762)"
    rows = [{"variant": "2b-lora-dpo-trl", "wall_s": 5.0, "exit": 1, "error": error},
            {"variant": "2b-lora-dpo-llamafactory", "wall_s": 60.0, "exit": 0, "pairs_per_s": 1.5, "tokens_per_s": 3000.0, "mem_peak_gb": 20.0, "image_patches": 0}]
    text = bench.table(rows)
    assert "| 2b-lora-dpo-trl | failed: IndexError: list index out of range (lfsite/" in text
    assert "| 2b-lora-dpo-llamafactory (no image reached the model) | 1.50 | 3,000 | 20.0 |  |  |  | 60.0 | 0 |" in text


def test_dpo_benchmark_matched_variant_is_planned_within_the_faster_peers_peak(tmp_path, monkeypatch):
    """qvltune-matched: the planner given the faster successful peer's measured peak as the H200's
    memory plans within it (its own margin below), where the full H200's rows would not fit, and that
    plan is what runs."""
    import argparse
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import dpo_throughput as bench

    from qvltune.estimate import SAFETY_MARGIN
    from qvltune.units import GiB

    model = bench.make_model_folder(tmp_path / "model-2b", "2b")
    data = bench.make_pairs(tmp_path / "data", 30)
    # The budget: the faster successful peer's peak (not the smaller peak), a failed peer or one whose
    # forwards got no image is no comparison, --match-memory-gb wins, a CPU run measures none.
    lf = {"variant": "2b-lora-dpo-llamafactory", "exit": 0, "pairs_per_s": 5.25, "mem_peak_gb": 28.8, "image_patches": 10}
    trl = {"variant": "2b-lora-dpo-trl", "exit": 0, "pairs_per_s": 3.0, "mem_peak_gb": 20.0, "image_patches": 10}
    assert bench.memory_budget("2b-lora", [trl, lf], None) == (28.8, "2b-lora-dpo-llamafactory")
    assert bench.memory_budget("2b-lora", [{**trl, "pairs_per_s": 6.0, "image_patches": 0}, lf], None)[0] == 28.8
    assert bench.memory_budget("2b-lora", [{"variant": "2b-lora-dpo-trl", "exit": 1, "error": "IndexError"}, lf], None)[0] == 28.8
    assert bench.memory_budget("2b-mixed", [trl, lf], None) is None
    assert bench.memory_budget("2b-lora", [trl, lf], 25.0) == (25.0, "--match-memory-gb")
    assert bench.memory_budget("tiny-lora", [{**lf, "variant": "tiny-lora-dpo-llamafactory", "mem_peak_gb": 0}], None) is None

    ran = []
    monkeypatch.setattr(bench, "run_variant", lambda variant, name, *a: ran.append(a[-2]) or {"variant": name, "exit": 0, "pairs_per_s": 9.0, "mem_peak_gb": 24.0, "row_tokens": a[-2]["data"]["max_seq_length"], "batch": "1x1", "checkpointing": a[-2]["optim"]["gradient_checkpointing"], "wall_s": 1.0})
    args = argparse.Namespace(match_memory_gb=None, effective_batch=32, work=tmp_path, steps=6)
    row = bench.run_matched("2b-lora-dpo-qvltune-matched", "2b", "lora", model, data, [trl, lf], args)
    full = bench.qvltune_plan(model, data, "lora", 32)
    assert full.estimate.per_gpu > 28.8 * GiB  # the full H200's plan would not fit the peer's memory
    assert row["memory_budget_gb"] == 28.8 and row["planned_peak_gb"] <= 28.8 * (1 - SAFETY_MARGIN)
    planned = (ran[0]["data"]["max_seq_length"], ran[0]["optim"]["gradient_checkpointing"])
    assert planned != (full.doc["data"]["max_seq_length"], full.doc["optim"]["gradient_checkpointing"])
    assert parse_config(ran[0]).stage == "dpo" and ran[0]["name"] == "2b-lora-dpo-qvltune-matched"
    text = bench.table([row], [trl, lf, row])
    assert f"| 2b-lora-dpo-qvltune-matched (planned to 28.8 GiB: {planned[0]:,}-token rows" in text
    assert "| 1.71x | 0.83x |" in text and "against 2b-lora-dpo-llamafactory" in text
    # no peer peak and no --match-memory-gb: a row saying what to give, nothing run
    row = bench.run_matched("2b-mixed-dpo-qvltune-matched", "2b", "mixed", model, data, [], args)
    assert "give --match-memory-gb GB" in row["error"] and len(ran) == 1


def test_init_plans_dpo_for_preference_data_and_starts_from_a_run(tmp_path, pref_data, monkeypatch):
    """`qvltune init` on pairs plans stage dpo (two sequences per pair, the reference chosen by the
    strategy); --from RUN takes RUN/final; --stage sft on pairs is a usage error."""
    from typer.testing import CliRunner

    from qvltune import hardware
    from qvltune.cli import app
    from qvltune.config import load_config

    class NoNvml:
        def nvmlInit(self):
            raise OSError("NVML Shared Library Not Found")

    monkeypatch.setattr(hardware, "_load_nvml", lambda: NoNvml())
    train, _ = pref_data
    run = lambda *a: CliRunner().invoke(app, ["init", *a], catch_exceptions=True)  # noqa: E731
    r = run("--data", str(train), "--model", "builtin:tiny", "--out", str(tmp_path / "p"), "--strategy", "mixed")
    assert r.exit_code == 0, r.output
    cfg = load_config(tmp_path / "p" / "qvltune.yaml")
    assert cfg.stage == "dpo" and cfg.preference().reference == "adapter_off" and "stage: dpo" in r.output
    r = run("--data", str(train), "--model", "builtin:tiny", "--out", str(tmp_path / "f"), "--strategy", "full", "--stage", "dpo")
    assert r.exit_code == 0, r.output
    assert load_config(tmp_path / "f" / "qvltune.yaml").preference().reference == "precomputed"
    r = run("--data", str(train), "--model", "builtin:tiny", "--out", str(tmp_path / "s"), "--stage", "sft")
    assert r.exit_code == 1 and "holds preference pairs" in str(r.exception)
    final = tmp_path / "runs" / "sft" / "final"
    r = run("--data", str(train), "--from", str(tmp_path / "runs" / "sft"), "--out", str(tmp_path / "g"))
    assert r.exit_code == 1 and "no finished model" in str(r.exception)
    from qvltune.tiny import tiny_model_path

    import shutil

    shutil.copytree(tiny_model_path(), final)
    r = run("--data", str(train), "--from", str(tmp_path / "runs" / "sft"), "--out", str(tmp_path / "g"), "--strategy", "lora")
    assert r.exit_code == 0, r.output
    assert load_config(tmp_path / "g" / "qvltune.yaml").model.path == str(final.resolve())
