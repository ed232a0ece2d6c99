"""Thinking models: a template that renders <think>reasoning</think> for the last answer and drops
the reasoning of earlier answers (as Qwen3-VL-*-Thinking's does) is trained turn by turn, each
answer in the context the template gives it when it is the last turn."""

from __future__ import annotations

import copy

import pytest

from conftest import write_image, write_jsonl
from qvltune.data.formats import parse_record
from qvltune.data.record import RawItem
from qvltune.data.tokenize import IGNORE_INDEX, Encoder

# Written from the behaviour documented for the Qwen3 / Qwen3-VL Thinking chat templates: the index of
# the last user turn is found first; an assistant turn after it is rendered with its reasoning
# (``reasoning_content``, or the text before ``</think>`` in its content) as
# "<think>\n{reasoning}\n</think>\n\n{answer}", an earlier one as its answer only; the generation
# prompt opens the reasoning: "<|im_start|>assistant\n<think>\n".
THINKING_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- if message.content is string -%}{%- set text = message.content -%}"
    "{%- else -%}{%- set text = namespace(v='') -%}"
    "{%- for c in message.content -%}"
    "{%- if c.type == 'image' -%}{%- set text.v = text.v + '<|vision_start|><|image_pad|><|vision_end|>' -%}"
    "{%- elif c.type == 'video' -%}{%- set text.v = text.v + '<|vision_start|><|video_pad|><|vision_end|>' -%}"
    "{%- elif c.text is defined -%}{%- set text.v = text.v + c.text -%}{%- endif -%}"
    "{%- endfor -%}{%- set text = text.v -%}{%- endif -%}"
    "{%- if message.role == 'assistant' -%}"
    "{%- set reasoning = '' -%}"
    "{%- if message.reasoning_content is string -%}{%- set reasoning = message.reasoning_content -%}"
    "{%- elif '</think>' in text -%}"
    "{%- set reasoning = text.split('</think>')[0].split('<think>')[-1] -%}"
    "{%- set text = text.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if loop.index0 > ns.last_user -%}{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' -}}{%- endif -%}"
    "{{- text + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + message.role + '\\n' + text + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think>\\n' -}}{%- endif -%}"
)


@pytest.fixture(scope="module")
def thinking_processor(tiny_processor):
    proc = copy.deepcopy(tiny_processor)
    proc.chat_template = THINKING_TEMPLATE
    proc.tokenizer.chat_template = THINKING_TEMPLATE
    return proc


def record(value, file="d.jsonl"):
    rec, problems = parse_record(RawItem(0, 1, value), str(file))
    assert not problems, problems
    return rec


def trained_text(enc, tokenizer) -> list[str]:
    spans, run = [], []
    for tok, lab in zip(enc.input_ids, enc.labels):
        if lab != IGNORE_INDEX:
            run.append(tok)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    return spans + ([tokenizer.decode(run)] if run else [])


TWO_TURNS = {
    "image": "a.png",
    "messages": [
        {"role": "user", "content": "<image>What colour is the shape?"},
        {"role": "assistant", "content": "<think>\nThe shape is filled with red.\n</think>\n\nred"},
        {"role": "user", "content": "And the background?"},
        {"role": "assistant", "content": "blue", "reasoning_content": "Around the shape it is blue."},
    ],
}


def test_the_template_rewrites_history(thinking_processor):
    # The fact the design rests on: the multi-turn render is not a prefix extension of the one-turn render.
    chat = record(TWO_TURNS).chat()
    one = thinking_processor.apply_chat_template(chat[:2], tokenize=False)
    two = thinking_processor.apply_chat_template(chat, tokenize=False)
    assert "The shape is filled with red." in one and "The shape is filled with red." not in two
    assert not two.startswith(one)


def test_single_turn_trains_reasoning_and_answer(tmp_path, thinking_processor):
    write_image(tmp_path / "a.png", (64, 64))
    rec = record({"image": "a.png", "messages": TWO_TURNS["messages"][:2]}, tmp_path / "d.jsonl")
    enc = Encoder(thinking_processor)
    views = enc.views(rec)
    assert [v for v, _ in views] == [0]  # one turn: the template is prefix-stable, nothing special
    encoded = enc.encode(rec)
    # The generation prompt ends with "<think>\n": the reasoning and the answer are what the model writes.
    assert trained_text(encoded, thinking_processor.tokenizer) == ["The shape is filled with red.\n</think>\n\nred<|im_end|>"]


def test_each_answer_is_trained_in_the_context_it_has_as_the_last_turn(tmp_path, thinking_processor):
    write_image(tmp_path / "a.png", (64, 64))
    rec = record(TWO_TURNS, tmp_path / "d.jsonl")
    enc = Encoder(thinking_processor)
    views = enc.views(rec)
    assert [v for v, _ in views] == [2, 4]
    tok = thinking_processor.tokenizer
    first, second = (enc.encode(view) for _, view in views)
    assert trained_text(first, tok) == ["The shape is filled with red.\n</think>\n\nred<|im_end|>"]
    assert trained_text(second, tok) == ["Around the shape it is blue.\n</think>\n\nblue<|im_end|>"]
    # The second sample's context is the template's own render: the first answer without its reasoning,
    # untrained; its whole text equals what the template renders for the conversation.
    whole = tok.decode(second.input_ids)
    assert "<|im_start|>assistant\nred<|im_end|>" in whole and "filled with red" not in whole
    expected = thinking_processor.apply_chat_template(rec.chat(), tokenize=False)
    assert whole.replace("<|image_pad|>", "") == expected.replace("<|image_pad|>", "")
    # thinking_turns: last trains only the final answer, in the same context
    last = Encoder(thinking_processor, thinking_turns="last")
    (view, only), = last.views(rec)
    assert view == -1 and trained_text(last.encode(only), tok) == trained_text(second, tok)


def test_instruct_template_keeps_one_sample_with_every_answer(tmp_path, tiny_processor):
    write_image(tmp_path / "a.png", (64, 64))
    rec = record(TWO_TURNS, tmp_path / "d.jsonl")
    enc = Encoder(tiny_processor)
    assert [v for v, _ in enc.views(rec)] == [0]
    spans = trained_text(enc.encode(rec), tiny_processor.tokenizer)
    assert len(spans) == 2 and spans[1] == "blue<|im_end|>"
    assert enc.drops_reasoning(rec)  # the Instruct template ignores reasoning_content: check-data warns


def test_check_data_counts_every_view_as_training_feeds_it(tmp_path, thinking_processor, tiny_processor):
    from qvltune.data.check import CheckOptions, check_dataset
    from qvltune.data.dataset import Entry, SFTDataset

    write_image(tmp_path / "a.png", (64, 64))
    data = write_jsonl(tmp_path / "t.jsonl", [TWO_TURNS, {"image": "a.png", "messages": TWO_TURNS["messages"][:2]}])
    report = check_dataset(str(data), CheckOptions(processor=thinking_processor))
    assert not report.errors, report.problems
    assert [(u[1], u[4]) for u in report.usable] == [(0, 2), (0, 4), (1, 0)] and report.views == 2
    entries = [Entry(*u) for u in report.usable]
    dataset = SFTDataset(entries, Encoder(thinking_processor), [[i] for i in range(len(entries))])
    for i, e in enumerate(entries):
        (encoded,) = dataset[i]
        assert (len(encoded), encoded.trained_tokens) == (e.tokens, e.trained)
    # the same data under the Instruct template: one sample per record, and the dropped reasoning is named
    plain = check_dataset(str(data), CheckOptions(processor=tiny_processor))
    assert [(u[1], u[4]) for u in plain.usable] == [(0, 0), (1, 0)]
    assert [p.code for p in plain.warnings] == ["reasoning-dropped"]
    # a too-long view names the answer it ends at
    short = check_dataset(str(data), CheckOptions(processor=thinking_processor, max_seq_length=len(dataset[0][0]) + 2))
    assert any("the view up to answer 2" in p.message for p in short.errors)


def test_reasoning_outside_an_answer_is_an_error():
    bad = {"messages": [{"role": "user", "content": "q", "reasoning_content": "hm"}, {"role": "assistant", "content": "a"}]}
    rec, problems = parse_record(RawItem(0, 1, bad), "d.jsonl")
    assert rec is None and problems[0].field == "messages[0].reasoning_content"
