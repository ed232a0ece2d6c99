"""The README's sample outputs are what the code prints today.

Every fenced block of README.md that starts with ``$ qvltune check-data|init|estimate`` is run (in a
folder holding the data the samples name) and must match the block line for line. ``doctor``
depends on the machine, so its sample is held to the checks the code makes, in their order; the
other samples (merge, eval, demo, train) name the wording their renderers use. After an intended
change: ``QVLTUNE_UPDATE_SNAPSHOTS=1 python -m pytest tests/test_readme.py`` rewrites the blocks.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from conftest import write_image, write_jsonl
from qvltune import console
from qvltune.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
RUN = ("check-data", "init", "estimate")
BLOCK = re.compile(r"```\n(\$ qvltune ([a-z-]+)[^\n]*)\n(.*?)```", re.S)


def blocks(text: str) -> list[re.Match]:
    return list(BLOCK.finditer(text))


def sample_folder(tmp: Path) -> None:
    """data/train.jsonl: 2,000 question-answer records about photos of four sizes, answers of 1 to
    200 words (seeded), and run.yaml, a run over it; train.jsonl: five records, two of them with errors."""
    import random

    rng = random.Random(0)
    sizes = {"p0.jpg": (640, 480), "p1.jpg": (1024, 768), "p2.jpg": (1280, 960), "p3.jpg": (800, 1200)}
    for name, size in sizes.items():
        write_image(tmp / "data" / "photos" / name, size)
    words = "the photo shows a small red house next to a river with two trees and a dog in front".split()
    write_jsonl(tmp / "data" / "train.jsonl", [
        {"image": f"photos/{rng.choice(list(sizes))}", "conversations": [
            {"from": "human", "value": "<image>\nDescribe what you see."},
            {"from": "gpt", "value": " ".join(rng.choice(words) for _ in range(int(rng.lognormvariate(3.5, 1.0)) % 200 + 1))}]}
        for _ in range(2000)
    ])
    (tmp / "run.yaml").write_text(  # check-data --config: a run over data/train.jsonl
        "name: photos\nmodel:\n  path: builtin:tiny\ndata:\n  train: data/train.jsonl\n  max_seq_length: 1024\n  max_image_tokens: 256\noptim:\n  bf16: false\n"
    )
    for name, size in (("cat.jpg", (1280, 960)), ("a.jpg", (640, 480))):
        write_image(tmp / "images" / name, size)
    write_jsonl(tmp / "train.jsonl", [
        {"image": "images/cat.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat animal is this?"}, {"from": "gpt", "value": "A cat, sitting on a red sofa next to an open window."}]},
        {"image": "images/dog.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat animal is this?"}, {"from": "gpt", "value": "A dog."}]},
        {"messages": [{"role": "user", "content": "<image><image>Which is brighter?"}, {"role": "assistant", "content": "The first."}], "images": ["images/a.jpg"]},
        {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello."}]},
        {"image": "images/a.jpg", "conversations": [{"from": "human", "value": "<image>\n" + "Describe the picture in detail. " * 20}, {"from": "gpt", "value": "A plain red picture. " * 10}]},
    ])


def run(args: list[str], tmp: Path, capsys) -> str:
    with pytest.raises(SystemExit):
        main(args)
    out = capsys.readouterr().out
    return "\n".join(line.rstrip() for line in out.replace(f"{tmp}/", "").splitlines())


def test_samples_are_what_the_code_prints(tmp_path, monkeypatch, capsys):
    sample_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(console.out, "width", 100)
    text = README.read_text()
    found, stale = [], []
    for m in blocks(text):
        command, name, shown = m.group(1), m.group(2), m.group(3).rstrip("\n")
        if name not in RUN:
            continue
        found.append(name)
        printed = run(command[len("$ qvltune "):].split(), tmp_path, capsys)
        if printed != shown:
            stale.append((command, shown, printed))
    assert sorted(set(found)) == sorted(RUN), found
    if os.environ.get("QVLTUNE_UPDATE_SNAPSHOTS") and stale:
        for command, shown, printed in stale:
            text = text.replace(f"{command}\n{shown}\n```", f"{command}\n{printed}\n```", 1)
        README.write_text(text)
        stale = []
    assert not stale, "\n\n".join(f"{c}\n--- README\n{s}\n--- printed\n{p}" for c, s, p in stale)


def test_doctor_sample_lists_the_checks_the_code_makes(tmp_path):
    from qvltune.doctor import collect_facts, run_checks

    names = [c.name for c in run_checks(collect_facts(tmp_path))]
    block = next(m for m in blocks(README.read_text()) if m.group(2) == "doctor").group(3)
    # each line: two spaces, the mark padded to 6, the name padded to 22
    shown = [line[8:30].strip() for line in block.splitlines() if line[2:8].strip() in ("ok", "warn", "fail", "info")]
    # this machine has no GPU: the GPU-only checks (compile needs) are absent here and in the sample
    assert shown == names, (shown, names)


@pytest.mark.parametrize("command, wording", [
    ("merge", ["Merged the adapter ", " with its base ", "  wrote ", "Verification (the saved folder reloaded", "next: qvltune predict"]),
    ("eval", ["Evaluation of ", "loss (assistant tokens)", "exact-match accuracy"]),  # in the predict block
    ("demo", ["held-out accuracy before training:", "Examples", "(mistakes first)", "final model:"]),
])
def test_other_samples_use_the_renderers_wording(command, wording):
    block = next(m.group(0) for m in blocks(README.read_text()) if f"$ qvltune {command}" in m.group(0))
    source = "".join(p.read_text() for p in (Path(__file__).resolve().parent.parent / "qvltune" / "cli").glob("*.py"))
    for w in wording:
        assert w in block, (command, w)
        assert w.strip() in source, (command, w)


def test_the_guide_is_named_and_the_tiny_model_counted_once():
    text = README.read_text()
    assert "Fine-Tuning Overview: Training Qwen3-VL" in text
    from qvltune.model_stats import model_stats, resolve_model_config

    total = model_stats(resolve_model_config("builtin:tiny")[0]).total
    counts = set(re.findall(r"(\d+\.\d) M parameters", text))
    assert counts == {f"{total / 1e6:.1f}"}, counts
