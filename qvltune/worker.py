"""The training recipe run on every rank: ``python -m qvltune.worker --run-dir DIR`` (DeepSpeed starts
``qvltune.rank``, which runs this and records how it ended).

A linear recipe: config -> TrainingArguments (first, so ZeRO-3 partitions the model as it loads) ->
processor and model -> freeze / LoRA -> datasets and collator -> ``QvlTrainer`` -> save.

The data side (processor, index, packing plan, datasets, collator) lives in
``qvltune.training_data``. ``transformers.Trainer`` supplies checkpointing, resume, accumulation,
schedules, eval and ``report_to``; what qvltune changes in it (``QvlTrainer``) and the callback that
reports the run live in ``qvltune.trainer``.
"""

from __future__ import annotations

import sys
import time

# This module's first line: the launcher's phase ends, the imports' begin. ``python -m
# qvltune.worker`` runs it as __main__, which imports it again as qvltune.worker (see the end): that
# second copy keeps the first one's moment.
_LOADED = getattr(sys.modules.get("__main__"), "_LOADED", None) or time.time()

from qvltune.compile_cache import use_persistent_compile_cache  # noqa: E402 - torch-free
from qvltune.weights_prefetch import start_for_worker  # noqa: E402 - torch-free

# The weights are read into the page cache while torch and the rest import (qvltune.weights_prefetch).
if __name__ == "__main__":
    start_for_worker(sys.argv[1:])

# Before torch is imported: inductor writes its /tmp default into the environment on first use (an
# import of DeepSpeed is enough), after which a setting made later would look like the user's own.
COMPILE_CACHE = use_persistent_compile_cache()

import argparse  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import traceback  # noqa: E402
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch  # noqa: E402

from qvltune.checkpoint_writer import fsync_tree
from qvltune.checkpoints import is_complete, last_checkpoint_text, latest_complete_checkpoint
from qvltune.compiled_layers import compile_blocks, same_graph_with_and_without_images
from qvltune.config import RunConfig, load_config
from qvltune.data.dataset import BadSampleError
from qvltune.data_ready import wait_for_data
from qvltune.errors import UserError
from qvltune.metrics import MetricsWriter
from qvltune.nodes import check_shared_run_dir
from qvltune.model import apply_strategy, component_of, language_side_trains, load_model, model_class, read_model_config, trainable_table, vision_side_trains
from qvltune.phases import PhaseClock, worker_clock
from qvltune.process_exit import end_process
from qvltune.profiling import profiler_callback
from qvltune.rank import note as rank_note
from qvltune.stalls import quiet_gc, thaw_gc, watch_recompiles
from qvltune.trainer import is_main, make_callback, make_trainer_class, unwrap, world_size
from qvltune.training_data import build_datasets, close_data_loaders, gets_dummy_image, prepare_data_side, row_padding
from qvltune.zero import DS_CONFIG, deepspeed_config, write_deepspeed_config, zero3_leaf_blocks, zero3_stats

EXIT_INTERRUPTED = 130
EXIT_NAN = 3


# ----------------------------------------------------------------------------------------------
# The recipe


def training_arguments(cfg: RunConfig, use_cpu: bool, ds_config: dict):
    from transformers import TrainingArguments

    o, s = cfg.optim, cfg.schedule
    return TrainingArguments(
        output_dir=str(cfg.run_dir),
        per_device_train_batch_size=o.per_device_batch,
        per_device_eval_batch_size=o.per_device_batch,
        gradient_accumulation_steps=o.grad_accum,
        learning_rate=o.learning_rate,
        weight_decay=o.weight_decay,
        max_grad_norm=o.max_grad_norm,
        num_train_epochs=o.epochs,
        max_steps=o.max_steps or -1,
        lr_scheduler_type=o.scheduler,
        warmup_steps=o.warmup_ratio,  # transformers 5: a float in [0, 1) is the warmup ratio
        bf16=o.bf16,
        gradient_checkpointing=o.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=s.log_steps,
        # qvltune's guard handles NaN; the Trainer's filter (a host sync per micro-batch) only keeps the
        # logged loss readable when NaN steps are skipped instead of stopping the run.
        logging_nan_inf_filter=o.nan_policy == "skip_step",
        eval_strategy="steps" if cfg.data.eval or cfg.data.eval_split else "no",
        eval_steps=s.eval_steps,
        save_strategy="steps" if s.save_steps else "no",
        save_steps=s.save_steps or 500,
        save_total_limit=None,  # rotation is QvlTrainer._rotate's, among complete checkpoints only
        seed=o.seed,
        data_seed=o.seed,
        report_to=[] if s.report_to == "none" else [s.report_to],
        deepspeed=ds_config,
        use_cpu=use_cpu,
        dataloader_num_workers=cfg.data.num_workers,
        dataloader_pin_memory=not use_cpu,
        dataloader_persistent_workers=cfg.data.num_workers > 0,
        remove_unused_columns=False,
        prediction_loss_only=True,
        disable_tqdm=True,
        log_level="warning",
        save_only_model=False,
    )


def llm_flops_per_token(model) -> float:
    """Training FLOPs per token, counted as 6 x the language model's non-embedding parameters that
    a token passes through (forward 2N + backward 4N; the counting rule MFU figures use). In an MoE
    layer a token passes through num_experts_per_tok of the num_experts experts."""
    model = unwrap(model)
    text = getattr(model.config, "text_config", model.config)
    experts = getattr(text, "num_experts", 0)
    routed = text.num_experts_per_tok / experts if experts else 1.0  # the share of each expert tensor a token uses
    n = 0.0
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen or "lora_" in name:
            continue
        seen.add(id(p))
        if component_of(name) == "llm":
            numel = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
            n += numel * routed if ".experts." in name else numel
    return 6.0 * n


def _begin(writer: MetricsWriter | None, name: str, **fields) -> None:
    """Tell the panel what the run is doing now (it shows the phase with its elapsed time)."""
    if writer:
        writer.write("phase", name=name, **fields)


def _phase(name: str, since: float) -> float:
    """Print how long a start-up phase took (train.log), return now."""
    now = time.time()
    if is_main():
        print(f"qvltune: {name} in {now - since:.1f} s", flush=True)
    return now


def _mark(clock: PhaseClock, name: str) -> float:
    """Close a start-up phase on the run's clock (the ``phases`` record) and print it (train.log)."""
    since = clock.since
    clock.mark(name)
    return _phase(name, since)


def weights_device(cfg: RunConfig, cuda: bool, local_rank: int) -> torch.device | None:
    """Where ``from_pretrained`` puts the weights: straight onto this rank's GPU under ZeRO-0..2 (no
    host copy for DeepSpeed to move afterwards); None (the host) without a GPU, under ZeRO-3 (its
    partitioned init places each shard itself) and with parameters offloaded to the host."""
    if not cuda or cfg.deepspeed.stage == 3 or cfg.deepspeed.offload_params:
        return None
    return torch.device("cuda", local_rank)


def run(run_dir: Path, resume: bool) -> int:
    clock = worker_clock(_LOADED)  # continues qvltune train's clock: its checks, the launcher, the imports
    use_cpu = not torch.cuda.is_available()
    writer = MetricsWriter(run_dir / "metrics.jsonl") if is_main() else None  # rank 0 of node 0
    _begin(writer, "starting the process group (DeepSpeed builds its ops on first use)")
    # Start the process group through DeepSpeed first: ZeRO-3 partitions the model while it loads and
    # checks the global batch against DeepSpeed's own view of the world size. It is also where the
    # nodes of a multi-node run meet: node 0 starts its ranks only once it has written the run folder,
    # so every rank reads the config (below) after that.
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo" if use_cpu else "nccl")
    _mark(clock, "DeepSpeed and the process group")
    check_shared_run_dir(run_dir)  # several nodes: one run folder for all
    cfg = load_config(run_dir / "config.yaml")
    if cfg.optim.compile and is_main():  # reused by later runs and resumes (qvltune.compile_cache)
        from qvltune.compile_cache import cache_size

        print(f"qvltune: compile cache {COMPILE_CACHE} ({cache_size(COMPILE_CACHE) / 2**20:,.0f} MiB already)", flush=True)
    ds_config = deepspeed_config(cfg, zero3_stats(cfg))  # ZeRO-3: settings from the model's sizes
    if is_main():
        # The JSON DeepSpeed is given, kept for the user. Written here, not by qvltune train: under
        # ZeRO-3 its settings need the model built on the meta device, which cost the command ~15 s
        # of importing torch and transformers before the launcher started (H200, 8B).
        write_deepspeed_config(run_dir / DS_CONFIG, ds_config)
    # Imported apart from building the arguments so the two show as phases of their own: on the
    # H200 the pair took 9-13 s, against 2.4 s of imports alone on the 2-core CPU.
    import transformers.training_args  # noqa: F401 - with it the Trainer's utilities and peft

    _mark(clock, "run config and the Trainer's imports (transformers, peft)")
    args = training_arguments(cfg, use_cpu, ds_config)  # before the model, so ZeRO-3 partitions at load
    _mark(clock, "training arguments (CUDA start)")

    from transformers import set_seed

    set_seed(cfg.optim.seed)  # before LoRA adapters are initialised, so a run is reproducible
    _begin(writer, "loading the model (the processor and the data index beside it)")
    # The data side (processor, index, packing plan) needs no weights: it runs in a thread while the
    # model loads. The model's class is imported first, here, so the two threads never import the same
    # transformers modules at once.
    model_class(read_model_config(cfg.model.path, cfg.model.trust_remote_code).get("model_type", "?"))
    with ThreadPoolExecutor(1, thread_name_prefix="qvltune-data") as pool:
        data_work = pool.submit(prepare_data_side, cfg, run_dir)
        model = load_model(
            cfg.model.path,
            dtype="bfloat16" if cfg.optim.bf16 else "float32",
            attn_implementation=cfg.model.attn_implementation,
            trust_remote_code=cfg.model.trust_remote_code,
            random_init=cfg.model.random_init,
            device=weights_device(cfg, torch.cuda.is_available(), int(os.environ.get("LOCAL_RANK", "0"))),
        )
        loaded = time.time()
        processor, index, train_groups, eval_groups, data_seconds = data_work.result()  # its UserError, if any, is raised here
    checked = wait_for_data(run_dir)  # set (already) when qvltune train checked the data beside the launcher
    if checked is not None:
        clock.add("data check and index (qvltune train, beside the launcher)", checked)
    clock.add("processor, data index and packing (beside the model load)", data_seconds)
    clock.mark("model load", loaded)
    _mark(clock, "waiting for the data index")  # usually nothing (hidden under 0.05 s)
    model.config.use_cache = False
    model.config.get_text_config().use_cache = False  # no KV cache in training (and packed rows need none)
    model = apply_strategy(model, cfg)
    table = trainable_table(model, cfg)
    if cfg.deepspeed.stage == 3:
        blocks = zero3_leaf_blocks(model)
        if is_main():
            print(f"qvltune: ZeRO-3 gathers {blocks} transformer blocks whole", flush=True)
    _mark(clock, "model prepared (strategy, adapters)")
    if cfg.optim.compile:
        compile_blocks(model, zero3=cfg.deepspeed.stage == 3)  # the layers compile at the first step
        if not gets_dummy_image(world_size(), cfg.deepspeed.stage, vision_side_trains(model), language_side_trains(model)):
            same_graph_with_and_without_images(model)  # text-only micro-batches, which carry no dummy image
        if is_main():  # rank 0 writes the stall records (every rank compiles the same graphs)
            watch_recompiles()  # a later compile's reasons go to train.log and to the stall record
        _mark(clock, "torch.compile set up (its imports)")
    _begin(writer, "building the datasets and the trainer")

    train_groups, train_set, eval_set, collator = build_datasets(cfg, run_dir, model, processor, index, train_groups, eval_groups)

    peak = None
    if torch.cuda.is_available():
        from qvltune.hardware import peak_tflops

        tflops = peak_tflops(torch.cuda.get_device_name())
        peak = tflops * 1e12 if tflops else None
    callback = make_callback(run_dir, writer, llm_flops_per_token(model), peak, cfg.optim)
    callbacks = [callback]
    if cfg.schedule.profile_steps:
        # After the report callback: its on_step_end starts the next step's clock, to which the
        # profile's writing time is then added as time between steps (exclude_seconds).
        callbacks.append(profiler_callback(run_dir, *cfg.schedule.profile_steps, python=cfg.schedule.profile_python, exclude=callback.exclude_seconds))
    trainer_class, extra = make_trainer_class(), {}
    if cfg.stage == "dpo":  # the pair loss and its reference (qvltune.preference)
        from qvltune.preference import worker as dpo

        trainer_class, extra, dpo_callback = dpo.trainer_and_callback(cfg, writer, train_set, eval_set)
        callbacks.append(dpo_callback)
    trainer = trainer_class(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, data_collator=collator, callbacks=callbacks, run_cfg=cfg, **extra
    )
    callback.trainer = trainer
    if cfg.stage == "dpo":
        dpo_callback.trainer = trainer
    callback.clock, callback.compiles = clock, cfg.optim.compile  # it writes the phases record at the first step's end
    if writer:  # rank 0's background writer reports each checkpoint once it is marked complete
        trainer.checkpointer.on_complete = lambda step, target, blocking, background, parts: writer.write(
            "checkpoint", step=step, path=str(target), seconds=blocking, background_seconds=background, parts=parts
        )
    t = _mark(clock, "datasets and trainer")
    _install_stop_handlers(callback)

    resume_from = latest_complete_checkpoint(run_dir) if resume else None
    if writer:
        writer.write(
            "start",
            world_size=world_size(),
            epochs=cfg.optim.epochs,
            components=[s.__dict__ for s in table],
            train_samples=len(index.train),
            eval_samples=len(index.eval),
            skipped=len(index.skipped),
            **row_padding(cfg, index, train_groups),
            packing=cfg.data.packing,
            resumed_from=str(resume_from) if resume_from else None,
            device="cpu" if use_cpu else torch.cuda.get_device_name(),
        )
        _print_table(table)
        # The first step also restores a checkpoint, and compiles the decoder layers when asked.
        first = "compiling the decoder layers (first step)" if cfg.optim.compile else "first step"
        _begin(writer, ("restoring the checkpoint, " if resume_from else "") + first)
    quiet_gc()  # the setup's objects are never traversed again; collections at step boundaries only
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        trainer.finish_saves()  # the last checkpoint's background write: complete before anything reports it
        t = _phase("training", t)
    except (torch.OutOfMemoryError, OSError, BadSampleError, *_compile_errors(cfg)) as e:
        trainer.checkpointer.settle()  # a save in flight may still complete (and become the resume point)
        status, message, hint = explain_failure(e, cfg, trainer, run_dir)
        if writer:
            writer.write("end", status=status, step=trainer.state.global_step, message=message, hint=hint, last_checkpoint=last_checkpoint_text(run_dir))
        raise UserError(message, hint) from None
    finally:
        try:
            stopped = close_data_loaders(trainer)  # no batch is read after training; their exit would wait 5 s a worker
            if is_main() and stopped:
                print(f"qvltune: the workers of {stopped} data loader(s) stopped", flush=True)
        except Exception as e:  # never in place of training's own error: torch's exit handler still stops them
            print(f"qvltune: could not stop the data loaders' workers ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
    # Training is over and its last checkpoint written: what it held for the rest of the run goes
    # before the final save (under ZeRO-3 rank 0 gathers the whole 16-bit model in host memory):
    # the snapshot buffers, and what the step-boundary freezes kept from the collector.
    trainer.checkpointer.free_buffers()
    thaw_gc()
    step = trainer.state.global_step
    if callback.nonfinite_step is not None:
        last = last_checkpoint_text(run_dir)
        if writer:
            skipped = f" after {callback.skipped} skipped step(s) (optim.max_skipped_steps)" if callback.skipped else ""
            writer.write("end", status="nan", step=callback.nonfinite_step, message=f"loss became NaN/inf at step {callback.nonfinite_step}{skipped}", last_checkpoint=last)
        print(f"qvltune: loss became NaN/inf at step {callback.nonfinite_step}; last good checkpoint: {last or 'none'}", file=sys.stderr)
        return EXIT_NAN
    if callback.stopped_by_request:
        if writer:
            writer.write("end", status="interrupted", step=step, message="stopped on request; checkpoint saved", last_checkpoint=last_checkpoint_text(run_dir))
        return EXIT_INTERRUPTED
    _begin(writer, "saving the final model")
    final = save_final(trainer, processor, cfg, run_dir)
    _phase("final save", t)
    if writer:
        note = f" ({callback.skipped} step(s) skipped for a non-finite loss)" if callback.skipped else ""
        # train_loss and epoch: a run shorter than log_steps logs no loss of its own, and the last
        # logged epoch lags the end of training; the summary needs both.
        writer.write(
            "end", status="completed", step=step, epoch=trainer.state.epoch, train_loss=result.training_loss,
            final=str(final), last_checkpoint=last_checkpoint_text(run_dir), skipped_steps=callback.skipped, message=f"{step} steps, final model saved" + note,
        )
    return 0


def oom_advice(cfg: RunConfig) -> str:
    """What would lower peak memory, in the order that costs least speed."""
    o, d, ds = cfg.optim, cfg.data, cfg.deepspeed
    steps = []
    if o.per_device_batch > 1:
        steps.append(f"optim.per_device_batch: {max(1, o.per_device_batch // 2)} with optim.grad_accum: {o.grad_accum * 2} (same effective batch)")
    if not o.gradient_checkpointing:
        steps.append("optim.gradient_checkpointing: true")
    steps.append(f"a smaller data.max_seq_length (now {d.max_seq_length}) or data.max_pixels / max_image_tokens")
    if ds.stage < 3:
        steps.append("deepspeed.stage: 3 (shards weights across GPUs)")
    if not ds.offload_optimizer:
        steps.append("deepspeed.offload_optimizer: true")
    return "try " + "; or ".join(steps) + " — `qvltune estimate` shows the memory of each choice"


def _compile_errors(cfg: RunConfig) -> tuple[type[BaseException], ...]:
    """What torch.compile raises when it cannot compile (a missing triton, no C compiler): at the
    first step. Imported only for compiled runs."""
    if not cfg.optim.compile:
        return ()
    from torch._dynamo.exc import TorchDynamoException

    return (TorchDynamoException,)


def explain_failure(e: BaseException, cfg: RunConfig, trainer, run_dir: Path) -> tuple[str, str, str]:
    """(status, one-line message, hint) for the failures a user can act on."""
    step = trainer.state.global_step
    last = last_checkpoint_text(run_dir)
    if isinstance(e, torch.OutOfMemoryError):
        return "oom", f"GPU out of memory at step {step + 1}: {str(e).splitlines()[0][:160]}", oom_advice(cfg)
    if isinstance(e, _compile_errors(cfg)):
        cause = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        return "compile_failed", f"torch.compile failed at step {step + 1}: {cause[:200]}", "set optim.compile: false in the config and qvltune train CONFIG --resume (qvltune doctor shows what compile needs: triton and a C compiler)"
    if isinstance(e, BadSampleError):
        # Raised in a DataLoader worker, it arrives wrapped: its own message is the last line.
        lines = [ln for ln in e.message.splitlines() if ln.strip()]
        tag = f"{BadSampleError.__module__}.{BadSampleError.__name__}: "
        message = next((ln.split(tag, 1)[1] for ln in reversed(lines) if tag in ln), lines[-1] if lines else str(e))
        return "bad_sample", f"bad record at step {step + 1}: {message}", "restore the file, or set data.on_bad_sample: skip, then qvltune train CONFIG --resume"
    saving = getattr(trainer, "saving_step", None)
    if saving is not None:
        partial = run_dir / f"checkpoint-{saving}"
        if not is_complete(partial):
            shutil.rmtree(partial, ignore_errors=True)
        return (
            "save_failed",
            f"cannot write checkpoint-{saving}: {e.strerror or e} ({getattr(e, 'filename', None) or run_dir}); the previous checkpoint is intact: {last or 'none yet'}",
            "free disk space (or fix permissions) under output_dir, then qvltune train CONFIG --resume",
        )
    return "error", f"I/O error at step {step + 1}: {e}", "check the files and folders the run uses, then --resume"


def _install_stop_handlers(callback) -> None:
    """SIGINT/SIGTERM (Ctrl-C, a cluster scheduler) ask for a checkpoint and a clean exit at the
    end of the current step instead of killing the process mid-step."""

    def handler(signum, frame):
        rank_note("received", signal.Signals(signum).name)  # this rank was stopped, it did not fail
        if callback.stop_requested:  # a second signal: stop now
            raise KeyboardInterrupt
        callback.stop_requested = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def save_final(trainer, processor, cfg: RunConfig, run_dir: Path) -> Path:
    """The final adapter or model, with the processor and the resolved config, written atomically."""
    from qvltune.config import dump_config

    final, tmp = run_dir / "final", run_dir / "final.tmp"
    if trainer.args.should_save and tmp.exists():
        shutil.rmtree(tmp)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))  # collective under ZeRO-3 (gathers 16-bit weights)
    if trainer.args.should_save:
        processor.save_pretrained(str(tmp))
        dump_config(cfg, tmp / "qvltune.yaml")
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.replace(final)
    trainer.accelerator.wait_for_everyone()
    return final


def _print_table(table) -> None:
    print("component   mode     parameters   trainable     lr", flush=True)
    for s in table:
        lr = f"{s.lr:.2e}" if s.lr else "-"
        print(f"{s.component:<11} {s.mode:<8} {s.total:>12,} {s.trainable:>11,}   {lr}", flush=True)


def _last_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:300] if str(e) else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qvltune.worker")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--local_rank", type=int, default=None)  # added by the deepspeed launcher
    args = parser.parse_args(argv)
    try:
        code = run(args.run_dir, args.resume)
    except UserError as e:
        rank_note("error", e.message)
        print(f"Error: {e.message}" + (f"\nHint: {e.hint}" if e.hint else ""), file=sys.stderr, flush=True)
        code = 1
    except SystemExit:
        raise
    except Exception as e:  # not ours to explain: the traceback goes to train.log, the record keeps its line
        rank_note("error", _last_line(e))
        traceback.print_exc()
        sys.stderr.flush()
        code = 1  # and the rank still ends below: its process group destroyed (gloo aborts otherwise)
    except BaseException as e:  # a second Ctrl-C: stop at once
        rank_note("error", _last_line(e))
        raise
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # a clean exit (gloo aborts otherwise)
    if "MASTER_PORT" in os.environ and "LOCAL_RANK" in os.environ:
        from qvltune.launch import remove_shm_buffers

        remove_shm_buffers(int(os.environ["MASTER_PORT"]), int(os.environ.get("RANK", os.environ["LOCAL_RANK"])))  # named by global rank
    return code


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy's: then `qvltune.worker` is the one
    # module holding the worker's functions (fault-injection tests patch it there).
    from qvltune.worker import main as _main

    end_process(_main(), noted=lambda stage: rank_note("exit", stage))  # qvltune.process_exit
