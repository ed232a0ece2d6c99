"""Inference on a merged model folder or a base model + LoRA adapter: generation and evaluation.

``evaluate`` reports loss/perplexity on the assistant tokens (exactly the training labels) and, for
short-answer data, exact-match accuracy of greedy generations, overall and per ``question_type``
(a record field, when present); answers that are a box (``{"bbox_2d": [...]}``) are scored by IoU
and by accuracy at IoU >= 0.5 instead.

A MODEL argument (``resolve_model_dir``) may name a merged or fully trained model folder, a LoRA
adapter folder (a run's ``final/`` or ``checkpoint-N/``), a run folder (its ``final/``), a Hub id, or
``builtin:tiny``.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvltune.adapter import adapter_processor, attach_adapter, base_for_adapter, is_adapter, looks_local
from qvltune.checkpoints import COMPLETE_MARKER, latest_complete_checkpoint
from qvltune.data.boxes import first_box, iou
from qvltune.data.files import read_items
from qvltune.data.formats import SHAPE_HF, parse_record
from qvltune.data.media import MediaError
from qvltune.data.mixture import parse_mixture
from qvltune.data.record import Media, Message, Record
from qvltune.data.tokenize import IGNORE_INDEX, Encoder, TemplateError
from qvltune.errors import UserError
from qvltune.tiny import model_not_found, resolve_model_path

# Answers up to this many words count as short: exact match is meaningful for them.
SHORT_ANSWER_WORDS = 8

# Command-line spellings of the weight dtypes.
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def resolve_model_dir(model: str) -> str:
    """The folder (or Hub id) to load for MODEL: a run folder gives its ``final/``.

    A run without ``final/`` (training stopped early) is an error that names its newest checkpoint;
    an interrupted checkpoint (no completion marker) is refused."""
    if not looks_local(model):
        return resolve_model_path(model)
    path = Path(model).expanduser()
    if not path.exists():
        raise model_not_found(str(path), "give a merged model folder, an adapter folder, a run folder (runs/NAME), a Hub id or builtin:tiny")
    if not path.is_dir():
        raise UserError(f"{path} is a file, not a model folder", "give the folder that holds config.json or adapter_config.json")
    if is_adapter(path) or (path / "config.json").exists():
        if path.name.startswith("checkpoint-") and (path.parent / "config.yaml").exists() and not (path / COMPLETE_MARKER).exists():
            raise UserError(f"{path} is an incomplete checkpoint (its save was interrupted)", "use another checkpoint-N of the run, or its final/ folder")
        return str(path)
    if (path / "final").is_dir():
        return str(path / "final")
    if (path / "config.yaml").exists():  # a run folder without its final model
        last = latest_complete_checkpoint(path)
        hint = f"training did not finish; use its latest checkpoint: {last}" if last else "finish the training first: qvltune train CONFIG --resume"
        raise UserError(f"run {path} has no final/ model", hint)
    raise UserError(f"{path} holds no model: no config.json, adapter_config.json or final/", "give a merged model folder, an adapter folder or a run folder (runs/NAME)")


def check_device(device: str) -> str:
    import torch

    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device: unknown device '{device}'", "use cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible here", "run on the CPU (the default: drop --device)")
    return device


def default_device() -> str:
    """The GPU when one is visible (merging or generating with an 8B model on a CPU takes minutes), else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    """float32 on the CPU (bf16 matmuls are slow there and round every product), bfloat16 on a GPU."""
    return "float32" if device == "cpu" else "bfloat16"


def load_for_inference(model: str, base: str | None = None, device: str | None = None, dtype: str | None = None):
    """(model, processor) from a merged/full folder, or from an adapter folder plus its base."""
    import torch

    from qvltune.model import load_model, load_processor

    device = check_device(device or default_device())
    dtype = dtype or default_dtype(device)
    path = Path(resolve_model_dir(model))
    if not is_adapter(path):
        net = load_model(str(path), dtype=dtype)
        processor = load_processor(str(path))
    else:
        base = base or base_for_adapter(path)[0]
        net = attach_adapter(load_model(base, dtype=dtype), path, base)
        processor = adapter_processor(path, base)
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


def generate(model, processor, records: list[Record], *, max_new_tokens: int = 64, batch_size: int = 16, encoder: Encoder | None = None, progress=None) -> list[str]:
    """Greedy answers to each record's conversation up to (not including) its last answer.
    ``progress(phase, done, total)``, if given, hears of every batch."""
    import torch

    encoder = encoder or Encoder(processor)
    tokenizer = processor.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right
    out: list[str] = []
    try:
        for i in range(0, len(records), batch_size):
            if progress:
                progress("generating answers", i, len(records))
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
    short_answers: int = 0  # records whose answer is short enough for exact match
    # Box answers ({"bbox_2d": [...]}) are scored by IoU, not exact match: n, mean_iou, accuracy_iou50.
    boxes: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "loss": self.loss,
            "perplexity": self.perplexity,
            "accuracy": self.accuracy,
            "short_answers": self.short_answers,
            "boxes": self.boxes,
            "by_type": self.by_type,
            "examples": self.examples,
        }


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


# A generated box needs room for its JSON (about 30 tokens with Qwen's one-token digits).
BOX_ANSWER_TOKENS = 48
IOU_THRESHOLD = 0.5


def evaluate(model, processor, records: list[Record], *, max_new_tokens: int = 32, batch_size: int = 16, with_loss: bool = True, image_root: Path | None = None, progress=None) -> EvalReport:
    encoder = Encoder(processor, root=image_root)
    if progress and with_loss:
        progress("computing the loss on the answers", 0, None)
    loss = assistant_loss(model, processor, records, encoder) if with_loss else None
    refs = [r.messages[-1].text() if r.messages and r.messages[-1].role == "assistant" else "" for r in records]
    # An answer that is one box is scored by IoU; exact match on coordinates would count a box one
    # unit off as wrong.
    ref_boxes = {i: first_box(ref) for i, ref in enumerate(refs)}
    box_items = [i for i, b in ref_boxes.items() if b is not None]
    short = [i for i, ref in enumerate(refs) if ref and ref_boxes[i] is None and len(ref.split()) <= SHORT_ANSWER_WORDS]
    accuracy = None
    by_type: dict[str, dict[str, float]] = {}
    examples = []
    if short:
        answers = generate(model, processor, [records[i] for i in short], max_new_tokens=max_new_tokens, batch_size=batch_size, encoder=encoder, progress=progress)
        hits: dict[str, list[int]] = defaultdict(list)
        mistakes: list[dict[str, str]] = []
        for i, answer in zip(short, answers):
            ok = int(normalise(answer) == normalise(refs[i]))
            hits["all"].append(ok)
            qtype = records[i].raw.get("question_type")
            if isinstance(qtype, str):
                hits[qtype].append(ok)
            # Examples: the first mistakes (what is worth reading), else the first answers.
            if not ok and len(mistakes) < 5:
                mistakes.append({"expected": refs[i], "got": answer})
            if len(examples) < 5:
                examples.append({"expected": refs[i], "got": answer})
        examples = (mistakes + [e for e in examples if normalise(e["got"]) == normalise(e["expected"])])[:5]
        accuracy = sum(hits["all"]) / len(hits["all"])
        by_type = {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(hits.items()) if k != "all"}
    boxes = None
    if box_items:
        answers = generate(model, processor, [records[i] for i in box_items], max_new_tokens=max(max_new_tokens, BOX_ANSWER_TOKENS), batch_size=batch_size, encoder=encoder, progress=progress)
        ious: dict[str, list[float]] = defaultdict(list)
        for i, answer in zip(box_items, answers):
            got = first_box(answer)
            score = iou(ref_boxes[i], got) if got is not None else 0.0
            ious["all"].append(score)
            qtype = records[i].raw.get("question_type")
            if isinstance(qtype, str):
                ious[qtype].append(score)
            if sum(1 for e in examples if "iou" in e) < 2:
                examples.append({"expected": refs[i], "got": answer, "iou": f"{score:.2f}"})

        def summary(v: list[float]) -> dict[str, float]:
            return {"n": len(v), "mean_iou": sum(v) / len(v), "accuracy_iou50": sum(x >= IOU_THRESHOLD for x in v) / len(v)}

        boxes = summary(ious.pop("all"))
        by_type.update({k: summary(v) for k, v in sorted(ious.items())})
    return EvalReport(len(records), loss, math.exp(min(loss, 50)) if loss is not None else None, accuracy, by_type, examples, len(short), boxes)


# ----------------------------------------------------------------------------------------------
# One call per command: `qvltune predict` and `qvltune eval`


@dataclass(frozen=True)
class InferenceOptions:
    """How a model is loaded and asked: the flags ``qvltune predict`` and ``qvltune eval`` share
    (each command has its own defaults for the generation sizes)."""

    base: str | None = None  # an adapter's base model (default: the one it records)
    device: str | None = None  # cpu or cuda (default: the GPU when there is one)
    dtype: str | None = None  # a torch dtype name, see DTYPES (default: fp32 on CPU, bf16 on GPU)
    image_root: Path | None = None  # where relative media paths of a dataset resolve (default: its folder)
    max_new_tokens: int = 64  # the longest generated answer, in tokens
    batch_size: int = 8  # records generated together
    limit: int | None = None  # only the first N records of a dataset

    def load(self, model: str):
        """(model, processor) ready for inference."""
        return load_for_inference(model, self.base, self.device, self.dtype)


@dataclass
class Prediction:
    where: str  # file:line of the record, or "prompt"
    prompt: str
    answer: str
    expected: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"where": self.where, "prompt": self.prompt, "answer": self.answer, "expected": self.expected}


def prompt_record(prompt: str, images: list[Path]) -> Record:
    """A one-turn record for a command-line prompt: the images first, then the text.

    Built directly rather than parsed: the data parser rightly refuses records without an answer."""
    parts: list[str | Media] = [Media("image", str(image), f"--image[{i}]") for i, image in enumerate(images)]
    parts.append(prompt)
    return Record("prompt", 0, None, SHAPE_HF, [Message("user", parts)])


@contextmanager
def _media_errors_as_user_errors(what: str):
    """A missing or broken image or chat template is the user's to fix: one line, no traceback."""
    try:
        yield
    except MediaError as e:
        raise UserError(f"{what}: {e.describe()}", e.fix or "fix the path, or pass --image-root") from None
    except TemplateError as e:
        raise UserError(f"{what}: {e}", "the model's chat template cannot render this conversation") from None


def _limit(records: list[Record], limit: int | None) -> list[Record]:
    return records[:limit] if limit else records


def predict(
    model: str,
    options: InferenceOptions,
    *,
    prompt: str | None = None,
    images: list[Path] | None = None,
    data: str | None = None,
    progress=None,
) -> list[Prediction]:
    """Greedy answers from MODEL with its chat template: to one prompt (with images), or to the last
    question of every record of ``data``."""
    if (prompt is None) == (data is None):
        raise UserError("give either --prompt (with --image) or --data", "qvltune predict MODEL --image photo.jpg --prompt 'What is shown?'")
    if data is not None:
        records = _limit(load_records(data), options.limit)
        encoder_root, outside = options.image_root, False
    else:
        for image in images or []:
            if not image.is_file():
                raise UserError(f"--image: {image} not found", "check the path")
        records = [prompt_record(prompt, list(images or []))]
        encoder_root, outside = Path.cwd(), True  # command-line paths are the user's own, anywhere
    if progress:
        progress(f"loading {model}", 0, None)
    net, processor = options.load(model)
    with _media_errors_as_user_errors(data or "--image"):
        answers = generate(net, processor, records, max_new_tokens=options.max_new_tokens, batch_size=options.batch_size, encoder=Encoder(processor, root=encoder_root, allow_outside_root=outside), progress=progress)
    out = []
    for rec, answer in zip(records, answers):
        asked = [m for m in rec.messages if m.role == "user"]
        has_answer = rec.messages[-1].role == "assistant"
        where = rec.where() if data is not None else "prompt"
        out.append(Prediction(where, asked[-1].text().strip() if asked else "", answer, rec.messages[-1].text() if has_answer else None))
    return out


def evaluate_model(model: str, data: str, options: InferenceOptions, progress=None) -> EvalReport:
    """Loss/perplexity on the assistant tokens of ``data`` and exact-match accuracy on its short answers."""
    records = _limit(load_records(data), options.limit)  # the parser refuses records without an answer
    if progress:
        progress(f"loading {model}", 0, None)
    net, processor = options.load(model)
    with _media_errors_as_user_errors(data):
        return evaluate(net, processor, records, max_new_tokens=options.max_new_tokens, batch_size=options.batch_size, image_root=options.image_root, progress=progress)
