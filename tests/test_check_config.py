"""``check-data --config RUN.yaml`` checks the run's data as ``qvltune train`` will and leaves the
index cache warm for it; a media file changed in between is still caught by train's check."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import write_image, write_jsonl
from qvltune.cli import main


def _run_folder(tmp: Path, **data) -> Path:
    """data/train.jsonl (12 records over two images, one of them in a mixture with a budget of its
    own), data/eval.jsonl, and run.yaml with settings that differ from check-data's defaults."""
    import yaml

    write_image(tmp / "data" / "a.png", (96, 64))
    write_image(tmp / "data" / "b.png", (320, 240))
    qa = lambda img, i: {"image": img, "conversations": [{"from": "human", "value": f"<image>\nQuestion {i}?"}, {"from": "gpt", "value": "answer " * (i + 1)}]}
    write_jsonl(tmp / "data" / "train.jsonl", [qa("a.png" if i % 2 else "b.png", i) for i in range(8)])
    write_jsonl(tmp / "data" / "more.jsonl", [qa("b.png", i) for i in range(4)])
    write_jsonl(tmp / "data" / "eval.jsonl", [qa("a.png", 1)])
    doc = {
        "name": "r", "output_dir": str(tmp / "runs"), "model": {"path": "builtin:tiny"},
        "data": {"train": "data/train.jsonl%50,data/more.jsonl[max_image_tokens=64]", "eval": "data/eval.jsonl", "max_seq_length": 512, "max_image_tokens": 256, "thinking_turns": "last", **data},
        "optim": {"bf16": False, "optimizer": "adamw_torch"},
    }
    (tmp / "run.yaml").write_text(yaml.safe_dump(doc))
    return tmp / "run.yaml"


def _exit(args) -> int:
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code


def test_train_finds_the_cache_check_data_wrote(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import qvltune.data.dataset as dataset
    from qvltune.config import load_config
    from qvltune.errors import UserError
    from qvltune.train import prepare_index

    config = _run_folder(tmp_path)
    assert _exit(["check-data", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "data.train" in out and "data.eval" in out and "reuses these checks and counts" in out

    checks = []  # every check train's prepare_index makes: none on a warm cache
    real = dataset.check_dataset
    monkeypatch.setattr(dataset, "check_dataset", lambda *a, **k: checks.append(k.get("only")) or real(*a, **k))
    cfg = load_config(config)
    assert prepare_index(cfg) == {"train": 8, "eval": 1, "skipped": 0}  # 50% of 8, all 4, and the eval set
    assert checks == []
    assert "reused from the cache" in capsys.readouterr().err

    # b.png is replaced by a file that is no image after check-data: train checks the records using it again and stops.
    (tmp_path / "data" / "b.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="b.png"):
        prepare_index(cfg)
    assert checks and all(only is not None for only in checks)  # only the stale records, from the cache


def test_a_flag_overrides_the_config_and_says_so(tmp_path, tiny_model_dir, capsys):
    from qvltune.config import load_config
    from qvltune.data.run_check import apply_overrides

    config = _run_folder(tmp_path)
    assert _exit(["check-data", "--config", str(config), "--max-seq-length", "1024", "--json"]) == 0
    import json

    doc = json.loads(capsys.readouterr().out)
    assert doc["overrides"] == [f"--max-seq-length 1024 overrides data.max_seq_length (512 in {config})"]
    assert doc["train"]["index_cache"] and doc["eval"]["index_cache"]

    # a bound in pixels replaces the config's bound in tokens (not both: that is an error)
    cfg, notes = apply_overrides(load_config(config), {"max_pixels": 128 * 32 * 32}, "run.yaml")
    assert (cfg.data.max_pixels, cfg.data.max_image_tokens) == (128 * 32 * 32, None) and len(notes) == 1


def test_a_bad_config_is_one_line_naming_file_and_field(tmp_path, capsys):
    config = _run_folder(tmp_path, max_seq_length=3)
    assert _exit(["check-data", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert first.startswith("Error: ") and f"{config}: data.max_seq_length:" in first and "(got 3)" in first
    assert err.splitlines()[1].startswith("Hint: ")
    assert _exit(["check-data"]) == 2  # neither DATA nor --config
