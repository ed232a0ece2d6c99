"""``qvltune train CONFIG``: launch DeepSpeed training with a live panel."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape  # a worker's error may hold "[...]" (gloo's source locations)

from qvltune import console
from qvltune.config import load_config
from qvltune.redact import redact


def command(
    config: Path = typer.Argument(..., metavar="CONFIG", help="Run config (YAML), e.g. from `qvltune init` or templates/."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest complete checkpoint, with the same data order."),
    no_live: bool = typer.Option(False, "--no-live", help="One plain line per log step instead of the live panel."),
    print_command: bool = typer.Option(False, "--print-command", help="Print the exact launcher command (for clusters) and exit."),
    force: bool = typer.Option(False, "--force", help="Delete an earlier run of the same name instead of refusing."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print the launcher command (it is always in launch.sh and train.log)."),
    node_rank: int = typer.Option(None, "--node-rank", min=0, help="Several nodes without ssh: this node's rank (0 = the master's node); run qvltune train on every node."),
    master_addr: str = typer.Option(None, "--master-addr", help="Several nodes without ssh: the address of node 0 (default: MASTER_ADDR)."),
    nodes: int = typer.Option(None, "--nodes", min=1, help="Several nodes without ssh: how many (default: launch.nodes)."),
) -> int:
    """Train with DeepSpeed (transformers Trainer + peft) and show loss, eval loss, throughput, MFU and GPU memory."""
    import os

    from qvltune.hardware import detect_gpus
    from qvltune.nodes import node_from_environment
    from qvltune.train import completed_run, launch_command, run_training

    cfg = load_config(config)
    gpus = detect_gpus()[0]
    if print_command and master_addr is not None and node_rank is None:
        node_rank = 0  # printing every node's command: any node will do
    node = node_from_environment(cfg, os.environ, node_rank=node_rank, master_addr=master_addr, nodes=nodes)
    if print_command:
        print_commands(cfg, node, len(gpus), resume)
        return 0
    if node is None:
        launch_command(cfg, len(gpus), resume)  # refuses several nodes with no way to reach them
    if resume and (end := completed_run(cfg)):
        console.out.print(f"[green]{cfg.name} already completed[/]: {end.get('step')} steps; its model is in {cfg.run_dir / 'final'}")
        console.out.print(next_steps(cfg))
        console.note("to train longer, raise optim.epochs (or max_steps) in the config and --resume; to start over, --force")
        return 0
    live = not no_live and console.err.is_terminal
    outcome = run_training(cfg, resume=resume, live=live, force=force, gpus=gpus, verbose=verbose, node=node)
    return report(outcome, cfg, config)


def print_commands(cfg, node, gpu_count: int, resume: bool) -> None:
    """The launcher command, or with several nodes started one by one, each node's."""
    from dataclasses import replace

    from qvltune.launch import command_text, format_command, one_node_launch
    from qvltune.nodes import NODES_DIR, node_launch
    from qvltune.train import launch_command

    if node is None:
        runner_argv, env = launch_command(cfg, gpu_count, resume)
        # What qvltune train runs: on one node DeepSpeed's launcher directly (as in launch.sh).
        console.out.print(command_text(one_node_launch(runner_argv) or runner_argv, runner_argv, env), markup=False)
        console.note(f"(the run folder {cfg.run_dir} must hold config.yaml; `qvltune train` prepares it)")
        return
    hostfile = ""
    for rank in range(node.nodes):
        argv, env, hostfile = node_launch(cfg, replace(node, node_rank=rank), run_dir=cfg.run_dir.resolve(), gpu_count=gpu_count, resume=resume)
        console.out.print(f"# node {rank}", markup=False)
        console.out.print(format_command(argv, env), markup=False)
    console.note(
        f"(qvltune train on each node runs these; by hand, node 0 first writes the run folder {cfg.run_dir} "
        f"(config.yaml, data_index.json) and every node needs {cfg.run_dir / NODES_DIR / 'hostfile'}:\n{hostfile.rstrip()})"
    )


def next_steps(cfg) -> str:
    """What to run after a finished run: merge an adapter; a full run's folder is the model already."""
    final = cfg.run_dir / "final"
    if cfg.uses_lora():
        return f"next: qvltune merge {final} --out {cfg.run_dir / 'merged'}"
    return f"next: qvltune eval {final} --data FILE   or   qvltune predict {final} --image IMG --prompt TEXT"


def report(outcome, cfg, config_path: Path) -> int:
    state = outcome.state
    run_dir = cfg.run_dir
    if outcome.exit_code == 0 and state.status == "completed":
        final = run_dir / "final"
        loss = f", loss {state.final_loss:.4f}" if state.final_loss is not None else ""
        evals = f", eval loss {state.eval_loss:.4f}" if state.eval_loss is not None else ""
        console.out.print(f"[green]Training completed[/]: {state.step} steps{loss}{evals}")
        if state.phases:
            from qvltune.phases import format_phases

            console.out.print(format_phases(state.phases), markup=False, highlight=False)
        console.out.print(f"model: {final}   curve: {run_dir / 'loss.png'}   metrics: {run_dir / 'metrics.jsonl'}")
        console.out.print(next_steps(cfg))
        return 0
    if state.status == "interrupted" or (outcome.interrupted and outcome.exit_code in (0, 130)):
        console.warn(f"stopped at step {state.step}; last checkpoint: {state.checkpoint or 'none'}")
        console.err.print(f"[bold]Hint:[/] resume with: qvltune train {config_path} --resume")
        return 130
    if outcome.peer_failure:  # first: this node's own errors follow from it (peers gone)
        console.err.print(f"[red]training failed[/]: {escape(outcome.peer_failure)}; the ranks of {outcome.node} were stopped; last checkpoint: {state.checkpoint or 'none'}", highlight=False)
        console.err.print(f"[bold]Hint:[/] see that node's log under {run_dir / 'nodes'}, fix the cause, then start every node again with --resume")
        return outcome.failure.exit_code if outcome.failure else 1  # the failed rank's own code
    if state.status == "nan":
        console.error(f"{state.message}; last good checkpoint: {state.checkpoint or 'none'}", "lower optim.learning_rate (or raise warmup), check the data around that step, then --resume")
        return 1
    if state.status in ("oom", "bad_sample", "save_failed", "error") and state.message:
        console.error(state.message, state.hint)
        return 1
    from qvltune.launch import describe_exit

    # The rank that failed first, from the ranks' own records (qvltune.rank); the launcher's exit code
    # only when none was left (the recorders themselves killed).
    failure = outcome.failure
    what = failure.describe(2 if outcome.node else cfg.launch.nodes) if failure else f"the launcher ({describe_exit(outcome.exit_code)}; no rank left a record in {run_dir / 'ranks'})"
    if outcome.node:
        what = f"{outcome.node}: " + what
    tail = "\n".join(redact(line) for line in outcome.log_tail[-25:])
    console.err.print(f"[red]training failed[/]: {escape(redact(what))}; last checkpoint: {state.checkpoint or 'none'}; last lines of {run_dir / 'train.log'}:", highlight=False)
    console.err.print(tail, markup=False, highlight=False)
    console.err.print(f"[bold]Hint:[/] fix the cause above, then: qvltune train {config_path} --resume")
    # That rank's own exit code (128 + N when signal N killed it), as a shell reports a failed command.
    if failure:
        return failure.exit_code
    from qvltune.rank import shell_status

    return shell_status(outcome.exit_code) or 1
