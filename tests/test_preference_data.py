"""Preference records (LLaMA-Factory's and TRL's layouts) become a prompt and two answers; check-data
names every problem by file, line and field; packed pairs give each answer its unpacked log-prob."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import write_image, write_jsonl
from qvltune.data.packing import PackedCollator, PaddedCollator, RopeIndex
from qvltune.data.record import RawItem
from qvltune.data.tokenize import IGNORE_INDEX, Encoder
from qvltune.preference.data import EncodedPair, PairCollator, check_pairs, is_preference_data
from qvltune.preference.formats import parse_pair
from qvltune.preference.loss import logits_sequence_logps
from test_check_data import run_cli

MODEL_INPUTS = ("input_ids", "mm_token_type_ids", "position_ids", "pixel_values", "image_grid_thw", "attention_mask", "use_cache")


def layouts(tmp_path):
    write_image(tmp_path / "a.png", (96, 64), (200, 30, 30))
    write_image(tmp_path / "b.png", (64, 64), (30, 30, 200))
    return {
        "llamafactory": {"conversations": [{"from": "human", "value": "<image>What colour is the shape?"}], "chosen": {"from": "gpt", "value": "red"}, "rejected": {"from": "gpt", "value": "orange"}, "images": ["a.png"]},
        "llamafactory-messages": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image><image>Which is blue?"}, {"role": "assistant", "content": "The second."}, {"role": "user", "content": "And the first?"}], "chosen": {"role": "assistant", "content": "Red."}, "rejected": {"role": "assistant", "content": "Blue."}, "images": ["a.png", "b.png"]},
        "trl-plain": {"prompt": "<image>What colour is the shape?", "chosen": "red", "rejected": "purple", "images": ["a.png"]},
        "trl-conversational": {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}], "chosen": [{"role": "assistant", "content": "red"}], "rejected": [{"role": "assistant", "content": "green"}], "images": ["a.png"]},
        "trl-text-only": {"prompt": [{"role": "user", "content": "Say hello."}], "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": [{"role": "assistant", "content": "No."}]},
    }


@pytest.mark.parametrize("name", ["llamafactory", "llamafactory-messages", "trl-plain", "trl-conversational", "trl-text-only"])
def test_layouts_parse_to_a_prompt_and_two_answers(tmp_path, tiny_processor, name):
    value = layouts(tmp_path)[name]
    pair, problems = parse_pair(RawItem(0, 1, value), str(tmp_path / "p.jsonl"))
    assert pair is not None and not problems, problems
    assert pair.chosen.messages[:-1] == pair.rejected.messages[:-1]  # one prompt
    assert pair.chosen.messages[-1].role == pair.rejected.messages[-1].role == "assistant"
    assert pair.chosen.messages[-1].text() != pair.rejected.messages[-1].text()
    assert len(pair.chosen.media) == len(value.get("images", []))
    # Encoded: the same prompt tokens, only the last answer labelled (never an earlier turn's).
    enc = Encoder(tiny_processor)
    c, r = enc.encode(pair.chosen), enc.encode(pair.rejected)
    answer = lambda s: tiny_processor.tokenizer.decode([t for t in s.labels if t != IGNORE_INDEX])  # noqa: E731
    assert answer(c).startswith(pair.chosen.messages[-1].text()) and answer(r).startswith(pair.rejected.messages[-1].text())
    first = next(i for i, t in enumerate(c.labels) if t != IGNORE_INDEX)
    assert c.input_ids[:first] == r.input_ids[:first]


def test_check_data_names_every_problem(tmp_path, capsys):
    good = layouts(tmp_path)
    bad = [
        good["llamafactory"],
        {"conversations": good["llamafactory"]["conversations"], "chosen": {"from": "gpt", "value": "red"}, "images": ["a.png"]},  # line 2: no rejected
        {**good["trl-plain"], "rejected": "red"},  # line 3: the same answer twice
        {**good["llamafactory"], "chosen": {"from": "gpt", "value": "<image>red"}},  # line 4: media in an answer
        {**good["trl-plain"], "chosen": "  "},  # line 5: empty answer
        {**good["trl-conversational"], "images": ["a.png", "b.png"]},  # line 6: two images for one image part
        {**good["trl-plain"], "images": ["missing.png"]},  # line 7: missing image (the SFT media check)
        {"prompt": "Hi", "chosen": "Hello there, how are you doing today my friend?" * 30, "rejected": "Hi."},  # line 8: chosen too long
    ]
    data = write_jsonl(tmp_path / "p.jsonl", bad)
    assert is_preference_data(str(data))
    code, out, _ = run_cli(["check-data", str(data), "--model", "builtin:tiny", "--max-seq-length", "128", "--json"], capsys)
    doc = json.loads(out)
    assert code == 1 and doc["preference"]["pairs"] == 1
    found = {(p["line"], p["field"], p["code"]) for p in doc["problems"] if p["severity"] == "error"}
    want = {
        (2, "rejected", "missing-answer"),
        (3, "rejected", "same-answers"),
        (4, "chosen.value", "placeholder-in-answer"),
        (5, "chosen", "empty-answer"),
        (6, "images", "placeholder-count"),
        (7, "images[0]", "missing-media"),
        (8, "chosen", "too-long"),
    }
    assert want <= found, found - want
    assert {line for line, _, _ in found} == set(range(2, 9))  # the good pair has none
    # One line each on the terminal, naming file:line and field.
    code, out, _ = run_cli(["check-data", str(data), "--model", "builtin:tiny", "--max-seq-length", "128"], capsys)
    assert f"{data}:2 (record 1) rejected: missing \"rejected\" answer" in out
    assert f"{data}:8 (record 7) chosen: prompt + chosen answer:" in out


def test_check_data_summarises_chosen_and_rejected_lengths(tmp_path, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", list(layouts(tmp_path).values()))
    code, out, _ = run_cli(["check-data", str(data), "--model", "builtin:tiny"], capsys)
    assert code == 0, out
    assert "Preference pairs" in out and "chosen" in out and "rejected" in out
    assert "OK: 5 preference pairs ready" in out
    report = check_pairs(str(data))  # estimated counts (no model) work too
    assert len(report.pairs) == 5 and len(report.lengths) == 10


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from qvltune.model import load_model

    return load_model(str(tiny_model_dir), dtype="float32", attn_implementation="sdpa").eval()


def test_packed_pairs_equal_unpacked_answers(tmp_path, tiny_model, tiny_processor):
    """Each answer's summed log-prob from a packed row of whole pairs (and from padded rows) equals
    its own unpadded forward."""
    enc = Encoder(tiny_processor)
    pairs = []
    for i, value in enumerate(layouts(tmp_path).values()):
        pair, _ = parse_pair(RawItem(i, i + 1, value), str(tmp_path / "p.jsonl"))
        pairs.append(EncodedPair(("train", i), enc.encode(pair.chosen), enc.encode(pair.rejected)))
    alone = []
    for p in pairs:
        for s in p.samples:
            batch = PaddedCollator(0)([[s]])
            with torch.no_grad():
                logp = torch.log_softmax(tiny_model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS}).logits[0, :-1].float(), -1)
            y = batch["labels"][0, 1:]
            alone.append(logp[y != IGNORE_INDEX].gather(1, y[y != IGNORE_INDEX][:, None]).sum())
    alone = torch.stack(alone)
    pad = tiny_processor.tokenizer.pad_token_id
    for collator in (PairCollator(PackedCollator(pad, RopeIndex(tiny_model.config)), packed=True), PairCollator(PaddedCollator(pad), packed=False)):
        items = [pairs[:2], pairs[2:]] if collator.packed else [[p] for p in pairs]
        batch = collator(items)
        with torch.no_grad():
            logits = tiny_model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS}).logits
        rows = logits.reshape(-1, logits.shape[-1]).index_select(0, batch["loss_index"])
        got = logits_sequence_logps(rows, batch["loss_targets"], batch["pairs"].row_sample, batch["pairs"].samples)
        assert torch.allclose(got, alone, atol=1e-4), (collator.packed, got, alone)
        assert batch["pair_keys"] == [p.key for p in pairs]
        assert batch["pairs"].chosen.tolist() == [0, 2, 4, 6, 8] and batch["pairs"].rejected.tolist() == [1, 3, 5, 7, 9]
        if collator.packed:
            assert batch["input_ids"].shape[0] == 2  # both answers of a pair share a row


def test_eval_on_preference_pairs_reports_preference_accuracy(tmp_path, capsys, tiny_model, tiny_processor):
    """`qvltune eval MODEL --data pairs`: preference accuracy from each answer's log-prob (checked
    against a direct computation), DPO's reward against a reference (zero margin against itself)."""
    data = write_jsonl(tmp_path / "p.jsonl", list(layouts(tmp_path).values()))
    code, out, _ = run_cli(["eval", "builtin:tiny", "--data", str(data), "--reference", "builtin:tiny", "--json", "--max-new-tokens", "4"], capsys)
    assert code == 0, out
    doc = json.loads(out)
    assert doc["pairs"] == 5 and doc["reward_margin"] == pytest.approx(0.0, abs=1e-6) and doc["reward_accuracy"] == 0.0
    assert sum(doc["generated"].values()) == pytest.approx(1.0)
    from qvltune.preference.data import load_pairs

    def direct(s):
        batch = PaddedCollator(0)([[s]])
        with torch.no_grad():
            logp = torch.log_softmax(tiny_model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS}).logits[0, :-1].float(), -1)
        y = batch["labels"][0, 1:]
        return float(logp[y != IGNORE_INDEX].gather(1, y[y != IGNORE_INDEX][:, None]).sum())

    enc = Encoder(tiny_processor)
    margins = [direct(enc.encode(p.chosen)) - direct(enc.encode(p.rejected)) for p in load_pairs(str(data))]
    assert doc["accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 5)
    assert doc["logp_margin"] == pytest.approx(sum(margins) / 5, abs=1e-4)
    code, out, _ = run_cli(["eval", "builtin:tiny", "--data", str(data)], capsys)
    assert code == 0 and "preference accuracy" in out


def test_a_repeated_pair_is_never_both_trained_and_held_out(tmp_path, tiny_processor):
    from qvltune.config import parse_config
    from qvltune.preference.data import prepare_pairs

    write_image(tmp_path / "a.png", (96, 64))
    pairs = [{"conversations": [{"from": "human", "value": f"<image>Colour {i}?"}], "chosen": {"from": "gpt", "value": "red"}, "rejected": {"from": "gpt", "value": "blue"}, "images": ["a.png"]} for i in range(10)]
    data = write_jsonl(tmp_path / "p.jsonl", pairs)
    cfg = parse_config({"name": "d", "stage": "dpo", "model": {"path": "builtin:tiny"}, "data": {"train": f"{data}%200", "eval_split": 0.2, "max_seq_length": 512}})
    index = prepare_pairs(cfg, tiny_processor)
    held, trained = {e.index for e in index.eval}, {e.index for e in index.train}
    assert len(held) == 2 and len(trained) == 8 and not held & trained and len(index.eval) == 4
