"""``qvltune eval`` on preference pairs: how often the model prefers the chosen answer.

- preference accuracy: the share of pairs whose chosen answer the model gives a higher summed
  log-probability than the rejected one (what a preference-tuned model should get right whatever
  it was tuned from);
- with a reference model (``--reference``): DPO's own measure, the share of pairs whose implicit
  reward ``beta * (log p - log p_ref)`` is higher for the chosen answer, and the mean reward margin;
- for short answers, what the model now generates: the share equal to the chosen answer, to the
  rejected one, or neither (``qvltune demo --stage dpo`` shows answers moving to the preferred ones).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from qvltune.data.tokenize import IGNORE_INDEX, Encoded, Encoder
from qvltune.preference.formats import Pair

SHORT_ANSWER_WORDS = 8


def answer_logp(model, enc: Encoded) -> float:
    """Summed log-prob of a sample's labelled (answer) tokens, one forward with full logits."""
    import torch

    inputs: dict[str, Any] = {"input_ids": torch.tensor([enc.input_ids], device=model.device), "mm_token_type_ids": torch.tensor([enc.mm_token_type_ids], device=model.device)}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        if getattr(enc, key) is not None:
            inputs[key] = getattr(enc, key).to(model.device)
    with torch.no_grad():
        logp = torch.log_softmax(model(**inputs).logits[0, :-1].float(), dim=-1)
    labels = torch.tensor(enc.labels[1:], device=model.device)
    keep = labels != IGNORE_INDEX
    return float(logp[keep].gather(1, labels[keep][:, None]).sum())


@dataclass
class PreferenceReport:
    pairs: int
    accuracy: float  # chosen answer more likely than the rejected one
    logp_margin: float  # mean of log p(chosen) - log p(rejected)
    reward_accuracy: float | None = None  # with a reference: DPO's implicit reward prefers chosen
    reward_margin: float | None = None
    beta: float | None = None
    generated: dict[str, float] | None = None  # short answers: share generating chosen / rejected / other
    by_type: dict[str, dict[str, float]] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)
    answers: dict[int, str] = field(default_factory=dict, repr=False)  # generated answer of each short pair, by position

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("pairs", "accuracy", "logp_margin", "reward_accuracy", "reward_margin", "beta", "generated", "by_type", "examples")}


def _norm(text: str) -> str:
    from qvltune.infer import normalise

    return normalise(text)


def evaluate_pairs(model, processor, pairs: list[Pair], *, reference=None, beta: float = 0.1, image_root=None, max_new_tokens: int = 16, batch_size: int = 16, progress=None) -> PreferenceReport:
    from qvltune.infer import generate

    encoder = Encoder(processor, root=image_root)
    margins, rewards = [], []
    for i, pair in enumerate(pairs):
        if progress and i % 20 == 0:
            progress("scoring the answers of each pair", i, len(pairs))
        c, r = encoder.encode(pair.chosen), encoder.encode(pair.rejected)
        lc, lr = answer_logp(model, c), answer_logp(model, r)
        margins.append(lc - lr)
        if reference is not None:
            rewards.append(beta * ((lc - answer_logp(reference, c)) - (lr - answer_logp(reference, r))))
    n = len(pairs)
    report = PreferenceReport(n, sum(m > 0 for m in margins) / max(n, 1), sum(margins) / max(n, 1))
    if reference is not None:
        report.reward_accuracy = sum(x > 0 for x in rewards) / max(n, 1)
        report.reward_margin = sum(rewards) / max(n, 1)
        report.beta = beta
    short = [i for i, p in enumerate(pairs) if len(p.chosen.messages[-1].text().split()) <= SHORT_ANSWER_WORDS]
    if short:
        answers = generate(model, processor, [pairs[i].chosen for i in short], max_new_tokens=max_new_tokens, batch_size=batch_size, encoder=encoder, progress=progress)
        counts: dict[str, dict[str, int]] = defaultdict(lambda: {"chosen": 0, "rejected": 0, "other": 0})
        for i, answer in zip(short, answers):
            p = pairs[i]
            report.answers[i] = answer
            got = "chosen" if _norm(answer) == _norm(p.chosen.messages[-1].text()) else "rejected" if _norm(answer) == _norm(p.rejected.messages[-1].text()) else "other"
            counts["all"][got] += 1
            for key in ("question_type", "preference"):
                if isinstance(p.chosen.raw.get(key), str):
                    counts[f"{key}={p.chosen.raw[key]}"][got] += 1
            if len(report.examples) < 5:
                report.examples.append({"chosen": p.chosen.messages[-1].text(), "rejected": p.rejected.messages[-1].text(), "got": answer})
        total = lambda c: max(1, sum(c.values()))  # noqa: E731
        report.generated = {k: v / total(counts["all"]) for k, v in counts["all"].items()}
        report.by_type = {k: {**{g: v / total(c) for g, v in c.items()}, "n": sum(c.values())} for k, c in sorted(counts.items()) if k != "all"}
    return report


def evaluate_pairs_model(model: str, data: str, options, *, reference: str | None = None, beta: float = 0.1, progress=None) -> PreferenceReport:
    """``qvltune eval`` on preference pairs; ``options``: ``qvltune.infer.InferenceOptions`` (the
    reference loads on the same device and dtype, with no adapter base of its own)."""
    from qvltune.infer import _media_errors_as_user_errors, load_for_inference
    from qvltune.preference.data import load_pairs

    pairs = load_pairs(data)
    pairs = pairs[:options.limit] if options.limit else pairs
    if progress:
        progress(f"loading {model}", 0, None)
    net, processor = options.load(model)
    ref = load_for_inference(reference, None, options.device, options.dtype)[0] if reference else None
    with _media_errors_as_user_errors(data):
        return evaluate_pairs(
            net, processor, pairs, reference=ref, beta=beta, image_root=options.image_root, max_new_tokens=options.max_new_tokens, batch_size=options.batch_size, progress=progress
        )
