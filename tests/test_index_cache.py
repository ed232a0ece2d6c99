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


def _qa(image: str, i: int) -> dict:
    return {"image": image, "conversations": [{"from": "human", "value": f"<image>\nQuestion {i}?"}, {"from": "gpt", "value": "answer " * (i + 1)}]}


def test_a_replaced_image_recounts_the_records_that_use_it(tmp_path, tiny_processor, monkeypatch):
    """Media are stamped (size, mtime) in the cache: an image replaced by one of another size is
    noticed on reuse, and only the records using it are checked and counted again."""
    import os

    import qvltune.data.dataset as dataset

    write_image(tmp_path / "a.png", (64, 64))
    write_image(tmp_path / "b.png", (64, 64))
    data = write_jsonl(tmp_path / "train.jsonl", [_qa("a.png" if i % 2 else "b.png", i) for i in range(6)])
    first = dataset.prepare_data(config(data), tiny_processor)

    write_image(tmp_path / "a.png", (320, 256))  # another size: more image tokens
    os.utime(tmp_path / "a.png", ns=(1, 1))  # even with an old mtime: the size differs
    asked = []
    real = dataset.check_dataset
    monkeypatch.setattr(dataset, "check_dataset", lambda *a, **k: asked.append(k.get("only")) or real(*a, **k))
    again = dataset.prepare_data(config(data), tiny_processor)
    assert again.from_cache and again.recounted == 3
    assert [sorted(i for i, _, _ in v) for v in asked[0].values()] == [[1, 3, 5]]  # only a.png's records
    fresh = dataset.prepare_data(config(data, index_cache=False), tiny_processor)
    assert [e.tokens for e in again.train] == [e.tokens for e in fresh.train]
    grew = [b.tokens - a.tokens for a, b in zip(first.train, again.train)]
    assert all(g > 0 for g in grew[1::2]) and not any(grew[0::2])

    asked.clear()
    third = dataset.prepare_data(config(data), tiny_processor)  # the recount was saved: nothing to redo
    assert third.from_cache and third.recounted == 0 and not asked and third.train == again.train

    (tmp_path / "b.png").unlink()  # a deleted image: its records now fail, from the cache too
    import pytest

    from qvltune.errors import UserError

    with pytest.raises(UserError, match="b.png"):
        dataset.prepare_data(config(data), tiny_processor)
    write_image(tmp_path / "b.png", (64, 64))  # restored: usable again
    assert len(dataset.prepare_data(config(data), tiny_processor).train) == 6


def test_training_reads_each_record_alone_at_its_offset(tmp_path, tiny_processor, monkeypatch):
    """The index holds each record's byte offset: the data loader reads just the records it encodes
    (never the whole file), and a file changed since the run was prepared is refused, named."""
    import pytest

    import qvltune.data.dataset as dataset
    from qvltune.data.tokenize import Encoder
    from qvltune.errors import UserError

    write_image(tmp_path / "a.png", (96, 64))
    (tmp_path / "train.jsonl").write_text("\n" + "\n".join(json.dumps(_qa("a.png", i)) for i in range(1, 5)) + "\n\n" + json.dumps(_qa("a.png", 9)) + "\n")
    data = tmp_path / "train.jsonl"
    index = dataset.prepare_data(config(data), tiny_processor)
    assert [e.offset >= 0 for e in index.train] == [True] * 5
    index.save(tmp_path / "run" / "data_index.json")
    loaded = dataset.DataIndex.load(tmp_path / "run" / "data_index.json")
    assert loaded.train == index.train and loaded.train.stamps == json.loads(json.dumps(index.train.stamps))

    monkeypatch.setattr(dataset, "read_items", lambda *a, **k: pytest.fail("the whole file was read"))
    encoder = Encoder(tiny_processor, root=tmp_path)
    ds = dataset.SFTDataset(loaded.train, encoder, [[i] for i in range(len(loaded.train))])
    for i, entry in enumerate(loaded.train):
        record = ds.store.get(entry.file, entry.index, entry.offset, entry.line)
        assert record.messages[-1].text() == ("answer " * [2, 3, 4, 5, 10][i]) and record.line == entry.line
        assert len(ds[i][0]) == entry.tokens  # encoded as counted

    with open(data, "a") as f:
        f.write(json.dumps(_qa("a.png", 7)) + "\n")  # edited after the run was prepared
    with pytest.raises(UserError, match="changed since the run was prepared"):
        dataset.SFTDataset(loaded.train, encoder, [[0]])[0]


def test_a_json_list_edited_after_the_run_was_prepared_is_refused_too(tmp_path, tiny_processor):
    """A JSON list (no offsets: parsed whole) edited since the run was prepared gave a different
    record at the same index, silently; it is refused like an edited JSONL file."""
    import pytest

    import qvltune.data.dataset as dataset
    from qvltune.data.tokenize import Encoder
    from qvltune.errors import UserError

    write_image(tmp_path / "a.png", (96, 64))
    data = tmp_path / "train.json"
    data.write_text(json.dumps([_qa("a.png", i) for i in range(1, 4)]))
    index = dataset.prepare_data(config(data), tiny_processor)
    assert all(e.offset < 0 for e in index.train)
    data.write_text(json.dumps([_qa("a.png", i) for i in range(2, 5)]))  # shifted by one record
    with pytest.raises(UserError, match="changed since the run was prepared"):
        dataset.SFTDataset(index.train, Encoder(tiny_processor, root=tmp_path), [[0]])[0]


def test_an_index_of_one_object_per_entry_still_loads(tmp_path):
    """A run folder prepared before the index had columns resumes."""
    from qvltune.data.dataset import DataIndex, Entry

    (tmp_path / "data_index.json").write_text(json.dumps({"train": [{"file": "t.jsonl", "index": 3, "tokens": 40, "trained": 5, "view": 0}], "eval": [], "skipped": []}))
    index = DataIndex.load(tmp_path / "data_index.json")
    assert list(index.train) == [Entry("t.jsonl", 3, 40, 5, 0)] and len(index.eval) == 0


def test_another_spelling_of_the_same_file_reads_the_same_cache_entry_whole(tmp_path, tiny_processor, monkeypatch):
    """Two run folders name one dataset ../data/train.jsonl and data/train.jsonl: one cache entry
    (the key holds the resolved path). The second run found it, but its records were filed under the
    first run's spelling: it got none of them (and an image replaced since crashed its recount).
    The media stamps name the files absolutely: only the replaced image's records are recounted."""
    import qvltune.data.dataset as dataset

    data_dir = tmp_path / "data"
    (tmp_path / "exp").mkdir()
    data_dir.mkdir()
    write_image(data_dir / "a.png", (64, 64))
    write_image(data_dir / "b.png", (64, 64))
    write_jsonl(data_dir / "train.jsonl", [_qa("a.png" if i % 2 else "b.png", i) for i in range(6)])
    monkeypatch.chdir(tmp_path / "exp")
    first = dataset.prepare_data(config("../data/train.jsonl"), tiny_processor)
    monkeypatch.chdir(tmp_path)
    write_image(data_dir / "a.png", (320, 256))  # replaced since: its records are counted again
    again = dataset.prepare_data(config("data/train.jsonl"), tiny_processor)
    assert again.from_cache and again.recounted == 3 and len(again.train) == len(first.train) == 6
    assert first.train[0].file == "../data/train.jsonl" and again.train[0].file == "data/train.jsonl"  # each run's own spelling
