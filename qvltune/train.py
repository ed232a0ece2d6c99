"""``qvltune train``'s parent side: validate, prepare the run folder and data, launch, supervise.

The parent never imports torch in its drawing loop: it tails ``metrics.jsonl`` (written by rank 0)
and samples NVML. Ctrl-C writes the STOP file that every rank checks at the end of each step; they
save a checkpoint and exit cleanly. A second Ctrl-C stops the process group at once.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qvltune import console
from qvltune.config import RunConfig, dump_config
from qvltune.config_checks import check_against_hardware, check_against_model, effective_batch_mismatch
from qvltune.dashboard import DashboardState, format_line, render
from qvltune.errors import UserError
from qvltune.launch import Child, build_launch, command_text, format_command, free_port, master_port_of, one_node_launch, remove_shm_buffers, start
from qvltune.metrics import MetricsTailer, MetricsWriter, read_all
from qvltune.data_ready import DATA_READY, mark_data_ready, pending_env
from qvltune.phases import PhaseClock, parent_env, process_started
from qvltune.rank import RankFailure, clear_records, first_failure, read_records
from qvltune.checkpoints import STOP_FILE, checkpoints, last_checkpoint_text, latest_complete_checkpoint
from qvltune.zero import DS_CONFIG


# On one node qvltune's guard starts the ranks this launcher command describes, without the
# launcher's own process (qvltune.node_ranks); run by hand, the command itself does the same.
LAUNCH_HEADER = "#!/usr/bin/env bash\n# The command qvltune train ran (on one node its ranks are started as this launcher would start them).\n"


def missing_data_files(cfg: RunConfig) -> list[str]:
    """``data.train`` / ``data.eval`` files that do not exist (mixtures: every part), as messages."""
    from qvltune.data.mixture import parse_mixture

    problems = []
    for field in ("train", "eval"):
        spec = getattr(cfg.data, field)
        if not spec:
            continue
        for part in spec if isinstance(spec, list) else [spec]:
            try:
                paths = [s.path for s in parse_mixture(part)]
            except ValueError:
                continue  # a malformed mixture is reported where it is parsed, with its rule
            problems += [f"data.{field}: file not found: {p}" for p in paths if not Path(p).is_file()]
    return problems


def validate(cfg: RunConfig, gpus: list[Any]) -> None:
    """Every conflict that needs the model or the machine, all at once, before anything runs."""
    from qvltune.model import read_model_config

    missing = missing_data_files(cfg)
    if missing:
        raise UserError(
            missing[0] if len(missing) == 1 else f"{len(missing)} data files not found:\n  " + "\n  ".join(missing),
            "fix the path in the config (relative paths are relative to the config file's folder)",
        )
    model_type = read_model_config(cfg.model.path, cfg.model.trust_remote_code).get("model_type", "?")
    problems = check_against_model(cfg, model_type) + check_against_hardware(cfg, gpus)
    if problems:
        raise UserError(f"{len(problems)} problem(s) with this config on this machine:\n  " + "\n  ".join(problems), "fix the fields above")
    mismatch = effective_batch_mismatch(cfg, gpus)
    if mismatch:
        console.warn(mismatch)


def remove_aside(folder: Path) -> threading.Thread | None:
    """Delete ``folder`` without waiting for it: renamed at once to a hidden sibling, then deleted by
    a thread while the run starts (an earlier run's checkpoints are gigabytes: 1.4 s of a 2B and
    3.3 s of an 8B start on the H200 went to deleting them). Not a daemon: the command does not end
    before the folder is gone. A sibling left by an interrupted deletion goes with it. A run folder
    that is a link (to larger storage) stays one: what it points to is emptied the same way."""
    if folder.is_symlink():
        target = folder.resolve()
        thread = remove_aside(target) if target.is_dir() else None
        target.mkdir(parents=True, exist_ok=True)
        return thread
    aside = folder.with_name(f".{folder.name}.deleting-{os.getpid()}-{time.time_ns()}")
    try:
        folder.rename(aside)
    except OSError:  # e.g. the run folder is a mount point: deleted in place, waited for
        shutil.rmtree(folder)
        return None
    stale = [p for p in folder.parent.glob(f".{glob.escape(folder.name)}.deleting-*") if p != aside]

    def remove() -> None:
        for path in (aside, *stale):
            shutil.rmtree(path, ignore_errors=True)  # what cannot go now is retried by the next --force

    thread = threading.Thread(target=remove, name="qvltune-remove-earlier-run")
    thread.start()
    return thread


def prepare_run(cfg: RunConfig, *, resume: bool, force: bool = False) -> dict[str, Any]:
    """Create the run folder (config, data index; the ZeRO JSON is rank 0's); refuse to clobber a
    previous run."""
    prepare_folder(cfg, resume=resume, force=force)
    return prepare_index(cfg)


def prepare_folder(cfg: RunConfig, *, resume: bool, force: bool = False) -> threading.Thread | None:
    """The run folder with what the ranks read first (the config); refuse to clobber a previous
    run. An earlier attempt's data index and ZeRO JSON go: the ranks wait for this attempt's
    (``data_ready``), never read the last one, and rank 0 writes the JSON it was given. Returns the
    thread deleting the earlier run's folder (``--force``), if any."""
    run_dir = cfg.run_dir
    existing = checkpoints(run_dir) if run_dir.exists() else []
    removing = None
    if existing and not resume:
        if not force:
            raise UserError(
                f"{run_dir} already holds {len(existing)} checkpoint(s) of an earlier run",
                "continue it with --resume, start over with --force (deletes it), or change `name`",
            )
        removing = remove_aside(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STOP_FILE).unlink(missing_ok=True)
    if not resume:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    # The ZeRO JSON is rank 0's to write (qvltune.worker): the one DeepSpeed was given, never an
    # earlier attempt's.
    (run_dir / DS_CONFIG).unlink(missing_ok=True)
    # skipped.jsonl stays: it also lists what the earlier attempt's ranks skipped in training;
    # prepare_index rewrites it when this attempt's check skips records.
    for name in (DATA_READY, "data_index.json"):
        (run_dir / name).unlink(missing_ok=True)
    return removing


def prepare_index(cfg: RunConfig) -> dict[str, Any]:
    """Check every record and media file of the run's data (or reuse the index cache's checks),
    write the data index, then the ``data_ready`` mark the ranks wait for (with how long it took)."""
    from qvltune.data.dataset import prepare_data
    from qvltune.model import run_processor

    started = time.time()
    run_dir = cfg.run_dir
    processor = run_processor(cfg)
    if cfg.stage == "dpo":  # preference pairs: checked and counted by qvltune.preference
        from qvltune.preference.data import prepare_pairs

        index = prepare_pairs(cfg, processor)
    else:
        index = prepare_data(cfg, processor)
    if index.from_cache:
        recounted = f"; {index.recounted} record(s) checked again, their media changed" if index.recounted else ""
        console.note(f"data index: checks and token counts reused from the cache beside the data (data.index_cache){recounted}")
    index.save(run_dir / "data_index.json")
    if index.skipped:
        import json

        with open(run_dir / "skipped.jsonl", "w") as f:
            for s in index.skipped:
                f.write(json.dumps(s) + "\n")
        console.warn(f"skipping {len(index.skipped)} bad record(s) (data.on_bad_sample: skip); listed in {run_dir / 'skipped.jsonl'}")
    mark_data_ready(run_dir, time.time() - started)
    return {"train": len(index.train), "eval": len(index.eval), "skipped": len(index.skipped)}


def check_data(cfg: RunConfig, status: str) -> dict[str, Any]:
    """``prepare_index`` behind a status line."""
    with console.status(status):
        return prepare_index(cfg)


@dataclass
class Outcome:
    exit_code: int
    state: DashboardState
    log_tail: list[str]
    interrupted: bool
    peer_failure: str | None = None  # multi-node: another node failed, so this one stopped
    node: str | None = None  # multi-node: "node 1 of 2", to name this node in messages
    failure: RankFailure | None = None  # the rank that failed first, from the ranks' own records


# What rank 0 already explained in its own ``end`` record (and the worker's exit code says so).
WORKER_REPORTED = ("oom", "bad_sample", "nan", "save_failed", "compile_failed", "error")


def rank_failure(run_dir: Path, outcome: Outcome, *, node: int | None = None, nodes: int = 1, write_end: bool = True, attempt: set[int] | None = None) -> RankFailure | None:
    """After the launcher exited with an error: which rank failed first, from the records each rank
    left (``qvltune.rank``), not from the launcher, whose exit code is whichever failed rank it
    polled first. Written to metrics.jsonl as the run's ``end`` record (``write_end``: by the node
    that owns the metrics) unless rank 0 already explained the failure there. ``attempt``: the
    nodes that took part in this attempt (node 0 reading every node's records: a node that did not
    start this time still has its records of an earlier one, which would name an old failure)."""
    if outcome.exit_code in (0, 130) or outcome.interrupted or outcome.state.status in WORKER_REPORTED:
        return None
    records = read_records(run_dir, node)
    if attempt is not None:
        records = [r for r in records if int(r.get("node", 0)) in attempt]
    failure = first_failure(records)
    if failure is not None and write_end:
        MetricsWriter(run_dir / "metrics.jsonl").write(
            "end", status="rank_failed", step=outcome.state.step, message=failure.describe(nodes), last_checkpoint=last_checkpoint_text(run_dir), **failure.as_record()
        )
    return failure


def resume_state(cfg: RunConfig, metrics: Path) -> tuple[DashboardState, MetricsTailer]:
    """The panel's state and a tailer positioned after what earlier attempts of this run wrote:
    their curves stay on the panel, their lines are not printed again, and their last status
    (``interrupted``) gives way to this attempt's."""
    state = DashboardState(cfg.name)
    tailer = MetricsTailer(metrics)
    for record in tailer.read_new():
        state.apply(record)
    state.status, state.message, state.hint, state.phase = "starting", None, None, None
    state.started, state.first_step_time = time.time(), None  # this attempt's elapsed time and rate
    return state, tailer


def supervise(
    child: Child, cfg: RunConfig, *, live: bool, nvml_sampler=None, refresh: float = 0.5, state: DashboardState | None = None, tailer: MetricsTailer | None = None, on_tick=None
) -> Outcome:
    """Tail metrics and NVML while the child runs; render the panel (TTY) or one line per log step.
    ``on_tick(state)`` (multi-node) runs at every refresh; a message it returns names another node's
    failure: this node's ranks are stopped at once (their peers are gone, no checkpoint can be saved)."""
    run_dir = cfg.run_dir
    state = state or DashboardState(cfg.name)
    tailer = tailer or MetricsTailer(run_dir / "metrics.jsonl")
    if state.phase is None:
        state.begin("starting DeepSpeed")
    interrupts = 0
    peer_failure = None

    def tick() -> None:
        nonlocal peer_failure
        if on_tick is not None and peer_failure is None:
            peer_failure = on_tick(state)
            if peer_failure:
                child.terminate(timeout=10)

    def on_sigint(signum, frame):
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            (run_dir / STOP_FILE).write_text("stop requested\n")
            state.message = "Ctrl-C: saving a checkpoint at the end of this step, then stopping (Ctrl-C again to kill)"
            if not live:
                console.warn(state.message)
        else:
            child.terminate(timeout=10)

    # Ctrl-C, or SIGTERM from a scheduler to this process: checkpoint, then stop.
    previous = {sig: signal.signal(sig, on_sigint) for sig in (signal.SIGINT, signal.SIGTERM)}
    last_sample = 0.0
    try:
        if live:
            from rich.live import Live

            # The alternate screen: a resized terminal or a panel taller than it cannot leave broken
            # lines or stray borders behind; the final panel is printed once, below, when it is over.
            with Live(render(state), console=console.err, refresh_per_second=4, screen=True) as view:
                while child.poll() is None:
                    _drain(tailer, state, None)
                    child.read_output()
                    if nvml_sampler and time.time() - last_sample > 1.0:
                        state.gpus, last_sample = nvml_sampler(), time.time()
                    tick()
                    view.update(render(state))
                    child.wait(refresh)  # back at once when the ranks are done
                _drain(tailer, state, None)
            console.err.print(render(state))
        else:
            while child.poll() is None:
                _drain(tailer, state, console.out)
                child.read_output()
                tick()
                child.wait(refresh)  # back at once when the ranks are done
            _drain(tailer, state, console.out)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    child.read_output()
    return Outcome(child.process.returncode, state, list(child.tail), interrupts > 0, peer_failure)


def _drain(tailer: MetricsTailer, state: DashboardState, printer) -> None:
    for record in tailer.read_new():
        state.apply(record)
        if printer is not None:
            # A resumed start names the step it resumes at of the total (known from the earlier attempt).
            line = state.message if record.get("kind") == "start" and record.get("resumed_from") else format_line(record)
            if line:
                printer.print(line)


def _import_plotting() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


def import_plotting_beside() -> None:
    """Import matplotlib while training runs (the parent mostly waits), not after it: the loss plot
    is drawn once the ranks have ended, and its import was ~0.35 s of the 0.75 s between the ranks'
    end and the command's on the CPU."""
    threading.Thread(target=_import_plotting, name="qvltune-import-plotting", daemon=True).start()


def plot_loss(metrics_path: Path, out: Path) -> Path | None:
    """loss.png: training loss per step and eval loss, from metrics.jsonl."""
    records = read_all(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("kind") == "eval" and r.get("eval_loss") is not None]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:red")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def launch_command(cfg: RunConfig, gpu_count: int, resume: bool, master_port: int | None = None) -> tuple[list[str], dict[str, str]]:
    if cfg.launch.nodes > 1 and not cfg.launch.hostfile:
        raise UserError(
            f"launch.nodes is {cfg.launch.nodes} but nothing says how to reach the other nodes",
            "give launch.hostfile (ssh), or start qvltune train on each node with --node-rank N --master-addr HOST "
            "(or MASTER_ADDR/NODE_RANK/WORLD_SIZE), or under srun (see README: Several nodes)",
        )
    return build_launch(
        cfg, run_dir=cfg.run_dir.resolve(), gpu_count=gpu_count, resume=resume, master_port=master_port, visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES")
    )


def completed_run(cfg: RunConfig) -> dict[str, Any] | None:
    """The ``end`` record of this run when it already finished with this same schedule (epochs or
    max_steps): resuming it would only relaunch DeepSpeed to do nothing. A longer schedule in the
    config is a reason to resume, so then this is None."""
    run_dir = cfg.run_dir
    saved = run_dir / "config.yaml"
    if not (run_dir / "final").is_dir() or not saved.is_file():
        return None
    ends = [r for r in read_all(run_dir / "metrics.jsonl") if r.get("kind") in ("end", "start")]
    if not ends or ends[-1].get("kind") != "end" or ends[-1].get("status") != "completed":
        return None
    from qvltune.config import load_config

    try:
        before = load_config(saved).optim
    except UserError:
        return None
    if (before.epochs, before.max_steps) != (cfg.optim.epochs, cfg.optim.max_steps):
        return None
    return ends[-1]


def run_training(cfg: RunConfig, *, resume: bool, live: bool, force: bool = False, gpus: list[Any] | None = None, verbose: bool = False, node=None) -> Outcome:
    """The whole parent flow: validate, prepare, launch, supervise, plot. ``node`` (a
    ``nodes.NodeSpec``): this machine is one node of a run started node by node (no ssh, Slurm)."""
    from qvltune.hardware import detect_gpus, sample_gpus

    if gpus is None:
        gpus = detect_gpus()[0]
    if node is not None:
        return run_node(cfg, node, resume=resume, live=live, force=force, gpus=gpus)
    clock = PhaseClock(since=process_started() or time.time())  # the first rank goes on with it
    clock.mark("qvltune start (CLI, config, GPUs)")
    with console.status("checking the config against the model and this machine"):
        validate(cfg, gpus)
    clock.mark("config check")
    if resume and latest_complete_checkpoint(cfg.run_dir) is None:
        console.note(f"no complete checkpoint in {cfg.run_dir}: starting from the beginning")
    prepare_folder(cfg, resume=resume, force=force)
    runner_argv, env = launch_command(cfg, len(gpus), resume, master_port=cfg.launch.master_port or free_port())
    # One node: DeepSpeed's launcher started directly, as its runner would start it (one Python and
    # torch start less; qvltune.launch.one_node_launch). launch.sh keeps both forms.
    direct = one_node_launch(runner_argv)
    argv = direct or runner_argv
    # The data is checked beside the launcher only when every rank is a child of it on this machine
    # and so sees QVLTUNE_DATA_PENDING: the runner starts the ranks of a hostfile over ssh, passing on
    # only some variables, and ranks that never heard of the pending check would run their own.
    beside = direct is not None
    if not beside:
        counts = check_data(cfg, "checking every record and media file of the data")
        clock.mark("data check and index")
    command = format_command(argv, env)
    (cfg.run_dir / "launch.sh").write_text(LAUNCH_HEADER + command_text(argv, runner_argv, env) + "\n")
    with open(cfg.run_dir / "train.log", "a") as log:
        log.write(f"qvltune: launching: {command}\n")
    if verbose:
        console.note(f"launching: {command}")
    state, tailer = resume_state(cfg, cfg.run_dir / "metrics.jsonl")
    # The parent's phases go to the ranks, not into launch.sh: the recorded command stays reproducible.
    clear_records(cfg.run_dir)
    # On one node DeepSpeed starts now and the data is checked beside it (qvltune.data_ready): the
    # ranks' start-up (Python, torch, the process group, the weights) no longer waits behind the
    # check, and no rank reads the data index before the check below has written it.
    child = start(argv, {**env, **parent_env(clock), **(pending_env() if beside else {})}, cfg.run_dir / "train.log", cfg.run_dir)
    if beside:
        try:
            counts = check_data(cfg, "checking every record and media file of the data (DeepSpeed starts beside it)")
        except BaseException:  # a failed check (or Ctrl-C): the ranks stop before they read any data
            child.terminate(timeout=10)
            remove_shm_buffers(master_port_of(argv))
            raise
    console.note(f"data: {counts['train']} training and {counts['eval']} eval records checked")
    console.note(f"log: {cfg.run_dir / 'train.log'}   command: {cfg.run_dir / 'launch.sh'}")
    import_plotting_beside()
    try:
        outcome = supervise(child, cfg, live=live, nvml_sampler=sample_gpus if gpus else None, state=state, tailer=tailer)
    finally:
        remove_shm_buffers(master_port_of(argv))  # also those of ranks that were killed
    outcome.failure = rank_failure(cfg.run_dir, outcome, nodes=cfg.launch.nodes)
    plot_loss(cfg.run_dir / "metrics.jsonl", cfg.run_dir / "loss.png")
    return outcome


def run_node(cfg: RunConfig, node, *, resume: bool, live: bool, force: bool, gpus: list[Any]) -> Outcome:
    """One node of a multi-node run started node by node: node 0 prepares the run folder (config,
    data index, metrics) exactly as on one machine; every node starts its own ranks through
    DeepSpeed's runner without ssh, keeps its status file current (alive, GPUs, exit code) and
    watches the others' (``nodes.PeerWatch``): a node that dies is named, and the rest stop."""
    from qvltune.hardware import sample_gpus
    from qvltune.nodes import HEARTBEAT_SECONDS, NODES_DIR, PeerWatch, node_launch, peer_gpus, write_status

    validate(cfg, gpus)
    run_dir = cfg.run_dir
    label = f"node {node.node_rank} of {node.nodes}"
    if node.is_first:
        counts = prepare_run(cfg, resume=resume, force=force)
        console.note(f"data: {counts['train']} training and {counts['eval']} eval records checked")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        console.note(f"{label}: node 0 prepares {run_dir} (which must be on storage every node sees)")
    argv, env, hostfile = node_launch(cfg, node, run_dir=run_dir.resolve(), gpu_count=len(gpus), resume=resume)
    nodes_dir = run_dir / NODES_DIR
    nodes_dir.mkdir(parents=True, exist_ok=True)
    tmp = nodes_dir / f".hostfile.{node.node_rank}.tmp"
    tmp.write_text(hostfile)
    tmp.replace(nodes_dir / "hostfile")  # the same text on every node
    log = run_dir / "train.log" if node.is_first else nodes_dir / f"node-{node.node_rank}.log"
    if node.is_first:
        (run_dir / "launch.sh").write_text(
            "#!/usr/bin/env bash\n# The command qvltune train ran on node 0; node N runs it with --node_rank N.\n" + format_command(argv, env) + "\n"
        )
    console.note(f"{label} ({node.source}), master {node.master_addr}:{node.master_port}; launching: {format_command(argv, env)}")
    console.note(f"log: {log}")
    watch = PeerWatch(run_dir, node)  # before this node's first status: earlier files are history
    local = sample_gpus() if gpus else []
    write_status(run_dir, node.node_rank, "running", gpus=local)
    clear_records(run_dir, node.node_rank)  # each node its own ranks' records of an earlier attempt
    child = start(argv, env, log, run_dir)
    last = time.time()

    def on_tick(state: DashboardState) -> str | None:
        nonlocal last, local
        if time.time() - last >= HEARTBEAT_SECONDS:
            local = sample_gpus() if gpus else []
            write_status(run_dir, node.node_rank, "running", gpus=local)
            last = time.time()
            if node.is_first:  # node 0's panel: its own GPUs, then every other node's
                state.gpus = list(local) + peer_gpus(watch.live)
        return watch.check()

    outcome = None
    try:
        if node.is_first:
            import_plotting_beside()
        outcome = supervise(child, cfg, live=live, on_tick=on_tick)
        outcome.node = label
        # Node 0's ranks fail at once when a peer's die (closed sockets): if a peer failed, name it,
        # not the consequence. (Node 0's own errors -- out of memory, a bad sample, NaN -- come first.)
        if node.is_first and outcome.exit_code not in (0, 130) and outcome.peer_failure is None and outcome.state.status not in WORKER_REPORTED:
            outcome.peer_failure = watch.failed_peer()
        # This node's ranks' records name which of them failed first, with its own exit code.
        # Node 0 reads every node's (the run folder is shared), the others their own.
        attempt = {node.node_rank, *watch.live} if node.is_first else None  # the peers heard from this time
        outcome.failure = rank_failure(run_dir, outcome, node=None if node.is_first else node.node_rank, nodes=node.nodes, write_end=node.is_first, attempt=attempt)
    finally:
        own = outcome.failure if outcome and outcome.failure and outcome.failure.node == node.node_rank else None
        ranks = [(own.local_rank, own.status_code)] if own else []
        write_status(run_dir, node.node_rank, "exited", exit_code=child.poll(), stopped_for=outcome.peer_failure if outcome else None, failed_ranks=ranks)
        remove_shm_buffers(node.master_port)
    if node.is_first:
        plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png")
    return outcome
