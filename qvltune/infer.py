"""Inference on a merged model folder or a base model + LoRA adapter: generation and evaluation.

``evaluate`` reports loss/perplexity on the assistant tokens (exactly the training labels) and, for
short-answer data, exact-match accuracy of greedy generations, overall and per ``question_type``
(a record field, when present).
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvltune.data.formats import Record, parse_mixture, parse_record, read_items
from qvltune.data.tokenize import IGNORE_INDEX, Encoder
from qvltune.errors import UserError
from qvltune.tiny import resolve_model_path

# Answers up to this many words count as short: exact match is meaningful for them.
SHORT_ANSWER_WORDS = 8


def adapter_base(path: Path) -> str | None:
    """The base model an adapter folder was trained on (from adapter_config.json), if it is one."""
    cfg = path / "adapter_config.json"
    if not cfg.exists():
        return None
    return json.loads(cfg.read_text()).get("base_model_name_or_path")


def load_for_inference(model: str, base: str | None = None, device: str = "cpu", dtype: str = "float32"):
    """(model, processor) from a merged/full folder, or from an adapter folder plus its base."""
    import torch

    from qvltune.model import load_model, load_processor

    path = Path(resolve_model_path(model))
    adapter_of = adapter_base(path) if path.is_dir() else None
    if adapter_of is None:
        net = load_model(str(path), dtype=dtype)
        processor = load_processor(str(path))
    else:
        from peft import PeftModel

        base = base or adapter_of
        net = load_model(base, dtype=dtype)
        net = PeftModel.from_pretrained(net, str(path))
        has_processor = (path / "processor_config.json").exists() or (path / "preprocessor_config.json").exists()
        processor = load_processor(str(path) if has_processor else base)
    net.to(torch.device(device)).eval()
    return net, processor


def normalise(answer: str) -> str:
    return re.sub(r"[\s.!]+$", "", answer.strip().lower())


def load_records(data: str) -> list[Record]:
    records = []
    for spec in parse_mixture(data):
        if not spec.path.exists():
            raise UserError(f"dataset not found: {spec.path}", "check the path")
        for item in read_items(spec.path):
            rec, problems = parse_record(item, str(spec.path)) if item.problem is None else (None, [item.problem])
            if rec is None:
                raise UserError(f"{problems[0]}", f"run qvltune check-data {spec.path}")
            records.append(rec)
    return records


def generate(model, processor, records: list[Record], *, max_new_tokens: int = 64, batch_size: int = 16, encoder: Encoder | None = None) -> list[str]:
    """Greedy answers to each record's conversation up to (not including) its last answer."""
    import torch

    encoder = encoder or Encoder(processor)
    tokenizer = processor.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right
    out: list[str] = []
    try:
        for i in range(0, len(records), batch_size):
            batch = records[i : i + batch_size]
            texts, images, videos, metas = [], [], [], []
            for rec in batch:
                chat = rec.chat()
                if chat and chat[-1]["role"] == "assistant":
                    chat = chat[:-1]
                texts.append(processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
                prompt_media = [m for msg in rec.messages[: len(chat)] for m in msg.parts if not isinstance(m, str)]
                ims, vids, mds = encoder.load_media(rec, prompt_media)
                images += ims
                videos += vids
                metas += mds
            kwargs: dict[str, Any] = {"padding": True, "return_tensors": "pt"}
            if images:
                kwargs["images"] = images
            if videos:
                kwargs["videos"] = videos
                kwargs["videos_kwargs"] = {"do_sample_frames": False, "video_metadata": metas}
            inputs = processor(text=texts, **kwargs).to(model.device)
            with torch.no_grad():
                generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = generated[:, inputs["input_ids"].shape[1] :]
            out += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [o.strip() for o in out]


@dataclass
class EvalReport:
    records: int
    loss: float | None
    perplexity: float | None
    accuracy: float | None  # exact match on short answers; None when answers are long
    by_type: dict[str, dict[str, float]] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"records": self.records, "loss": self.loss, "perplexity": self.perplexity, "accuracy": self.accuracy, "by_type": self.by_type, "examples": self.examples}


def assistant_loss(model, processor, records: list[Record], encoder: Encoder | None = None) -> float:
    """Mean cross-entropy over every assistant token (the training labels), token-weighted."""
    import torch

    encoder = encoder or Encoder(processor)
    total, count = 0.0, 0
    for rec in records:
        enc = encoder.encode(rec)
        inputs: dict[str, Any] = {
            "input_ids": torch.tensor([enc.input_ids], device=model.device),
            "mm_token_type_ids": torch.tensor([enc.mm_token_type_ids], device=model.device),
        }
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            if getattr(enc, key) is not None:
                inputs[key] = getattr(enc, key).to(model.device)
        with torch.no_grad():
            logits = model(**inputs).logits[0, :-1].float()
        labels = torch.tensor(enc.labels[1:], device=model.device)
        total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((labels != IGNORE_INDEX).sum())
    return total / max(count, 1)


def evaluate(model, processor, records: list[Record], *, max_new_tokens: int = 32, batch_size: int = 16, with_loss: bool = True, image_root: Path | None = None) -> EvalReport:
    encoder = Encoder(processor, root=image_root)
    loss = assistant_loss(model, processor, records, encoder) if with_loss else None
    refs = [r.messages[-1].text() if r.messages and r.messages[-1].role == "assistant" else "" for r in records]
    short = [i for i, ref in enumerate(refs) if ref and len(ref.split()) <= SHORT_ANSWER_WORDS]
    accuracy = None
    by_type: dict[str, dict[str, float]] = {}
    examples = []
    if short:
        answers = generate(model, processor, [records[i] for i in short], max_new_tokens=max_new_tokens, batch_size=batch_size, encoder=encoder)
        hits: dict[str, list[int]] = defaultdict(list)
        for i, answer in zip(short, answers):
            ok = int(normalise(answer) == normalise(refs[i]))
            hits["all"].append(ok)
            qtype = records[i].raw.get("question_type")
            if isinstance(qtype, str):
                hits[qtype].append(ok)
            if len(examples) < 5:
                examples.append({"expected": refs[i], "got": answer})
        accuracy = sum(hits["all"]) / len(hits["all"])
        by_type = {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(hits.items()) if k != "all"}
    return EvalReport(len(records), loss, math.exp(min(loss, 50)) if loss is not None else None, accuracy, by_type, examples)
