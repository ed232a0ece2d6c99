"""Real training through the real launcher path: ``qvltune train`` -> deepspeed -> worker, on CPU (gloo).

Each strategy changes exactly the parameters it should; ZeRO-2 and ZeRO-3 run with 1 and 2
processes (ZeRO-3 with vision LoRA and batches where one rank has no image); Ctrl-C saves a checkpoint and --resume
reproduces the uninterrupted loss curve.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import write_jsonl
from qvltune.config import load_config, parse_config
from qvltune.launch import build_launch
from qvltune.metrics import read_all
from qvltune.model import component_of
from qvltune.zero import deepspeed_config, zero3_stats
from qvltune.rank import read_records

pytestmark = pytest.mark.slow


def write_config(tmp_path: Path, demo_data, name: str, **sections) -> Path:
    train, evals = demo_data
    doc = {
        "name": name,
        "output_dir": str(tmp_path / "runs"),
        "model": {"path": "builtin:tiny"},
        "data": {"train": str(train), "eval": f"{evals}%50", "max_seq_length": 256, "num_workers": 0},
        "strategy": "lora",
        "optim": {"learning_rate": 2e-3, "bf16": False, "optimizer": "adamw_torch", "per_device_batch": 4, "grad_accum": 1, "max_steps": 4, "warmup_ratio": 0.0},
        "schedule": {"log_steps": 1, "eval_steps": 2, "save_steps": 2},
        "deepspeed": {"stage": 2},
        "launch": {"cpu_processes": 1},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            doc.setdefault(key, {}).update(value)
        else:
            doc[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def losses(config: Path) -> dict[int, float]:
    """{step: loss} of a run's logged optimizer steps."""
    return {r["step"]: r["loss"] for r in read_all(run_dir(config) / "metrics.jsonl") if r["kind"] == "train"}


def train(config: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qvltune", "train", str(config), "--no-live", *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"})


def run_dir(config: Path) -> Path:
    doc = yaml.safe_load(config.read_text())
    return Path(doc["output_dir"]) / doc["name"]


def tensors_by_component(path: Path, strip: str = "") -> dict[str, dict[str, object]]:
    out: dict[str, dict] = {}
    for name, t in load_file(str(path)).items():
        out.setdefault(component_of(name), {})[name[len(strip):] if name.startswith(strip) else name] = t
    return out


def test_launch_command_is_pure_and_complete(tmp_path):
    cfg = parse_config({"name": "x", "model": {"path": "builtin:tiny"}, "data": {"train": "d.jsonl"}, "launch": {"gpus": [0, 2], "master_port": 29600}})
    argv, env = build_launch(cfg, run_dir=tmp_path, gpu_count=4)
    assert argv[-4:] == ["--module", "qvltune.rank", "--run-dir", str(tmp_path)]
    assert "--include" in argv and argv[argv.index("--include") + 1] == "localhost:0,2"
    assert argv[argv.index("--master_port") + 1] == "29600"
    argv, env = build_launch(cfg.model_copy(update={"launch": cfg.launch.model_copy(update={"gpus": "all"})}), run_dir=tmp_path, gpu_count=4, resume=True)
    assert argv[argv.index("--num_gpus") + 1] == "4" and argv[-1] == "--resume"
    cpu = parse_config({"name": "x", "model": {"path": "builtin:tiny"}, "data": {"train": "d.jsonl"}, "launch": {"cpu_processes": 2}})
    argv, env = build_launch(cpu, run_dir=tmp_path, gpu_count=0, cpu_count=2)
    assert argv[argv.index("--num_gpus") + 1] == "2" and env["OMP_NUM_THREADS"] == "1"
    multi = parse_config({"name": "x", "model": {"path": "builtin:tiny"}, "data": {"train": "d.jsonl"}, "launch": {"nodes": 2, "hostfile": "/etc/hosts.txt", "gpus": 8}})
    argv, _ = build_launch(multi, run_dir=tmp_path, gpu_count=8)
    assert argv[argv.index("--hostfile") + 1] == "/etc/hosts.txt" and argv[argv.index("--num_nodes") + 1] == "2"


def test_launch_honours_cuda_visible_devices(tmp_path):
    """The deepspeed runner ignores CUDA_VISIBLE_DEVICES once --num_gpus is given: qvltune passes
    the visible GPUs as --include, and config indices count within them (as in CUDA)."""
    def include(gpus, count, visible):
        cfg = parse_config({"name": "x", "model": {"path": "builtin:tiny"}, "data": {"train": "d.jsonl"}, "launch": {"gpus": gpus}})
        argv, _ = build_launch(cfg, run_dir=tmp_path, gpu_count=count, visible_devices=visible)
        return argv[argv.index("--include") + 1] if "--include" in argv else "--num_gpus " + argv[argv.index("--num_gpus") + 1]

    assert include(1, 2, "2,3") == "localhost:2"
    assert include("all", 2, "2,3") == "localhost:2,3"
    assert include([1], 2, "2,3") == "localhost:3"
    assert include("all", 4, None) == "--num_gpus 4"
    assert include("all", 1, "GPU-5f2c") == "--num_gpus 1"  # UUIDs: left to the runner


def test_print_command(tmp_path, demo_data):
    config = write_config(tmp_path, demo_data, "pc")
    out = subprocess.run([sys.executable, "-m", "qvltune", "train", str(config), "--print-command"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "--module qvltune.rank --run-dir" in out.stdout and "deepspeed" in out.stdout
    assert not run_dir(config).exists()  # printing launches nothing
    # What qvltune train runs on one node (DeepSpeed's launcher directly), the runner form as a comment.
    comment, runner, command = out.stdout.splitlines()[:3]
    assert comment == "# The same as DeepSpeed's runner form:" and runner.startswith("#   ") and "--num_gpus 1" in runner
    assert "-m deepspeed.launcher.launch --world_info=" in command and command.endswith(" qvltune.rank --run-dir " + str(run_dir(config).resolve()))


def test_lora_zero2_one_process(tmp_path, demo_data, tiny_model_dir):
    config = write_config(tmp_path, demo_data, "lora", data={"num_workers": 1})  # a worker per loader: stopped at the end
    result = train(config)
    assert result.returncode == 0, result.stdout + result.stderr
    rd = run_dir(config)
    final = rd / "final"
    # An adapter, the processor and the resolved config, saved together.
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja", "processor_config.json", "qvltune.yaml"):
        assert (final / name).exists(), name
    adapter = load_file(str(final / "adapter_model.safetensors"))
    assert adapter and all(component_of(k) == "llm" and "lora_" in k for k in adapter)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # B starts at zero: it trained
    records = read_all(rd / "metrics.jsonl")
    kinds = [r["kind"] for r in records if r["kind"] not in ("phase", "step")]  # progress records come and go
    assert kinds[0] == "start" and kinds[-1] == "end" and "eval" in kinds and "checkpoint" in kinds
    start = next(r for r in records if r["kind"] == "start")
    assert {c["component"]: c["mode"] for c in start["components"]}["llm"] == "lora"
    train_recs = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "epoch"):
        assert all(r[key] is not None for r in train_recs), key
    assert all(r["mfu"] is None for r in train_recs)  # CPU: no peak to divide by
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals and all(r["eval_ppl"] > 1 for r in evals)
    assert (rd / "loss.png").exists() and (rd / "ds_config.json").exists() and (rd / "launch.sh").exists()
    assert (rd / "checkpoint-4" / "qvltune-complete").exists()
    # The checkpoint's adapter (copied alone and written by the save's thread: checkpoint_writer.
    # snapshot_adapter) is byte for byte the final one (the Trainer's own save) of the same weights.
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (rd / "checkpoint-4" / name).read_bytes() == (final / name).read_bytes(), name
    save = next(r for r in records if r["kind"] == "save")  # where the save's wait went
    parts = save["parts"]
    assert {"model files", "DeepSpeed state to host", "ranks meet"} <= set(parts)
    timed = parts["model files"] + parts["DeepSpeed state to host"]
    assert parts["model files"] > 0 and parts["DeepSpeed state to host"] > 0 and parts.get("other", 0.0) < timed  # the named parts are where the wait went
    assert "Training completed" in result.stdout and "qvltune merge" in result.stdout
    # The rank's record says where its exit went: its main returned after the end record, then its
    # exit handlers ran, then the process ended (qvltune.rank, qvltune.process_exit).
    # The data loaders' workers (training's and evaluation's, persistent) were stopped at the end.
    assert "qvltune: the workers of 2 data loader(s) stopped" in (rd / "train.log").read_text()
    (rank,) = read_records(rd)
    end = next(r for r in reversed(records) if r["kind"] == "end")
    assert rank["exit_code"] == 0 and end["time"] <= rank["returned"] <= rank["exiting"] <= rank["ended"], rank
    # The start-up, phase by phase, from the command to the first step's end (qvltune.phases).
    phases = next(r for r in records if r["kind"] == "phases")
    names = [p["name"] for p in phases["phases"]]
    for expected in ("config check", "data check and index", "launcher", "imports", "DeepSpeed and the process group", "run config and the Trainer's imports", "training arguments (CUDA start)", "model load", "DeepSpeed engine", "first step"):
        assert any(n.startswith(expected) for n in names), (expected, names)
    imports = next(p["seconds"] for p in phases["phases"] if p["name"].startswith("imports"))
    assert imports > 0.3  # torch and transformers take seconds: counted here, not in the launcher's phase
    first_step = next(r for r in records if r["kind"] == "step")
    assert 0 < phases["to_first_step"] and phases["time"] <= first_step["time"]
    assert sum(p["seconds"] for p in phases["phases"] if not p.get("parallel")) == pytest.approx(phases["to_first_step"], abs=0.05)
    # The first step split: nothing compiled here (compile is off on the CPU), its batches and its work.
    split, first = phases["first_step"], next(p["seconds"] for p in phases["phases"] if p["name"].startswith("first step"))
    assert "compile" not in phases and split["compile_s"] == 0 and split["data_s"] >= 0 and split["rest_s"] > 0
    assert split["data_s"] + split["rest_s"] == pytest.approx(first, abs=0.01)
    assert "time to first step" in result.stdout and "time to first step" in (rd / "train.log").read_text()


def test_mixed_zero3_two_processes_with_text_only_batches(tmp_path, demo_data, tiny_model_dir):
    """ZeRO-3 with a rank whose batch has no image: the dummy vision pass keeps the ranks in step.

    The vision tower trains with LoRA under gradient checkpointing: its first block is a trained
    ZeRO-3 leaf behind frozen patch embeddings, whose gradients DeepSpeed reduced before computing
    them ("Cannot reduce scatter gradients whose size is not same as the params") until
    zero3_leaf_blocks made that block's input require grad."""
    train_file, _ = demo_data
    text_only = write_jsonl(tmp_path / "text.jsonl", [{"messages": [{"role": "user", "content": f"Count to {i}."}, {"role": "assistant", "content": " ".join(str(j) for j in range(i))}]} for i in range(2, 12)])
    # Ranks alternate records (per-device batch 1): text-only and image records side by side.
    config = write_config(
        tmp_path, demo_data, "mixed", strategy="mixed", components={"vision": "lora"}, launch={"cpu_processes": 2}, deepspeed={"stage": 3},
        data={"train": f"{text_only},{train_file}%20"}, optim={"per_device_batch": 1, "max_steps": 6, "gradient_checkpointing": True},
    )
    result = train(config, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ZeRO-3 gathers 4 transformer blocks whole" in (run_dir(config) / "train.log").read_text()  # 2 decoder layers + 2 vision blocks
    # The run folder's ZeRO JSON is what the ranks were given: ZeRO-3's settings from the model's sizes.
    written = json.loads((run_dir(config) / "ds_config.json").read_text())
    cfg = load_config(run_dir(config) / "config.yaml")
    assert written == deepspeed_config(cfg, zero3_stats(cfg)) and isinstance(written["zero_optimization"]["stage3_prefetch_bucket_size"], int)
    final = run_dir(config) / "final"
    adapter = load_file(str(final / "adapter_model.safetensors"))
    base = tensors_by_component(tiny_model_dir / "model.safetensors")
    saved = {}
    for k, v in adapter.items():
        saved.setdefault(component_of(k), {})[k] = v
    assert set(saved) == {"llm", "merger", "deepstack", "vision"}  # lm_head frozen
    # Every vision block's LoRA trained, the first one included (B starts at zero).
    vision_b = {k: v for k, v in saved["vision"].items() if "lora_B" in k}
    blocks = {k.split("blocks.", 1)[1].split(".", 1)[0] for k in vision_b}
    assert blocks == {"0", "1"} and all(v.abs().max() > 0 for v in vision_b.values()), {k: float(v.abs().max()) for k, v in vision_b.items()}
    # The fully trained projection is saved whole and changed.
    for name, t in {**base["merger"], **base["deepstack"]}.items():
        key = next(k for k in adapter if k.endswith(name.split("visual.", 1)[1]) and "visual" in k)
        assert not adapter[key].equal(t), name


def test_the_projector_alone_trains_on_one_process_through_text_only_batches(tmp_path, demo_data, tiny_model_dir):
    """The guide's alignment stage: only the merger (and the DeepStack mergers) train, the LLM and
    lm_head frozen. On one rank a text-only micro-batch got no dummy image, so no trained parameter
    took part in it and DeepSpeed's backward failed (ZeRO-2: "IndexError: list index out of range",
    its gradient bucket empty). Such a micro-batch now carries the dummy image
    (training_data.gets_dummy_image)."""
    train_file, _ = demo_data
    text_only = write_jsonl(tmp_path / "text.jsonl", [{"messages": [{"role": "user", "content": f"Count to {i}."}, {"role": "assistant", "content": " ".join(str(j) for j in range(i))}]} for i in range(2, 10)])
    config = write_config(
        tmp_path, demo_data, "projector", strategy="full", components={"llm": "frozen", "lm_head": "frozen"},
        data={"train": f"{text_only},{train_file}%13", "eval": None, "packing": False},  # 8 text-only and 8 image records, one a step
        optim={"per_device_batch": 1, "max_steps": 6}, schedule={"eval_steps": 100, "save_steps": 100},
    )
    result = train(config)
    assert result.returncode == 0, result.stdout + result.stderr
    base = tensors_by_component(tiny_model_dir / "model.safetensors")
    trained = tensors_by_component(run_dir(config) / "final" / "model.safetensors")
    for component in ("llm", "lm_head", "vision"):
        assert all(trained[component][name].equal(t) for name, t in base[component].items()), component
    assert any(not trained["merger"][name].equal(t) for name, t in base["merger"].items())


def test_ctrl_c_saves_and_resume_reproduces_the_loss_curve(tmp_path, demo_data):
    # LoRA dropout on, and a tolerance far below what a different dropout mask changes (~1e-3 here):
    # the resumed run must restore the RNG state along with weights, optimizer and data order.
    sections = {"optim": {"max_steps": 10, "per_device_batch": 2}, "lora": {"dropout": 0.1}, "schedule": {"log_steps": 1, "eval_steps": 100, "save_steps": 100}, "data": {"packing": True, "max_seq_length": 256}}
    reference = write_config(tmp_path, demo_data, "ref", **sections)
    result = train(reference)
    assert result.returncode == 0, result.stdout + result.stderr
    ref = {r["step"]: r["loss"] for r in read_all(run_dir(reference) / "metrics.jsonl") if r["kind"] == "train"}
    start = next(r for r in read_all(run_dir(reference) / "metrics.jsonl") if r["kind"] == "start")
    assert start["packing"] and 0 <= start["padding"] < 0.1 and 0 <= start["padding_unpacked"] < 1  # both reported

    config = write_config(tmp_path, demo_data, "interrupted", **sections)
    rd = run_dir(config)
    proc = subprocess.Popen([sys.executable, "-m", "qvltune", "train", str(config), "--no-live"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait for step 3, then press Ctrl-C
        steps = [r["step"] for r in read_all(rd / "metrics.jsonl") if r["kind"] == "train"]
        if steps and steps[-1] >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, out + err
    assert "--resume" in err
    saved = [p for p in rd.glob("checkpoint-*") if (p / "qvltune-complete").exists()]
    assert len(saved) == 1
    stopped_at = int(saved[0].name.split("-")[1])
    assert 3 <= stopped_at < 10
    assert not (rd / "final").exists()

    result = train(config, "--resume")
    assert result.returncode == 0, result.stdout + result.stderr
    # it says where it resumes, and does not print the earlier attempt's lines again
    assert f"resuming from checkpoint-{stopped_at} (step {stopped_at} of 10)" in result.stdout, result.stdout
    assert f"step {stopped_at}/10 " not in result.stdout and "checkpoint saved" not in result.stdout.split("resuming from")[0]
    assert "Training completed: 10 steps" in result.stdout
    resumed = [r for r in read_all(rd / "metrics.jsonl") if r["kind"] == "train"]
    after = {r["step"]: r["loss"] for r in resumed if r["step"] > stopped_at}
    assert sorted(after) == list(range(stopped_at + 1, 11))
    for step, loss in after.items():
        assert loss == pytest.approx(ref[step], rel=1e-6), (step, loss, ref[step])
    assert (rd / "final" / "adapter_model.safetensors").exists()


def test_existing_run_is_not_clobbered_and_bad_config_is_one_clear_error(tmp_path, demo_data):
    # A run shorter than log_steps logs no loss of its own: it still ends with its summary, exit 0.
    config = write_config(tmp_path, demo_data, "twice", optim={"max_steps": 2}, schedule={"save_steps": 1, "log_steps": 10})
    first = train(config)
    assert first.returncode == 0 and "Training completed: 2 steps, loss " in first.stdout, first.stdout + first.stderr
    assert "launching:" not in first.stderr and "launching:" in (run_dir(config) / "train.log").read_text()  # behind --verbose
    log_size = (run_dir(config) / "train.log").stat().st_size
    # --resume on a finished run says so and what to do next, without starting DeepSpeed again.
    done = train(config, "--resume")
    assert done.returncode == 0 and "already completed" in done.stdout and "next: qvltune merge" in done.stdout, done.stdout + done.stderr
    assert (run_dir(config) / "train.log").stat().st_size == log_size and "checkpoint saved" not in done.stdout
    again = train(config)
    assert again.returncode == 1 and "already holds" in again.stderr and "--resume" in again.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "b", "model": {"path": "builtin:tiny"}, "data": {"train": "x.jsonl"}, "optim": {"lr": 1}}))
    result = train(bad)
    assert result.returncode == 1 and "optim.lr: unknown key" in result.stderr and "Traceback" not in result.stderr
    missing = write_config(tmp_path, demo_data, "nodata", data={"train": str(tmp_path / "nope.jsonl")})
    result = train(missing)
    assert result.returncode == 1 and "nope.jsonl" in result.stderr and "Traceback" not in result.stderr
    assert json.loads((run_dir(config) / "data_index.json").read_text())["train"]


def grad_norms(config: Path) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in read_all(run_dir(config) / "metrics.jsonl") if r["kind"] == "train"}


@pytest.mark.parametrize("stage", [2, 3])
def test_batch_split_changes_nothing_and_frozen_weights_stay_bitwise(tmp_path, demo_data, uneven_data, tiny_model_dir, stage):
    """The loss is the mean over every labelled token of the accumulated batch, however the batch of
    4 is split: 2 ranks x 2 == 1 rank x 2 x 2 accumulation (ZeRO-2 and ZeRO-3), and on one rank
    4 x 1 == 2 x 2 == 1 x 4 (ZeRO-2), in loss and gradient norm, on answers of 1 to ~40 words (a mean
    of per-micro-batch means would differ). After the real run every frozen tensor (the vision tower)
    is bitwise the base's and every trained one changed (ZeRO-3 gathers the whole model to save it)."""
    common = {"strategy": "full", "deepspeed": {"stage": stage}, "data": {"train": str(uneven_data), "eval": None}, "schedule": {"log_steps": 1, "eval_steps": 100, "save_steps": 100}}
    splits = {"2x1-2ranks": (2, 1, 2), "2x2": (2, 2, 1)}
    if stage == 2:
        splits.update({"4x1": (4, 1, 1), "1x4": (1, 4, 1)})
    configs = {
        name: write_config(tmp_path, demo_data, f"{name}-z{stage}", launch={"cpu_processes": ranks}, optim={"per_device_batch": batch, "grad_accum": accum, "max_steps": 3}, **common)
        for name, (batch, accum, ranks) in splits.items()
    }
    for config in configs.values():
        result = train(config)
        assert result.returncode == 0, result.stdout + result.stderr
    reference = configs["2x2"]
    for name, config in configs.items():
        assert sorted(losses(config)) == [1, 2, 3]
        for step in (1, 2, 3):
            assert losses(config)[step] == pytest.approx(losses(reference)[step], rel=1e-4), (name, step)
            assert grad_norms(config)[step] == pytest.approx(grad_norms(reference)[step], rel=1e-4), (name, step)

    base = tensors_by_component(tiny_model_dir / "model.safetensors")
    trained = tensors_by_component(run_dir(configs["2x1-2ranks"]) / "final" / "model.safetensors")
    for component in ("merger", "deepstack", "llm", "lm_head"):
        for name, t in base[component].items():
            assert not trained[component][name].equal(t), f"{name} did not change"
    for name, t in base["vision"].items():
        assert trained["vision"][name].equal(t), f"frozen {name} changed"
    assert next(r for r in read_all(run_dir(configs["2x1-2ranks"]) / "metrics.jsonl") if r["kind"] == "start")["world_size"] == 2


def test_optimizer_offload_changes_where_adam_runs_not_what_it_computes(tmp_path, demo_data):
    """ZeRO-3 + CPU optimizer offload follows ZeRO-2's loss curve: decoupled weight decay (AdamW) on
    the CPU too. (accelerate rebuilds the optimizer for offload; handed anything but torch's AdamW
    it builds L2-regularised Adam, which moves every zero-gradient LoRA A matrix by a full step.)"""
    common = {"strategy": "mixed", "optim": {"per_device_batch": 4, "max_steps": 3, "weight_decay": 0.1}, "schedule": {"log_steps": 1, "eval_steps": 100, "save_steps": 100}}
    plain = write_config(tmp_path, demo_data, "z2", deepspeed={"stage": 2}, **common)
    offload = write_config(tmp_path, demo_data, "z3-offload", deepspeed={"stage": 3, "offload_optimizer": True}, **common)
    for config in (plain, offload):
        result = train(config)
        assert result.returncode == 0, result.stdout + result.stderr
    z2, z3 = losses(plain), losses(offload)
    assert sorted(z2) == sorted(z3) == [1, 2, 3]
    for step in (2, 3):
        assert z3[step] == pytest.approx(z2[step], rel=1e-4), (step, z2, z3)


def test_zero3_two_processes_stop_and_resume_reproduce_the_run(tmp_path, demo_data):
    """ZeRO-3 checkpoints (sharded over 2 ranks) resume to the same losses as an uninterrupted run."""
    sections = {"strategy": "mixed", "deepspeed": {"stage": 3}, "launch": {"cpu_processes": 2}, "optim": {"max_steps": 6, "per_device_batch": 2}, "schedule": {"log_steps": 1, "eval_steps": 100, "save_steps": 100}}
    reference = write_config(tmp_path, demo_data, "z3-ref", **sections)
    assert train(reference).returncode == 0
    ref = losses(reference)
    config = write_config(tmp_path, demo_data, "z3-stop", **sections)
    rd = run_dir(config)
    proc = subprocess.Popen([sys.executable, "-m", "qvltune", "train", str(config), "--no-live"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not [r for r in read_all(rd / "metrics.jsonl") if r["kind"] == "train" and r["step"] >= 2]:
        time.sleep(0.2)
    (rd / "STOP").write_text("stop\n")  # what Ctrl-C in `qvltune train` does
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, out + err
    (saved,) = [p for p in rd.glob("checkpoint-*") if (p / "qvltune-complete").exists()]
    stopped_at = int(saved.name.split("-")[1])
    assert stopped_at < 6
    result = train(config, "--resume")
    assert result.returncode == 0, result.stdout + result.stderr
    after = {r["step"]: r["loss"] for r in read_all(rd / "metrics.jsonl") if r["kind"] == "train" and r["step"] > stopped_at}
    assert sorted(after) == list(range(stopped_at + 1, 7))
    for step, loss in after.items():
        assert loss == pytest.approx(ref[step], rel=1e-4), (step, loss, ref[step])


def test_zero3_gathers_each_transformer_block_whole(tiny_model_dir):
    """Under ZeRO-3 every decoder layer and vision block is one gather unit (one hook pair per block,
    not per Linear); the ZeRO-3 runs above train through them (their train.log says how many)."""
    from deepspeed.utils import get_z3_leaf_modules

    from qvltune.model import load_model
    from qvltune.zero import zero3_leaf_blocks

    model = load_model(str(tiny_model_dir), dtype="float32", attn_implementation="sdpa")
    cfg = model.config
    assert zero3_leaf_blocks(model) == cfg.text_config.num_hidden_layers + cfg.vision_config.depth
    leaves = get_z3_leaf_modules(model)
    assert {type(m).__name__ for m in leaves} == {"Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock"}
    assert model.model.language_model.layers[0] in leaves and model.model.language_model.layers[0].self_attn not in leaves


@pytest.mark.parametrize(("components", "vision_input_grad"), [({"vision": "lora"}, True), ({}, False)])
def test_zero3_trained_blocks_see_inputs_that_require_grad(tmp_path, tiny_model_dir, tiny_processor, components, vision_input_grad):
    """DeepSpeed reduces a leaf block's gradients in a full backward hook, which fires after the
    block's backward only when an input requires grad: every trained block gets such an input (the
    first vision block behind the frozen patch embedding included), a frozen tower does not (it
    would run a backward for nothing)."""
    from qvltune.data.packing import PaddedCollator
    from qvltune.data.tokenize import Encoder
    from qvltune.model import apply_strategy, load_model, transformer_blocks
    from qvltune.zero import zero3_leaf_blocks
    from test_invariants import MODEL_INPUTS, config
    from test_packing import records

    model = apply_strategy(load_model(str(tiny_model_dir), dtype="float32", attn_implementation="sdpa"), config("mixed", components))
    zero3_leaf_blocks(model)
    seen: dict[str, bool] = {}
    for i, block in enumerate(transformer_blocks(model)):  # after zero3_leaf_blocks' hooks: sees what the block sees
        block.register_forward_pre_hook(lambda m, args, name=f"{type(block).__name__}-{i}": seen.__setitem__(name, args[0].requires_grad))
    model.train()
    batch = PaddedCollator(0)([[Encoder(tiny_processor).encode(records(tmp_path)[0])]])
    model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS})
    assert seen == {
        "Qwen3VLVisionBlock-0": vision_input_grad, "Qwen3VLVisionBlock-1": vision_input_grad,
        "Qwen3VLTextDecoderLayer-2": True, "Qwen3VLTextDecoderLayer-3": True,
    }
