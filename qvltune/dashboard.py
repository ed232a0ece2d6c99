"""The live training panel: ``DashboardState`` (fed by metrics.jsonl records and NVML samples) and
``render(state)``, a pure function to a Rich renderable, tested with a fixed-width console.

Without a TTY, ``format_line(record)`` gives one plain line per log step instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 24) -> str:
    values = [v for v in values if v is not None][-width:]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = hi - lo or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * (len(SPARK) - 1) + 0.5))] for v in values)


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _fmt(value: Any, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


# The panel's title for each status; anything else (nan, oom, error, ...) is shown as it is, in red.
_STYLE = {"starting": "blue", "training": "green", "evaluating": "magenta", "completed": "green", "interrupted": "yellow"}


@dataclass
class DashboardState:
    """What the panel shows, fed one metrics.jsonl record at a time (``apply``).

    ``phase`` is what the run is doing when no step is being counted (starting the processes,
    loading the model, compiling, evaluating, saving): the panel shows it with its elapsed time, so
    no wait of more than a moment goes unexplained."""

    name: str
    started: float = field(default_factory=time.time)
    step: int = 0
    max_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    losses: list[float] = field(default_factory=list)
    train_loss: float | None = None  # the mean over the whole run (the end record)
    eval_loss: float | None = None
    eval_ppl: float | None = None
    eval_step: int | None = None
    eval_losses: list[float] = field(default_factory=list)
    lr: float | None = None
    grad_norm: float | None = None
    tokens_per_s: float | None = None
    samples_per_s: float | None = None
    mfu: float | None = None
    mem_peak_gb: float | None = None
    padding: float | None = None
    checkpoint: str | None = None  # the newest complete checkpoint
    writing: str | None = None  # a checkpoint being written in the background (training goes on)
    device: str | None = None
    world_size: int | None = None
    status: str = "starting"
    phase: str | None = None
    phase_since: float | None = None
    resumed_from: str | None = None
    message: str | None = None
    hint: str | None = None
    first_step_time: float | None = None
    first_step: int = 0
    last_time: float | None = None
    gpus: list[Any] = field(default_factory=list)  # hardware.GpuInfo samples
    phases: dict[str, Any] | None = None  # the start-up's ``phases`` record (qvltune.phases)
    stall: dict[str, Any] | None = None  # the last ``stall`` record (qvltune.stalls)
    # DPO runs (``preference`` records): the latest training and held-out preference metrics.
    preference: dict[str, Any] | None = None
    eval_preference: dict[str, Any] | None = None

    def begin(self, phase: str, since: float | None = None) -> None:
        self.phase, self.phase_since = phase, since if since is not None else time.time()

    def apply(self, record: dict[str, Any]) -> None:
        kind = record.get("kind")
        when = record.get("time", time.time())
        if kind == "phase":
            self.begin(record.get("name", "working"), when)
            if record.get("name") == "evaluating":
                self.status = "evaluating"
        elif kind == "start":
            # A new (or resumed) run starts: what an earlier attempt left on screen no longer holds.
            self.status, self.message, self.hint, self.phase = "training", None, None, None
            self.world_size = record.get("world_size")
            self.device = record.get("device")
            self.padding = record.get("padding")
            self.resumed_from = record.get("resumed_from")
            self.first_step_time, self.first_step = None, 0
            if self.resumed_from:
                self.step = checkpoint_step(self.resumed_from)
                self.message = resume_line(self.resumed_from, self.max_steps)
        elif kind in ("train", "step"):
            step = record.get("step", self.step)
            if self.first_step_time is None or step < self.first_step:
                # The ETA counts from the first completed step: the one before it includes compiling.
                self.first_step_time, self.first_step = when, step
            for key in ("step", "max_steps", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "mfu", "mem_peak_gb"):
                if record.get(key) is not None:
                    setattr(self, key, record[key])
            if kind == "train" and record.get("loss") is not None:
                self.losses.append(record["loss"])
            self.last_time = when
            if self.status == "starting":
                self.status = "training"
            if self.phase != "evaluating":  # the log record of an eval step comes before the eval itself
                self.phase = None
            if self.message and self.message.startswith("resuming from"):
                self.message = None  # the title says "(resumed)" from here on
        elif kind == "eval":
            self.eval_loss, self.eval_ppl, self.eval_step = record.get("eval_loss"), record.get("eval_ppl"), record.get("step")
            if self.eval_loss is not None:
                self.eval_losses.append(self.eval_loss)
            if self.status == "evaluating":
                self.status, self.phase = "training", None
        elif kind == "save":  # training resumed; the checkpoint's files are written beside it
            self.writing = record.get("path")
            if self.phase and self.phase.startswith("saving"):
                self.phase = None
        elif kind == "preference":
            if record.get("split") == "eval":
                self.eval_preference = record
            else:
                self.preference = record
        elif kind == "checkpoint":
            self.checkpoint = record.get("path")
            if self.writing == self.checkpoint:
                self.writing = None
            if self.phase and self.phase.startswith("saving"):
                self.phase = None
        elif kind == "skipped":
            self.message = skipped_line(record)
        elif kind == "phases":
            self.phases = record
        elif kind == "stall":
            self.stall = record
        elif kind == "end":
            self.step = record.get("step", self.step)
            self.status = record.get("status", "ended")
            self.message = record.get("message")
            self.hint = record.get("hint")
            self.phase = None
            if record.get("epoch") is not None:
                self.epoch = record["epoch"]
            if record.get("train_loss") is not None:
                self.train_loss = record["train_loss"]
            if record.get("last_checkpoint"):
                self.checkpoint = record["last_checkpoint"]

    @property
    def final_loss(self) -> float | None:
        """The loss to report at the end: the last logged one, else the run's mean."""
        return self.loss if self.loss is not None else self.train_loss

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left, from the step rate since the first completed step."""
        if not self.max_steps or self.first_step_time is None or self.step <= self.first_step:
            return None
        now = now if now is not None else (self.last_time or time.time())
        rate = (self.step - self.first_step) / max(now - self.first_step_time, 1e-9)
        return (self.max_steps - self.step) / rate if rate > 0 else None


def checkpoint_step(path: str) -> int:
    tail = str(path).rstrip("/").rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def resume_line(checkpoint: str, max_steps: int | None) -> str:
    name = str(checkpoint).rstrip("/").rsplit("/", 1)[-1]
    return f"resuming from {name} (step {checkpoint_step(checkpoint)} of {max_steps or '?'})"


def title(state: DashboardState) -> str:
    status = state.status
    if state.resumed_from and status in ("training", "evaluating"):
        status += " (resumed)"
    return f"qvltune · {state.name} · {status}"


def render(state: DashboardState, now: float | None = None) -> Panel:
    """The panel; it fits 80 columns and, without GPUs listed, about 16 lines."""
    now = now if now is not None else time.time()
    total = state.max_steps or 0
    done = min(state.step, total) if total else 0
    counters = Text(
        f"step {state.step}/{total or '?'}  epoch {_fmt(state.epoch, '.2f')}  elapsed {_fmt_duration(now - state.started)}  ETA {_fmt_duration(state.eta())}"
    )
    head = Table.grid(expand=True)  # a bare ProgressBar ends no line: the grid gives it its own
    head.add_column()
    head.add_row(ProgressBar(total=max(total, 1), completed=done))
    head.add_row(counters)
    if state.phase:
        since = _fmt_duration(now - state.phase_since) if state.phase_since is not None else "-"
        head.add_row(Text(f"{state.phase} ... {since}", style="bold cyan"))
    parts: list[Any] = [head]

    metrics = Table.grid(padding=(0, 2))
    metrics.add_column(style="bold", no_wrap=True)
    metrics.add_column(justify="right", no_wrap=True)
    metrics.add_column(overflow="ellipsis", no_wrap=True)
    loss = state.loss if state.loss is not None else state.train_loss
    metrics.add_row("loss", _fmt(loss, ".4f"), Text(sparkline(state.losses), style="cyan"))
    dpo = state.preference is not None or state.eval_preference is not None  # a perplexity of the DPO loss means nothing
    eval_text = _fmt(state.eval_loss, ".4f") + (f" (ppl {state.eval_ppl:.2f})" if state.eval_ppl is not None and not dpo else "")
    eval_note = Text(sparkline(state.eval_losses), style="magenta")
    if state.eval_step is not None:
        eval_note.append(f" at step {state.eval_step}", style="dim")
    metrics.add_row("eval loss", eval_text, eval_note)
    if dpo:
        _preference_rows(metrics, state.preference or {}, state.eval_preference or {})
    metrics.add_row("lr", _fmt(state.lr, ".2e"), "")
    metrics.add_row("grad norm", _fmt(state.grad_norm, ".3f"), "")
    throughput = f"{_fmt(state.tokens_per_s, ',.0f')} tok/s"
    if state.samples_per_s is not None:
        throughput += f"  {state.samples_per_s:,.1f} samples/s"
    metrics.add_row("throughput", throughput, Text("real tokens, all ranks", style="dim"))
    metrics.add_row("MFU", f"{state.mfu * 100:.1f}%" if state.mfu is not None else "-", Text("6 x LLM params per token" if state.mfu is not None else "no GPU peak to compare with", style="dim"))
    if state.padding is not None:
        metrics.add_row("padding", f"{state.padding * 100:.1f}%", "")

    parts += [Text(""), metrics]
    if state.gpus:
        gpus = Table(box=None, padding=(0, 1), show_edge=False)
        for col in ("GPU", "name", "memory", "util", "temp"):
            gpus.add_column(col, justify="right" if col in ("memory", "util", "temp") else "left", no_wrap=True, overflow="ellipsis")
        for g in state.gpus:
            used = g.memory_used / 1024**3
            gpus.add_row(
                str(g.index) if getattr(g, "node", None) is None else f"node {g.node}: {g.index}",
                g.name,
                f"{used:,.1f}/{g.memory_total / 1024**3:,.0f} GiB",
                f"{g.utilization}%" if g.utilization is not None else "-",
                f"{g.temperature}°C" if g.temperature is not None else "-",
            )
        parts += [Text(""), gpus]
    elif state.mem_peak_gb is not None:
        parts.append(Text(f"GPU memory peak (rank 0): {state.mem_peak_gb:.1f} GiB"))
    else:
        device = f"device: {state.device}" + (f" x{state.world_size}" if state.world_size else "") if state.device else "device: not reported yet"
        parts += [Text(""), Text(device, style="dim")]
    parts.append(Text(f"last checkpoint: {state.checkpoint or '-'}", style="dim", overflow="ellipsis", no_wrap=True))
    if state.writing:
        parts.append(Text(f"writing {state.writing.rstrip('/').rsplit('/', 1)[-1]} in the background", style="dim"))
    if state.stall:
        parts.append(Text(stall_line(state.stall), style="yellow"))
    if state.message:
        parts.append(Text(state.message, style="yellow"))
    style = _STYLE.get(state.status, "red")
    return Panel(Group(*parts), title=title(state), border_style=style)


def _preference_rows(metrics: Table, train: dict[str, Any], held_out: dict[str, Any]) -> None:
    """DPO: reward margin, preference accuracy, rewards and KL estimate (training, held-out)."""
    def both(key: str, spec: str, scale: float = 1.0) -> str:
        value = lambda r: _fmt(r[key] * scale if r.get(key) is not None else None, spec)  # noqa: E731
        return value(train) + (f" / {value(held_out)}" if held_out else "")

    note = Text("train" + (" / held-out" if held_out else ""), style="dim")
    metrics.add_row("reward margin", both("reward_margin", ".3f"), note)
    metrics.add_row("pref. accuracy", both("accuracy", ".1f", 100.0) + " %", "")
    metrics.add_row("rewards c / r", f"{_fmt(train.get('chosen_reward'), '.3f')} / {_fmt(train.get('rejected_reward'), '.3f')}", Text("chosen / rejected (train)", style="dim"))
    metrics.add_row("KL est.", both("kl", ".4f"), Text("log-ratio to the reference per answer token", style="dim"))


def skipped_line(record: dict[str, Any]) -> str:
    return f"step {record.get('step')}: non-finite loss, update skipped ({record.get('count')} of at most {record.get('limit')})"


def stall_line(record: dict[str, Any]) -> str:
    count = record.get("count", 1)
    gc = f"; GC {record['gc_seconds']:.1f} s of it" if record.get("gc_seconds") else ""
    if record.get("data_wait_s"):
        gc += f"; waited {record['data_wait_s']:.1f} s for data"
    if record.get("new_graphs"):
        gc += f"; {record['new_graphs']} recompilation(s)"
        if record.get("recompiled"):
            gc += f" ({record['recompiled'][0][:80]})"  # the first failed guard; train.log has them all
    return (
        f"stall{'s' if count > 1 else ''}: {count}, the last at step {record.get('step')}: {record.get('seconds', 0):.1f} s, "
        f"{record.get('ratio', 0):.1f}x the median step ({record.get('median_s', 0):.2f} s){gc}"
    )


def save_parts_text(parts: dict | None) -> str:
    """``: model files 0.4 s, DeepSpeed state to host 1.2 s`` (where a save's wait went; parts under
    0.05 s left out)."""
    shown = [f"{name} {seconds:.1f} s" for name, seconds in (parts or {}).items() if seconds >= 0.05]
    return ": " + ", ".join(shown) if shown else ""


def format_line(record: dict[str, Any]) -> str | None:
    """One plain line per record for logs and non-TTY output (the ``phases`` record: a line and its
    indented detail lines)."""
    kind = record.get("kind")
    if kind == "train":
        mfu = f" mfu {record['mfu'] * 100:.1f}%" if record.get("mfu") is not None else ""
        mem = f" mem {record['mem_peak_gb']:.1f}GiB" if record.get("mem_peak_gb") is not None else ""
        return (
            f"step {record.get('step')}/{record.get('max_steps')} epoch {_fmt(record.get('epoch'), '.2f')} "
            f"loss {_fmt(record.get('loss'), '.4f')} lr {_fmt(record.get('lr'), '.2e')} grad_norm {_fmt(record.get('grad_norm'), '.3f')} "
            f"tok/s {_fmt(record.get('tokens_per_s'), ',.0f')}{mfu}{mem}"
        )
    if kind == "eval":
        return f"eval step {record.get('step')}: eval_loss {_fmt(record.get('eval_loss'), '.4f')} ppl {_fmt(record.get('eval_ppl'), '.2f')}"
    if kind == "save":
        return None  # the checkpoint line follows once it is complete
    if kind == "preference":
        return (
            f"{'eval ' if record.get('split') == 'eval' else ''}step {record.get('step')}: reward margin {_fmt(record.get('reward_margin'), '.3f')} "
            f"accuracy {_fmt(record['accuracy'] * 100 if record.get('accuracy') is not None else None, '.1f')}% "
            f"rewards {_fmt(record.get('chosen_reward'), '.3f')}/{_fmt(record.get('rejected_reward'), '.3f')} kl {_fmt(record.get('kl'), '.4f')}"
        )
    if kind == "checkpoint":
        times = ""
        if record.get("background_seconds") is not None:
            times = f" (training waited {record.get('seconds') or 0:.1f} s{save_parts_text(record.get('parts'))}; written beside it in {record['background_seconds']:.1f} s)"
        return f"checkpoint saved: {record.get('path')}{times}"
    if kind == "phase":
        return f"{record.get('name')} ..."
    if kind == "skipped":
        return skipped_line(record)
    if kind == "stall":
        return stall_line(record)
    if kind == "phases":
        from qvltune.phases import format_phases

        return format_phases(record)
    if kind == "start":
        pad = record.get("padding")
        if record.get("resumed_from"):
            return resume_line(record["resumed_from"], record.get("max_steps"))
        return f"training started: {record.get('train_samples')} samples in {record.get('train_rows')} rows, {record.get('world_size')} process(es), padding {pad * 100:.1f}%" if pad is not None else "training started"
    if kind == "end":
        return f"training {record.get('status')}: {record.get('message', '')}"
    return None
