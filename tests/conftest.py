"""Shared fixtures: the real tiny Qwen3-VL (built once per test session) and small real datasets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Keep the tests' tiny model away from the user's cache, and DeepSpeed/transformers quiet and offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    cache = os.environ.get("QVLTUNE_TEST_CACHE") or str(tmp_path_factory.mktemp("qvltune-cache"))
    os.environ["QVLTUNE_CACHE"] = cache
    yield cache


@pytest.fixture(scope="session")
def tiny_model_dir(_cache) -> Path:
    from qvltune.tiny import tiny_model_path

    return tiny_model_path()


@pytest.fixture(scope="session")
def tiny_processor(tiny_model_dir):
    from qvltune.model import load_processor

    return load_processor(str(tiny_model_dir))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> tuple[Path, Path]:
    from qvltune.tiny import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=64, n_eval=16, seed=1)


@pytest.fixture(scope="session")
def sft_demo(_cache, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``qvltune demo`` (the SFT demo at its default size), run once per session: test_demo.py holds
    it to its accuracy, and test_dpo_demo.py preference-tunes the model it leaves in
    ``runs/demo/final`` instead of training a second one (about three minutes saved on 2 cores)."""
    out = tmp_path_factory.mktemp("sft-demo") / "demo"
    result = subprocess.run([sys.executable, "-m", "qvltune", "demo", "--out", str(out), "--no-live"], capture_output=True, text=True, timeout=900)
    return out, result


@pytest.fixture(scope="session")
def uneven_data(demo_data) -> Path:
    """The demo's held-out records, the first half answered in 13 to 40 words and the second in one
    (image paths stay relative to the demo folder): batches taken in order hold very unequal numbers
    of labelled tokens, so a mean of per-batch means is far from the token mean."""
    evals = demo_data[1]
    out = evals.with_name("uneven.jsonl")
    records = [json.loads(line) for line in evals.read_text().splitlines()]
    for i, r in enumerate(records[: len(records) // 2]):
        colour = r["conversations"][-1]["value"]
        r["conversations"][-1]["value"] = " ".join([f"The colour is {colour}."] * (3 + i))
    return write_jsonl(out, records)


def write_image(path: Path, size=(64, 48), colour=(200, 30, 30), fmt=None) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path
