"""The run config: strict loading, every problem at once with its path, conflicts, and the ZeRO JSON."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import yaml

from qvltune.config import load_config, parse_config
from qvltune.config_checks import check_against_hardware, check_against_model
from qvltune.errors import UserError
from qvltune.hardware import GpuInfo
from qvltune.zero import deepspeed_config

BASE = {"name": "t", "model": {"path": "builtin:tiny"}, "data": {"train": "d.jsonl"}}


def conf(**changes):
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in changes.items():
        node = doc
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return doc


def problems(doc) -> str:
    with pytest.raises(UserError) as e:
        parse_config(doc)
    return e.value.message


def template_names():
    return sorted(p.name for p in resources.files("qvltune.templates").iterdir() if p.name.endswith(".yaml"))


@pytest.mark.parametrize("name", template_names())
def test_every_template_loads_and_validates(name, tmp_path):
    text = resources.files("qvltune.templates").joinpath(name).read_text()
    (tmp_path / name).write_text(text)
    cfg = load_config(tmp_path / name)
    assert cfg.name and cfg.modes()
    ds = deepspeed_config(cfg)
    assert ds["gradient_clipping"] == cfg.optim.max_grad_norm
    assert ds["zero_optimization"]["stage"] == cfg.deepspeed.stage


def test_templates_cover_strategies_and_resolutions():
    names = template_names()
    assert {"lora.yaml", "full.yaml", "mixed.yaml"} <= set(names)
    texts = {n: yaml.safe_load(resources.files("qvltune.templates").joinpath(n).read_text()) for n in names}
    budgets = []
    for d in texts.values():
        data = d["data"]
        lo = data.get("min_pixels") or (data.get("min_image_tokens") or 0) * 1024
        hi = data.get("max_pixels") or (data.get("max_image_tokens") or 0) * 1024
        if hi:
            budgets.append((lo, hi))
    assert any(lo == hi for lo, hi in budgets), "a fixed-resolution template"
    assert any(lo < hi for lo, hi in budgets), "a variable-resolution template"


def test_all_problems_reported_at_once_with_paths():
    doc = conf(optim__learning_rate=-1, optim__per_device_batch=0, data__packing="maybe", strategy="both", lora__rank=0, optim__warmup=0.1)
    msg = problems(doc)
    for path in ("optim.learning_rate", "optim.per_device_batch", "data.packing", "strategy", "lora.rank", "optim.warmup: unknown key"):
        assert path in msg, msg
    assert "(got -1)" in msg and "6 problem(s)" in msg


def test_missing_and_unknown_top_level():
    msg = problems({"name": "x", "modle": {}})
    assert "model: required" in msg and "data: required" in msg and "modle: unknown key" in msg


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"strategy": "lora", "components": {"llm": "frozen"}}, "nothing to adapt"),
        ({"strategy": "full", "components": {"llm": "frozen", "merger": "frozen", "deepstack": "frozen", "lm_head": "frozen"}}, "nothing to train"),
        ({"strategy": "full", "components": {"vision": "lora"}}, "strategy 'full' with LoRA"),
        ({"strategy": "mixed", "lora": {"target_modules": []}}, "lora.target_modules"),
        ({"strategy": "lora", "components": {"vision": "full"}}, "copied whole into the adapter"),
        ({"optim": {"per_device_batch": 3, "grad_accum": 4, "effective_batch": 64}}, "optim.effective_batch"),
        ({"deepspeed": {"stage": 0, "offload_optimizer": True}}, "deepspeed.offload_optimizer"),
        ({"deepspeed": {"stage": 2, "offload_params": True}}, "deepspeed.offload_params"),
        ({"data": {"train": "d.jsonl", "eval": "e.jsonl", "eval_split": 0.1}}, "data.eval_split"),
        ({"data": {"train": "d.jsonl", "min_pixels": 4000, "min_image_tokens": 4}}, "pixels or in tokens"),
    ],
)
def test_conflicts(changes, expected):
    doc = dict(BASE, **changes)
    assert expected in problems(doc)


def test_conflicts_with_model_and_hardware():
    cfg = parse_config(dict(BASE, deepspeed={"stage": 3}))
    assert any("MoE" in p for p in check_against_model(cfg, "qwen3_vl_moe"))
    assert any("not Qwen3-VL" in p for p in check_against_model(cfg, "llama"))
    assert check_against_model(cfg, "qwen3_vl") == []
    v100 = GpuInfo(0, "Tesla V100-SXM2-32GB", 32 << 30, 32 << 30, 0, "7.0")
    assert any("has no bf16" in p for p in check_against_hardware(cfg, [v100]))
    assert any("optim.bf16" in p for p in check_against_hardware(cfg, []))  # CPU mode
    h200 = GpuInfo(0, "NVIDIA H200", 141 << 30, 140 << 30, 1 << 30, "9.0")
    assert check_against_hardware(cfg, [h200]) == []
    cfg8 = parse_config(dict(BASE, launch={"gpus": 8}))
    assert any("8 requested but 1 found" in p for p in check_against_hardware(cfg8, [h200]))


def test_presets_overrides_and_resolved(tmp_path):
    cfg = parse_config(dict(BASE, strategy="mixed", components={"vision": "lora"}, optim={"component_lr": {"vision": 1e-5}}))
    assert cfg.modes() == {"vision": "lora", "merger": "full", "deepstack": "full", "llm": "lora", "lm_head": "frozen"}
    assert cfg.lr_for("vision") == 1e-5 and cfg.lr_for("llm") == 1e-4
    assert cfg.resolved()["components"]["merger"] == "full"
    assert parse_config(dict(BASE, lora={"dropout": 0})).lora.dropout == 0.0  # 0 means 0


def test_yaml_errors_and_relative_paths(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel:\n  path: [unclosed\n")
    with pytest.raises(UserError) as e:
        load_config(bad)
    assert "bad.yaml:" in e.value.message and "invalid YAML" in e.value.message
    with pytest.raises(UserError):
        load_config(tmp_path / "missing.yaml")
    good = tmp_path / "sub" / "run.yaml"
    good.parent.mkdir()
    good.write_text(yaml.safe_dump(dict(BASE, data={"train": "data/a.jsonl%50,data/b.jsonl", "image_root": "imgs"})))
    cfg = load_config(good)
    assert cfg.data.train == f"{good.parent}/data/a.jsonl%50,{good.parent}/data/b.jsonl"
    assert cfg.data.image_root == str(good.parent / "imgs") and cfg.output_dir == str(good.parent / "runs")
    assert cfg.model.path == "builtin:tiny"


def test_zero_json_by_stage():
    z2 = deepspeed_config(parse_config(dict(BASE, optim={"max_grad_norm": 0.5, "per_device_batch": 2, "grad_accum": 3})))
    assert z2["gradient_clipping"] == 0.5 and z2["train_micro_batch_size_per_gpu"] == 2 and z2["gradient_accumulation_steps"] == 3
    assert z2["zero_optimization"]["stage"] == 2 and "offload_optimizer" not in z2["zero_optimization"]
    z3 = deepspeed_config(parse_config(dict(BASE, deepspeed={"stage": 3, "offload_optimizer": True, "offload_params": True})))
    zo = z3["zero_optimization"]
    assert zo["stage3_gather_16bit_weights_on_model_save"] is True
    assert zo["offload_optimizer"]["device"] == "cpu" and zo["offload_param"]["device"] == "cpu"
    assert z3["bf16"]["enabled"] is True
