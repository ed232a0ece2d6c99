"""Per-source settings in mixtures: each dataset with its own pixel budget, image root and weight,
on the command line and in the config, used by check-data, the planner's summary and training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import write_image, write_jsonl
from qvltune.cli import main
from qvltune.data.mixture import DatasetSpec, parse_mixture


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def qa(image: str, answer: str = "red"):
    return {"image": image, "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": answer}]}


def test_mixture_strings_and_lists_carry_settings():
    assert parse_mixture("a.jsonl%50,b.jsonl") == [DatasetSpec(Path("a.jsonl"), 50.0), DatasetSpec(Path("b.jsonl"), 100.0)]
    specs = parse_mixture("docs.jsonl%50[max_image_tokens=256,image_root=/scans],photos.jsonl[min_pixels=4096, max_pixels=65536]")
    assert specs == [
        DatasetSpec(Path("docs.jsonl"), 50.0, Path("/scans"), None, 256 * 1024),
        DatasetSpec(Path("photos.jsonl"), 100.0, None, 4096, 65536),
    ]
    assert parse_mixture(["a.jsonl%20", {"path": "b.jsonl", "weight": 30, "min_image_tokens": 4}])[1] == DatasetSpec(Path("b.jsonl"), 30.0, None, 4096, None)
    # a config's list of sources prints back as one command-line argument that parses the same
    from qvltune.data.mixture import mixture_text

    mixed = ["a.jsonl%20", {"path": "b.jsonl", "weight": 30, "max_image_tokens": 16, "image_root": "imgs"}]
    assert mixture_text(mixed) == "a.jsonl%20,b.jsonl%30[image_root=imgs,max_pixels=16384]"
    assert parse_mixture(mixture_text(mixed)) == parse_mixture(mixed)
    for bad, message in (
        ("a.jsonl[max_pixel=5]", "unknown setting 'max_pixel'"),
        ("a.jsonl[max_pixels=lots]", "whole number"),
        ("a.jsonl[max_pixels]", "key=value"),
        ("a.jsonl[min_pixels=9000,max_pixels=5000]", "larger than max"),
        ("a.jsonl[max_pixels=5000,max_image_tokens=4]", "not both"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_mixture(bad)


@pytest.fixture
def two_sources(tmp_path):
    write_image(tmp_path / "a" / "big.png", (640, 640))
    write_image(tmp_path / "elsewhere" / "big.png", (640, 640))
    docs = write_jsonl(tmp_path / "a" / "docs.jsonl", [qa("big.png"), qa("big.png", "blue")])
    photos = write_jsonl(tmp_path / "b" / "photos.jsonl", [qa("big.png", "green")])  # its images live elsewhere
    return tmp_path, docs, photos


def test_check_data_uses_each_sources_budget_and_root(two_sources, capsys, tiny_processor):
    from qvltune.data.files import read_items
    from qvltune.data.formats import parse_record
    from qvltune.data.tokenize import Encoder, configure_processor

    tmp, docs, photos = two_sources
    spec = f"{docs}[max_image_tokens=4],{photos}%50[max_image_tokens=64,image_root={tmp / 'elsewhere'}]"
    code, out, err = run_cli(["check-data", spec, "--model", "builtin:tiny", "--json"], capsys)
    assert code == 0, out + err
    doc = json.loads(out)
    assert [(s["percent"], s["max_pixels"], s["image_root"]) for s in doc["sources"]] == [(100.0, 4096, str(docs.parent)), (50.0, 65536, str(tmp / "elsewhere"))]
    # exact counts: each source's image at its own budget (4 vs 64 image tokens for the same picture)
    import copy

    lengths = []
    for path, budget, root in ((docs, 4096, None), (photos, 65536, tmp / "elsewhere")):
        enc = Encoder(configure_processor(copy.deepcopy(tiny_processor), None, budget), root=root)
        lengths += [len(enc.encode(parse_record(i, str(path))[0])) for i in read_items(path)]
    assert doc["tokens"]["max"] == max(lengths) and doc["tokens"]["per_epoch"] == sum(lengths)
    assert max(lengths) - min(lengths) >= 60  # the budgets really differ
    # without --model, the estimate uses each source's budget too; the text summary lists the sources
    code, out, _ = run_cli(["check-data", spec, "--json"], capsys)
    estimated = json.loads(out)
    assert code == 0 and [(s["min_pixels"], s["max_pixels"]) for s in estimated["sources"]] == [(4096, 4096), (50176, 65536)]
    assert estimated["tokens"]["max"] - estimated["tokens"]["p50"] >= 60
    # the photos source without its own image root: its image is not found, named with the source's file
    code, out, _ = run_cli(["check-data", f"{docs},{photos}", "--json"], capsys)
    assert code == 1 and json.loads(out)["problems"][0]["file"] == str(photos)


def test_config_list_of_sources_anchored_and_used_by_training_data(two_sources, tmp_path, tiny_processor):
    from qvltune.config import load_config
    from qvltune.data.dataset import SFTDataset, prepare_data, source_encoders
    from qvltune.data.tokenize import Encoder

    tmp, docs, photos = two_sources
    config = tmp / "run" / "qvltune.yaml"
    config.parent.mkdir()
    doc = {
        "name": "mix",
        "model": {"path": "builtin:tiny"},
        "data": {
            "train": [
                {"path": "../a/docs.jsonl", "max_image_tokens": 4},
                {"path": "../b/photos.jsonl", "weight": 200, "image_root": "../elsewhere", "max_image_tokens": 64},
            ],
            "max_seq_length": 512,
        },
        "optim": {"bf16": False, "optimizer": "adamw_torch"},
    }
    config.write_text(yaml.safe_dump(doc))
    cfg = load_config(config)
    assert cfg.data.train[1].image_root == str((tmp / "run" / "../elsewhere")) and cfg.data.train[0].path == str(tmp / "run" / "../a/docs.jsonl")
    index = prepare_data(cfg, tiny_processor)
    assert sorted(Path(e.file).name for e in index.train) == ["docs.jsonl", "docs.jsonl", "photos.jsonl", "photos.jsonl"]  # weight 200: twice
    base = Encoder(tiny_processor)
    dataset = SFTDataset(index.train, base, [[i] for i in range(len(index.train))], encoders=source_encoders(cfg, base))
    for i, entry in enumerate(index.train):
        (encoded,) = dataset[i]
        assert len(encoded) == entry.tokens  # training feeds exactly what was counted, per source
    assert {e.tokens for e in index.train if e.file.endswith("photos.jsonl")} != {e.tokens for e in index.train if e.file.endswith("docs.jsonl")}
    # the planner's summary (estimate/init) reads the same sources
    from qvltune.cli.estimate import dataset_summary

    summary = dataset_summary(cfg.data.train, None, *cfg.data.pixel_budget(), quiet=True)
    assert summary is not None


def test_a_repeated_record_is_never_both_trained_and_held_out(tmp_path, tiny_processor):
    """eval_split drew entries: a record repeated by a%300 could sit in training and in the
    held-out set at once, and its eval loss read better than it was."""
    from qvltune.config import parse_config
    from qvltune.data.dataset import prepare_data

    write_image(tmp_path / "a.png", (64, 64))
    data = write_jsonl(tmp_path / "t.jsonl", [{"image": "a.png", "conversations": [{"from": "human", "value": f"<image>q{i}"}, {"from": "gpt", "value": f"a{i}"}]} for i in range(20)])
    cfg = parse_config({"name": "c", "model": {"path": "builtin:tiny"}, "data": {"train": f"{data}%300", "eval_split": 0.2, "max_seq_length": 512}})
    index = prepare_data(cfg, tiny_processor)
    held, trained = {e.index for e in index.eval}, {e.index for e in index.train}
    assert len(held) == 4 and len(trained) == 16 and not held & trained
    assert len(index.eval) == 12 and len(index.train) == 48  # each record three times, on its one side
