"""``qvltune doctor --hostfile F``: can DeepSpeed's ssh/pdsh runner start this run on every host?

DeepSpeed's runner reads the hostfile, reaches every host with pdsh over ssh (localhost too), runs
this same Python there in this same folder, and expects the data, the model and the run folder at
the same paths. ``probe_hosts`` asks each host exactly that, over ssh with no password prompt
(``BatchMode``) and a short timeout; ``host_checks`` is a pure function of the answers, tested with
made-up ones, that says what is missing and how to fix it.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvltune.doctor import Check

PACKAGES = ("qvltune", "torch", "transformers", "deepspeed")
SSH_TIMEOUT_SECONDS = 10

# Run on every host with the same Python as here: the package versions and which paths exist.
PROBE = (
    "import importlib, json, os, socket, sys\n"
    "v = {}\n"
    "for m in sys.argv[1].split(','):\n"
    "    try: v[m] = importlib.import_module(m).__version__\n"
    "    except Exception as e: v[m] = None\n"
    "print(json.dumps({'host': socket.gethostname(), 'versions': v, 'exists': {p: os.path.exists(p) for p in sys.argv[2:]}}))\n"
)


@dataclass
class HostReport:
    host: str
    slots: int
    reached: bool
    error: str = ""  # why not, when not reached
    versions: dict[str, str | None] = field(default_factory=dict)
    exists: dict[str, bool] = field(default_factory=dict)


def read_hostfile(path: Path) -> dict[str, int]:
    """host -> slots, parsed by DeepSpeed's own runner (the one that will read it)."""
    from deepspeed.launcher.runner import _parse_hostfile

    lines = path.read_text().splitlines()
    try:
        return dict(_parse_hostfile(lines))
    except ValueError as e:
        raise ValueError(f"{path}: {e} (each line: '<hostname> slots=<GPUs>')") from None


def paths_to_check(cfg: Any | None, cwd: Path) -> dict[str, str]:
    """label -> absolute path that must exist on every host: the folder DeepSpeed's runner cds into,
    the Python it runs, the data files, the image root, a local model folder, the run folder's parent."""
    from qvltune.data.mixture import parse_mixture

    out = {"working folder": str(cwd), "python": sys.executable}
    if cfg is None:
        return out
    for spec in parse_mixture(cfg.data.train) + (parse_mixture(cfg.data.eval) if cfg.data.eval else []):
        out[f"data {spec.path.name}"] = str(spec.path)
    if cfg.data.image_root:
        out["image root"] = str(cfg.data.image_root)
    if Path(cfg.model.path).is_dir():
        out["model folder"] = str(Path(cfg.model.path).resolve())
    output = Path(cfg.output_dir).resolve()
    out["output folder" if output.exists() else "output folder's parent"] = str(output if output.exists() else output.parent)
    return out


def probe_command(paths: list[str]) -> list[str]:
    return [sys.executable, "-c", PROBE, ",".join(PACKAGES), *paths]


def probe_hosts(hosts: dict[str, int], paths: list[str], ssh: str = "ssh") -> list[HostReport]:
    """Ask every host over ssh, as the runner will reach it (no password prompt, short timeout)."""
    remote = shlex.join(probe_command(paths))
    reports = []
    for host, slots in hosts.items():
        argv = [ssh, "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_TIMEOUT_SECONDS}", host, remote]
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=SSH_TIMEOUT_SECONDS * 3)
        except (OSError, subprocess.TimeoutExpired) as e:
            reports.append(HostReport(host, slots, False, f"{type(e).__name__}: {e}"))
            continue
        if out.returncode != 0:
            why = (out.stderr.strip().splitlines() or [f"ssh exit code {out.returncode}"])[-1]
            reports.append(HostReport(host, slots, False, why))
            continue
        try:
            doc = json.loads(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            reports.append(HostReport(host, slots, False, f"unexpected answer: {out.stdout.strip()[:200]!r}"))
            continue
        reports.append(HostReport(host, slots, True, versions=doc["versions"], exists=doc["exists"]))
    return reports


def local_versions() -> dict[str, str | None]:
    out = subprocess.run(probe_command([]), capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["versions"]


def host_checks(hosts: dict[str, int], reports: list[HostReport], here: dict[str, str | None], paths: dict[str, str], *, pdsh: str | None, ssh: str | None) -> list[Check]:
    """What the runner needs, host by host; every gap with its fix."""
    out: list[Check] = []
    add = lambda *a: out.append(Check(*a))  # noqa: E731
    slots = sorted(set(hosts.values()))
    add("hostfile", "ok" if len(slots) == 1 else "warn", f"{len(hosts)} host(s), {sum(hosts.values())} slot(s)" + ("" if len(slots) == 1 else f"; slots differ ({slots})"),
        "" if len(slots) == 1 else "give every node the same number of GPUs (qvltune plans for identical nodes)")  # fmt: skip
    add("pdsh", "ok" if pdsh else "fail", f"pdsh at {pdsh}" if pdsh else "pdsh not found: DeepSpeed's runner starts the other hosts with it",
        "" if pdsh else "apt install pdsh (or start each node without ssh: qvltune train CONFIG --node-rank N --master-addr HOST)")  # fmt: skip
    add("ssh", "ok" if ssh else "fail", f"ssh at {ssh}" if ssh else "ssh not found", "" if ssh else "apt install openssh-client")
    label = {v: k for k, v in paths.items()}
    for r in reports:
        name = f"host {r.host}"
        if not r.reached:
            add(name, "fail", f"not reachable over ssh without a password: {r.error}", f"ssh-copy-id {r.host} (and accept its host key once), or use the no-ssh or Slurm way")
            continue
        differ = [f"{m} {r.versions.get(m) or 'missing'} (here {here.get(m) or 'missing'})" for m in PACKAGES if r.versions.get(m) != here.get(m)]
        missing = [f"{label.get(p, p)} {p}" for p, ok in r.exists.items() if not ok]
        if differ:
            add(name, "fail", "versions differ: " + "; ".join(differ), f"install the same versions on {r.host} (pip install -e . in the same environment path)")
        if missing:
            add(name, "fail", "missing there: " + "; ".join(missing), "mount the shared storage at the same path on every host (the runner cds into this folder and runs this Python there)")
        if not differ and not missing:
            versions = ", ".join(f"{m} {r.versions.get(m)}" for m in PACKAGES)
            add(name, "ok", f"reachable; {versions}; {len(r.exists)} path(s) present")
    return out


def check_hostfile(path: Path, cfg: Any | None = None, *, cwd: Path | None = None) -> list[Check]:
    """The whole check: parse, probe every host, judge."""
    try:
        hosts = read_hostfile(path)
    except (OSError, ValueError) as e:
        return [Check("hostfile", "fail", str(e), "one line per node: '<hostname> slots=<GPUs>'")]
    paths = paths_to_check(cfg, (cwd or Path.cwd()).resolve())
    ssh = shutil.which("ssh")
    reports = probe_hosts(hosts, list(paths.values())) if ssh else [HostReport(h, s, False, "no ssh client here") for h, s in hosts.items()]
    return host_checks(hosts, reports, local_versions(), paths, pdsh=shutil.which("pdsh"), ssh=ssh)
