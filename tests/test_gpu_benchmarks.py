"""The CPU side of the GPU benchmarks (gpu_throughput.py, multi_gpu.py): the configs they run are
the planner's, and every multi-GPU variant sees the same rows per optimizer step."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import gpu_throughput as gt  # noqa: E402
import multi_gpu as mg  # noqa: E402

from qvltune.config import parse_config  # noqa: E402


@pytest.fixture(scope="module")
def bench_inputs(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    return gt.make_model_folder(work / "model-2b", "2b"), gt.make_data(work / "data", 60), work


def test_qvltune_variant_is_the_planners_config(bench_inputs):
    model, data, work = bench_inputs
    doc = gt.run_config("v", model, data, work, "mixed", "qvltune", 6, False, None, 64)
    cfg = parse_config(doc)
    assert cfg.data.packing and cfg.data.max_seq_length >= 8192 and not cfg.optim.gradient_checkpointing
    assert cfg.optim.max_steps == 6 and cfg.model.random_init and cfg.optim.compile  # the planner compiles on GPUs
    eager = parse_config(gt.run_config("e", model, data, work, "mixed", "qvltune-eager", 6, False, None, 64))
    assert not eager.optim.compile and eager.data.max_seq_length == cfg.data.max_seq_length
    plain = parse_config(gt.run_config("p", model, data, work, "mixed", "plain", 6, False, None, 64))
    assert not plain.data.packing and plain.optim.gradient_checkpointing and plain.model.attn_implementation == "sdpa"


def test_multi_gpu_variants_keep_the_rows_per_step(bench_inputs):
    model, data, work = bench_inputs
    base = gt.planned_doc(model, data, "mixed", 64)
    base["optim"]["grad_accum"] = 4
    rows = {}
    for name in ("1gpu-z2", "2gpu-z2", "2gpu-z3-offload", "4gpu-z3"):
        gpus, stage, offload = mg.VARIANTS[name]
        cfg = parse_config(mg.variant_doc(name, base, work, 10, 5))
        rows[name] = cfg.optim.per_device_batch * cfg.optim.grad_accum * gpus
        assert cfg.deepspeed.stage == stage and cfg.deepspeed.offload_optimizer == offload and cfg.launch.gpus == gpus
        assert cfg.optim.compile == (stage < 3)  # as the planner decides: compiled under ZeRO-0..2 only
        assert not cfg.model.random_init  # every variant loads the same saved weights
        assert 0 < mg.predicted_gib(mg.variant_doc(name, base, work, 10, None), model, gpus) < 140
    assert set(rows.values()) == {4}
