"""What a newcomer meets when something is wrong: one message per mistake, from the one place
that knows it, before any slow work (and with a hint that can help)."""

from __future__ import annotations

import logging

import pytest
import yaml
from typer.testing import CliRunner

from qvltune.cli import _DropAcceleratorGuess, app
from qvltune.config import parse_config
from qvltune.errors import UserError
from qvltune.model import read_model_config
from qvltune.train import missing_data_files
from qvltune.wizard import model_folder


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=True)


def test_a_missing_model_folder_reads_the_same_everywhere(tmp_path):
    missing = str(tmp_path / "nowhere" / "model")
    with pytest.raises(UserError) as e:
        read_model_config(missing)  # train's validation, init, estimate
    assert e.value.message == f"model folder not found: {missing}" and "Repo id" not in str(e.value)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"name": "x", "model": {"path": missing}, "data": {"train": str(tmp_path / "t.jsonl")}}))
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}\n')
    for args in (["estimate", str(config), "--no-data"], ["eval", missing, "--data", str(data)], ["predict", missing, "--prompt", "hi"]):
        r = invoke(*args)
        assert isinstance(r.exception, UserError) and r.exception.message == f"model folder not found: {missing}", (args, r.exception)


def test_did_you_mean_for_a_misspelt_key():
    doc = {"name": "x", "model": {"path": "builtin:tiny"}, "data": {"train": "t.jsonl"}, "optim": {"learnig_rate": 1e-3}, "schedul": {}, "lora": {"rnk": 8}}
    with pytest.raises(UserError) as e:
        parse_config(doc)
    message = e.value.message
    assert "optim.learnig_rate: unknown key: did you mean learning_rate?" in message
    assert "schedul: unknown key: did you mean schedule?" in message and "lora.rnk: unknown key: did you mean rank?" in message
    with pytest.raises(UserError) as e:
        parse_config({**doc, "optim": {"zzz": 1}, "schedul": None, "lora": {}})
    assert "optim.zzz: unknown key (check the spelling" in e.value.message  # nothing near: no guess


def test_missing_data_files_are_named_with_their_field(tmp_path):
    (tmp_path / "a.jsonl").write_text("")
    cfg = parse_config({"name": "x", "model": {"path": "builtin:tiny"}, "data": {"train": f"{tmp_path / 'a.jsonl'}%50,{tmp_path / 'b.jsonl'}", "eval": str(tmp_path / "e.jsonl")}})
    assert missing_data_files(cfg) == [f"data.train: file not found: {tmp_path / 'b.jsonl'}", f"data.eval: file not found: {tmp_path / 'e.jsonl'}"]


def test_inputs_are_checked_before_slow_work(tmp_path):
    r = invoke("demo", "--train-samples", "-5", "--out", str(tmp_path))
    assert r.exit_code == 2 and "--train-samples" in r.output and not list(tmp_path.iterdir())
    r = invoke("merge", str(tmp_path / "runs" / "gone"), "--out", str(tmp_path / "m"))
    assert isinstance(r.exception, UserError) and "adapter or run folder not found" in r.exception.message
    assert "merging" not in r.output and "Hub id" not in (r.exception.hint or "")


def test_the_wizard_says_why_a_model_folder_will_not_do(tmp_path):
    assert model_folder(str(tmp_path / "nope")).startswith("folder not found")
    (tmp_path / "f").write_text("x")
    assert "is a file" in model_folder(str(tmp_path / "f"))
    assert model_folder(str(tmp_path)).startswith("no config.json in")
    (tmp_path / "config.json").write_text("{}")
    assert model_folder(str(tmp_path)) is True


def test_deepspeeds_cpu_guess_is_dropped_and_nothing_else():
    drop = _DropAcceleratorGuess()
    record = lambda msg: logging.LogRecord("DeepSpeed", logging.WARNING, "x", 1, msg, None, None)  # noqa: E731
    assert not drop.filter(record("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."))
    assert drop.filter(record("Unable to find hostfile"))
