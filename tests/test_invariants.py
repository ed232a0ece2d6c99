"""Promises that hold for every strategy, checked on the real tiny model in one process:

- exactly the chosen parameters train (the requires_grad set, every strategy and override);
- a packed row gives every trained component the gradients its samples give alone;
- the loss of an accumulated batch is the mean over all its labelled tokens, whatever the
  micro-batches (QvlTrainer.compute_loss with the Trainer's token count);
- media outside the image root are refused, in check-data and in training alike, unless allowed.
"""

from __future__ import annotations

import pytest
import torch

from conftest import write_image, write_jsonl
from qvltune.config import COMPONENTS, parse_config
from qvltune.data.packing import PackedCollator, PaddedCollator, RopeIndex
from qvltune.data.tokenize import IGNORE_INDEX, Encoder
from qvltune.model import apply_strategy, component_of, load_model
from test_packing import records

MODEL_INPUTS = ("input_ids", "mm_token_type_ids", "position_ids", "pixel_values", "image_grid_thw", "attention_mask", "use_cache")


def config(strategy: str, components: dict | None = None, **lora):
    return parse_config({
        "name": "t", "model": {"path": "builtin:tiny"}, "data": {"train": "d.jsonl"}, "strategy": strategy,
        "components": components or {}, "lora": {"dropout": 0.0, **lora},
    })


# ----------------------------------------------------------------------------------------------
# Exactly the chosen parameters train


def expected_trainable(name: str, modes: dict[str, str], wrapped: bool) -> bool:
    """Whether parameter ``name`` must have requires_grad, from its component's mode alone.

    Under peft, a fully trained component beside LoRA trains through its modules_to_save copy (the
    original stays frozen); a LoRA component trains only its adapters."""
    mode = modes[component_of(name)]
    if "lora_" in name:
        return mode == "lora"
    if mode == "full":
        return ".modules_to_save." in name if wrapped else True
    return False


CASES = [
    ("lora", {}),
    ("mixed", {}),
    ("full", {}),
    ("mixed", {"vision": "lora"}),
    ("mixed", {"lm_head": "full"}),
    ("mixed", {"merger": "frozen", "deepstack": "frozen"}),
    ("lora", {"vision": "lora", "merger": "full"}),
    ("full", {"vision": "full", "lm_head": "frozen"}),
    ("full", {"llm": "frozen"}),
    ("lora", {"llm": "frozen", "vision": "lora"}),
]


@pytest.mark.parametrize(("strategy", "components"), CASES)
def test_exactly_the_chosen_parameters_train(tiny_model_dir, strategy, components):
    cfg = config(strategy, components)
    modes = cfg.modes()
    model = apply_strategy(load_model(str(tiny_model_dir), dtype="float32"), cfg)
    wrapped = cfg.uses_lora()
    wrong = [n for n, p in model.named_parameters() if p.requires_grad != expected_trainable(n, modes, wrapped)]
    assert not wrong, f"{strategy} {components}: requires_grad wrong for {wrong[:5]}"
    trains = {component_of(n) for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {c for c in COMPONENTS if modes[c] != "frozen"}  # every chosen component trains something


# ----------------------------------------------------------------------------------------------
# Packed rows: the same gradients as lone samples, for every trained component


def gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def summed_loss(model, batch) -> torch.Tensor:
    logits = model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS}).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize(("strategy", "components"), [("full", {"vision": "full"}), ("mixed", {"vision": "lora", "lm_head": "full"})])
def test_packed_rows_give_every_component_the_gradients_of_lone_samples(tmp_path, tiny_model_dir, tiny_processor, strategy, components):
    """Three samples with three images packed in one row (and a fourth in a second, padded row): the
    summed loss's gradients equal the sum over the samples alone, for the vision tower (full or
    LoRA), the merger, the DeepStack merger, the LLM and lm_head (fp32: only summation order differs)."""
    torch.manual_seed(0)
    cfg = config(strategy, components)
    model = apply_strategy(load_model(str(tiny_model_dir), dtype="float32", attn_implementation="sdpa"), cfg)
    if cfg.uses_lora():  # LoRA B starts at zero: give the adapters values, so that A gets gradients too
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
    model.train()
    samples = [Encoder(tiny_processor).encode(r) for r in records(tmp_path)]

    model.zero_grad()
    for s in samples:
        summed_loss(model, PaddedCollator(0)([[s]])).backward()
    alone = gradients(model)

    model.zero_grad()
    packed = PackedCollator(tiny_processor.tokenizer.pad_token_id, RopeIndex(model.config))([samples[:3], samples[3:]])
    assert int(packed["image_grid_thw"].shape[0]) == 4  # 3 images in the first row (2 in one sample), 1 in the second
    summed_loss(model, packed).backward()
    together = gradients(model)

    assert set(alone) == set(together)
    by_component: dict[str, list[str]] = {}
    for name in alone:
        by_component.setdefault(component_of(name), []).append(name)
    assert set(by_component) == {c for c, m in cfg.modes().items() if m != "frozen"}
    for component, names in by_component.items():
        a = torch.cat([alone[n].flatten() for n in names]).double()
        b = torch.cat([together[n].flatten() for n in names]).double()
        cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        relative = float((a - b).abs().max() / a.abs().max())
        assert cosine >= 0.99999 and relative <= 1e-4, (component, cosine, relative)


# ----------------------------------------------------------------------------------------------
# Token-weighted loss


def test_compute_loss_divides_the_summed_loss_by_the_accumulated_token_count(tmp_path, tiny_model_dir, tiny_processor):
    """Given the Trainer's count of labelled tokens over the whole accumulated batch, each
    micro-batch's loss is its summed cross-entropy over that count: the micro-batches' losses add
    up to the token mean of the batch, not to a mean of per-micro-batch means."""
    from transformers import TrainingArguments

    from qvltune.trainer import make_trainer_class

    cfg = config("full")
    cfg.optim.fused_loss = True
    model = load_model(str(tiny_model_dir), dtype="float32", attn_implementation="sdpa").eval()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], per_device_train_batch_size=1)
    trainer = make_trainer_class()(model=model, args=args, run_cfg=cfg)
    samples = [Encoder(tiny_processor).encode(r) for r in records(tmp_path)]
    micro = [PaddedCollator(0)([[s] for s in samples[:1]]), PaddedCollator(0)([[s] for s in samples[1:]])]  # 1 short + 3 samples
    counts = [int((m["labels"][:, 1:] != IGNORE_INDEX).sum()) for m in micro]
    total = sum(counts)
    with torch.no_grad():
        reference = sum(summed_loss(model, m) for m in micro) / total
        losses = [trainer.compute_loss(model, dict(m), num_items_in_batch=torch.tensor(total)) for m in micro]
    assert float(sum(losses)) == pytest.approx(float(reference), rel=1e-5)
    per_micro_mean = sum(float(summed_loss(model, m)) / c for m, c in zip(micro, counts)) / len(micro)
    assert abs(per_micro_mean - float(reference)) > 1e-2  # the records' answers differ enough to tell


# ----------------------------------------------------------------------------------------------
# Media outside the image root


def test_absolute_media_paths_outside_the_root_are_refused_unless_allowed(tmp_path, tiny_processor):
    from qvltune.data.check import CheckOptions, check_dataset
    from qvltune.data.files import read_items
    from qvltune.data.formats import parse_record
    from qvltune.data.media import MediaError

    outside = write_image(tmp_path / "elsewhere" / "secret.png")
    inside = write_image(tmp_path / "data" / "ok.png")
    data = write_jsonl(tmp_path / "data" / "train.jsonl", [
        {"image": str(outside), "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]},
        {"image": str(inside), "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]},
    ])
    report = check_dataset(str(data))
    errors = [p for p in report.problems if p.severity == "error"]
    assert len(errors) == 1 and errors[0].line == 1 and "outside" in errors[0].message and errors[0].field == "image[0]"
    assert len(report.usable) == 1  # the absolute path inside the root is fine
    assert not [p for p in check_dataset(str(data), CheckOptions(allow_outside_root=True)).problems if p.severity == "error"]

    (item, _) = list(read_items(data))
    record, _ = parse_record(item, str(data))
    with pytest.raises(MediaError, match="outside"):
        Encoder(tiny_processor, root=data.parent).encode(record)  # training refuses it too
    assert Encoder(tiny_processor, root=data.parent, allow_outside_root=True).encode(record).pixel_values is not None
