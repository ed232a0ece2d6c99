"""Time to the first step (issue 21): what ``qvltune train`` overlaps and cuts before the ranks train,
and what each cut must keep -- the data check before any rank reads the data, DeepSpeed's own
launcher with the arguments its runner would give it; and the worker's start-up choices that need
no launch (where the weights load, eval rows built like training rows)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import write_image, write_jsonl
from qvltune import launch as launch_mod
from qvltune import node_ranks
from qvltune.config import parse_config
from qvltune.data_ready import DATA_READY, PENDING_ENV, mark_data_ready, wait_for_data
from qvltune.errors import UserError
from qvltune.launch import build_launch, master_port_of, one_node_launch
from qvltune.model import load_model
from qvltune.node_ranks import NodeRanks, RankCommand, rank_commands, within_visible
from qvltune.worker import weights_device

REPO = Path(__file__).parents[1]


# ----------------------------------------------------------------------------------------------
# Where the weights load, and the eval rows


def _cfg(**deepspeed):
    return parse_config({"name": "x", "model": {"path": "builtin:tiny"}, "data": {"train": "x.jsonl"}, "deepspeed": deepspeed})


def test_weights_load_straight_to_the_ranks_gpu_except_where_deepspeed_places_them():
    assert weights_device(_cfg(stage=2), cuda=True, local_rank=3) == torch.device("cuda", 3)
    assert weights_device(_cfg(stage=0), cuda=True, local_rank=0) == torch.device("cuda", 0)
    assert weights_device(_cfg(stage=2), cuda=False, local_rank=0) is None  # CPU runs: the host
    assert weights_device(_cfg(stage=3), cuda=True, local_rank=1) is None  # zero.Init partitions at load
    assert weights_device(_cfg(stage=3, offload_params=True), cuda=True, local_rank=1) is None


def test_a_device_map_load_gives_the_same_weights(tiny_model_dir):
    plain = load_model(str(tiny_model_dir), dtype="float32")
    placed = load_model(str(tiny_model_dir), dtype="float32", device=torch.device("cpu"))
    a, b = plain.state_dict(), placed.state_dict()
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) and b[k].device.type == "cpu" for k in a)


def test_eval_rows_are_packed_and_collated_exactly_like_training_rows(tmp_path, demo_data, tiny_model_dir):
    """Evaluation runs the fast path: packed rows from the same plan, the same collator (varlen
    sample boundaries, no 4-D mask), hence the same compiled layers and attention kernels."""
    from qvltune.training_data import build_datasets, prepare_data_side

    train, evals = demo_data
    cfg = parse_config({
        "name": "x", "output_dir": str(tmp_path), "model": {"path": str(tiny_model_dir), "attn_implementation": "varlen"},
        "data": {"train": str(train), "eval": str(evals), "packing": True, "max_seq_length": 512},
    })
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    processor, index, train_groups, eval_groups, _ = prepare_data_side(cfg, run_dir)
    model = load_model(str(tiny_model_dir), dtype="float32", attn_implementation="varlen")
    _, train_set, eval_set, collator = build_datasets(cfg, run_dir, model, processor, index, train_groups, eval_groups)
    assert len(eval_set) < len(index.eval)  # several held-out samples per row
    train_batch, eval_batch = collator([train_set[0], train_set[1]]), collator([eval_set[0], eval_set[1]])
    assert set(train_batch) == set(eval_batch)
    assert "cu_seq_lens_q" in eval_batch and eval_batch.get("attention_mask") is None
    assert len(eval_batch["cu_seq_lens_q"]) - 1 >= sum(len(eval_set[i]) for i in range(2))  # a segment per sample (and per row end padding)


# ----------------------------------------------------------------------------------------------
# DeepSpeed's launcher without its runner (one node)


def runner_command(argv: list[str], monkeypatch, devices: int = 8) -> list[str]:
    """The command DeepSpeed's own runner starts for ``argv`` (its ``main``, with the process start
    captured). ``devices``: what its accelerator counts (a GPU machine cannot exist here)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.launcher import runner

    started = []

    class Captured:
        returncode = 0

        def __init__(self, cmd, env=None, **kwargs):
            started.append(cmd)

        def wait(self):
            return 0

    monkeypatch.setattr(runner.subprocess, "Popen", Captured)
    monkeypatch.setattr(get_accelerator(), "device_count", lambda: devices)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    prefix = 1 if argv[0].endswith("deepspeed") else 3
    runner.main(argv[prefix:])
    return started[0]


@pytest.mark.parametrize(
    "launch, gpu_count, visible, resume",
    [
        ({"cpu_processes": 2}, 0, None, False),  # CPU ranks
        ({"gpus": "all"}, 4, None, True),  # every GPU, --resume passed on to the ranks
        ({"gpus": [0, 2]}, 4, None, False),  # some GPUs
        ({"gpus": "all"}, 2, "1,3", False),  # within CUDA_VISIBLE_DEVICES
    ],
)
def test_the_direct_launch_is_what_deepspeeds_runner_would_start(tmp_path, monkeypatch, launch, gpu_count, visible, resume):
    cfg = parse_config({"name": "x", "model": {"path": "builtin:tiny"}, "data": {"train": "d.jsonl"}, "launch": launch})
    argv, _ = build_launch(cfg, run_dir=tmp_path, gpu_count=gpu_count, resume=resume, master_port=29777, visible_devices=visible)
    direct = one_node_launch(argv)
    assert direct is not None and "deepspeed.launcher.launch" in direct
    assert direct == runner_command(argv, monkeypatch)
    assert rank_commands(direct) is not None  # qvltune starts these ranks itself (not the launcher)
    # The run's shared-memory buffers are found by this port after the run (remove_shm_buffers).
    assert master_port_of(direct) == master_port_of(argv) == 29777


def test_commands_that_need_the_runner_keep_it(tmp_path):
    cfg = parse_config({"name": "x", "model": {"path": "builtin:tiny"}, "data": {"train": "d.jsonl"}, "launch": {"hostfile": "hosts", "nodes": 2}})
    argv, _ = build_launch(cfg, run_dir=tmp_path, gpu_count=8, master_port=29777)
    assert one_node_launch(argv) is None  # several nodes over ssh: the runner's job
    assert one_node_launch(["torchrun", "--nproc_per_node", "2", "x.py"]) is None


def test_the_runners_default_hostfile_keeps_the_runner(tmp_path, monkeypatch):
    """DeepSpeed's runner reads /job/hostfile when no hostfile is given, and then starts nodes over
    ssh: with that file there, the one-node translation would run a different job."""
    from deepspeed.launcher.runner import DLTS_HOSTFILE

    assert str(launch_mod.RUNNER_DEFAULT_HOSTFILE) == DLTS_HOSTFILE
    cfg = parse_config({"name": "x", "model": {"path": "builtin:tiny"}, "data": {"train": "d.jsonl"}, "launch": {"gpus": "all"}})
    argv, _ = build_launch(cfg, run_dir=tmp_path, gpu_count=8, master_port=29777)
    hostfile = tmp_path / "job" / "hostfile"
    monkeypatch.setattr(launch_mod, "RUNNER_DEFAULT_HOSTFILE", hostfile)
    assert one_node_launch(argv) is not None  # not there: one node
    hostfile.parent.mkdir()
    hostfile.write_text("worker-0 slots=8\nworker-1 slots=8\n")
    assert one_node_launch(argv) is None


# ----------------------------------------------------------------------------------------------
# The ranks without DeepSpeed's launcher process (qvltune.node_ranks)

PROBE_RANK = """
import json, os, sys
before = json.loads(os.environ["PROBE_BEFORE"])
changed = {k: v for k, v in os.environ.items() if before.get(k) != v and k != "PROBE_BEFORE"}
out = os.path.join(sys.argv[-1], "rank" + os.environ["RANK"] + ".json")
json.dump({"argv": sys.argv[1:-1], "env": changed, "exe": sys.executable}, open(out, "w"))
"""


def started_ranks(argv: list[str], work: Path, start) -> dict[str, dict]:
    """What each rank process of a launcher command saw (its arguments, the variables it was given
    on top of the caller's), with the ranks started by ``start(argv, env)``."""
    out = work / f"seen-{len(list(work.glob('seen-*')))}"
    out.mkdir()
    (work / "probe_rank.py").write_text(PROBE_RANK)
    env = {**os.environ, "PYTHONPATH": str(work), "OMP_NUM_THREADS": "1"}
    env.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)  # set in this process by an earlier import of DeepSpeed
    env["PROBE_BEFORE"] = json.dumps(env)
    assert start([*argv, str(out)], env) == 0
    return {p.name: json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))}


@pytest.mark.parametrize("world, node_rank", [({"localhost": [0, 1]}, 0), ({"node-a": [0, 1], "node-b": [2, 3]}, 1)])
def test_the_ranks_are_started_as_deepspeeds_launcher_starts_them(tmp_path, world, node_rank):
    """Each rank gets the arguments and variables the real launcher gives it (the launcher's own
    torch import leaves inductor's /tmp cache folder in its environment: qvltune.compile_cache
    counts that as unset, so the ranks lose nothing without it). Nodes of equal size, as qvltune
    starts them: with unequal ones DeepSpeed's local ranks are the global rank modulo this node's
    size, not the rank's place on its node."""
    info = base64.urlsafe_b64encode(json.dumps(world).encode()).decode()
    argv = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={info}", "--master_addr=10.1.2.3", "--master_port=29781"]
    argv += [f"--node_rank={node_rank}"] if node_rank else []
    argv += ["--module", "--enable_each_rank_log=None", "--log_level=info", "probe_rank", "--run-dir", "x"]
    theirs = started_ranks(argv, tmp_path, lambda a, env: subprocess.run(a, env=env, cwd=tmp_path, capture_output=True, timeout=120).returncode)
    for seen in theirs.values():
        seen["env"].pop("TORCHINDUCTOR_CACHE_DIR", None)
    ours = started_ranks(argv, tmp_path, lambda a, env: NodeRanks(rank_commands(a), env).wait())
    assert ours == theirs and len(ours) == len(list(world.values())[node_rank]), (ours, theirs)
    first = ours["rank2.json"] if node_rank else ours["rank0.json"]
    assert first["env"]["LOCAL_RANK"] == "0" and first["argv"] == ["--local_rank=0", "--run-dir", "x"]
    assert first["env"]["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"  # what DeepSpeed's import leaves the launcher's ranks


def test_a_launcher_command_with_options_not_read_here_is_left_to_the_launcher():
    base = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", "--world_info=eyJsb2NhbGhvc3QiOiBbMF19", "--master_port=1"]
    assert rank_commands(base + ["--module", "qvltune.rank"]) is not None
    assert rank_commands(base + ["--bind_cores_to_rank", "--module", "qvltune.rank"]) is None  # numactl: the launcher's
    assert rank_commands(base + ["--enable_each_rank_log=/logs", "--module", "qvltune.rank"]) is None
    assert rank_commands(base + ["qvltune/worker.py"]) is None  # a script, not --module
    assert rank_commands(["torchrun", "--nproc_per_node", "2", "x.py"]) is None
    uneven = base64.urlsafe_b64encode(json.dumps({"a": [0, 1], "b": [0, 1, 2]}).encode()).decode()
    assert rank_commands([*base[:4], f"--world_info={uneven}", "--master_port=1", "--module", "qvltune.rank"]) is None


def test_ranks_run_on_the_users_gpus_when_they_are_named_by_uuid():
    """``--num_gpus N`` slots are positions in a CUDA_VISIBLE_DEVICES of UUIDs or MIG instances, not
    physical GPU numbers; numeric lists arrive as the GPU numbers themselves (``--include``)."""
    assert within_visible("0,1", "MIG-aa,MIG-bb,MIG-cc") == "MIG-aa,MIG-bb"
    assert within_visible("1", "GPU-x, GPU-y") == "GPU-y"
    assert within_visible("1,3", "1,3") == "1,3" and within_visible("0,1", "") == "0,1"
    assert within_visible("2", "GPU-x") == "2"  # more slots than named GPUs: left as given


def test_when_a_rank_fails_the_others_are_stopped_and_its_code_is_the_nodes(tmp_path):
    """As DeepSpeed's launcher: the first failure's exit code, and the ranks still running are
    stopped (SIGTERM to the process tree) instead of waiting on a peer that is gone."""
    (tmp_path / "hang.py").write_text("import time\ntime.sleep(60)\n")
    hang = [sys.executable, str(tmp_path / "hang.py")]
    ranks = NodeRanks([RankCommand(0, 0, hang, {}), RankCommand(1, 1, [sys.executable, "-c", "import sys; sys.exit(17)"], {})])
    t = time.time()
    assert ranks.wait() == 17 and time.time() - t < 10
    assert ranks.processes[0].returncode == -15  # stopped, not left running
    ranks = NodeRanks([RankCommand(0, 0, [sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"], {})])
    assert ranks.wait() == 128 + 9  # a signal, as a shell reports it


def test_a_rank_that_ignores_sigterm_is_killed_with_its_children(tmp_path, monkeypatch):
    """The teardown's second half: what SIGTERM did not stop is killed, process tree and all."""
    monkeypatch.setattr(node_ranks, "TEARDOWN_SECONDS", 1.0)
    (tmp_path / "stubborn.py").write_text(
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
        f"open({str(tmp_path / 'child.pid')!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n"
    )
    fail = [sys.executable, "-c", "import time, sys; time.sleep(1.5); sys.exit(3)"]
    ranks = NodeRanks([RankCommand(0, 0, [sys.executable, str(tmp_path / "stubborn.py")], {}), RankCommand(1, 1, fail, {})])
    t = time.time()
    assert ranks.wait() == 3 and time.time() - t < 15
    assert ranks.processes[0].returncode == -9
    grandchild = int((tmp_path / "child.pid").read_text())
    gone = not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
    assert gone, "the rank's own child outlived the teardown"


# ----------------------------------------------------------------------------------------------
# The data check beside the launcher


def pending(pid: int | None = None) -> dict[str, str]:
    return {PENDING_ENV: str(pid or os.getpid())}


def test_a_rank_waits_for_this_attempts_data_never_an_earlier_ones(tmp_path, demo_data):
    from qvltune.train import prepare_folder

    cfg = parse_config({"name": "r", "output_dir": str(tmp_path / "runs"), "model": {"path": "builtin:tiny"}, "data": {"train": str(demo_data[0])}})
    rd = cfg.run_dir
    rd.mkdir(parents=True)
    (rd / "data_index.json").write_text('{"earlier": "attempt"}')  # what an earlier attempt left
    mark_data_ready(rd, 9.0)
    prepare_folder(cfg, resume=True)
    assert not (rd / DATA_READY).exists() and not (rd / "data_index.json").exists()
    got = []
    waiter = threading.Thread(target=lambda: got.append(wait_for_data(rd, pending(), poll=0.01)), daemon=True)
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive(), "a rank went on before this attempt's check was done"
    mark_data_ready(rd, 1.25)
    waiter.join(5)
    assert got == [1.25]
    assert wait_for_data(rd, {}) is None  # started by hand: nothing to wait for


def test_the_command_prepares_a_zero3_run_without_torch(tmp_path, demo_data, tiny_model_dir):
    """ZeRO-3's settings need the model built on the meta device (torch, transformers): ~15 s of
    the command's time before the launcher started on an H200 (8B). Everything ``qvltune train``
    does before it starts the launcher (the config check, the run folder, the launch command) runs
    without them now; rank 0 writes the ZeRO JSON it was given (test_training's ZeRO-3 run checks
    it), and an earlier attempt's JSON is gone."""
    rd = tmp_path / "runs" / "z3"
    rd.mkdir(parents=True)
    (rd / "ds_config.json").write_text('{"earlier": "attempt"}')
    code = (
        "import sys\n"
        "from qvltune.config import parse_config\n"
        "from qvltune.launch import one_node_launch\n"
        "from qvltune.train import launch_command, prepare_folder, validate\n"
        f"cfg = parse_config({{'name': 'z3', 'output_dir': {str(tmp_path / 'runs')!r}, 'model': {{'path': {str(tiny_model_dir)!r}}}, 'data': {{'train': {str(demo_data[0])!r}}}, 'deepspeed': {{'stage': 3}}, 'launch': {{'cpu_processes': 2}}, 'optim': {{'bf16': False, 'optimizer': 'adamw_torch'}}}})\n"
        "validate(cfg, [])\n"
        "prepare_folder(cfg, resume=True)\n"
        "assert one_node_launch(launch_command(cfg, 0, False, master_port=29555)[0])\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]" and not (rd / "ds_config.json").exists()


def test_resume_keeps_the_list_of_samples_skipped_in_training(tmp_path, demo_data):
    """skipped.jsonl also lists what the earlier attempt's ranks skipped while training: a resumed
    attempt keeps it (prepare_index rewrites it only when its own check skips records)."""
    from qvltune.train import prepare_folder

    cfg = parse_config({"name": "r", "output_dir": str(tmp_path / "runs"), "model": {"path": "builtin:tiny"}, "data": {"train": str(demo_data[0])}})
    rd = cfg.run_dir
    rd.mkdir(parents=True)
    (rd / "skipped.jsonl").write_text('{"file": "train.jsonl", "line": 3, "reason": "image unreadable"}\n')
    prepare_folder(cfg, resume=True)
    assert (rd / "skipped.jsonl").read_text().count("\n") == 1


class LaunchSeen(Exception):
    pass


@pytest.mark.parametrize("launch, beside", [({"cpu_processes": 2}, True), ({"hostfile": "hosts", "nodes": 2}, False)])
def test_the_data_is_checked_beside_the_launcher_only_where_the_ranks_are_its_children(tmp_path, demo_data, monkeypatch, launch, beside):
    """One node: the launcher starts first, its ranks told to wait (QVLTUNE_DATA_PENDING). A hostfile:
    DeepSpeed's runner starts the ranks over ssh, which passes that variable on to none of them, so
    the data index is written before the launch and nothing is pending. (What the launch would
    start is captured: several nodes cannot exist here.)"""
    from qvltune import train as train_mod

    cfg = parse_config({
        "name": "w", "output_dir": str(tmp_path / "runs"), "model": {"path": "builtin:tiny"}, "launch": launch,
        "data": {"train": str(demo_data[0]), "eval_split": 0.0, "index_cache": False}, "optim": {"bf16": False, "optimizer": "adamw_torch"},
    })
    seen = {}

    def start(argv, env, log_path, run_dir):
        seen.update(argv=argv, pending=PENDING_ENV in env, index=(run_dir / "data_index.json").exists(), ready=(run_dir / DATA_READY).exists())
        raise LaunchSeen

    monkeypatch.setattr(train_mod, "start", start)
    with pytest.raises(LaunchSeen):
        train_mod.run_training(cfg, resume=False, live=False, gpus=[])
    assert ("deepspeed.launcher.launch" in seen["argv"]) == beside
    assert seen["pending"] == beside
    assert seen["index"] == seen["ready"] == (not beside)  # a hostfile's ranks find this attempt's index


def test_a_rank_stops_waiting_when_qvltune_train_is_gone(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    got = []

    def wait():
        try:
            wait_for_data(tmp_path, pending(int(gone)), poll=0.01)
        except UserError as e:
            got.append(e.message)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    waiter.join(5)
    assert got and "ended before it finished checking the data" in got[0]


RANK_STAND_IN = """
import sys, time
from qvltune.data_ready import wait_for_data
wait_for_data(Path(sys.argv[1]))
Path(sys.argv[1], "rank-read-the-data").write_text("yes")
time.sleep(60)
"""


def test_a_failed_data_check_stops_the_ranks_already_started(tmp_path, monkeypatch):
    """The launcher starts before the check: when the check fails, its error is the run's, and the
    ranks are stopped before any of them reads the data. (The launched command -- chosen as for a
    real run: one node, DeepSpeed's launcher directly -- is replaced by a stand-in rank running the
    real wait: DeepSpeed itself is started by the slow suite.)"""
    from qvltune import train as train_mod

    data = tmp_path / "data"
    image = write_image(data / "a.png")
    write_jsonl(data / "train.jsonl", [
        {"image": image.name, "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]},
        {"image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "blue"}]},
    ])
    cfg = parse_config({
        "name": "bad", "output_dir": str(tmp_path / "runs"), "model": {"path": "builtin:tiny"},
        "data": {"train": str(data / "train.jsonl"), "eval_split": 0.0, "index_cache": False}, "launch": {"cpu_processes": 1},
        "optim": {"bf16": False, "optimizer": "adamw_torch"},
    })
    rd = cfg.run_dir
    real_start = train_mod.start
    launched = []

    def start(argv, env, log_path, run_dir):
        launched.append(argv)
        stand_in = [sys.executable, "-c", RANK_STAND_IN, str(rd)]
        return real_start(stand_in, {**env, "PYTHONPATH": os.pathsep.join(sys.path)}, log_path, run_dir)

    monkeypatch.setattr(train_mod, "start", start)
    with pytest.raises(UserError) as e:
        train_mod.run_training(cfg, resume=False, live=False, gpus=[])
    assert "train.jsonl:2" in e.value.message and "missing.png" in e.value.message
    assert launched and "deepspeed.launcher.launch" in launched[0]  # launched before the check ended
    deadline = time.time() + 15
    while time.time() < deadline and any(str(rd) in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])):
        time.sleep(0.2)
    assert not any(str(rd) in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])), "the launched rank is still running"
    assert not (rd / "rank-read-the-data").exists() and not (rd / DATA_READY).exists()


@pytest.mark.slow
def test_a_bad_record_stops_a_run_whose_deepspeed_already_started(tmp_path, demo_data):
    """The whole command: DeepSpeed is launched before the data check ends; a record whose image is
    missing is still the run's one clear error (exit 1, file and line), and no rank is left."""
    from test_faults import no_workers_left
    from test_training import run_dir, train, write_config

    data = tmp_path / "data"
    images = [write_image(data / f"{i}.png", (64, 48), (i * 20, 0, 0)) for i in range(12)]
    records = [{"image": p.name, "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": f"red {i}"}]} for i, p in enumerate(images)]
    records[6]["image"] = "gone.png"
    write_jsonl(data / "train.jsonl", records)
    config = write_config(tmp_path, demo_data, "late-bad", data={"train": str(data / "train.jsonl"), "eval": None})
    result = train(config)
    rd = run_dir(config)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "train.jsonl:7" in result.stderr and "gone.png" in result.stderr and "Traceback" not in result.stderr
    assert "deepspeed.launcher.launch" in (rd / "launch.sh").read_text()  # it had been launched
    assert no_workers_left(rd) and not (rd / "data_index.json").exists()


def test_force_starts_a_fresh_run_folder_at_once_and_deletes_the_earlier_one_beside_it(tmp_path, demo_data):
    from qvltune.train import prepare_folder

    cfg = parse_config({"name": "r", "output_dir": str(tmp_path / "runs"), "model": {"path": "builtin:tiny"}, "data": {"train": str(demo_data[0])}})
    rd = cfg.run_dir
    (rd / "checkpoint-10").mkdir(parents=True)
    (rd / "checkpoint-10" / "optimizer.pt").write_bytes(b"x" * 1000)
    stale = rd.with_name(f".{rd.name}.deleting-1")  # left by an interrupted deletion
    (stale / "checkpoint-5").mkdir(parents=True)
    with pytest.raises(UserError):
        prepare_folder(cfg, resume=False)  # no --force: the earlier run is kept
    removing = prepare_folder(cfg, resume=False, force=True)
    assert sorted(p.name for p in rd.iterdir()) == ["config.yaml"]  # this run's folder, at once
    removing.join(10)
    assert sorted(p.name for p in rd.parent.iterdir()) == ["r"]  # the earlier run and the stale sibling are gone

    # A run folder that links to other storage stays a link; what it points to is emptied.
    storage = tmp_path / "big-disk" / "r"
    (storage / "checkpoint-20").mkdir(parents=True)
    (rd / "config.yaml").unlink()
    rd.rmdir()
    rd.symlink_to(storage)
    prepare_folder(cfg, resume=False, force=True).join(10)
    assert rd.is_symlink() and sorted(p.name for p in storage.iterdir()) == ["config.yaml"]
    assert sorted(p.name for p in storage.parent.iterdir()) == ["r"]


def test_the_first_local_rank_reads_its_model_folders_weights_ahead(tmp_path, demo_data, tiny_model_dir, monkeypatch):
    from qvltune.train import prepare_folder
    from qvltune.weights_prefetch import model_path_of_run, start_for_worker, weight_files

    folder = tmp_path / "model"
    folder.mkdir()
    for name, size in (("config.json", 10), ("model-00002-of-00002.safetensors", 300), ("model-00001-of-00002.safetensors", 900), ("tokenizer.json", 50), ("optimizer.bin", 2000)):
        (folder / name).write_bytes(b"x" * size)
    assert [p.name for p in weight_files(folder)] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]  # no .bin beside them
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "pytorch_model.bin").write_bytes(b"x")
    assert [p.name for p in weight_files(tmp_path / "old")] == ["pytorch_model.bin"]
    assert weight_files("Qwen/Qwen3-VL-8B-Instruct") == [] and weight_files("builtin:tiny") == [] and weight_files(None) == []

    # The worker finds the model in the run folder's config.yaml, written before any rank starts.
    cfg = parse_config({"name": "r", "output_dir": str(tmp_path / "runs"), "model": {"path": str(tiny_model_dir)}, "data": {"train": str(demo_data[0])}})
    prepare_folder(cfg, resume=False)
    argv = ["--local_rank=0", "--run-dir", str(cfg.run_dir)]
    assert model_path_of_run(argv) == str(tiny_model_dir) and weight_files(model_path_of_run(argv))
    assert model_path_of_run(["--run-dir", str(tmp_path / "nowhere")]) is None
    assert model_path_of_run(["--local_rank=0", "--run-dir"]) is None and model_path_of_run([]) is None  # no folder given
    assert start_for_worker(argv, {"LOCAL_RANK": "1"}) is None  # one reader per node
    advised = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: (advised.append((os.readlink(f"/proc/self/fd/{fd}"), advice)), real(fd, offset, length, advice)))
    reader = start_for_worker(argv, {"LOCAL_RANK": "0"})
    assert reader is not None and reader.daemon
    reader.join(10)
    assert advised == [(str(p.resolve()), os.POSIX_FADV_WILLNEED) for p in weight_files(tiny_model_dir)]
    # A run folder it cannot read is a read-ahead not done, never a failed rank.
    lost = start_for_worker(["--run-dir", str(tmp_path / "nowhere")], {"LOCAL_RANK": "0"})
    lost.join(10)
    assert not lost.is_alive()
