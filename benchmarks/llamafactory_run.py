"""Run LLaMA-Factory's SFT on gpu_throughput.py's model folder and data and time every step.

The peer comparison of gpu_throughput.py (variants ``llamafactory`` and ``llamafactory-packed``).
It runs in its own process, with LLaMA-Factory's pinned stack (transformers, peft, accelerate, trl,
datasets) first on PYTHONPATH: it must not import qvltune, which needs newer versions.

    DISABLE_VERSION_CHECK=1 PYTHONPATH=<llamafactory site>:$PYTHONPATH \\
        python benchmarks/llamafactory_run.py RUN.json

RUN.json: {"args": {LLaMA-Factory's training arguments}, "metrics": "steps.jsonl"}. A forward
pre-hook counts, for each trained micro-batch (a forward with gradients: not a DPO reference pass),
its real (non-pad) tokens, its row x width slots and its samples, from the attention mask the model
is given (0/1 for padded rows; for neat packing with sdpa, the 4-D block-diagonal mask LLaMA-Factory
builds: a real token attends to itself, a new sample does not attend to the token before it), and the
image patch rows it is given (``pixel_values``: none on image data means the images never reached
the model); each optimizer step appends one line to the metrics file: step, its end (time.time()),
its seconds, and those counts.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """Per optimizer step: seconds since the previous step and the tokens the model was given."""

    def __init__(self, path: Path):
        self.path = path
        self.counts = None
        self.last = None

    def _count(self, module, args, kwargs):
        # TRL's DPOTrainer passes input_ids positionally, LLaMA-Factory by name.
        ids, mask = kwargs.get("input_ids", args[0] if args else None), kwargs.get("attention_mask")
        if ids is None or not torch.is_grad_enabled():  # a DPO reference pass (no grad): its tokens are not trained
            return
        rows = torch.tensor(ids.shape[0], device=ids.device)
        if mask is None:  # nothing padded
            real, samples = torch.tensor(ids.numel(), device=ids.device), rows
        elif mask.dim() == 4:  # neat packing with sdpa: (B, 1, L, L) additive, 0 where attended
            sees_itself = mask[:, 0].diagonal(dim1=-2, dim2=-1) == 0  # a real (non-pad) token
            cut = mask[:, 0].diagonal(offset=-1, dim1=-2, dim2=-1) != 0  # token i+1 does not see token i
            real = sees_itself.sum()
            samples = sees_itself[:, 0].sum() + (sees_itself[:, 1:] & cut).sum()
        else:  # padded rows: 1 = real token
            real, samples = (mask != 0).sum(), rows
        # Summed on the GPU, read once per optimizer step (no per-micro-batch sync).
        # Patch rows of the images the model is given: a peer that drops pixel_values trains text only.
        pixels = kwargs.get("pixel_values")
        patches = torch.tensor(pixels.shape[0] if pixels is not None else 0, device=ids.device)
        step = torch.stack([real, torch.tensor(ids.numel(), device=ids.device), samples, patches])
        self.counts = step if self.counts is None else self.counts + step

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.register_forward_pre_hook(self._count, with_kwargs=True)
        self.path.write_text("")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.last = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        counts = self.counts.tolist() if self.counts is not None else [0, 0, 0, 0]  # syncs: the step is done
        now = time.time()
        rec = {"step": state.global_step, "time": now, "seconds": now - self.last, "tokens": counts[0], "slots": counts[1], "samples": counts[2], "image_patches": counts[3]}
        if torch.cuda.is_available():
            rec["mem_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.counts, self.last = None, now


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    from llamafactory.train.tuner import run_exp

    run_exp(args=spec["args"], callbacks=[StepTimer(Path(spec["metrics"]))])


if __name__ == "__main__":
    main()
