"""``metrics.jsonl``: the only thing the training worker and the dashboard share.

Rank 0 of the worker appends one JSON object per line; the parent tails the file. Every line has
``kind`` and ``time``; the kinds and their fields:

- ``start``: ``max_steps``, ``epochs``, ``world_size``, ``components`` (per-component parameter
  table), ``train_samples``, ``train_rows``, ``padding`` (fraction of pad tokens, packed or not),
  ``padding_unpacked``, ``resumed_from``
- ``train`` (one per log step): ``step``, ``epoch``, ``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``
  (real, non-pad tokens), ``samples_per_s``, ``mfu`` (null on CPU), ``mem_gb`` / ``mem_peak_gb``
  (rank 0's allocated / peak GPU memory), ``padding`` (pad fraction of the batches since the last log)
- ``eval``: ``step``, ``eval_loss`` (mean over every assistant token of the eval set), ``eval_ppl``,
  ``seconds`` (how long the evaluation took)
- ``phases`` (once, at the first step's end): ``phases`` (``name``, ``seconds`` of each start-up
  phase, from ``qvltune train``'s start to the first step's end; see qvltune.phases),
  ``to_first_step`` (their sum, seconds), ``compile`` (when the layers are compiled: the first
  step's compile split into Dynamo, AOTAutograd, forward and backward kernels, with the caches'
  hits; qvltune.compile_cache.compile_breakdown), ``first_step`` (its ``compile_s``, ``data_s``: waiting
  for its batches, ``rest_s``: the step's own work)
- ``save`` (a checkpoint's blocking part ended, training goes on): ``step``, ``path``, ``seconds``
- ``checkpoint`` (that checkpoint is complete: every file synced, the marker written): ``step``,
  ``path``, ``seconds`` (how long training waited for the save), ``background_seconds`` (the write
  and sync beside training)
- ``stall`` (a step slower than 2x the median, eval and save excluded; qvltune.stalls): ``step``,
  ``seconds``, ``median_s``, ``ratio``, ``gc_seconds`` (the garbage collector's part), ``data_wait_s``
  (waiting for batches), ``new_graphs`` (torch.compile recompilations in that step), ``count``
- ``end``: ``status`` (``completed`` | ``interrupted`` | ``nan`` | ``error``), ``step``, ``message``,
  ``final`` (path of the saved model/adapter), ``last_checkpoint``
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Appends records; each line is flushed whole so a reader never sees half a record."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, kind: str, **fields: Any) -> None:
        record = {"kind": kind, "time": time.time(), **fields}
        line = json.dumps(record, default=_jsonable) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()


def _jsonable(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


class MetricsTailer:
    """Reads records appended since the last call (only complete lines)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self._partial = b""

    def read_new(self) -> list[dict[str, Any]]:
        try:
            size = os.path.getsize(self.path)
        except OSError:
            return []
        if size < self.offset:  # the file was replaced: start over
            self.offset, self._partial = 0, b""
        if size == self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(size - self.offset)
        self.offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()  # an incomplete last line waits for the next call
        out = []
        for line in lines:
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out


def read_all(path: Path) -> list[dict[str, Any]]:
    return MetricsTailer(path).read_new() if path.exists() else []
