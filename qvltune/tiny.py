"""The embedded tiny Qwen3-VL and the synthetic task that ``qvltune demo`` and the tests train on.

No weights can be downloaded where qvltune is developed and tested, so everything runs on a model
built here: the real ``Qwen3VLForConditionalGeneration`` class with a small random-init config
(2 text and 2 vision layers of width 128, DeepStack on, tied embeddings like the 2B/4B models), a
small byte-level BPE tokenizer trained on a fixed corpus and carrying the Qwen special tokens, the
Qwen3-VL chat template and the real image/video processors. It is saved as an ordinary model
folder that ``AutoProcessor`` / ``AutoModelForImageTextToText`` load, cached under the user cache
directory, and rebuilt (deterministically) when missing.

The synthetic task: Pillow draws one shape (circle, square, triangle) of one of six colours on a
background of another colour, at varied sizes and aspect ratios; the questions ask for the shape's
colour and the background's colour. A model that ignores the image cannot beat chance (1 in 6);
the tiny model learns both in about one epoch (measured on a 2-core CPU).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

BUILTIN_TINY = "builtin:tiny"
# Bump when the tiny model's definition changes, so stale caches are rebuilt rather than reused.
TINY_VERSION = 2

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The Qwen3-VL instruct chat template's behaviour for system/user/assistant turns with string or
# content-list messages (images and videos as <|vision_start|><|image_pad|><|vision_end|>), no
# default system prompt, optional "Picture N:" labels. Tool calls are out of scope for the tiny model.
CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}"
    "{%- set video_count = namespace(value=0) -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message.role + '\\n' -}}"
    "{%- if message.content is string -%}{{- message.content -}}"
    "{%- else -%}{%- for content in message.content -%}"
    "{%- if content.type == 'image' or 'image' in content or 'image_url' in content -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content.type == 'video' or 'video' in content -%}"
    "{%- set video_count.value = video_count.value + 1 -%}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content -%}{{- content.text -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Qwen2's pre-tokenizer split (tokenization_qwen2.PRETOKENIZE_REGEX), so the tiny tokenizer splits
# text exactly as the real Qwen tokenizer does, only with a much smaller vocabulary.
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {
    "shape_colour": "What colour is the shape?",
    "background_colour": "What colour is the background?",
}
# The grounding question: where the shape is, answered as a Qwen3-VL box (0-1000 relative to the
# image). Kept out of QUESTIONS, whose text the tiny tokenizer is trained on (changing it would
# change the tokenizer and every cached tiny model).
GROUNDING_TYPE = "shape_box"
GROUNDING_QUESTION = "Where is the shape? Answer with its box."
# Image sizes of the demo data: varied sizes and aspect ratios, up to 192x128 (a few image tokens
# each, so a CPU trains on thousands of them in seconds).
_WIDTHS = (64, 96, 128, 160, 192)
_HEIGHTS = (64, 96, 128)

# Pixel budget of the tiny model's processor: 4 to 64 image tokens (one token = 32x32 pixels).
TINY_MIN_PIXELS = 4 * 32 * 32
TINY_MAX_PIXELS = 64 * 32 * 32


def cache_dir() -> Path:
    """Where qvltune keeps the built tiny model (``QVLTUNE_CACHE`` overrides)."""
    if os.environ.get("QVLTUNE_CACHE"):
        return Path(os.environ["QVLTUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "qvltune"


def tiny_model_path() -> Path:
    """The tiny model's folder, built on first use (atomically: a crash never leaves half a folder)."""
    dest = cache_dir() / f"tiny-qwen3-vl-v{TINY_VERSION}"
    if (dest / "config.json").exists() and (dest / "model.safetensors").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=dest.parent))
    try:
        build_tiny_model(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process built it first
            if not (dest / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


MODEL_PATH_HINT = "give a local model folder (with config.json), a Hub id such as Qwen/Qwen3-VL-2B-Instruct, or builtin:tiny"


def looks_like_path(name: str) -> bool:
    """A local path rather than a Hub id ("org/name"): starts with / . ~, or has more than one /."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def model_not_found(path: str, hint: str = MODEL_PATH_HINT):
    """The one message for a model folder that does not exist (every command raises this one)."""
    from qvltune.errors import UserError

    return UserError(f"model folder not found: {path}", hint)


def resolve_model_path(name_or_path: str) -> str:
    """Map ``builtin:tiny`` to the cached folder; a Hub id stays as it is; a local path must exist.

    Every command resolves its model here, so a missing folder reads the same everywhere (and never
    reaches the Hub client, which would call it a malformed repo id)."""
    if name_or_path == BUILTIN_TINY:
        return str(tiny_model_path())
    if looks_like_path(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise model_not_found(name_or_path)
    return name_or_path


def _tokenizer_corpus() -> list[str]:
    """A fixed corpus: the demo's vocabulary plus ordinary English, so any text tokenizes compactly."""
    words = (
        "the a an is are was of to in on and or with what which who where how many colour color "
        "shape background image picture photo video frame describe show shows shown answer question "
        "left right top bottom middle centre center large small big tiny one two three four five six "
        "yes no there this that it its please write short long text document chart table page number "
        "cat dog car tree house person people sky water road sign red green blue yellow purple orange "
        "black white grey gray brown pink circle square triangle rectangle line dot object objects "
        "count letter word read reads say says see seen look looks like model train fine tune data "
        "system user assistant you are helpful assistant hello thanks good bad true false first second"
    ).split()
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(4000)]
    lines += [f"{q} {c.capitalize()}. {c}" for q in QUESTIONS.values() for c in COLOURS]
    lines += ["0123456789 .,:;!?()[]{}<>\"'-_/\\@#$%^&*+=~`|\n\n"] * 10
    return lines


def build_tokenizer():
    """Train the tiny byte-level BPE tokenizer (deterministic) and wrap it as a Qwen2 tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(_tokenizer_corpus(), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges)
    tokenizer.add_tokens(SPECIAL_TOKENS, special_tokens=True)
    tokenizer.eos_token = "<|im_end|>"  # what the instruct models stop generation on
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 4096
    return tokenizer


def build_tiny_model(dest: Path) -> Path:
    """Write the tiny Qwen3-VL (model, tokenizer, processors, chat template) into ``dest``."""
    import torch
    from transformers import GenerationConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    # Qwen3-VL's normalisation constants (mean = std = 0.5) and geometry (patch 16, merge 2).
    vision_kwargs = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": TINY_MIN_PIXELS, "longest_edge": TINY_MAX_PIXELS}, **vision_kwargs
    )
    video_processor = Qwen3VLVideoProcessor(
        size={"shortest_edge": TINY_MIN_PIXELS, "longest_edge": TINY_MAX_PIXELS * 8}, **vision_kwargs
    )
    processor = Qwen3VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor, chat_template=CHAT_TEMPLATE
    )
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            # Interleaved M-RoPE like the released models; the sections split head_dim/2 = 16.
            rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [6, 5, 5], "mrope_interleaved": True},
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            pad_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=128,
            intermediate_size=256,
            num_heads=4,
            out_hidden_size=128,
            num_position_embeddings=256,
            # One DeepStack merger: vision layer 0 feeds LLM layer 0. (A merger feeding the last LLM layer
            # would only touch image positions, which carry no labels, and could never learn.)
            deepstack_visual_indexes=[0],
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"], do_sample=False
    )
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    return dest


# ----------------------------------------------------------------------------------------------
# The synthetic task


@dataclass(frozen=True)
class DemoSample:
    image: str  # file name, relative to the dataset folder
    question_type: str
    answer: str


def draw_sample(rng: random.Random):
    """One image and its labels: a shape of one colour on a background of another."""
    from PIL import Image, ImageDraw

    width, height = rng.choice(_WIDTHS), rng.choice(_HEIGHTS)
    shape_colour, background = rng.sample(sorted(COLOURS), 2)
    shape = rng.choice(SHAPES)
    image = Image.new("RGB", (width, height), COLOURS[background])
    draw = ImageDraw.Draw(image)
    size = rng.randint(min(width, height) // 3, int(min(width, height) * 0.8))
    x0, y0 = rng.randint(0, width - size), rng.randint(0, height - size)
    box = (x0, y0, x0 + size, y0 + size)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[shape_colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[shape_colour])
    else:
        draw.polygon([(x0 + size // 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=COLOURS[shape_colour])
    # The shape's box in Qwen3-VL's convention: 0-1000 relative to the image's width and height.
    box = [round(x0 / width * 1000), round(y0 / height * 1000), round((x0 + size) / width * 1000), round((y0 + size) / height * 1000)]
    return image, {"shape_colour": shape_colour, "background_colour": background, "shape": shape, GROUNDING_TYPE: json.dumps({"bbox_2d": box})}


def make_demo_dataset(dest: Path, n_train: int = 3000, n_eval: int = 300, seed: int = 0, grounding_every: int = 0) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` (Qwen official format) and their PNG images into ``dest``.

    Each image gets one question, alternating between the colour questions, so the splits are
    balanced; with ``grounding_every`` N, every Nth record asks for the shape's box instead.
    """
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "images").mkdir(exist_ok=True)
    rng = random.Random(seed)
    question_types = list(QUESTIONS)
    paths = []
    for split, count in (("train", n_train), ("eval", n_eval)):
        path = dest / f"{split}.jsonl"
        with open(path, "w") as f:
            for i in range(count):
                image, labels = draw_sample(rng)
                name = f"images/{split}_{i:05d}.png"
                image.save(dest / name)
                if grounding_every and i % grounding_every == grounding_every - 1:
                    qtype, question = GROUNDING_TYPE, GROUNDING_QUESTION
                else:
                    qtype = question_types[(i - (i // grounding_every if grounding_every else 0)) % len(question_types)]
                    question = QUESTIONS[qtype]
                record = {
                    "id": f"{split}-{i}",
                    "image": name,
                    "question_type": qtype,
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{question}"},
                        {"from": "gpt", "value": labels[qtype]},
                    ],
                }
                f.write(json.dumps(record) + "\n")
        paths.append(path)
    return paths[0], paths[1]


# ----------------------------------------------------------------------------------------------
# The preference task (``qvltune demo --stage dpo``)

# The phrasing preferred over the SFT demo's bare colour: something SFT never taught, colour first
# ("red it is.", as in "Red it is!"). The colour is then the very token SFT trained ("red", no
# leading space; the tiny tokenizer splits the answer into red / it / is / .), so DPO only has to
# learn to go on after it instead of stopping. Measured on the demo: colour last ("it is red.")
# puts the colour after a space, " red", a token SFT never trained, and generation lost the colour
# ("it isit is"); "red is the colour." looped on " the" ("red is the the the") after as much training.
PREFERRED_ANSWER = "{colour} it is."


def preferred(colour: str) -> str:
    return PREFERRED_ANSWER.format(colour=colour)


def colours_in(answer: str) -> list[str]:
    """The demo's colour words in an answer, in order ("red it is." -> ["red"])."""
    return [w for w in re.findall(r"[a-z]+", answer.lower()) if w in COLOURS]


def make_preference_dataset(dest: Path, n_train: int = 1000, n_eval: int = 100, seed: int = 7) -> tuple[Path, Path]:
    """``pref_train.jsonl`` and ``pref_eval.jsonl`` (LLaMA-Factory's preference layout) on new images
    drawn like the SFT demo's, in ``dest/images``.

    Every pair prefers the right colour in the fixed phrasing ``<colour> it is.``; the rejected answer
    alternates between the SFT demo's own bare answer (the right colour: a style preference SFT never
    taught) and the same phrasing with a plausible wrong colour (the other colour in the picture:
    the background's for the shape question and the shape's for the background question)."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "images").mkdir(exist_ok=True)
    rng = random.Random(seed)
    question_types = list(QUESTIONS)
    other = {"shape_colour": "background_colour", "background_colour": "shape_colour"}
    paths = []
    for split, count in (("train", n_train), ("eval", n_eval)):
        path = dest / f"pref_{split}.jsonl"
        with open(path, "w") as f:
            for i in range(count):
                image, labels = draw_sample(rng)
                name = f"images/pref_{split}_{i:05d}.png"
                image.save(dest / name)
                qtype = question_types[i % len(question_types)]
                right, wrong = labels[qtype], labels[other[qtype]]
                kind = "style" if (i // len(question_types)) % 2 == 0 else "colour"
                rejected = right if kind == "style" else preferred(wrong)
                record = {
                    "id": f"pref-{split}-{i}",
                    "question_type": qtype,
                    "preference": kind,
                    "conversations": [{"from": "human", "value": f"<image>\n{QUESTIONS[qtype]}"}],
                    "chosen": {"from": "gpt", "value": preferred(right)},
                    "rejected": {"from": "gpt", "value": rejected},
                    "images": [name],
                }
                f.write(json.dumps(record) + "\n")
        paths.append(path)
    return paths[0], paths[1]
