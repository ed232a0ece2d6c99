"""`qvltune demo --stage dpo`: from the SFT demo's model, preference tuning moves the held-out
answers to the preferred phrasing (which SFT never taught) and wins the held-out pairs."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from qvltune.tiny import make_preference_dataset



def row(text: str, label: str) -> tuple[float | None, float]:
    """A row of the demo's before/after table: (SFT, DPO) in percent ("-" for no SFT figure)."""
    m = re.search(re.escape(label) + r"[^│]*│\s+([\d.]+%|-)\s+│\s+([\d.]+)%", text)
    assert m, (label, text[-2500:])
    before = None if m.group(1) == "-" else float(m.group(1).rstrip("%"))
    return before, float(m.group(2))


def test_scores_read_the_generated_answers(tmp_path):
    """The demo's generation rows: exact preferred phrasing, the SFT demo's bare colour, and the
    right colour first in whatever phrasing (held-out pairs as the demo makes them)."""
    from qvltune.preference.data import load_pairs
    from qvltune.preference.demo import scores
    from qvltune.preference.evaluate import PreferenceReport
    from qvltune.tiny import colours_in

    pairs = load_pairs(str(make_preference_dataset(tmp_path, 2, 4)[1]))
    right = [colours_in(p.chosen.messages[-1].text())[0] for p in pairs]
    wrong = [next(c for c in ("red", "blue") if c != r) for r in right]
    answers = {0: f"{right[0].capitalize()} it is.", 1: right[1], 2: f"{wrong[2]} it is.", 3: "it isit is"}
    got = scores(PreferenceReport(4, 0.0, 0.0, answers=answers), pairs)
    assert got == {"preferred": 0.25, "bare": 0.25, "colour": 0.5}


@pytest.mark.slow
def test_dpo_demo_moves_answers_to_the_preferred_ones(sft_demo):
    # Starts from the SFT demo's model that test_demo.py's run left (conftest.py), so only the DPO
    # stage runs here, at the demo's own size (160 pairs, 60 held out): under a minute on 2 cores.
    out, sft = sft_demo
    assert sft.returncode == 0, sft.stdout[-3000:] + sft.stderr[-3000:]
    args = ["--out", str(out), "--no-live"]
    result = subprocess.run([sys.executable, "-m", "qvltune", "demo", "--stage", "dpo", *args], capture_output=True, text=True, timeout=900, env={**os.environ, "COLUMNS": "120"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = result.stdout
    assert "starting from the SFT demo's model" in text, text[-2500:]
    # Generation: SFT answers with the bare colour, never the phrasing; after DPO most answers are
    # the preferred phrasing with the right colour (exact match), and the colour is kept.
    phrasing_before, phrasing_after = row(text, "answers in the preferred phrasing")
    assert phrasing_before == 0.0 and phrasing_after >= 75.0, text[-2500:]
    bare_before, bare_after = row(text, "answers as SFT taught (bare colour)")
    assert bare_before >= 80.0 and bare_after <= 10.0, text[-2500:]
    _, colour_after = row(text, "right colour, any phrasing")
    assert colour_after >= 80.0, text[-2500:]
    # Scores: the SFT model loses the style pairs (half of them: it prefers its bare answer) and wins
    # the colour pairs; DPO wins nearly all, and by its own reward against the SFT model too.
    pref_before, pref_after = row(text, "preference accuracy")
    assert pref_before <= 60.0 and pref_after >= max(85.0, pref_before + 30.0), text[-2500:]
    _, reward = row(text, "reward accuracy")
    assert reward >= 80.0, text[-2500:]
    assert (out / "runs" / "demo-dpo" / "final" / "model.safetensors").exists()
