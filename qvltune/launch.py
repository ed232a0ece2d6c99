"""The ``deepspeed`` launcher command for a run (pure), and running it as a child process.

``build_launch`` (DeepSpeed's runner form) and ``one_node_launch`` (on one node, the per-node
launcher the runner would start) are pure functions of the config and the machine, so
``--print-command`` prints exactly what ``qvltune train`` runs (``one_node_launch(argv) or argv``),
and tests check it without launching anything. ``start`` runs it under ``guard``, which on one node
starts the ranks of that launcher command itself (``qvltune.node_ranks``).
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from qvltune.config import RunConfig
from qvltune.node_ranks import LAUNCHER, NodeRanks, rank_commands
from qvltune.rank import die_with_parent, shell_status

DEFAULT_MASTER_PORT = 29500


def deepspeed_launcher() -> list[str]:
    """The ``deepspeed`` script next to this Python (a venv's), else the module form."""
    script = Path(sys.executable).with_name("deepspeed")
    return [str(script)] if script.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]


def build_launch(
    cfg: RunConfig,
    *,
    run_dir: Path,
    gpu_count: int,
    resume: bool = False,
    master_port: int | None = None,
    cpu_count: int | None = None,
    visible_devices: str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) that start the worker on every rank. ``visible_devices`` is
    CUDA_VISIBLE_DEVICES: GPU indices in the config count within it, as everywhere in CUDA."""
    launch = cfg.launch
    argv = deepspeed_launcher()
    if launch.hostfile:
        argv += ["--hostfile", launch.hostfile, "--num_nodes", str(launch.nodes)]
        if launch.master_addr:
            argv += ["--master_addr", launch.master_addr]
    # The deepspeed runner drops CUDA_VISIBLE_DEVICES as soon as --num_gpus is given (and then
    # starts on GPU 0), so a restricted set of visible GPUs is passed on as --include instead.
    visible = [v.strip() for v in (visible_devices or "").split(",") if v.strip()]
    if not all(v.isdigit() for v in visible) or launch.hostfile:
        visible = []  # UUIDs, or several nodes: leave the choice to the runner as before
    processes = processes_per_node(cfg, gpu_count)
    if gpu_count == 0:
        argv += ["--num_gpus", str(processes)]
    elif isinstance(launch.gpus, list):
        ids = [visible[i] if i < len(visible) else str(i) for i in launch.gpus] if visible else [str(i) for i in launch.gpus]
        argv += ["--include", "localhost:" + ",".join(ids)]
    else:
        if visible:
            argv += ["--include", "localhost:" + ",".join(visible[:processes])]
        else:
            argv += ["--num_gpus", str(processes)]
    argv += ["--master_port", str(master_port or launch.master_port or DEFAULT_MASTER_PORT)]
    argv += ["--module", "qvltune.rank", "--run-dir", str(run_dir)]  # runs qvltune.worker, records its outcome
    if resume:
        argv.append("--resume")
    return argv, launch_env(gpu_count, processes, cpu_count)


RUNNER_FLAGS = {"--num_gpus", "--include", "--master_port"}  # what build_launch gives DeepSpeed's runner on one node
# DeepSpeed's runner reads this hostfile when none is given (deepspeed.launcher.runner.DLTS_HOSTFILE;
# not imported: that imports torch) and then starts the ranks on its hosts, over ssh: several nodes.
RUNNER_DEFAULT_HOSTFILE = Path("/job/hostfile")


def one_node_launch(argv: list[str]) -> list[str] | None:
    """The command DeepSpeed's runner would start for a one-node ``build_launch`` command: its
    per-node launcher (``deepspeed.launcher.launch``, which starts and watches the ranks) with the
    runner's own arguments for it (the slots as base64 JSON ``--world_info``, its default log
    settings). None when the runner is needed: a hostfile, given or the runner's default
    (``RUNNER_DEFAULT_HOSTFILE``, which makes it start nodes over ssh).

    Why: on one node the runner does only this translation, in a Python process of its own that
    imports torch and DeepSpeed first (1.5-2 s on the 2-core CPU, more on a GPU machine where torch
    loads the CUDA libraries and the runner counts the GPUs), before the launcher imports them
    again. Starting the launcher directly saves that process; the launcher, its rank handling and
    its exit codes stay DeepSpeed's. tests/test_startup.py checks the result against the command
    DeepSpeed's own runner builds from ``argv``."""
    import base64
    import json

    script = Path(sys.executable).with_name("deepspeed")
    prefixes = ([str(script)], [sys.executable, "-m", "deepspeed.launcher.runner"])
    prefix = next((p for p in prefixes if argv[: len(p)] == p), None)
    if prefix is None or RUNNER_DEFAULT_HOSTFILE.exists():
        return None
    rest = argv[len(prefix) :]
    options: dict[str, str] = {}
    while rest and rest[0] in RUNNER_FLAGS:
        options[rest[0]] = rest[1]
        rest = rest[2:]
    if not rest or rest[0] != "--module" or len(rest) < 2 or "--master_port" not in options:
        return None  # a hostfile or a flag this translation does not know: the runner decides
    if "--include" in options:
        host, _, ids = options["--include"].partition(":")
        if host != "localhost" or not ids:
            return None
        slots = [int(i) for i in ids.split(",")]
    elif "--num_gpus" in options:
        slots = list(range(int(options["--num_gpus"])))
    else:
        return None
    world = base64.urlsafe_b64encode(json.dumps({"localhost": slots}).encode()).decode()
    return [
        sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}", "--master_addr=127.0.0.1",
        f"--master_port={options['--master_port']}", "--module", "--enable_each_rank_log=None", "--log_level=info", *rest[1:],
    ]


def processes_per_node(cfg: RunConfig, gpu_count: int) -> int:
    """Ranks on one node: the CPU process count without GPUs, else the GPUs asked for."""
    gpus = cfg.launch.gpus
    if gpu_count == 0:
        return cfg.launch.cpu_processes
    if isinstance(gpus, list):
        return len(gpus)
    return gpu_count if gpus == "all" else gpus


def launch_env(gpu_count: int, processes: int, cpu_count: int | None = None) -> dict[str, str]:
    """The environment the launcher and ranks need on top of this one."""
    env = {
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # DeepSpeed's op builder crashes on the "9.0a" arch some images default to.
        "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace("9.0a", "9.0") or "",
    }
    if not env["TORCH_CUDA_ARCH_LIST"]:
        del env["TORCH_CUDA_ARCH_LIST"]
    if gpu_count == 0:
        # CPU mode: split the cores between the processes instead of oversubscribing them.
        # (an OMP_NUM_THREADS already set wins: several simulated nodes may share one machine.)
        env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS") or str(max(1, (cpu_count or os.cpu_count() or 1) // processes))
    return env


def format_command(argv: list[str], env: dict[str, str]) -> str:
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    return (prefix + " " if prefix else "") + shlex.join(argv)


def command_text(argv: list[str], runner_argv: list[str], env: dict[str, str]) -> str:
    """The command that runs, for launch.sh and ``--print-command``: when it is DeepSpeed's launcher
    started directly (``one_node_launch``), the runner form it stands for comes first, as a comment."""
    same = f"# The same as DeepSpeed's runner form:\n#   {format_command(runner_argv, env)}\n" if argv != runner_argv else ""
    return same + format_command(argv, env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Child:
    """The launcher process and its output, kept in a log file and a ring buffer of recent lines."""

    process: subprocess.Popen
    log_path: Path
    tail: deque = field(default_factory=lambda: deque(maxlen=40))
    _offset: int = 0

    def poll(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float) -> int | None:
        """Up to ``timeout`` seconds for the launcher to exit (a refresh interval that ends early)."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def read_output(self) -> list[str]:
        """New complete lines the child wrote since the last call."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return []
        cut = data.rfind(b"\n") + 1
        self._offset += cut
        lines = data[:cut].decode(errors="replace").splitlines()
        self.tail.extend(lines)
        return lines

    def terminate(self, timeout: float = 30.0) -> None:
        """Stop the whole process group (launcher and ranks): SIGTERM, then SIGKILL."""
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()


SHM_DIR = Path("/dev/shm")


def master_port_of(argv: list[str]) -> int | None:
    """The --master_port of a deepspeed runner or launcher command (``build_launch`` always sets one)."""
    if "--master_port" in argv:
        return int(argv[argv.index("--master_port") + 1])
    return next((int(a.split("=", 1)[1]) for a in argv if a.startswith("--master_port=")), None)


def remove_shm_buffers(master_port: int, rank: int | None = None, shm_dir: Path = SHM_DIR) -> int:
    """Delete DeepSpeed's CPU all-reduce buffers of a run (``deepspeed_allreduce_buffer_*_<addr>_<port>_<rank>``,
    ~70 MB each in /dev/shm). DeepSpeed never unlinks them, so every CPU run would otherwise leave
    RAM behind until the machine swaps. Returns how many were removed."""
    pattern = f"deepspeed_allreduce_buffer_*_{master_port}_{'*' if rank is None else rank}"
    removed = 0
    for path in shm_dir.glob(pattern):
        try:
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def describe_exit(code: int) -> str:
    """A process's exit as Popen reports it (-N: signal N), or as the guard and a shell report a
    signal (128 + N)."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if 128 < code < 128 + 65 and code - 128 in signal.Signals._value2member_map_:
        return f"exit code {code}: 128 + {signal.Signals(code - 128).name}"
    return f"exit code {code}"


def start(argv: list[str], env: dict[str, str], log_path: Path, run_dir: Path) -> Child:
    """Start the launcher under a guard, in its own session: a terminal Ctrl-C reaches only
    ``qvltune train``, which then asks the ranks to checkpoint and stop (the launcher would kill them
    outright); and if ``qvltune train`` dies, the guard stops the whole group (see ``guard``)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    offset = log_path.stat().st_size if log_path.exists() else 0
    log = open(log_path, "ab")
    guarded = [sys.executable, "-m", "qvltune.launch", str(run_dir), *argv]
    process = subprocess.Popen(
        guarded, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM)
    )
    log.close()
    return Child(process, log_path, _offset=offset)


GUARD_GRACE_SECONDS = 60


def guard(run_dir: Path, argv: list[str]) -> int:
    """Start the ranks (or, for a command ``qvltune.node_ranks`` does not read, the launcher) and
    outlive nothing: the guard is the session leader between ``qvltune train`` and the ranks. The
    kernel sends it SIGTERM when ``qvltune train`` dies (PR_SET_PDEATHSIG, which a runner's own
    children would not inherit); it then asks the ranks to checkpoint and stop (the STOP file), and
    after a grace period kills whatever is left of its process group, so no rank keeps running on
    the GPUs. Ranks it starts itself also get SIGTERM if the guard dies (then they checkpoint)."""
    from qvltune.checkpoints import STOP_FILE

    # DeepSpeed builds its ops (the CPU all-reduce, CPU Adam) with whichever `ninja` is first on PATH;
    # two ninja versions (a venv's and the system's) read each other's build log as "command
    # changed" and rebuild the op at every start, one process at a time. The venv's tools go first.
    path = os.environ.get("PATH", "")
    here = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": path if path.split(os.pathsep)[0] == here else here + os.pathsep + path}
    child: NodeRanks | subprocess.Popen | None = None

    def on_term(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            (run_dir / STOP_FILE).write_text("qvltune train went away\n")
        except OSError:
            pass
        deadline = time.time() + GUARD_GRACE_SECONDS
        while child is not None and child.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        port = master_port_of(argv)
        if port is not None:  # nobody else is left to remove the ranks' shared memory
            remove_shm_buffers(port)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    # Before anything starts, so no rank can be left behind by an early SIGTERM. A SIGINT sent to the
    # whole group reaches the ranks themselves (each checkpoints); the guard keeps watching them.
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, lambda signum, frame: None)  # a handler, not SIG_IGN: the ranks must not inherit it
    # DeepSpeed's per-node launcher: its ranks started from here, without its process (node_ranks).
    commands = rank_commands(argv)
    if commands is not None:
        child = NodeRanks(commands, env, preexec_fn=die_with_parent(signal.SIGTERM))
        print(f"qvltune: started {child.describe()} as {LAUNCHER} would", flush=True)
    else:
        child = subprocess.Popen(argv, env=env)
    return shell_status(child.wait())


if __name__ == "__main__":
    sys.exit(guard(Path(sys.argv[1]), sys.argv[2:]))
