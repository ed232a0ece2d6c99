"""One peer DPO run for dpo_throughput.py, in its own process with LLaMA-Factory's pinned stack first
on PYTHONPATH (it must not import qvltune): LLaMA-Factory's ``run_exp`` with ``stage: dpo``, or TRL's
``DPOTrainer`` on the same pairs (converted to TRL's conversational vision layout: a
``{"type": "image"}`` part in the prompt and PIL images in ``images``). Each optimizer step's time and
real tokens are appended to the metrics file by llamafactory_run.py's StepTimer.

    DISABLE_VERSION_CHECK=1 PYTHONPATH=<site>:$PYTHONPATH python benchmarks/dpo_peer_run.py RUN.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from llamafactory_run import StepTimer  # noqa: E402


def trl_dataset(path: Path):
    """The pairs in TRL's conversational vision layout (images decoded by ``datasets``)."""
    from datasets import Dataset, Features, Image, Sequence, Value

    rows = {"prompt": [], "chosen": [], "rejected": [], "images": []}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        text = r["conversations"][0]["value"].replace("<image>\n", "")
        content = ([{"type": "image", "text": None}] if r.get("images") else []) + [{"type": "text", "text": text}]
        rows["prompt"].append(json.dumps([{"role": "user", "content": content}]))
        rows["chosen"].append(json.dumps([{"role": "assistant", "content": [{"type": "text", "text": r["chosen"]["value"]}]}]))
        rows["rejected"].append(json.dumps([{"role": "assistant", "content": [{"type": "text", "text": r["rejected"]["value"]}]}]))
        rows["images"].append(r.get("images", []))
    ds = Dataset.from_dict(rows, features=Features({k: Value("string") for k in ("prompt", "chosen", "rejected")} | {"images": Sequence(Image())}))
    # Stored as JSON text (one schema for text-only and image prompts), parsed back per row.
    return ds.map(lambda x: {k: json.loads(x[k]) for k in ("prompt", "chosen", "rejected")})


def bool_package_checks() -> None:
    """TRL 0.24 reads transformers' ``_is_package_available(name)`` as a bool; transformers >= 5.3
    returns a tuple (always true), so TRL would import its optional extras (mergekit) and fail.
    LLaMA-Factory applies this same patch before it imports TRL (llamafactory/extras/packages.py);
    the TRL run does it here."""
    from transformers.utils import import_utils

    original = import_utils._is_package_available

    class Availability(tuple):  # still unpacks as (available, version), true only when available
        def __bool__(self) -> bool:
            return bool(self[0])

    import_utils._is_package_available = lambda name, return_version=False: Availability(original(name, return_version=return_version))


def run_trl(spec: dict) -> None:
    bool_package_checks()
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    lo, hi = spec["pixels"]
    processor = AutoProcessor.from_pretrained(spec["model"])
    processor.image_processor.size = {"shortest_edge": lo, "longest_edge": hi}
    model = AutoModelForImageTextToText.from_pretrained(spec["model"], dtype=getattr(torch, spec.get("dtype", "bfloat16")), attn_implementation="sdpa")
    for name, p in model.named_parameters():
        p.requires_grad_(False)
    # TRL 0.24 writes model.warnings_issued["estimate_tokens"], a dict transformers 5 models no longer
    # have; an empty one is what transformers 4 gave them.
    model.warnings_issued = {}
    lora = spec["lora"]
    peft_config = LoraConfig(r=lora["lora_rank"], lora_alpha=lora["lora_alpha"], lora_dropout=lora["lora_dropout"], task_type="CAUSAL_LM",
                             target_modules=r".*language_model\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj",
                             modules_to_save=spec["modules_to_save"] or None)
    trainer = DPOTrainer(model=model, ref_model=None, args=DPOConfig(**spec["args"]), train_dataset=trl_dataset(Path(spec["data"])), processing_class=processor, peft_config=peft_config, callbacks=[StepTimer(Path(spec["metrics"]))])
    print(f"trainable params: {sum(p.numel() for p in trainer.model.parameters() if p.requires_grad):,}", flush=True)  # as LLaMA-Factory logs it
    trainer.train()


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    if spec["runner"] == "llamafactory":
        from llamafactory.train.tuner import run_exp

        run_exp(args=spec["args"], callbacks=[StepTimer(Path(spec["metrics"]))])
    else:
        run_trl(spec)


if __name__ == "__main__":
    main()
