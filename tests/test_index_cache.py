"""The checked data index is cached beside the data, keyed by its content and the settings, and reused."""

from __future__ import annotations

import json

from conftest import write_image, write_jsonl


def config(train, **data):
    from qvltune.config import parse_config

    return parse_config({"name": "c", "model": {"path": "builtin:tiny"}, "data": {"train": str(train), "max_seq_length": 512, **data}, "optim": {"bf16": False, "optimizer": "adamw_torch"}})


def test_index_is_reused_until_the_data_or_settings_change(tmp_path, tiny_processor, monkeypatch):
    import qvltune.data.dataset as dataset

    write_image(tmp_path / "a.png", (96, 64))
    records = [{"image": "a.png", "conversations": [{"from": "human", "value": f"<image>\nQuestion {i}?"}, {"from": "gpt", "value": "x" * i}]} for i in range(1, 6)]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    first = dataset.prepare_data(config(data), tiny_processor)
    assert not first.from_cache and list((tmp_path / ".qvltune-index").glob("index-*.json"))

    calls = []
    real = dataset.check_dataset
    monkeypatch.setattr(dataset, "check_dataset", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = dataset.prepare_data(config(data), tiny_processor)
    assert again.from_cache and not calls and again.train == first.train  # nothing re-checked, same index

    data.touch()  # a touched file is the same content: still reused
    assert dataset.prepare_data(config(data), tiny_processor).from_cache
    other = dataset.prepare_data(config(data, max_seq_length=256), tiny_processor)  # another setting: rebuilt
    assert not other.from_cache and len(calls) == 1
    records[0]["conversations"][1]["value"] = "a much longer answer than before"
    write_jsonl(data, records)  # edited content: rebuilt, with the new counts
    edited = dataset.prepare_data(config(data), tiny_processor)
    assert not edited.from_cache and edited.train[0].tokens > first.train[0].tokens
    assert not dataset.prepare_data(config(data, index_cache=False), tiny_processor).from_cache


def test_cached_problems_still_stop_the_run(tmp_path, tiny_processor):
    import pytest

    from qvltune.data.dataset import prepare_data
    from qvltune.errors import UserError

    write_image(tmp_path / "a.png", (96, 64))
    data = write_jsonl(tmp_path / "t.jsonl", [{"image": "missing.png", "conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]}, {"image": "a.png", "conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "b"}]}])
    for _ in range(2):  # the second time from the cache
        with pytest.raises(UserError, match="missing.png"):
            prepare_data(config(data), tiny_processor)
    cached = json.loads(next((tmp_path / ".qvltune-index").glob("index-*.json")).read_text())
    assert cached["problems"][0]["code"] == "missing-media"
