"""The files ``qvltune init`` writes, built from the plan (pure), and written all-or-nothing.

- ``qvltune.yaml``: the run config (a header lists the plan's decisions; the body is the validated
  document), loadable by ``qvltune train`` / ``qvltune estimate``;
- ``ds_zero.json``: the DeepSpeed config generated from it (``qvltune.zero``), for clusters;
- ``launch.sh``: the ``deepspeed`` command ``qvltune train`` would run (``qvltune.launch``);
- ``qvltune-answers.yaml``: the answers, replayable with ``qvltune init --answers``;
- ``qvltune-plan.txt``: the plan with its full reasoning, parameters and memory (the terminal shows
  the compact plan; ``qvltune init --explain`` prints this one);
- ``hostfile`` (multi-node only, never overwritten): one line per node to fill in (ssh);
- ``train.sbatch`` (multi-node only): the Slurm script, one ``qvltune train`` per node (``qvltune.nodes``).

Every file is written to a temporary name first and renamed into place only when all are written,
so Ctrl-C or an error leaves either the previous files or the complete new set, never half of one.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from qvltune.config import RunConfig
from qvltune.launch import build_launch, format_command
from qvltune.zero import deepspeed_config

CONFIG_NAME = "qvltune.yaml"
DEEPSPEED_NAME = "ds_zero.json"
LAUNCH_NAME = "launch.sh"
ANSWERS_NAME = "qvltune-answers.yaml"
PLAN_NAME = "qvltune-plan.txt"
HOSTFILE_NAME = "hostfile"
SBATCH_NAME = "train.sbatch"


def config_text(doc: dict[str, Any], decisions: list[Any], fits: bool) -> str:
    head = ["# Written by `qvltune init`. Check it with `qvltune estimate qvltune.yaml`, train with `qvltune train qvltune.yaml`.", "# The plan:"]
    for d in decisions:
        head.append(f"#   {d.topic}: {d.choice} — {d.why}")
    if not fits:
        head.append("# WARNING: the estimate says this does not fit the machine it was planned for (see `qvltune estimate`).")
    return "\n".join(head) + "\n" + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


def answers_text(answers: dict[str, Any]) -> str:
    return "# Answers to `qvltune init`: replay with `qvltune init --answers qvltune-answers.yaml` (flags override them).\n" + yaml.safe_dump(answers, sort_keys=False)


def launch_text(cfg: RunConfig, *, config_path: Path, gpu_count: int, python: str | None = None) -> str:
    """A script running the exact ``deepspeed`` command of ``qvltune train``: it first writes the
    resolved config into the run folder (the worker reads it there), then launches."""
    argv, env = build_launch(cfg, run_dir=cfg.run_dir.resolve(), gpu_count=gpu_count)
    py = shlex.quote(python or sys.executable)
    prepare = (
        f"{py} -c 'import sys, pathlib; from qvltune.config import load_config, dump_config; "
        f"c = load_config(pathlib.Path(sys.argv[1]).resolve()); dump_config(c, c.run_dir / \"config.yaml\")' {shlex.quote(config_path.name)}"
    )
    return "\n".join(
        [
            "#!/usr/bin/env bash",
            "# Written by `qvltune init`: the deepspeed command that `qvltune train qvltune.yaml` runs.",
            "# `qvltune train` is the usual way (it checks the data first, shows the live panel and saves a",
            "# checkpoint on Ctrl-C); this script is for clusters and schedulers that start deepspeed themselves.",
            "set -euo pipefail",
            'cd "$(dirname "$0")"',
            "# The worker reads the resolved config (absolute paths, presets written out) from the run folder.",
            prepare,
            format_command(argv, env),
            "",
        ]
    )


def hostfile_text(nodes: int, slots: int) -> str:
    lines = ["# One line per node: <hostname> slots=<GPUs on it>. Replace the names, then launch from the first node."]
    lines += [f"node-{i + 1} slots={slots}" for i in range(nodes)]
    return "\n".join(lines) + "\n"


def deepspeed_text(cfg: RunConfig) -> str:
    return json.dumps(deepspeed_config(cfg), indent=2) + "\n"


def write_all(files: dict[Path, str], executable: set[Path] | None = None) -> list[Path]:
    """Write every file to a temporary name, then rename them all into place (atomic per file; a
    failure or Ctrl-C before the renames leaves nothing behind)."""
    executable = executable or set()
    temps: list[tuple[Path, Path]] = []
    try:
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temps.append((Path(tmp), path))
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o755 if path in executable else 0o644)
        for tmp, path in temps:
            os.replace(tmp, path)
        return [path for _, path in temps]
    finally:
        for tmp, _ in temps:
            if tmp.exists():
                tmp.unlink()
