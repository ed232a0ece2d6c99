"""Plant the merge mistakes that `qvltune merge`'s verification must catch, and check that it does.

Each fault is a context manager that changes peft's ``merge_and_unload`` for the duration of one
merge, the way a merge tool would get it wrong; the float32 reference (base + adapter, unmerged) is
taken before it runs, so only the merged weights are wrong:

- wrong_scale:  LoRA deltas added with alpha / sqrt(r) (rsLoRA's scale) instead of alpha / r
- left_out:     a module trained beside LoRA (merger, DeepStack mergers, lm_head) left at its base weights
- merged_twice: every LoRA delta added twice

Used by tests/test_merge.py on the tiny model, and on real-size adapters on a GPU:

    python benchmarks/merge_faults.py RUN_OR_ADAPTER --work DIR [--dtype bf16] [--faults wrong_scale,left_out,merged_twice]

prints one line per fault (caught or not, with the logit error ratio) and exits 1 if any fault passed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path


def _lora_layers(peft_model):
    from peft.tuners.lora import LoraLayer

    return [m for m in peft_model.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def _patched_merge(before_merge) -> Iterator[None]:
    """Run ``before_merge(lora_model)`` inside ``merge_and_unload``, before peft's own merge."""
    from peft.tuners.lora import LoraModel

    original = LoraModel.merge_and_unload

    def faulty(self, *args, **kwargs):
        before_merge(self)
        return original(self, *args, **kwargs)

    LoraModel.merge_and_unload = faulty
    try:
        yield
    finally:
        LoraModel.merge_and_unload = original


def wrong_scale():
    def rescale(model):
        for layer in _lora_layers(model):
            for name in layer.scaling:
                layer.scaling[name] = layer.lora_alpha[name] / math.sqrt(layer.r[name])

    return _patched_merge(rescale)


def left_out():
    from peft.utils import ModulesToSaveWrapper

    def forget(model):
        for module in model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                for name in module.modules_to_save:
                    module.modules_to_save[name].load_state_dict(module.original_module.state_dict())

    return _patched_merge(forget)


def merged_twice():
    import torch

    def add_once_more(model):
        with torch.no_grad():
            for layer in _lora_layers(model):
                for name in layer.active_adapters:
                    if name in layer.lora_A:
                        weight = layer.get_base_layer().weight
                        weight += layer.get_delta_weight(name).to(weight.dtype)

    return _patched_merge(add_once_more)


FAULTS = {"wrong_scale": wrong_scale, "left_out": left_out, "merged_twice": merged_twice}


def run(adapter: str, work: Path, dtype: str, faults: list[str], device: str | None = None) -> list[dict]:
    """Merge ``adapter`` once per fault (and once without) -> one row each: whether the check passed."""
    from qvltune.merge import merge

    rows = []
    for fault in ["none", *faults]:
        out = work / f"merged-{fault}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.with_name(out.name + ".unverified"), ignore_errors=True)
        with FAULTS[fault]() if fault != "none" else contextlib.nullcontext():
            result = merge(adapter, out, dtype=dtype, device=device, force=True)
        lg = result.logits
        rows.append({
            "fault": fault, "passed_verification": result.ok, "merge_ok": lg.merge_ok, "saved_ok": lg.saved_ok, "weights_ok": result.weights.ok,
            "merge_rms": lg.merge_rms, "merge_limit": lg.merge_limit, "merge_ratio": lg.merge_ratio, "saved_rms": lg.saved_rms, "cast_rms": lg.cast_rms,
            "ratio": lg.ratio, "unmerged_rms": lg.unmerged_rms, "training_effect": lg.training_effect, "top1": lg.top1_agreement,
            "not_merged": len(result.weights.not_merged), "seconds": round(result.seconds, 1),
        })
        shutil.rmtree(result.out, ignore_errors=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("adapter")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--faults", default=",".join(FAULTS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = run(args.adapter, args.work, args.dtype, args.faults.split(","))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print("| fault | verification | fp32 merge RMS error | x its limit | saved folder x cast-once | trained modules not merged |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['fault']} | {'passed' if r['passed_verification'] else 'FAILED'} | {r['merge_rms']:.3g} | {r['merge_ratio']:,.1f}x | {r['ratio']:.2f}x | {r['not_merged']} |")
    wrong = [r["fault"] for r in rows if r["passed_verification"] != (r["fault"] == "none")]
    if wrong:
        print(f"not as expected: {', '.join(wrong)}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
