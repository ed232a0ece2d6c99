"""Property-based tests: random and malformed configs and records end in a clean result or a clean
error — never an uncaught exception."""

from __future__ import annotations

import json
import string
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qvltune.config import parse_config
from qvltune.data.check import CheckOptions, check_dataset
from qvltune.data.files import read_items
from qvltune.data.formats import parse_record
from qvltune.data.record import RawItem
from qvltune.data.tokenize import IGNORE_INDEX, Encoder
from qvltune.errors import UserError

json_scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4), max_leaves=20)

CONFIG_KEYS = {
    "name": st.text(max_size=12) | st.just("run"),
    "output_dir": st.text(max_size=12),
    "model": st.fixed_dictionaries({"path": st.text(max_size=12)}, optional={"attn_implementation": json_scalars, "trust_remote_code": json_scalars, "random_init": json_scalars}) | json_values,
    "data": st.fixed_dictionaries({"train": st.text(max_size=12)}, optional={k: json_values for k in ("eval", "eval_split", "min_pixels", "max_pixels", "max_image_tokens", "max_seq_length", "packing", "on_bad_sample")}) | json_values,
    "strategy": st.sampled_from(["lora", "full", "mixed", "both", ""]) | json_scalars,
    "components": st.dictionaries(st.sampled_from(["vision", "merger", "deepstack", "llm", "lm_head", "other"]), st.sampled_from(["frozen", "full", "lora", "x"]), max_size=5) | json_values,
    "lora": st.dictionaries(st.sampled_from(["rank", "alpha", "dropout", "target_modules", "vision_target_modules"]), json_values, max_size=4),
    "optim": st.dictionaries(st.sampled_from(["learning_rate", "per_device_batch", "grad_accum", "effective_batch", "epochs", "max_steps", "bf16", "warmup_ratio", "compile"]), json_values, max_size=5),
    "schedule": st.dictionaries(st.sampled_from(["log_steps", "eval_steps", "save_steps", "save_total_limit", "profile_steps"]), json_values, max_size=4),
    "deepspeed": st.dictionaries(st.sampled_from(["stage", "offload_optimizer", "offload_params"]), json_values, max_size=3),
    "launch": st.dictionaries(st.sampled_from(["gpus", "nodes", "hostfile", "cpu_processes"]), json_values, max_size=3),
    "extra": json_values,
}


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional=CONFIG_KEYS) | json_values)
def test_any_config_document_is_accepted_or_cleanly_refused(doc):
    try:
        cfg = parse_config(doc, "fuzz.yaml")
    except UserError as e:
        assert e.message.startswith("fuzz.yaml")
    else:
        assert cfg.modes() and cfg.run_dir


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_yaml_text_is_accepted_or_cleanly_refused(tmp_path_factory, text):
    from qvltune.config import load_config

    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except UserError:
        pass


ROLES = st.sampled_from(["human", "gpt", "system", "user", "assistant", "bot", "", None, 3])
turn = st.fixed_dictionaries({"from": ROLES, "value": st.text(max_size=30) | json_scalars}) | st.fixed_dictionaries({"role": ROLES, "content": st.text(max_size=30) | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image", "video", "audio"]), "text": json_scalars, "image": json_scalars}), max_size=3)})
record = st.fixed_dictionaries({}, optional={"conversations": st.lists(turn, max_size=5) | json_values, "messages": st.lists(turn, max_size=5) | json_values, "image": json_values, "images": json_values, "video": json_values}) | json_values


@settings(max_examples=400, deadline=None)
@given(record)
def test_any_record_parses_or_reports_problems(value):
    rec, problems = parse_record(RawItem(0, 1, value), "d.jsonl")
    assert (rec is None) == any(p.severity == "error" for p in problems)  # no record without a reason
    for p in problems:
        assert p.message and p.file == "d.jsonl"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(record | st.text(max_size=40), max_size=8), st.booleans())
def test_check_data_never_crashes(tmp_path, records, as_list):
    path = Path(tmp_path) / ("d.json" if as_list else "d.jsonl")
    if as_list:
        path.write_text(json.dumps([r for r in records if not isinstance(r, str)]) if records else "[")
    else:
        path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records))
    report = check_dataset(str(path), CheckOptions(max_seq_length=512))
    assert report.records >= report.valid
    json.dumps(report.to_json())


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_are_read_or_reported(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("b") / "d.jsonl"
    path.write_bytes(data)
    for item in read_items(path):
        assert item.problem is None or item.problem.message


text = st.text(alphabet=string.ascii_letters + string.digits + " .,?!\n'éü", min_size=1, max_size=40).filter(lambda t: t.strip())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(text, text), min_size=1, max_size=3), st.one_of(st.none(), text))
def test_tokenization_labels_exactly_the_answers(tiny_processor, turns, system):
    messages = ([{"role": "system", "content": system}] if system else []) + [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    rec, problems = parse_record(RawItem(0, 1, {"messages": messages}), "d.jsonl")
    assert rec is not None, problems
    enc = Encoder(tiny_processor).encode(rec)
    tok = tiny_processor.tokenizer
    runs, run = [], []
    for t, label in zip(enc.input_ids, enc.labels):
        if label != IGNORE_INDEX:
            run.append(t)
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    assert [tok.decode(r) for r in runs] == [a + "<|im_end|>" for _, a in turns]


# ---------------------------------------------------------------------------------------------
# Hostile media and records end to end: check-data finishes, reports every failing record on its
# line, and accounts for every record (valid + failed = total); what it accepts, training can load.

ODD_MODES = ["1", "L", "LA", "P", "P+t", "RGB", "RGBA", "I;16", "CMYK"]
FORMATS = ["PNG", "GIF", "WEBP", "JPEG", "TIFF", "BMP"]


def _odd_image(draw) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    w, h = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    mode, fmt = draw(st.sampled_from(ODD_MODES)), draw(st.sampled_from(FORMATS))
    seed = draw(st.integers(0, 2**16))
    rgb = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")
    if mode == "I;16":
        im = Image.fromarray(np.random.default_rng(seed).integers(0, 65535, (h, w), dtype=np.uint16))
    elif mode == "P+t":
        im = rgb.convert("P")
        im.info["transparency"] = 0
    else:
        im = rgb.convert(mode)
    kwargs = {}
    if draw(st.booleans()) and fmt in ("JPEG", "WEBP", "TIFF", "PNG"):
        exif = Image.Exif()
        exif[0x0112] = draw(st.integers(0, 9))
        kwargs["exif"] = exif
    if draw(st.booleans()) and fmt in ("GIF", "WEBP"):
        kwargs.update(save_all=True, append_images=[rgb.transpose(Image.Transpose.ROTATE_180).convert(im.mode)])
    buf = io.BytesIO()
    try:
        im.save(buf, fmt, **kwargs)
    except (OSError, ValueError, KeyError):  # a mode the format cannot store: PNG stores it as RGB
        buf = io.BytesIO()
        (im if im.mode != "CMYK" else im.convert("RGB")).save(buf, "PNG")
    return buf.getvalue()


@st.composite
def media_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "truncated", "odd"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    data = _odd_image(draw)
    if kind == "truncated":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    return data


@st.composite
def hostile_dataset(draw):
    n_media = draw(st.integers(1, 5))
    media = [draw(media_bytes()) for _ in range(n_media)]
    names = [f"m{i}.{draw(st.sampled_from(['png', 'jpg', 'gif', 'webp', 'bin']))}" for i in range(n_media)]
    ref = st.sampled_from(names + ["missing.png", "../outside.png", "http://example.com/a.png"])
    image_record = ref.map(lambda n: {"image": n, "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "that"}]})
    video_record = st.lists(ref, min_size=1, max_size=3).map(lambda fs: {"video": [fs], "conversations": [{"from": "human", "value": "<video>What?"}, {"from": "gpt", "value": "this"}]})
    line = image_record | video_record | json_values | st.text(alphabet=st.characters(blacklist_characters="\n"), max_size=30)
    lines = draw(st.lists(line, min_size=1, max_size=8))
    return names, media, lines, draw(st.booleans())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(hostile_dataset())
def test_hostile_media_and_records_never_crash_and_every_record_is_accounted_for(tmp_path_factory, capsys, dataset):
    import pytest

    from qvltune.cli import main
    from qvltune.data.media import MediaError, load_image, probe_image

    names, media, lines, as_list = dataset
    root = tmp_path_factory.mktemp("hostile")
    for name, data in zip(names, media):
        (root / name).write_bytes(data)
    first = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}  # never '[': JSONL stays JSONL
    if as_list:
        path = root / "d.json"
        values = [first] + lines
        path.write_text(json.dumps(values))
        total = len(values)
    else:
        path = root / "d.jsonl"
        text = "\n".join(json.dumps(v) if not isinstance(v, str) else v for v in [first] + lines) + "\n"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        total = sum(1 for ln in path.read_bytes().split(b"\n") if ln.strip())
    with pytest.raises(SystemExit) as exit_info:
        main(["check-data", str(path), "--json", "--deep"])
    out, err = capsys.readouterr()
    assert exit_info.value.code in (0, 1), err
    assert "unexpected" not in err and "Traceback" not in err, err
    doc = json.loads(out)
    assert not [p for p in doc["problems"] if p["code"] == "internal-error"], doc["problems"]
    failing = {p["index"] for p in doc["problems"] if p["severity"] == "error" and p["index"] is not None}
    assert all(p["line"] is not None for p in doc["problems"] if p["index"] is not None)  # every record error has its line
    assert doc["records"] == total and doc["valid_records"] + doc["failed_records"] == total and doc["failed_records"] == len(failing)
    # What the deep check accepts, training and inference decode, at the size the check counted.
    for name in names:
        try:
            info = probe_image(root / name, deep=True)
        except MediaError:
            with pytest.raises(MediaError):
                load_image(root / name)
            continue
        im = load_image(root / name)
        assert im.mode == "RGB" and im.size == (info.width, info.height)
