"""`qvltune init`: the real questionary prompts driven by prompt_toolkit pipe input, and the
non-interactive path (flags, answers file, stdin not a TTY) through typer's CliRunner."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import yaml
from fake_nvml import MACHINES, FakeNvml
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from typer.testing import CliRunner

from qvltune import hardware, wizard
from qvltune.cli import app, main
from qvltune.config import load_config
from qvltune.errors import UserError
from qvltune.plan import Answers
from qvltune.zero import deepspeed_config

DOWN, ENTER, CLEAR, CTRL_C = "\x1b[B", "\r", "\x15", "\x03"
H8B = "Qwen/Qwen3-VL-8B-Instruct"


@pytest.fixture
def pipe():
    with create_pipe_input() as inp:
        yield inp


def ask(pipe, keys, defaults=None, **kw):
    pipe.send_text(keys)
    return wizard.ask(defaults or Answers(), recommended_model=kw.pop("recommended", "Qwen/Qwen3-VL-2B-Instruct"), input=pipe, output=DummyOutput(), **kw)


@pytest.fixture
def no_gpu(monkeypatch):
    class NoNvml:
        def nvmlInit(self):
            raise OSError("NVML Shared Library Not Found")

    monkeypatch.setattr(hardware, "_load_nvml", lambda: NoNvml())


# -- the wizard (questions only) -----------------------------------------------------------------


def test_wizard_asks_everything(pipe, demo_data, tmp_path):
    train, _ = demo_data
    seen = []
    keys = (
        DOWN + ENTER  # model: one below the recommended 2B -> 4B
        + str(train) + ENTER  # data
        + "y"  # domain shift
        + "n"  # fast
        + DOWN + ENTER  # resolution: variable
        + DOWN + DOWN + ENTER  # packing: off
        + CLEAR + str(tmp_path / "out") + ENTER  # output folder
        + CLEAR + "2" + ENTER  # nodes
    )
    a = ask(pipe, keys, on_dataset=seen.append)
    assert a.model == "Qwen/Qwen3-VL-4B-Instruct" and a.data == str(train) and seen == [str(train)]
    assert (a.domain_shift, a.fast, a.resolution, a.packing, a.out, a.nodes) == (True, False, "variable", "off", str(tmp_path / "out"), 2)


def test_wizard_proposes_the_given_answers_as_defaults(pipe, demo_data):
    train, _ = demo_data
    given = Answers(model=H8B, data=str(train), domain_shift=True, fast=True, resolution="variable", packing="on", out="runs-here", nodes=3)
    got = ask(pipe, ENTER * 8, given)  # Enter accepts every proposed default
    assert got == given


def test_wizard_local_folder_and_validation(pipe, demo_data, tiny_model_dir, tmp_path):
    train, _ = demo_data
    keys = (
        DOWN * 5 + ENTER  # from 2B: 4B, 8B, 32B, 30B-A3B, local folder
        + str(tmp_path) + ENTER  # no config.json there: refused, asked again
        + CLEAR + str(tiny_model_dir) + ENTER
        + str(tmp_path / "missing.jsonl") + ENTER  # not a file: refused
        + CLEAR + str(train) + ENTER
        + ENTER * 6
    )
    a = ask(pipe, keys)
    assert a.model == str(tiny_model_dir) and a.data == str(train)


def test_wizard_ctrl_c_raises(pipe):
    with pytest.raises(KeyboardInterrupt):
        ask(pipe, ENTER + CTRL_C)


# -- non-interactive (CliRunner: stdin is not a TTY) ---------------------------------------------


def run(args):
    return CliRunner().invoke(app, ["init", *args], catch_exceptions=True)


def test_non_interactive_writes_valid_files(demo_data, tmp_path, no_gpu):
    train, _ = demo_data
    out = tmp_path / "proj"
    r = run(["--data", str(train), "--model", "builtin:tiny", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "Plan for builtin:tiny" in r.output and "strategy" in r.output and "fits" in r.output
    cfg = load_config(out / "qvltune.yaml")  # what `qvltune train` will load
    assert cfg.model.path == "builtin:tiny" and cfg.data.train == str(train.resolve())
    assert json.loads((out / "ds_zero.json").read_text()) == deepspeed_config(cfg)
    launch = (out / "launch.sh").read_text()
    assert "--module qvltune.rank" in launch and f"--run-dir {out / 'runs' / cfg.name}" in launch
    assert (out / "launch.sh").stat().st_mode & stat.S_IXUSR
    answers = yaml.safe_load((out / "qvltune-answers.yaml").read_text())
    assert answers["model"] == "builtin:tiny" and answers["out"] == str(out)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_answers_file_replays_the_same_config(demo_data, tmp_path, no_gpu):
    train, _ = demo_data
    out = tmp_path / "a"
    assert run(["--data", str(train), "--model", "builtin:tiny", "--out", str(out), "--packing", "off", "--epochs", "3"]).exit_code == 0
    first = (out / "qvltune.yaml").read_text()
    r = run(["--answers", str(out / "qvltune-answers.yaml"), "--force"])
    assert r.exit_code == 0, r.output
    assert (out / "qvltune.yaml").read_text() == first
    # a flag overrides the file
    assert run(["--answers", str(out / "qvltune-answers.yaml"), "--force", "--epochs", "1"]).exit_code == 0
    assert load_config(out / "qvltune.yaml").optim.epochs == 1


def test_missing_answers_fail_naming_the_flags(tmp_path, no_gpu, capsys):
    with pytest.raises(SystemExit) as e:
        main(["init", "--out", str(tmp_path), "--yes"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "missing answer(s): data (--data)" in err and "Hint:" in err
    assert not list(tmp_path.iterdir())


def test_refuses_to_overwrite_without_force(demo_data, tmp_path, no_gpu):
    train, _ = demo_data
    args = ["--data", str(train), "--model", "builtin:tiny", "--out", str(tmp_path)]
    assert run(args).exit_code == 0
    r = run(args)
    assert r.exit_code == 1 and isinstance(r.exception, UserError) and "--force" in r.exception.hint
    assert "Plan for" not in r.output  # refused before the plan is made or shown
    assert run([*args, "--force"]).exit_code == 0
    # A hand-edited train.sbatch (partition, account) alone is reason enough to ask first.
    other = tmp_path / "other"
    other.mkdir()
    (other / "train.sbatch").write_text("#SBATCH --partition=mine\n")
    r = run(["--data", str(train), "--model", "builtin:tiny", "--out", str(other)])
    assert isinstance(r.exception, UserError) and "train.sbatch" in r.exception.message


def test_compact_plan_and_the_full_reasoning_in_the_plan_file(demo_data, tmp_path, no_gpu):
    train, _ = demo_data
    r = run(["--data", str(train), "--model", "builtin:tiny", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    plan = r.output[r.output.index("Plan for") : r.output.index("wrote ")]
    assert len(plan.splitlines()) <= 20  # fits 80x24 with the prompt below it
    full = (tmp_path / "qvltune-plan.txt").read_text()
    assert "the guide: 'Start with fixed" in full and "Memory per process" in full and "Parameters" in full
    explained = run(["--data", str(train), "--model", "builtin:tiny", "--out", str(tmp_path), "--force", "--explain"])
    assert "the guide: 'Start with fixed" in explained.output


def test_missing_dataset_file(tmp_path, no_gpu):
    r = run(["--data", str(tmp_path / "nope.jsonl"), "--model", "builtin:tiny", "--out", str(tmp_path)])
    assert isinstance(r.exception, UserError) and "not a file" in r.exception.message
    assert not list(tmp_path.iterdir())


def test_bad_answers_file(tmp_path, no_gpu):
    f = tmp_path / "a.yaml"
    f.write_text("modle: x\nnodes: 0\n")
    r = run(["--answers", str(f)])
    assert isinstance(r.exception, UserError) and "modle: unknown key" in r.exception.message and "nodes" in r.exception.message


def test_plans_for_another_machine(demo_data, tmp_path, no_gpu):
    train, _ = demo_data
    r = run(["--data", str(train), "--model", H8B, "--gpu", "H200", "--gpu-count", "8", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "GPUs: 8 x NVIDIA H200, 140 GiB, compute 9.0, bf16 yes (planned, not detected)" in r.output
    cfg = load_config(tmp_path / "qvltune.yaml")
    assert cfg.strategy == "full" and cfg.optim.bf16 and cfg.model.path == H8B
    assert "--num_gpus 8" in (tmp_path / "launch.sh").read_text()


def test_shows_detected_gpus_and_recommends_a_model(demo_data, tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(hardware, "_load_nvml", lambda: FakeNvml(MACHINES["1x RTX 4090"]))
    train, _ = demo_data
    r = run(["--data", str(train), "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "NVIDIA GeForce RTX 4090" in r.output and "24 GiB" in r.output
    assert load_config(tmp_path / "qvltune.yaml").model.path == "Qwen/Qwen3-VL-2B-Instruct"


def test_planning_for_fewer_gpus_than_detected_launches_that_many(demo_data, tmp_path, monkeypatch):
    """--gpu-count 2 on a node of 8: the batch and ZeRO stage are planned for 2, so the config starts
    2 ranks (it wrote launch.gpus: all, and train started 8: 4x the planned batch). A config whose
    launch does not give its planned effective batch is warned about at train time."""
    from qvltune.config_checks import effective_batch_mismatch

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nvml = FakeNvml(MACHINES["8x A100-80GB"])
    monkeypatch.setattr(hardware, "_load_nvml", lambda: nvml)
    train, _ = demo_data
    r = run(["--data", str(train), "--model", H8B, "--gpu-count", "2", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    cfg = load_config(tmp_path / "qvltune.yaml")
    gpus = hardware.detect_gpus()[0]
    assert len(gpus) == 8 and cfg.launch.gpus == 2 and "--num_gpus 2" in (tmp_path / "launch.sh").read_text()
    assert effective_batch_mismatch(cfg, gpus) is None
    cfg.launch.gpus = "all"
    eff = cfg.optim.effective_batch
    assert effective_batch_mismatch(cfg, gpus) == (
        f"optim.effective_batch: {eff} was planned, but 8 process(es) (launch.gpus: all) x per_device_batch {cfg.optim.per_device_batch} x grad_accum "
        f"{cfg.optim.grad_accum} train with {4 * eff}: set launch.gpus: 2, or re-plan with qvltune init"
    )


def test_a_mixture_with_settings_is_kept_whole_and_a_bad_one_is_one_line(demo_data, tmp_path, no_gpu, monkeypatch):
    """--data split on every comma: a source's [settings] were cut apart ("not a file") and its
    relative image_root was never made absolute; a bad percentage ended in an internal error."""
    train, _ = demo_data
    out = tmp_path / "out"
    monkeypatch.chdir(train.parent)
    r = run(["--data", f"{train.name}%50[max_image_tokens=256,image_root=images]", "--out", str(out)])
    assert r.exit_code == 0, r.output
    cfg = load_config(out / "qvltune.yaml")
    assert cfg.data.train == f"{train}%50[max_image_tokens=256,image_root={train.parent / 'images'}]"
    r = run(["--data", f"{train}%5O", "--out", str(tmp_path / "bad")])
    assert isinstance(r.exception, UserError) and r.exception.message.startswith("--data: bad sampling percentage")


def test_multi_node_writes_a_hostfile(demo_data, tmp_path, no_gpu):
    train, _ = demo_data
    r = run(["--data", str(train), "--model", H8B, "--gpu", "A100", "--gpu-count", "8", "--nodes", "2", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "slots=8" in (tmp_path / "hostfile").read_text()
    cfg = load_config(tmp_path / "qvltune.yaml")
    assert cfg.launch.nodes == 2 and cfg.launch.hostfile == str(tmp_path / "hostfile")
    assert f"--hostfile {tmp_path / 'hostfile'} --num_nodes 2" in (tmp_path / "launch.sh").read_text()
    sbatch = (tmp_path / "train.sbatch").read_text()  # the Slurm way (run for real in test_multinode.py)
    assert "#SBATCH --nodes=2" in sbatch and "#SBATCH --gpus-per-node=8" in sbatch
    assert f"-m qvltune train {tmp_path.resolve() / 'qvltune.yaml'} --resume" in sbatch


def test_launch_script_prepares_the_run_folder(demo_data, tmp_path, no_gpu):
    """The first command of launch.sh writes the resolved config where the worker reads it."""
    train, _ = demo_data
    assert run(["--data", str(train), "--model", "builtin:tiny", "--out", str(tmp_path)]).exit_code == 0
    prepare = next(line for line in (tmp_path / "launch.sh").read_text().splitlines() if "dump_config" in line)
    subprocess.run(["bash", "-c", prepare], cwd=tmp_path, check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    cfg = load_config(tmp_path / "qvltune.yaml")
    resolved = load_config(cfg.run_dir / "config.yaml")
    assert resolved.run_dir == cfg.run_dir and resolved.data.train == cfg.data.train and resolved.modes() == cfg.modes()


# -- interactive through the CLI: Ctrl-C and confirmation -----------------------------------------


class _Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def interactive(monkeypatch, pipe, no_gpu):
    """`qvltune init` in a 'terminal' whose keystrokes come from the pipe."""
    monkeypatch.setattr(sys, "stdin", _Tty())
    monkeypatch.setattr(wizard, "ask", partial(wizard.ask, input=pipe, output=DummyOutput()))
    monkeypatch.setattr(wizard, "confirm", partial(wizard.confirm, input=pipe, output=DummyOutput()))
    return pipe


def test_ctrl_c_exits_130_and_writes_nothing(interactive, demo_data, tmp_path, capsys):
    train, _ = demo_data
    interactive.send_text(ENTER + str(train) + ENTER + "n" + CTRL_C)
    with pytest.raises(SystemExit) as e:
        main(["init", "--model", "builtin:tiny", "--out", str(tmp_path / "o")])
    assert e.value.code == 130 and "interrupted: nothing was written" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_interactive_confirm_then_write(interactive, demo_data, tmp_path, capsys):
    train, _ = demo_data
    out = tmp_path / "o"
    interactive.send_text(ENTER + str(train) + ENTER + "n" + "n" + ENTER + ENTER + CLEAR + str(out) + ENTER + ENTER + "y")
    with pytest.raises(SystemExit) as e:
        main(["init", "--model", "builtin:tiny"])
    captured = capsys.readouterr()
    assert e.value.code == 0, captured.err
    assert "Dataset" in captured.out  # check-data's summary, inline after the dataset question
    assert load_config(out / "qvltune.yaml").model.path == "builtin:tiny"


def test_interactive_decline_writes_nothing(interactive, demo_data, tmp_path, capsys):
    train, _ = demo_data
    out = tmp_path / "o"
    interactive.send_text(ENTER + str(train) + ENTER + "n" + "n" + ENTER + ENTER + CLEAR + str(out) + ENTER + ENTER + "n")
    with pytest.raises(SystemExit) as e:
        main(["init", "--model", "builtin:tiny"])
    assert e.value.code == 0 and "nothing written" in capsys.readouterr().out
    assert not out.exists() or not list(out.iterdir())


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    from qvltune import scaffold

    (tmp_path / "keep.yaml").write_text("old\n")
    calls = {"n": 0}
    real = os.fdopen

    def flaky(fd, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            os.close(fd)
            raise KeyboardInterrupt
        return real(fd, *a, **k)

    monkeypatch.setattr(scaffold.os, "fdopen", flaky)
    files = {tmp_path / "a.yaml": "a", tmp_path / "keep.yaml": "new", tmp_path / "c.sh": "c"}
    with pytest.raises(KeyboardInterrupt):
        scaffold.write_all(files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.yaml"] and (tmp_path / "keep.yaml").read_text() == "old\n"
