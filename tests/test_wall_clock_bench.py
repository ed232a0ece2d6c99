"""The CPU side of benchmarks/wall_clock.py: the issue-shaped mix and the figures it reads from a
run's metrics.jsonl."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import wall_clock as wc  # noqa: E402


def test_the_issue_mix_has_its_shape(tmp_path, tiny_processor):
    path = wc.make_issue_data(tmp_path, 200, seed=3)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    text_only = [r for r in records if "image" not in r]
    assert 0.05 <= len(text_only) / len(records) <= 0.16
    tokens = []
    tok = tiny_processor.tokenizer
    for r in records:
        n = sum(len(tok(turn["value"].replace("<image>\n", "")).input_ids) for turn in r["conversations"])
        if "image" in r:
            w, h = Image.open(tmp_path / r["image"]).size
            assert (352, 352) <= (w, h) <= (1280, 960) and (w // 32) * (h // 32) <= wc.ISSUE_MAX_IMAGE_TOKENS
            n += (w // 32) * (h // 32)
        tokens.append(n)
    assert 650 <= statistics.fmean(tokens) <= 950, statistics.fmean(tokens)


def _records():
    t = 1000.0
    out = [{"kind": "start", "time": t + 40}, {"kind": "phases", "time": t + 90, "to_first_step": 90.0, "phases": [{"name": "model load", "seconds": 20.0}, {"name": "first step (compiling)", "seconds": 70.0}]}]
    clock = t + 90
    for step in range(1, 11):
        clock += 2.0 if step != 6 else 9.0  # step 6: a stall
        out.append({"kind": "train", "time": clock, "step": step, "tokens_per_s": 10000.0 + step})
        if step == 4:
            clock += 1.5
            out.append({"kind": "save", "time": clock, "step": 4, "seconds": 1.5})
        if step == 8:
            clock += 5.0
            out.append({"kind": "eval", "time": clock, "step": 8, "seconds": 5.0})
    out.append({"kind": "checkpoint", "time": clock, "step": 4, "seconds": 1.5, "background_seconds": 12.0})
    out.append({"kind": "stall", "time": t + 110, "step": 6, "seconds": 9.0, "ratio": 4.5, "gc_seconds": 0.0, "median_s": 2.0, "count": 1})
    out.append({"kind": "end", "time": clock + 3, "status": "completed"})
    return out


def test_summarize_reads_the_phases_steps_saves_evals_and_stalls():
    s = wc.summarize(_records(), wall_s=150.0, started=1000.0)
    assert s["status"] == "completed" and s["steps"] == 10 and s["to_first_step_s"] == 90.0
    assert s["phases"] == {"model load": 20.0, "first step (compiling)": 70.0}
    assert s["steady_step_median_s"] == pytest.approx(2.0)  # the save and the eval are not step time
    assert (s["slowest_step"], s["slowest_step_s"], s["slowest_vs_median"]) == (6, pytest.approx(9.0), pytest.approx(4.5))
    assert s["save_blocking_s"] == [1.5] and s["save_background_s"] == [12.0] and s["eval_s"] == [5.0]
    assert s["stalls"] == [{"step": 6, "seconds": 9.0, "ratio": 4.5, "gc_seconds": 0.0}]
    assert s["tok_s_median"] == pytest.approx(10006.5) and s["wall_vs_steady"] == pytest.approx(150.0 / 20.0)
    assert s["after_end_record"] is None  # no rank records given


def test_the_time_after_the_end_record_is_split_by_the_ranks_records():
    end = _records()[-1]["time"]
    ranks = [{"rank": 0, "returned": end + 0.5, "exiting": end + 2.5, "ended": end + 3.0}, {"rank": 1, "returned": end + 0.6, "exiting": end + 2.0, "ended": end + 4.0}]
    s = wc.summarize(_records(), wall_s=end + 5.5 - 1000.0, started=1000.0, ranks=ranks)
    assert s["after_end_record"] == {
        "worker's return (process group)": 0.5, "exit handlers": 2.0, "process end": 0.5, "other ranks' end": 1.0, "qvltune train after the ranks": 1.5
    }
    assert s["end_record_to_exit_s"] == pytest.approx(sum(s["after_end_record"].values()))


def test_the_peer_runs_the_planned_epoch_packed_with_the_same_pixels(tmp_path):
    data = wc.make_issue_data(tmp_path / "data", 20)
    doc = {"data": {"min_pixels": 50176, "max_pixels": 1228800}, "optim": {"epochs": 1}}
    args = wc.peer_args(tmp_path / "model", data, tmp_path / "run", doc)
    assert args["num_train_epochs"] == 1.0 and "max_steps" not in args and args["save_strategy"] == "no"  # one epoch, the model saved at its end
    assert (args["image_min_pixels"], args["image_max_pixels"]) == (50176, 1228800) and args["neat_packing"]
    assert args["finetuning_type"] == "lora" and args["freeze_vision_tower"] and not args["freeze_multi_modal_projector"]  # mixed


def _peer_steps(n, start=1000.0):
    return [{"step": i, "time": start + 60 + 2 * i, "seconds": 2.0, "tokens": 16000 + 100 * i} for i in range(1, n + 1)]


def test_a_peer_epoch_is_summarized_and_a_crash_is_a_result():
    done = wc.summarize_peer(_peer_steps(10), 90.0, 1000.0, 0, "", saved=True)
    assert done["status"] == "completed" and done["steps"] == 10 and done["to_first_step_s"] == 62.0
    assert done["tok_s_median"] == pytest.approx((16000 + 100 * 6.5) / 2.0)  # steps 3..10, as the qvltune units count
    stderr = "UserWarning: a deprecated argument\nTraceback (most recent call last):\n  ...\nRuntimeError: The expanded size of the tensor (8264) must match the existing size (8336)\n"
    crashed = wc.summarize_peer(_peer_steps(89), 300.0, 1000.0, 1, stderr, saved=False)
    assert crashed["status"] == "failed at step 90: RuntimeError: The expanded size of the tensor (8264) must match the existing size (8336)"
    # Under torch.distributed every line carries its rank, and a warning may follow the traceback.
    ranked = "[rank0]: Traceback (most recent call last):\n[rank0]:   File \"x.py\", line 1, in <module>\n[rank0]:     f()\n[rank0]: RuntimeError: CUDA out of memory\n[rank0]:[W1206 process_group.cpp] Warning: ProcessGroupNCCL has NOT been destroyed\n"
    assert wc.summarize_peer(_peer_steps(3), 30.0, 1000.0, 1, ranked, saved=False)["status"] == "failed at step 4: RuntimeError: CUDA out of memory"
    unsaved = wc.summarize_peer(_peer_steps(10), 20.0, 1000.0, 0, "UserWarning: FutureWarning\n", saved=False)
    assert unsaved["status"] == "exit 0 after step 10, no saved adapter"  # every step ran: no step failed, and a warning is no error


def test_startup_bench_counts_the_wait_for_the_data_not_the_check_beside_it():
    import startup

    record = {"to_first_step": 20.0, "phases": [
        {"name": "qvltune start (CLI, config, GPUs)", "seconds": 1.0},
        {"name": "launcher (rank processes, Python start)", "seconds": 2.0},
        {"name": "data check and index (qvltune train, beside the launcher)", "seconds": 9.0, "parallel": True},
        {"name": "model load", "seconds": 3.0},
        {"name": "waiting for the data index", "seconds": 4.0},  # the check outlasted the ranks' start
        {"name": "first step", "seconds": 10.0},
    ]}
    row = startup.summary(record)
    assert row["model and data ready"] == 10.0  # 1 + 2 + 3 + 4: the parallel check only through the wait
    assert row["data check and index (qvltune train, beside the launcher) (in parallel)"] == 9.0


def test_what_inductor_generated_is_read_from_the_compile_cache(tmp_path):
    """wall_clock.compiled_code: a real CPU compile's C++ kernels by name; Triton kernels (no GPU
    here) from a module in Inductor's wrapper form."""
    import os
    import subprocess

    code = "import torch\nf = torch.compile(lambda x: (x * 2).sin() + 1)\nf(torch.randn(8))\n"
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cpu")}, check=True, capture_output=True, timeout=300)
    cpu = wc.compiled_code(tmp_path / "cpu")
    assert cpu["wrappers"] >= 1 and cpu["triton_kernels"] == 0 and cpu["cpp_sources"] >= 1
    assert cpu["cpp_kernels"] and all(name.startswith("cpp_fused_") for name in cpu["cpp_kernels"]), cpu
    gpu = tmp_path / "gpu" / "ab"
    gpu.mkdir(parents=True)
    (gpu / "cabc.py").write_text(
        "async_compile = AsyncCompile()\n"
        "triton_poi_fused_add_0 = async_compile.triton('triton_poi_fused_add_0', '''\nsource\n''', device_str='cuda')\n"
        "triton_red_fused_sum_1 = async_compile.triton('triton_red_fused_sum_1', '''\nsource\n''', device_str='cuda')\n"
        "cpp_fused_copy_2 = async_compile.cpp_pybinding(['int64_t*'], '''\nsource\n''')\n"
    )
    assert wc.compiled_code(tmp_path / "gpu") == {"wrappers": 1, "triton_kernels": 2, "cpp_kernels": ["cpp_fused_copy_2"], "cpp_sources": 0}
