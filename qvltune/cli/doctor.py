"""``qvltune doctor``: check the environment; each problem with its fix; exit 1 on a blocker."""

from __future__ import annotations

from pathlib import Path

import typer
from qvltune import console

_MARK = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[bold red]fail[/]", "info": "[dim]info[/]"}


def command(
    path: Path = typer.Option(Path("."), "--path", help="Where runs will be written (free disk is checked there)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document and nothing else."),
    hostfile: Path = typer.Option(None, "--hostfile", help="Several nodes over ssh: check every host of this DeepSpeed hostfile (pdsh, ssh, same versions, paths)."),
    config: Path = typer.Option(None, "--config", help="With --hostfile: also check this run's data, model and output paths on every host (its launch.hostfile is used when --hostfile is not given)."),
) -> int:
    """Check Python, torch/CUDA, transformers, peft, DeepSpeed and its ops, GPUs, attention backends, disk and /dev/shm."""
    from qvltune.doctor import blockers, collect_facts, run_checks

    checks = run_checks(collect_facts(path))
    cfg = None
    if config is not None:
        from qvltune.config import load_config

        cfg = load_config(config)
        if hostfile is None and cfg.launch.hostfile:
            hostfile = Path(cfg.launch.hostfile)
    if hostfile is not None:
        from qvltune.hostcheck import check_hostfile

        checks += check_hostfile(hostfile, cfg)
    failed = blockers(checks)
    if as_json:
        console.print_json({"ok": not failed, "checks": [c.__dict__ for c in checks]})
        return 1 if failed else 0
    out = console.out
    for c in checks:
        out.print(f"  {_MARK[c.status]}{' ' * (6 - len(c.status))}{c.name:<22}{console.escape(c.detail)}")
        if c.fix and c.status != "ok":
            out.print(f"{' ' * 30}[dim]fix: {console.escape(c.fix)}[/]")
    warnings = sum(c.status == "warn" for c in checks)
    if failed:
        console.out.print(f"[red]{len(failed)} blocker(s)[/], {warnings} warning(s): fix the fail lines first")
        return 1
    console.out.print("[green]ready[/]: no blocker" + (f", {warnings} warning(s)" if warnings else ""))
    return 0
