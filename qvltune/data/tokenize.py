"""Turn a ``Record`` into model inputs with the model's own processor and chat template.

Labels: only assistant turns are trained (every assistant turn of a multi-turn record), through
their end-of-turn token; everything else is -100. The spans are found without knowing the template:
the conversation is rendered prefix by prefix (``messages[:i]`` with the generation prompt, then
``messages[:i+1]``), and the text between the two is the answer.

Thinking templates (Qwen3-VL-*-Thinking) render the last answer as ``<think>reasoning</think>answer``
but drop the reasoning of earlier answers once a later user turn follows, so a multi-turn render is
not a prefix of the next one. Such a record is trained in views (``record_views``): with
``thinking_turns: each`` (the default) one view per assistant turn, the conversation up to that turn,
rendered exactly as the template renders it when that turn is the last (earlier answers without
their reasoning, as context), training that turn only; with ``last``, only the final turn. A template
that is not prefix-stable even for the last turn is refused with a clear error instead of being
guessed at.

Each segment (prompt, answer, tail) is run through the processor with just the media it contains,
so image and video tokens are expanded exactly as the processor expands them under the configured
pixel budget (Qwen3-VL: one token per 32x32 pixels after smart resize). Tokenizing per segment
splits the text where training and generation split it (the prompt ends at ``assistant\\n``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from qvltune.data.media import DEFAULT_IMAGE_PIXEL_LIMIT, ImageInfo, MediaError, VideoInfo, load_image, load_video, probe_image, probe_video, resolve
from qvltune.data.record import Media, Record
from qvltune.data.video import VideoSampling, configure_video_processor
from qvltune.data.video import metadata as video_metadata

IGNORE_INDEX = -100

# Without a model, text tokens are estimated from characters (Qwen's 151k vocabulary averages about
# 4 characters per token on English; we round down to stay on the safe side) plus the template's
# per-turn overhead (<|im_start|>role\n ... <|im_end|>\n = 5 tokens).
CHARS_PER_TOKEN_ESTIMATE = 3.5
TURN_OVERHEAD_TOKENS = 5


class TemplateError(Exception):
    pass


class HistoryRewritten(TemplateError):
    """The template renders earlier turns differently once later turns follow (Thinking templates)."""


ThinkingTurns = Literal["each", "last"]


@dataclass(frozen=True)
class Segment:
    text: str
    trainable: bool


def configure_processor(processor: Any, min_pixels: int | None, max_pixels: int | None) -> Any:
    """Set the image pixel budget on the processor itself, so training, counting and the saved
    processor (what inference will use) all agree."""
    ip = processor.image_processor
    size = dict(ip.size) if ip.size else {}
    if min_pixels is not None:
        size["shortest_edge"] = int(min_pixels)
    if max_pixels is not None:
        size["longest_edge"] = int(max_pixels)
    ip.size = size
    for attr, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if value is not None and hasattr(ip, attr):
            setattr(ip, attr, int(value))
    return processor


def render_segments(processor: Any, messages: list[dict[str, Any]], only_last: bool = False) -> list[Segment]:
    """Split the rendered conversation into untrained and trained (assistant) text segments.

    ``only_last``: train the last assistant turn only (earlier answers are context)."""
    template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
    if not template:
        raise TemplateError("the model has no chat template")

    def render(msgs: list[dict[str, Any]], generation_prompt: bool) -> str:
        return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    end_token = _end_of_turn(processor)
    segments: list[Segment] = []
    done = ""
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in answers[-1:] if only_last else answers:
        prompt = render(messages[:i], True)
        full = render(messages[: i + 1], False)
        if not full.startswith(prompt):
            raise TemplateError(
                "the chat template does not render an answer after its own generation prompt, "
                "so assistant turns cannot be located"
            )
        if not prompt.startswith(done):
            raise HistoryRewritten(
                "the chat template renders earlier turns differently once later turns follow "
                "(as Thinking templates drop earlier reasoning)"
            )
        answer = full[len(prompt) :]
        cut = answer.rfind(end_token) + len(end_token) if end_token and end_token in answer else len(answer)
        segments.append(Segment(prompt[len(done) :], False))
        segments.append(Segment(answer[:cut], True))
        if answer[cut:]:
            segments.append(Segment(answer[cut:], False))
        done = full
    return [s for s in segments if s.text]


def record_views(processor: Any, record: Record, thinking_turns: ThinkingTurns = "each") -> list[tuple[int, Record, list[Segment] | None]]:
    """The (view, record, its segments when already rendered) a record is trained as; view 0 is the whole record, every assistant
    turn trained. A template that rewrites earlier turns (``HistoryRewritten``) gives, with ``each``,
    view n = the first n messages training their last answer, for each answer; with ``last``, the
    whole record training only its last answer (view -1)."""
    try:
        segments = render_segments(processor, record.chat())
        return [(0, record, segments)]
    except HistoryRewritten:
        pass
    if thinking_turns == "last":
        return [(-1, view_of(record, -1), None)]
    ends = [i + 1 for i, m in enumerate(record.messages) if m.role == "assistant"]
    return [(n, view_of(record, n), None) for n in ends]


def view_of(record: Record, view: int) -> Record:
    """The record as ``record_views`` numbered it (0: itself)."""
    if view == 0:
        return record
    if view == -1:
        return replace(record, train_last_only=True)
    return replace(record, messages=record.messages[:view], train_last_only=True)


def _end_of_turn(processor: Any) -> str:
    tok = processor.tokenizer
    # Remembered on the tokenizer (per vocabulary size): get_vocab builds a dict of the whole
    # vocabulary, a tenth of the time of counting a record when asked for every one.
    known = getattr(tok, "_qvltune_end_of_turn", None)
    if known is not None and known[0] == len(tok):
        return known[1]
    vocab = tok.get_vocab()
    end = next((c for c in ("<|im_end|>", tok.eos_token) if c and c in vocab), "")
    tok._qvltune_end_of_turn = (len(tok), end)
    return end


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    mm_token_type_ids: list[int]
    pixel_values: Any = None  # torch.Tensor (patches, dim) or None
    image_grid_thw: Any = None
    pixel_values_videos: Any = None
    video_grid_thw: Any = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


class Encoder:
    """Encodes records for one processor, pixel budget and media root."""

    def __init__(self, processor: Any, *, root: Path | None = None, allow_outside_root: bool = False, video_fps: float = 2.0, thinking_turns: ThinkingTurns = "each", video: VideoSampling | None = None, image_pixel_limit: int = DEFAULT_IMAGE_PIXEL_LIMIT):
        self.processor = processor
        self.thinking_turns = thinking_turns
        self.image_pixel_limit = image_pixel_limit
        self.root = root
        self.allow_outside_root = allow_outside_root
        self._rendered: tuple[Record, list[Segment]] | None = None
        self.video = video or VideoSampling(fps=video_fps)
        self.video_fps = self.video.fps
        # The per-video token budget is set on the processor itself, like the image budget, so the
        # saved processor resizes videos as training did.
        configure_video_processor(processor, self.video)
        self.image_token = getattr(processor, "image_token", "<|image_pad|>")
        self.video_token = getattr(processor, "video_token", "<|video_pad|>")
        self._merge = processor.image_processor.merge_size**2

    def media_root(self, record: Record) -> Path:
        return self.root if self.root is not None else Path(record.file).parent

    def segments(self, record: Record) -> list[Segment]:
        if self._rendered is not None and self._rendered[0] is record:  # rendered by views() just before
            return self._rendered[1]
        return render_segments(self.processor, record.chat(), only_last=record.train_last_only)

    def views(self, record: Record) -> list[tuple[int, Record]]:
        views = record_views(self.processor, record, self.thinking_turns)
        # Rendering is most of the cost of exact counts: keep what deciding the views rendered.
        self._rendered = next(((rec, segs) for _, rec, segs in views if segs is not None), None)
        return [(view, rec) for view, rec, _ in views]

    def drops_reasoning(self, record: Record) -> bool:
        """Whether the template leaves out reasoning given for a trained answer (``reasoning_content``):
        Instruct templates ignore the field, so it would silently not be trained."""
        answers = [m for m in record.messages if m.role == "assistant"]
        trained = answers[-1:] if record.train_last_only else answers
        if not any(m.reasoning and m.reasoning.strip() for m in trained):
            return False
        text = "".join(seg.text for seg in self.segments(record) if seg.trainable)
        return any(m.reasoning and m.reasoning.strip() and m.reasoning.strip() not in text for m in trained)

    # -- counting (no pixel decoding: sizes come from file headers) -----------------------------

    def image_tokens(self, info: ImageInfo) -> int:
        patches = self.processor.image_processor.get_number_of_image_patches(info.height, info.width, {})
        return patches // self._merge

    def _video_placeholder(self, info: VideoInfo) -> str:
        import torch

        patches = self.processor.video_processor.get_num_of_video_patches(info.frames, info.height, info.width)
        t = -(-info.frames // self.processor.video_processor.temporal_patch_size)
        hw = patches // t
        merge = self.processor.video_processor.merge_size
        # Grid in patches (t, h, w) only needs the right product per frame for the placeholder.
        grid = torch.tensor([[t, hw // merge, merge]])
        # The processor's own placeholder: frame groups with the timestamps it writes between them.
        return self.processor.replace_video_token({"video_grid_thw": grid, "video_metadata": [video_metadata(info)]}, 0)

    def count(self, record: Record, infos: list[ImageInfo | VideoInfo]) -> tuple[int, int]:
        """(total tokens, trained tokens) of a record, exactly as ``encode`` will produce them."""
        tok = self.processor.tokenizer
        it = iter(infos)
        total = trained = 0
        for seg in self.segments(record):
            text = seg.text
            if self.image_token in text or self.video_token in text:
                text = self._expand(text, it)
            n = len(tok(text, add_special_tokens=False)["input_ids"])
            total += n
            trained += n if seg.trainable else 0
        return total, trained

    def _expand(self, text: str, infos) -> str:
        """The segment's text with each media placeholder expanded as the processor expands it.

        The replacement strings are the processor's own (``replace_video_token`` writes the frame
        groups and their timestamps), and so is the substitution: ``get_text_with_replacements`` is
        the step ``processor(...)`` runs before tokenizing, and processors may rewrite the text around
        a placeholder there (transformers 5.25's Qwen3-VL collapses the template's
        ``<|vision_start|><|video_pad|><|vision_end|>`` to the bare frame groups, 2 tokens fewer than
        5.24 writes). Going through it keeps the count equal to encoding under either behaviour."""
        images, videos = [], []
        for kind in self._placeholders(text):
            info = next(infos)
            if kind == "image":
                images.append(self.image_token * self.image_tokens(info))
            else:
                videos.append(self._video_placeholder(info))
        (expanded,), _ = self.processor.get_text_with_replacements([text], images_replacements=images, videos_replacements=videos)
        return expanded

    def _placeholders(self, text: str) -> list[str]:
        """'image' / 'video' for each media placeholder of ``text``, in order (which media item each takes)."""
        kinds, i = [], 0
        while True:
            ji = text.find(self.image_token, i)
            jv = text.find(self.video_token, i)
            if ji < 0 and jv < 0:
                return kinds
            j = min(x for x in (ji, jv) if x >= 0)
            kinds.append("image" if j == ji else "video")
            i = j + len(self.image_token if j == ji else self.video_token)

    def probe(self, record: Record, deep: bool = False) -> list[ImageInfo | VideoInfo]:
        """Header-read every media item of a record (raises ``MediaError`` naming the item)."""
        root = self.media_root(record)
        infos: list[ImageInfo | VideoInfo] = []
        for m in record.media:
            try:
                if m.kind == "image":
                    infos.append(probe_image(resolve(m.source, root, self.allow_outside_root), deep, self.image_pixel_limit))
                else:
                    infos.append(probe_video(m.source, root, self.allow_outside_root, self.video, deep, self.image_pixel_limit))
            except MediaError as e:
                e.field = m.field
                raise
        return infos

    # -- encoding --------------------------------------------------------------------------------

    def encode(self, record: Record) -> Encoded:
        """Load the record's media and produce input ids, labels and pixel values."""
        import torch

        media = iter(record.media)
        ids: list[int] = []
        labels: list[int] = []
        types: list[int] = []
        pixels, grids, vpixels, vgrids = [], [], [], []
        for seg in self.segments(record):
            n_media = seg.text.count(self.image_token) + seg.text.count(self.video_token)
            images, videos, metas = self.load_media(record, [next(media) for _ in range(n_media)])
            kwargs: dict[str, Any] = {}
            if images:
                kwargs["images"] = images
            if videos:
                kwargs["videos"] = videos
                kwargs["videos_kwargs"] = {"do_sample_frames": False, "video_metadata": metas}
            enc = self.processor(text=[seg.text], return_tensors="pt", **kwargs)
            seg_ids = enc["input_ids"][0].tolist()
            ids += seg_ids
            labels += seg_ids if seg.trainable else [IGNORE_INDEX] * len(seg_ids)
            if "mm_token_type_ids" in enc:
                types += enc["mm_token_type_ids"][0].tolist()
            else:
                types += [1 if t == self.processor.image_token_id else 2 if t == self.processor.video_token_id else 0 for t in seg_ids]
            if images:
                pixels.append(enc["pixel_values"])
                grids.append(enc["image_grid_thw"])
            if videos:
                vpixels.append(enc["pixel_values_videos"])
                vgrids.append(enc["video_grid_thw"])
        return Encoded(
            ids,
            labels,
            types,
            torch.cat(pixels) if pixels else None,
            torch.cat(grids) if grids else None,
            torch.cat(vpixels) if vpixels else None,
            torch.cat(vgrids) if vgrids else None,
        )

    def load_media(self, record: Record, media: list[Media] | None = None) -> tuple[list[Any], list[Any], list[Any]]:
        """Decoded (images, videos, video metadata) of a record's media, in order."""
        root = self.media_root(record)
        images, videos, metas = [], [], []
        for m in record.media if media is None else media:
            if m.kind == "image":
                try:
                    images.append(load_image(resolve(m.source, root, self.allow_outside_root), self.image_pixel_limit))
                except MediaError as e:
                    e.field = e.field or m.field
                    raise
            else:
                frames, meta = self._load_video(m, root)
                videos.append(frames)
                metas.append(meta)
        return images, videos, metas

    def _load_video(self, m: Media, root: Path):
        try:
            info = probe_video(m.source, root, self.allow_outside_root, self.video, pixel_limit=self.image_pixel_limit)
            frames = load_video(info, m.source, root, self.allow_outside_root, self.image_pixel_limit)
        except MediaError as e:
            e.field = e.field or m.field
            raise
        return frames, video_metadata(info)


# The released Qwen3-VL video processors' budget (video_preprocessor_config.json): frames x height x
# width between these many pixels.
QWEN3VL_VIDEO_MIN_PIXELS = 4096
QWEN3VL_VIDEO_MAX_PIXELS = 25165824


def estimate_tokens(record: Record, infos: list[ImageInfo | VideoInfo], min_pixels: int, max_pixels: int, video_max_tokens: int | None = None) -> int:
    """Token count without a model: exact image tokens for the Qwen3-VL geometry (patch 16, merge 2),
    text estimated from characters. Used by ``check-data`` when no ``--model`` is given."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    total = 0
    it = iter(infos)
    for msg in record.messages:
        total += TURN_OVERHEAD_TOKENS
        for part in msg.parts:
            if isinstance(part, Media):
                info = next(it)
                if isinstance(info, ImageInfo):
                    h, w = smart_resize(info.height, info.width, factor=32, min_pixels=min_pixels, max_pixels=max_pixels)
                    total += (h // 32) * (w // 32) + 2  # + vision start/end
                else:
                    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as video_resize

                    budget = video_max_tokens * 32 * 32 * 2 if video_max_tokens else QWEN3VL_VIDEO_MAX_PIXELS
                    frames = max(2, info.frames)
                    h, w = video_resize(frames, info.height, info.width, temporal_factor=2, factor=32, min_pixels=min(QWEN3VL_VIDEO_MIN_PIXELS, budget), max_pixels=budget)
                    groups = -(-frames // 2)
                    total += groups * ((h // 32) * (w // 32) + 2 + 6)  # + "<t seconds>" before each group
            else:
                total += int(len(part) / CHARS_PER_TOKEN_ESTIMATE + 0.999)
    return total
