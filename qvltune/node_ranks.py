"""One node's ranks, started and watched by ``qvltune train``'s guard instead of a launcher process.

On one node ``qvltune train`` builds DeepSpeed's per-node launcher command (``python -u -m
deepspeed.launcher.launch --world_info=... --module ... qvltune.rank --run-dir ...``,
``qvltune.launch.one_node_launch``) and keeps it in ``launch.sh``. That launcher only sets each
rank's variables, starts the ranks and tears them down when one fails, yet it imports DeepSpeed,
and with it torch (and, on a GPU machine, the CUDA libraries), before it starts anything: 1.5-2 s
on the 2-core CPU, a large part of the 6-7 s "launcher" phase on the H200, on the critical path of
every run (``torchrun`` imports torch too). The guard (``qvltune.launch.guard``, torch-free, already between
``qvltune train`` and the launcher) does the same work from the same command instead:

- ``rank_commands`` reads the launcher command and returns what it would start: per local rank
  ``python -u -m qvltune.rank --local_rank=N ...`` with the variables DeepSpeed's launcher sets
  (``CUDA_VISIBLE_DEVICES``, ``MASTER_ADDR``/``PORT``, ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
  ``CROSS_RANK``/``SIZE``, ``LOCAL_SIZE``); tests/test_startup.py compares them with what the real
  launcher starts. A flag it does not read, or nodes of unequal size (where DeepSpeed's local rank
  is the global rank modulo this node's size), makes it return None: the guard runs the launcher.
- ``NodeRanks`` starts them and, when one fails, stops the others as the launcher does: SIGTERM to
  each rank's process tree, SIGKILL to what is left after ``TEARDOWN_SECONDS``. It polls ten times a
  second (the launcher: once), so a run's end reaches ``qvltune train`` sooner.

Which rank failed first, and how, is still each rank's own record (``qvltune.rank``); the exit code
here is the first failure seen, as the launcher's was (for a rank killed by signal N, 128 + N as a
shell says it, where DeepSpeed's launcher exited with 256 - N).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass

from qvltune.rank import shell_status

LAUNCHER = "deepspeed.launcher.launch"
TEARDOWN_SECONDS = 30.0  # DeepSpeed's launcher waits as long for its ranks after SIGTERM
POLL_SECONDS = 0.1
# The launcher's options as one_node_launch writes them, and the values this reading implements.
_VALUED = ("--world_info", "--master_addr", "--master_port", "--node_rank", "--enable_each_rank_log", "--log_level")
_KNOWN_VALUES = {"--enable_each_rank_log": {"None"}}  # per-rank log files: the launcher's job


@dataclass(frozen=True)
class RankCommand:
    rank: int
    local_rank: int
    argv: list[str]
    env: dict[str, str]  # set on top of the launcher's own environment


def rank_commands(argv: list[str]) -> list[RankCommand] | None:
    """The processes DeepSpeed's per-node launcher command ``argv`` starts, in its order; None for
    any other command, or a launcher flag not read here (the launcher then runs as it is)."""
    if len(argv) < 4 or argv[1:4] != ["-u", "-m", LAUNCHER]:
        return None
    python, rest = argv[0], argv[4:]
    options: dict[str, str] = {}
    module = False
    while rest and rest[0].startswith("--"):
        flag, has_value, value = rest[0].partition("=")
        if flag == "--module" and not has_value:
            module = True
        elif flag in _VALUED and has_value and value in _KNOWN_VALUES.get(flag, {value}):
            options[flag] = value
        else:
            return None
        rest = rest[1:]
    if not module or not rest or "--world_info" not in options or "--master_port" not in options:
        return None
    world: dict[str, list[int]] = json.loads(base64.urlsafe_b64decode(options["--world_info"]))
    nodes = list(world)
    if len({len(slots) for slots in world.values()}) != 1:
        return None
    node_rank = int(options.get("--node_rank", "0"))
    slots = world[nodes[node_rank]]
    first_rank = sum(len(world[n]) for n in nodes[:node_rank])
    shared = {
        "CUDA_VISIBLE_DEVICES": ",".join(map(str, slots)),
        "MASTER_ADDR": options.get("--master_addr", "127.0.0.1"),
        "MASTER_PORT": options["--master_port"],
        "WORLD_SIZE": str(sum(len(s) for s in world.values())),
        "CROSS_RANK": str(node_rank),
        "CROSS_SIZE": str(len(nodes)),
        "LOCAL_SIZE": str(len(slots)),
    }
    module_name, script_args = rest[0], rest[1:]
    return [
        RankCommand(
            rank=first_rank + local,
            local_rank=local,
            argv=[python, "-u", "-m", module_name, f"--local_rank={local}", *script_args],
            env={**shared, "RANK": str(first_rank + local), "LOCAL_RANK": str(local)},
        )
        for local in range(len(slots))
    ]


def within_visible(slots: str, visible: str) -> str:
    """The ranks' ``CUDA_VISIBLE_DEVICES`` for the launcher's slots, when the one qvltune was given
    names GPUs by UUID or MIG instance: the slots (``--num_gpus N`` gives 0..N-1) are positions in
    that list, where DeepSpeed's launcher would make them physical GPU numbers and put the ranks on
    other GPUs than the user's (or whole GPUs instead of MIG slices). Numeric lists are left alone:
    ``build_launch`` passes their GPU numbers on as the slots (``--include``)."""
    entries = [v.strip() for v in visible.split(",") if v.strip()]
    ids = [int(i) for i in slots.split(",") if i]
    if not entries or all(v.isdigit() for v in entries) or any(i >= len(entries) for i in ids):
        return slots
    return ",".join(entries[i] for i in ids)


def _signal_tree(pid: int, sig: signal.Signals) -> None:
    """``sig`` to a process and all its descendants (the rank's worker, its data loader and compile
    workers), children first, as DeepSpeed's launcher stops a rank."""
    import psutil

    try:
        parent = psutil.Process(pid)
        tree = parent.children(recursive=True) + [parent]
    except psutil.Error:
        return
    for process in tree:
        try:
            process.send_signal(sig)
        except psutil.Error:
            pass


class NodeRanks:
    """This node's rank processes, watched as one: ``poll()`` is None while any runs; once one fails
    the others are stopped, and the result is the first failure's exit code (128 + N for signal N),
    else 0."""

    def __init__(self, commands: list[RankCommand], environ: dict[str, str] | None = None, preexec_fn=None):
        base = dict(os.environ if environ is None else environ)
        # Importing DeepSpeed (0.19 does) sets this in its launcher's environment, and so in every
        # rank's: torch.cuda.is_available() then asks NVML instead of starting CUDA (DeepSpeed's
        # reason: no CUDA context before its ranks fork). A DeepSpeed that does not set it leaves
        # the ranks to the CUDA runtime's own count: the same answer. A value already set wins.
        base.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        visible = base.get("CUDA_VISIBLE_DEVICES", "")
        self.processes = []
        for c in commands:
            env = {**base, **c.env}
            if "CUDA_VISIBLE_DEVICES" in c.env:
                env["CUDA_VISIBLE_DEVICES"] = within_visible(c.env["CUDA_VISIBLE_DEVICES"], visible)
            self.processes.append(subprocess.Popen(c.argv, env=env, preexec_fn=preexec_fn))
        self.commands = commands
        self.failure: int | None = None
        self._stop_sent: float | None = None
        self._killed = False

    def describe(self) -> str:
        return ", ".join(f"rank {c.rank} (pid {p.pid})" for c, p in zip(self.commands, self.processes))

    def poll(self) -> int | None:
        codes = [p.poll() for p in self.processes]
        if self.failure is None:
            failed = next((c for c in codes if c not in (None, 0)), None)
            if failed is not None:
                self.failure = shell_status(failed)
        if self.failure is not None and any(c is None for c in codes):
            now = time.monotonic()
            if self._stop_sent is None:
                self._stop_sent = now
                self._signal_running(signal.SIGTERM)
            elif now - self._stop_sent > TEARDOWN_SECONDS and not self._killed:
                self._killed = True
                self._signal_running(signal.SIGKILL)
        if any(c is None for c in codes):
            return None
        return self.failure or 0

    def wait(self) -> int:
        while (code := self.poll()) is None:
            time.sleep(POLL_SECONDS)
        return code

    def _signal_running(self, sig: signal.Signals) -> None:
        for process in self.processes:
            if process.poll() is None:
                _signal_tree(process.pid, sig)
