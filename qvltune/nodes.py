"""Several nodes without ssh: which node this is, its DeepSpeed command, and how nodes watch each other.

Clusters start jobs three ways, and DeepSpeed's own launcher serves all three (qvltune has no
launcher or collective of its own):

- **ssh/pdsh hostfile** (``launch.hostfile``): ``qvltune train`` on the first node runs the deepspeed
  runner, which reaches the other nodes over ssh (``launch.build_launch``; ``qvltune doctor --hostfile``).
- **No ssh** (Kubernetes PyTorchJob, manual starts): one ``qvltune train`` per node, told its rank by
  ``--node-rank``/``--master-addr`` or by ``MASTER_ADDR``/``NODE_RANK``/``WORLD_SIZE``; each runs the
  runner with ``--no_ssh --node_rank N``, which starts this node's ranks only.
- **Slurm**: ``srun`` starts one ``qvltune train`` per node; the node rank, node count and master
  come from ``SLURM_*`` (``node_from_environment``). ``slurm_script`` writes the sbatch file.

``node_from_environment`` and ``node_launch`` are pure (tested by tables of environments). Nodes share
only the run folder, which must be on storage every node sees: node 0 alone writes the config,
data index, metrics and checkpoint markers; every node keeps ``nodes/node-K.json`` up to date
(``write_status``: alive, exit code, its GPUs), which is how node 0's panel shows every node's GPUs
and how a node that dies is named and the others stop (``PeerWatch``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from qvltune.config import RunConfig
from qvltune.errors import UserError

DEFAULT_MASTER_PORT = 29500
NODES_DIR = "nodes"  # inside the run folder: hostfile, node-K.json statuses, node-K.log
# A node whose status file has not changed for this long is taken as lost (machine down, network
# gone); each live node rewrites its status every HEARTBEAT_SECONDS.
HEARTBEAT_SECONDS = 2.0
NODE_TIMEOUT_SECONDS = float(os.environ.get("QVLTUNE_NODE_TIMEOUT", "120"))
# When node 0 ended (completed or stopped on Ctrl-C), the other nodes' ranks end with it; a node
# still running this long after that is stopped.
PEER_END_GRACE_SECONDS = 60.0
SHARED_CHECK_SECONDS = 10.0  # how long rank 0 waits to see the other nodes' probe files


@dataclass(frozen=True)
class NodeSpec:
    """This machine's place in a multi-node run started node by node (no ssh)."""

    nodes: int
    node_rank: int
    master_addr: str
    master_port: int
    source: str  # where it came from, for messages: "--node-rank", "MASTER_ADDR/NODE_RANK", "Slurm job 42"

    @property
    def is_first(self) -> bool:
        return self.node_rank == 0


def _int(env: Mapping[str, str], name: str, source: str) -> int:
    value = env.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} is not a whole number ({source})", f"set {name} to an integer") from None


def _port(env: Mapping[str, str], cfg: RunConfig, fallback: int) -> int:
    if env.get("MASTER_PORT"):
        return _int(env, "MASTER_PORT", "environment")
    return cfg.launch.master_port or fallback


def node_from_environment(
    cfg: RunConfig,
    env: Mapping[str, str],
    *,
    node_rank: int | None = None,
    master_addr: str | None = None,
    nodes: int | None = None,
    first_host=None,
) -> NodeSpec | None:
    """Which node of a no-ssh multi-node run this is, or None for the ordinary paths (one node, or
    a hostfile that the runner reaches over ssh). Precedence: flags, then the PyTorchJob variables,
    then Slurm. ``first_host`` expands a Slurm node list (default: ``slurm_first_host``)."""
    if node_rank is not None or master_addr is not None:
        count = nodes or cfg.launch.nodes
        addr = master_addr or env.get("MASTER_ADDR") or cfg.launch.master_addr
        if node_rank is None or not addr:
            raise UserError(
                "a node started on its own needs both --node-rank and --master-addr (or MASTER_ADDR)",
                "e.g. qvltune train CONFIG --nodes 2 --node-rank 1 --master-addr <first node's address>",
            )
        return _checked(NodeSpec(count, node_rank, addr, _port(env, cfg, DEFAULT_MASTER_PORT), "--node-rank"))
    if "NODE_RANK" in env or "PET_NODE_RANK" in env or ("MASTER_ADDR" in env and "RANK" in env and "LOCAL_RANK" not in env):
        # Kubeflow's PyTorchJob starts one pod per node and sets MASTER_ADDR, MASTER_PORT, RANK (the
        # pod's index) and WORLD_SIZE (the number of pods); its elastic form sets PET_NNODES and
        # PET_NODE_RANK. Here one pod = one node = one deepspeed launcher.
        rank_var = next(v for v in ("NODE_RANK", "PET_NODE_RANK", "RANK") if v in env)
        count_var = next((v for v in ("NNODES", "PET_NNODES", "WORLD_SIZE") if v in env), None)
        source = f"MASTER_ADDR/{rank_var}" + (f"/{count_var}" if count_var else "")
        count = _int(env, count_var, source) if count_var else (nodes or cfg.launch.nodes)
        if count <= 1:
            return None
        if not env.get("MASTER_ADDR"):
            raise UserError(f"{rank_var} is set but MASTER_ADDR is not ({source})", "export MASTER_ADDR=<the first node's address> on every node")
        return _checked(NodeSpec(count, _int(env, rank_var, source), env["MASTER_ADDR"], _port(env, cfg, DEFAULT_MASTER_PORT), source))
    if "SLURM_JOB_ID" in env:
        return _slurm_node(cfg, env, first_host or slurm_first_host)
    return None


def _slurm_node(cfg: RunConfig, env: Mapping[str, str], first_host) -> NodeSpec | None:
    job = env["SLURM_JOB_ID"]
    allocated = _int(env, "SLURM_NNODES", f"Slurm job {job}") if env.get("SLURM_NNODES") else 1
    if "SLURM_STEP_NUM_NODES" not in env:
        # In the batch script itself (not under srun): only the first node runs this.
        if allocated > 1:
            raise UserError(
                f"inside Slurm job {job} of {allocated} nodes but not under srun: this would start the first node only",
                "start one qvltune train per node: srun --ntasks-per-node=1 qvltune train CONFIG --resume (see the script `qvltune init --nodes N` writes)",
            )
        return None
    count = _int(env, "SLURM_STEP_NUM_NODES", f"Slurm job {job}")
    if count <= 1:
        return None
    tasks = _int(env, "SLURM_STEP_NUM_TASKS", f"Slurm job {job}") if env.get("SLURM_STEP_NUM_TASKS") else count
    if tasks != count:
        raise UserError(
            f"srun started {tasks} tasks on {count} nodes (Slurm job {job}); qvltune train starts each node's ranks itself",
            "run one task per node: srun --ntasks-per-node=1 qvltune train CONFIG",
        )
    addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
    # Every node must agree on the port without talking: derived from the job id, so two jobs
    # sharing a node do not collide (the same rule as PyTorch Lightning's SLURM environment).
    port = _port(env, cfg, 15000 + int(re.sub(r"\D", "", job) or 0) % 20000)
    return _checked(NodeSpec(count, _int(env, "SLURM_NODEID", f"Slurm job {job}"), addr, port, f"Slurm job {job}"))


def _checked(node: NodeSpec) -> NodeSpec:
    if node.nodes < 1 or not 0 <= node.node_rank < node.nodes:
        raise UserError(f"node rank {node.node_rank} is not between 0 and {node.nodes - 1} ({node.source})", "number the nodes 0..N-1, the master's node 0")
    return node


def slurm_first_host(nodelist: str) -> str:
    """The first host of a Slurm node list ("gpu[07-09,12],login1" -> "gpu07"): ``scontrol show
    hostnames`` when it is here, else the first entry expanded by hand (the list syntax is Slurm's
    hostlist: a prefix and a bracketed range; scontrol is missing inside some containers)."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=20)
            if out.returncode == 0 and out.stdout.split():
                return out.stdout.split()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise UserError(f"cannot read the Slurm node list {nodelist!r}", "export MASTER_ADDR=<the first node's address> in the sbatch script")
    prefix, ranges = m.group(1), m.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


# ----------------------------------------------------------------------------------------------
# The launcher command of one node


def hostfile_text(nodes: int, slots: int) -> str:
    """DeepSpeed's world description for ``--no_ssh``: one line per node. The names are only labels
    (nothing connects to them without ssh); the slots give every node's process count, from which
    each rank's global number follows, so all nodes must run the same number of processes."""
    return "".join(f"node{i} slots={slots}\n" for i in range(nodes))


def node_launch(cfg: RunConfig, node: NodeSpec, *, run_dir: Path, gpu_count: int, resume: bool = False, cpu_count: int | None = None) -> tuple[list[str], dict[str, str], str]:
    """(argv, extra environment, hostfile text) that start this node's ranks through DeepSpeed's
    runner without ssh (``--no_ssh --node_rank``); every node runs the same command but for its rank."""
    from qvltune.launch import deepspeed_launcher, launch_env, processes_per_node

    if isinstance(cfg.launch.gpus, list):
        raise UserError("launch.gpus: a device list applies to one node; with several nodes give a count or 'all'", "set launch.gpus: all (or a count)")
    processes = processes_per_node(cfg, gpu_count)
    hostfile = run_dir / NODES_DIR / "hostfile"
    argv = deepspeed_launcher() + [
        "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node.node_rank),
        "--master_addr", node.master_addr, "--master_port", str(node.master_port),
        "--module", "qvltune.rank", "--run-dir", str(run_dir),
    ]  # fmt: skip
    if resume:
        argv.append("--resume")
    return argv, launch_env(gpu_count, processes, cpu_count), hostfile_text(node.nodes, processes)


# ----------------------------------------------------------------------------------------------
# Node statuses in the shared run folder


def status_path(run_dir: Path, node_rank: int) -> Path:
    return run_dir / NODES_DIR / f"node-{node_rank}.json"


def write_status(
    run_dir: Path, node_rank: int, state: str, *, exit_code: int | None = None, gpus: list[Any] = (), stopped_for: str | None = None, failed_ranks: list[tuple[int, int]] = ()
) -> None:
    """This node's heartbeat: ``running`` (rewritten every HEARTBEAT_SECONDS) or ``exited`` with its
    launcher's exit code. Written whole (temporary file + rename) so a reader never sees half."""
    path = status_path(run_dir, node_rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"node": node_rank, "host": socket.gethostname(), "pid": os.getpid(), "state": state, "exit_code": exit_code, "stopped_for": stopped_for, "failed_ranks": [list(r) for r in failed_ranks], "time": time.time(), "gpus": [_gpu_doc(g) for g in gpus]}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)


def _gpu_doc(g: Any) -> dict[str, Any]:
    doc = asdict(g)
    doc.pop("node", None)
    return doc


def read_status(run_dir: Path, node_rank: int) -> dict[str, Any] | None:
    try:
        return json.loads(status_path(run_dir, node_rank).read_text())
    except (OSError, ValueError):
        return None


def peer_gpus(statuses: Mapping[int, dict[str, Any]]) -> list[Any]:
    """The GPUs other nodes reported, tagged with their node (for node 0's panel)."""
    from qvltune.hardware import GpuInfo

    out = []
    for rank in sorted(statuses):
        for g in statuses[rank].get("gpus") or []:
            out.append(GpuInfo(**{**g, "node": rank}))
    return out


@dataclass
class PeerWatch:
    """What this node knows about the others, from their status files. A status counts only once it
    changed after this node started (a file left by an earlier attempt says nothing about this one);
    ``check`` names a peer that exited with an error, stopped reporting, or ended long ago."""

    run_dir: Path
    node: NodeSpec
    timeout: float = NODE_TIMEOUT_SECONDS
    grace: float = PEER_END_GRACE_SECONDS
    _initial: dict[int, str | None] = field(default_factory=dict)
    _seen: dict[int, tuple[str, float]] = field(default_factory=dict)  # raw text, when it last changed (our clock)
    live: dict[int, dict[str, Any]] = field(default_factory=dict)  # peers heard from during this attempt

    def __post_init__(self):
        for rank in self.peers():
            self._initial[rank] = self._raw(rank)

    def peers(self) -> list[int]:
        # Node 0 watches every node; the others watch node 0 (if another node dies, node 0 stops,
        # and they follow it).
        return [r for r in range(self.node.nodes) if r != self.node.node_rank] if self.node.is_first else [0]

    def _raw(self, rank: int) -> str | None:
        try:
            return status_path(self.run_dir, rank).read_text()
        except OSError:
            return None

    def failed_peer(self, wait: float = 10.0) -> str | None:
        """After this node's ranks failed: did a peer fail first? (Its status may take a moment to
        arrive; this node's ranks see a dead peer's sockets close at once.)"""
        deadline = time.time() + wait
        while True:
            self.check()
            for rank, doc in sorted(self.live.items()):
                if doc.get("state") == "exited" and doc.get("exit_code") not in (0, 130) and not doc.get("stopped_for"):
                    return self._failed(rank, doc)
            if time.time() >= deadline:
                return None
            time.sleep(0.5)

    @staticmethod
    def _failed(rank: int, doc: dict[str, Any]) -> str:
        from qvltune.launch import describe_exit

        code, ranks = doc.get("exit_code"), doc.get("failed_ranks") or []
        what = ", ".join(f"local rank {r}: {describe_exit(c)}" for r, c in ranks) or (describe_exit(code) if isinstance(code, int) else "exit code unknown")
        return f"node {rank} ({doc.get('host', '?')}) failed ({what})"

    def check(self, now: float | None = None) -> str | None:
        now = time.time() if now is None else now
        for rank in self.peers():
            raw = self._raw(rank)
            if raw is not None and raw != self._initial.get(rank) and (rank not in self._seen or self._seen[rank][0] != raw):
                try:
                    self.live[rank] = json.loads(raw)
                    self._seen[rank] = (raw, now)
                except ValueError:
                    pass
            if rank not in self.live:
                continue
            doc, changed = self.live[rank], self._seen[rank][1]
            where = f"node {rank} ({doc.get('host', '?')})"
            if doc.get("state") == "exited":
                code = doc.get("exit_code")
                if code not in (0, 130):
                    return f"{where} stopped because {doc['stopped_for']}" if doc.get("stopped_for") else self._failed(rank, doc)
                if now - changed > self.grace:
                    return f"{where} ended {int(now - changed)} s ago ({'interrupted' if code == 130 else 'completed'}) while this node's ranks were still running"
            elif now - changed > self.timeout:
                return f"{where} stopped reporting {int(now - changed)} s ago (machine down or network lost?)"
        return None


def check_shared_run_dir(run_dir: Path) -> None:
    """Several nodes must see one run folder (checkpoint shards of every rank, node 0's config and
    markers). Each node's first rank writes a file named by a token from rank 0; rank 0 then checks
    it sees them all, and every rank stops with the same error when not. (Called by every rank of
    the worker, right after the process group starts.)"""
    nodes = int(os.environ.get("CROSS_SIZE", "1"))  # set by DeepSpeed's launcher: the node count
    if nodes <= 1:
        return
    import torch.distributed as dist

    first = os.environ.get("RANK", "0") == "0"
    token = [f"{time.time():.6f}-{os.getpid()}" if first else None]
    dist.broadcast_object_list(token, src=0)
    probe_dir = run_dir / NODES_DIR
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        probe_dir.mkdir(parents=True, exist_ok=True)
        (probe_dir / f"seen-{token[0]}-node{os.environ.get('CROSS_RANK', '0')}").write_text(socket.gethostname())
    dist.barrier()
    missing: list[Any] = [None]
    if first:
        deadline = time.time() + SHARED_CHECK_SECONDS  # network file systems may show a new file late
        while True:
            missing[0] = [k for k in range(nodes) if not (probe_dir / f"seen-{token[0]}-node{k}").exists()]
            if not missing[0] or time.time() > deadline:
                break
            time.sleep(0.5)
        for p in probe_dir.glob(f"seen-{token[0]}-node*"):
            p.unlink(missing_ok=True)
    dist.broadcast_object_list(missing, src=0)
    if missing[0]:
        raise UserError(
            f"the run folder {run_dir} is not shared between the nodes: node 0 cannot see what node(s) {missing[0]} wrote there",
            "put output_dir on storage every node mounts at the same path (NFS, Lustre, GPFS)",
        )


# ----------------------------------------------------------------------------------------------
# Slurm


def slurm_script(cfg: RunConfig, *, config_path: Path, nodes: int, gpus_per_node: int, python: str) -> str:
    """An sbatch script: one ``qvltune train`` per node (srun), the master and node ranks taken from
    the allocation by ``qvltune train`` itself, ``--resume`` always (a requeued job continues from
    its last complete checkpoint; a fresh one starts from the beginning)."""
    run_dir = cfg.run_dir
    lines = [
        "#!/usr/bin/env bash",
        f"# Written by `qvltune init`: train {cfg.name} on {nodes} nodes under Slurm. Submit with: sbatch {config_path.parent.name or '.'}/train.sbatch",
        "# The run folder (output_dir) must be on storage every node sees (NFS, Lustre, GPFS): node 0 writes",
        "# the config, metrics and checkpoint markers there, and every rank writes its checkpoint shards.",
        f"#SBATCH --job-name={cfg.name}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1           # one qvltune train per node; it starts that node's ranks",
    ]
    if gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    lines += [
        "#SBATCH --exclusive",
        "#SBATCH --requeue                     # preempted or a node failed: requeued, and --resume continues",
        "#SBATCH --signal=TERM@180             # 3 minutes before the time limit: every rank checkpoints and stops",
        f"#SBATCH --output={config_path.parent}/slurm-%j.out",
        "set -euo pipefail",
        f"mkdir -p {shlex.quote(str(run_dir))}",
        "# --kill-on-bad-exit: if one node fails, Slurm stops the others too (qvltune also names it).",
        f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 {shlex.quote(python)} -m qvltune train {shlex.quote(str(config_path))} --resume --no-live",
        "",
    ]
    return "\n".join(lines)
