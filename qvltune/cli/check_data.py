"""``qvltune check-data``: validate a dataset and summarise it."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from qvltune import console
from qvltune.data.check import CheckOptions, Report, check_dataset
from qvltune.data.media import DEFAULT_IMAGE_PIXEL_LIMIT
from qvltune.data.problems import group_problems
from qvltune.data.run_check import FLAG_FIELDS
from qvltune.data.video import VideoSampling
from qvltune.errors import UserError
from qvltune.pixels import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, TOKEN_PIXELS, resolve_pixels

MAX_LISTED = 200  # problem lines printed (after grouping); the rest are counted (all are in --json)


def command(
    ctx: typer.Context,
    data: str = typer.Argument(None, metavar="DATA", help="Dataset file(s): a.jsonl, or a mixture a.jsonl%50,b.json (with --config: instead of data.train)"),
    config: Path = typer.Option(None, "--config", metavar="RUN.yaml", help="Check a run's data (train and eval) exactly as `qvltune train RUN.yaml` will, with all its data settings and model, and write the index cache it reuses. A flag given beside it overrides the config's field for this check."),
    image_root: Path = typer.Option(None, "--image-root", help="Folder that relative media paths resolve against (default: each dataset's folder)."),
    model: str = typer.Option(None, "--model", help="Model folder or Hub id (or builtin:tiny) for exact token counts with its chat template."),
    min_pixels: int = typer.Option(None, "--min-pixels", help="Smallest image area after resize, in pixels (Qwen3-VL: one token per 32x32)."),
    max_pixels: int = typer.Option(None, "--max-pixels", help="Largest image area after resize, in pixels."),
    min_image_tokens: int = typer.Option(None, "--min-image-tokens", help="Same as --min-pixels, in tokens per image."),
    max_image_tokens: int = typer.Option(None, "--max-image-tokens", help="Same as --max-pixels, in tokens per image."),
    max_seq_length: int = typer.Option(None, "--max-seq-length", help="Flag records longer than this many tokens."),
    thinking_turns: str = typer.Option("each", "--thinking-turns", metavar="each|last", help="Thinking templates (earlier reasoning dropped): train every answer as the last turn (each) or only the final one."),
    video_fps: float = typer.Option(2.0, "--video-fps", min=0.01, help="Frames per second sampled from video files (frame folders/lists are taken to be at this rate)."),
    video_min_frames: int = typer.Option(2, "--video-min-frames", min=2, help="Fewest frames sampled from a video file."),
    video_max_frames: int = typer.Option(None, "--video-max-frames", min=2, help="Most frames per video (files and frame lists)."),
    video_max_tokens: int = typer.Option(None, "--video-max-tokens", min=1, help="LLM tokens per video, all frames (lowers the resolution of long videos)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Check records in this many processes (large datasets; the report is the same). With --config: as qvltune train (every core for data over 16 MB)."),
    deep: bool = typer.Option(False, "--deep", help="Decode every image fully (catches truncated files; slower)."),
    allow_outside_root: bool = typer.Option(False, "--allow-outside-root", help="Accept media paths outside the image root."),
    image_pixel_limit: int = typer.Option(DEFAULT_IMAGE_PIXEL_LIMIT, "--image-pixel-limit", min=1, help="Largest image (width x height as stored) to decode; bigger ones are refused as possible decompression bombs (default: Pillow's limit). Config: data.image_pixel_limit."),
    strict: bool = typer.Option(False, "--strict", help="Fail on warnings too."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document and nothing else."),
) -> int:
    """Find every problem in a multimodal dataset before any GPU time is spent."""
    if config is not None:
        given = {name: ctx.params[name] for name in FLAG_FIELDS if _given(ctx, name)}
        return check_config(config, given, workers=workers if _given(ctx, "workers") else None, deep=deep, strict=strict, as_json=as_json)
    if data is None:
        raise typer.BadParameter("give a dataset file (DATA), or a run config (--config RUN.yaml)", param_hint="DATA")
    if thinking_turns not in ("each", "last"):
        raise typer.BadParameter(f"'{thinking_turns}' is not one of each, last", param_hint="--thinking-turns")
    try:
        lo, hi = resolve_pixels(min_pixels, max_pixels, min_image_tokens, max_image_tokens)
    except ValueError as e:
        raise UserError(str(e), "give pixels or tokens, not both, with min <= max") from None
    processor = None
    if model:
        from qvltune.model import load_processor

        processor = load_processor(model, lo, hi)
        lo = processor.image_processor.size["shortest_edge"]
        hi = processor.image_processor.size["longest_edge"]
    lo = lo if lo is not None else DEFAULT_MIN_PIXELS
    hi = hi if hi is not None else DEFAULT_MAX_PIXELS
    from qvltune.preference.data import check_pairs, is_preference_data

    options = CheckOptions(
        image_root=image_root, processor=processor, model_name=model, min_pixels=lo, max_pixels=hi, max_seq_length=max_seq_length, deep=deep,
        allow_outside_root=allow_outside_root, video=VideoSampling(video_fps, video_min_frames, video_max_frames, video_max_tokens),
        thinking_turns=thinking_turns, image_pixel_limit=image_pixel_limit,
    )

    try:
        preference = is_preference_data(data)
    except ValueError as e:  # a malformed mixture spec
        raise UserError(str(e), "write mixtures as a.jsonl%50,b.jsonl") from None
    try:
        with _progress(enabled=not console.err.is_dumb_terminal and console.err.is_terminal) as progress:
            if preference:  # chosen/rejected pairs (qvltune.preference): each answer checked as a record
                report = check_pairs(data, options)
            else:
                report = check_dataset(data, options, workers=workers, progress=progress)
    except ValueError as e:  # a malformed mixture spec
        raise UserError(str(e), "write mixtures as a.jsonl%50,b.jsonl") from None
    if as_json:
        doc = report.to_json()
        doc["pixels"] = {"min": lo, "max": hi}
        console.print_json(doc)
    else:
        render(report, lo, hi, strict)
    return 0 if report.ok(strict) else 1


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave this parameter (on the command line or in the environment), not its default."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def check_config(config: Path, given: dict, *, workers: int | None, deep: bool, strict: bool, as_json: bool) -> int:
    """``check-data --config RUN.yaml``: the run's data checked as ``qvltune train`` checks it
    (``qvltune.data.run_check``), each dataset's report, and where the index cache entry went."""
    from qvltune.config import load_config
    from qvltune.data.run_check import check_run, apply_overrides
    from qvltune.model import run_processor

    if given.get("thinking_turns", "each") not in ("each", "last"):
        raise typer.BadParameter(f"'{given['thinking_turns']}' is not one of each, last", param_hint="--thinking-turns")
    cfg, notes = apply_overrides(load_config(config), given, str(config))
    processor = run_processor(cfg)
    lo, hi = processor.image_processor.size["shortest_edge"], processor.image_processor.size["longest_edge"]
    for note in notes:
        console.note(note)
    show = not as_json and not console.err.is_dumb_terminal and console.err.is_terminal
    try:
        checks = check_run(cfg, processor, workers=workers, deep=deep, progress=lambda: _progress(enabled=show))
    except ValueError as e:  # a malformed mixture spec
        raise UserError(str(e), "write mixtures as a.jsonl%50,b.jsonl") from None
    ok = all(c.report.ok(strict) for c in checks)
    if as_json:
        docs = {}
        for c in checks:
            docs[c.field.split(".")[1]] = {**c.report.to_json(), "pixels": {"min": lo, "max": hi}, "index_cache": str(c.cache_file) if c.cache_file else None}
        console.print_json({"config": str(config), "overrides": notes, **docs})
        return 0 if ok else 1
    out = console.out
    out.print(f"checking the data of {config} as `qvltune train` will: model {cfg.model.path}, max_seq_length {cfg.data.max_seq_length}, thinking_turns {cfg.data.thinking_turns}", highlight=False)
    for c in checks:
        out.print()
        out.print(f"[bold]{c.field}[/]")
        c.report.files = [_shown(f) for f in c.report.files]  # the config's paths are absolute: shown from here
        render(c.report, lo, hi, strict)
        if c.report.errors and cfg.data.on_bad_sample == "skip":
            out.print(f"qvltune train skips the {len(c.report.errors)} failed record(s) (data.on_bad_sample: skip)")
    out.print()
    written = [c.cache_file for c in checks if c.cache_file is not None]
    if cfg.stage == "dpo":
        out.print("index cache: none for preference data; qvltune train checks the pairs again")
    elif not cfg.data.index_cache:
        out.print("index cache: off (data.index_cache: false); qvltune train checks the data again")
    elif len(written) < len(checks):
        out.print("index cache: not written (the data's folder is not writable); qvltune train checks the data again")
    elif notes:
        out.print(f"index cache: written for these settings; `qvltune train {config}` checks the data again unless the config says the same")
    else:
        folders = sorted({_shown(str(p.parent)) for p in written})
        out.print(f"index cache: written to {', '.join(folders)}; `qvltune train {config}` reuses these checks and counts", highlight=False)
    return 0 if ok else 1


def _shown(path: str) -> str:
    """A path relative to the working folder when it is under it (as the user would type it)."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


class _progress:
    """A transient progress bar on stderr for long files (callback: done, total)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

        self.bar = Progress("checking", BarColumn(), TaskProgressColumn(), TextColumn("{task.fields[records]:,} records"), TimeRemainingColumn(), console=console.err, transient=True)
        self.bar.start()
        self.task = self.bar.add_task("check", total=1.0, records=0)
        return self.update

    def update(self, records: int, fraction: float) -> None:
        """Called every few hundred records with the share of the dataset's bytes read so far."""
        self.bar.update(self.task, completed=fraction, records=records)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


def render(report: Report, min_pixels: int, max_pixels: int, strict: bool) -> None:
    out = console.out
    lines = group_problems(report.problems)
    for line in lines[:MAX_LISTED]:
        style = "red" if line.severity == "error" else "yellow"
        fix = f" [dim]— {console.escape(line.fix)}[/]" if line.fix else ""
        out.print(f"[{style}]{line.severity}[/] {console.escape(line.text)}{fix}")
    if len(lines) > MAX_LISTED:
        out.print(f"... and {sum(line.count for line in lines[MAX_LISTED:])} more problems (--json lists them all)")
    if report.problems:
        out.print()
    if not report.records and report.errors:  # nothing could be read: the problems above say why, a table of zeros would not
        out.print(f"[red]{len(report.errors)} error(s)[/]: no record could be read")
        return

    summary = Table(title="Dataset", show_header=False, title_justify="left", box=None, padding=(0, 2))
    summary.add_row("files", ", ".join(report.files))
    failures = report.failures()
    summary.add_row("records", f"{report.records} ({report.valid} valid" + (f", {report.failed} failed" if failures else "") + ")")
    if failures:
        summary.add_row("failed", ", ".join(f"{code}: {n}" for code, n in failures.most_common()))
    if report.views:
        summary.add_row("samples", f"{len(report.usable)}: the chat template drops earlier reasoning, so each answer is trained as the last turn of its own sample ({report.views} from multi-turn records)")
    summary.add_row("shapes", ", ".join(f"{k}: {v}" for k, v in report.shapes.most_common()) or "-")
    summary.add_row("images per record", ", ".join(f"{k}: {v}" for k, v in sorted(report.images_per_record.items())) or "-")
    if report.videos:
        summary.add_row("videos", str(report.videos))
    if report.boxes:
        summary.add_row("boxes and points", f"{report.boxes:,} in {report.box_records:,} records (Qwen3-VL convention: 0-1000 relative to the image)")
    sizes = report.to_json()["image_sizes"]
    if sizes:
        summary.add_row(
            "image sizes",
            f"{sizes['count']} images, width {sizes['width']['min']}-{sizes['width']['max']} (median {sizes['width']['median']}), "
            f"height {sizes['height']['min']}-{sizes['height']['max']} (median {sizes['height']['median']})",
        )
    summary.add_row("pixel budget", f"{min_pixels:,}-{max_pixels:,} px = {min_pixels // TOKEN_PIXELS}-{max_pixels // TOKEN_PIXELS} tokens per image")
    if len(report.sources) > 1 or any((s["min_pixels"], s["max_pixels"]) != (min_pixels, max_pixels) for s in report.sources):
        for s in report.sources:  # a mixture: each source with its own share, budget and image root
            lo, hi = s["min_pixels"], s["max_pixels"]
            summary.add_row(
                f"  {s['file']}",
                f"{s['percent']:g}%, {lo:,}-{hi:,} px = {lo // TOKEN_PIXELS}-{hi // TOKEN_PIXELS} tokens per image, images in {s['image_root']}",
            )
    out.print(summary)
    if getattr(report, "pairs", None) is not None:
        _render_pairs(report)

    if report.lengths:
        tokens = Table(title="Tokens per record", title_justify="left", box=None, padding=(0, 2))
        for col in ("p50", "p90", "p99", "max", "per epoch", "trained per epoch"):
            tokens.add_column(col, justify="right")
        tokens.add_row(
            *(f"{report.percentile(q):,}" for q in (50, 90, 99)),
            f"{max(report.lengths):,}",
            f"{sum(report.lengths):,}",
            f"{report.trained_tokens:,}",
        )
        out.print(tokens)
        hist = report.histogram()
        peak = max(c for _, _, c in hist) or 1
        for lo, hi, count in hist:
            out.print(f"  {lo:>7,}-{hi:<7,} {'█' * max(1 if count else 0, round(30 * count / peak)):<30} {count}")
        out.print(f"[dim]token counts: {report.counting}[/]")
        if report.max_seq_length:
            out.print(f"records longer than max_seq_length {report.max_seq_length}: {report.too_long}")
        out.print(f"suggested max_seq_length: [bold]{report.suggested_max_seq_length()}[/]")

    n_err, n_warn = len(report.errors), len(report.warnings)
    if report.ok(strict):
        out.print(f"[green]OK[/]: {report.valid} {'preference pairs' if getattr(report, 'pairs', None) is not None else 'records'} ready" + (f", {n_warn} warning(s)" if n_warn else ""))
    else:
        out.print(f"[red]{n_err} error(s)[/], {n_warn} warning(s)" + (" (--strict fails on warnings)" if strict and not n_err else ""))


def _render_pairs(report) -> None:
    """Preference data: the answers' lengths side by side (DPO is known to reward length when
    chosen answers are systematically longer)."""
    pref = report.to_json()["preference"]
    table = Table(title="Preference pairs (tokens of prompt + answer)", title_justify="left", box=None, padding=(0, 2))
    for col in ("", "p50", "p90", "max"):
        table.add_column(col, justify="right" if col else "left")
    for key in ("chosen", "rejected"):
        t = pref[f"{key}_tokens"]
        table.add_row(key, f"{t['p50']:,}", f"{t['p90']:,}", f"{t['max']:,}")
    console.out.print(table)
    if pref["pairs"]:
        console.out.print(f"pairs: {pref['pairs']} ({', '.join(f'{k}: {v}' for k, v in pref['layouts'].items())}); chosen longer than rejected in {pref['chosen_longer'] / pref['pairs']:.0%}")
