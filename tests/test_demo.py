"""README's main command: `qvltune demo` takes the tiny model from chance to >= 90% held-out accuracy."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.slow


def test_demo_learns_the_task(sft_demo):
    out, result = sft_demo  # the demo run once per session (conftest.py); test_dpo_demo.py starts from its model
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    before = float(re.search(r"accuracy before training: ([\d.]+)%", result.stdout).group(1))
    after = float(re.search(r"│ all\s+│\s+\d+ │\s+[\d.]+% │\s+([\d.]+)% │", result.stdout).group(1))
    assert before <= 100 / 6 + 5  # no better than chance (1 in 6) before
    assert after >= 90.0, result.stdout[-2000:]
    assert (out / "runs" / "demo" / "final" / "model.safetensors").exists()
