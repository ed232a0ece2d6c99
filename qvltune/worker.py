"""The training recipe that DeepSpeed starts on every rank: ``python -m qvltune.worker --run-dir DIR``.

A linear recipe: config -> TrainingArguments (first, so ZeRO-3 partitions the model as it loads) ->
processor and model -> freeze / LoRA -> datasets and collator -> ``QvlTrainer`` -> save.

``transformers.Trainer`` supplies checkpointing, resume, accumulation, schedules, eval and
``report_to``; what qvltune changes in it (``QvlTrainer``) and the callback that reports the run
live in ``qvltune.trainer``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from qvltune.checkpoints import is_complete, latest_complete_checkpoint
from qvltune.config import RunConfig, load_config
from qvltune.data.dataset import BadSampleError, DataIndex, SFTDataset, prepare_data, source_encoders
from qvltune.errors import UserError
from qvltune.data.packing import PackedCollator, PaddedCollator, RopeIndex, dummy_image, pack_bins, padding_fraction
from qvltune.data.tokenize import Encoder
from qvltune.metrics import MetricsWriter
from qvltune.nodes import check_shared_run_dir
from qvltune.model import DECODER_LAYER, apply_strategy, component_of, load_model, load_processor, trainable_table, transformer_blocks
from qvltune.trainer import fsync_tree, is_main, make_callback, make_trainer_class, profiler_callback, unwrap, world_size
from qvltune.zero import deepspeed_config, zero3_leaf_blocks

EXIT_INTERRUPTED = 130
EXIT_NAN = 3


# ----------------------------------------------------------------------------------------------
# The recipe


def training_arguments(cfg: RunConfig, use_cpu: bool):
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
        deepspeed=deepspeed_config(cfg),
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


def compile_blocks(model, backend: str | Callable = "inductor") -> int:
    """torch.compile every language-model decoder layer in place; returns how many were compiled.

    One graph serves all layers (same code, parameters are graph inputs) and ``dynamic=True`` makes
    it cover every packed-row length from the first step, so there is one compilation, not one per
    length. Vision blocks stay eager: with sdpa their attention loops over the images of the batch in
    Python (``lengths.tolist()``), so every new image count would be a graph break and a recompile.
    """
    layers = transformer_blocks(model, (DECODER_LAYER,))
    for layer in layers:
        layer.compile(dynamic=True, backend=backend)
    return len(layers)


def run(run_dir: Path, resume: bool) -> int:
    t = time.time()
    use_cpu = not torch.cuda.is_available()
    writer = MetricsWriter(run_dir / "metrics.jsonl") if is_main() else None  # rank 0 of node 0
    _begin(writer, "starting the process group (DeepSpeed builds its ops on first use)")
    # Start the process group through DeepSpeed first: ZeRO-3 partitions the model while it loads and
    # checks the global batch against DeepSpeed's own view of the world size. It is also where the
    # nodes of a multi-node run meet: node 0 starts its ranks only once it has written the run folder,
    # so every rank reads the config (below) after that.
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo" if use_cpu else "nccl")
    check_shared_run_dir(run_dir)  # several nodes: one run folder for all
    cfg = load_config(run_dir / "config.yaml")
    args = training_arguments(cfg, use_cpu)  # before the model, so ZeRO-3 partitions at load
    t = _phase("process group and arguments", t)

    from transformers import set_seed

    set_seed(cfg.optim.seed)  # before LoRA adapters are initialised, so a run is reproducible
    _begin(writer, "loading the processor and the data index")
    lo, hi = cfg.data.pixel_budget()
    processor = load_processor(cfg.model.path, lo, hi, cfg.model.trust_remote_code)
    index_path = run_dir / "data_index.json"
    if cfg.stage == "dpo":  # preference pairs (qvltune.preference)
        from qvltune.preference import worker as dpo
        index = dpo.load_index(cfg, run_dir, processor)
    else:
        index = DataIndex.load(index_path) if index_path.exists() else prepare_data(cfg, processor)
    t = _phase("processor and data index", t)
    _begin(writer, "loading the model")

    model = load_model(
        cfg.model.path,
        dtype="bfloat16" if cfg.optim.bf16 else "float32",
        attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
        random_init=cfg.model.random_init,
    )
    model.config.use_cache = False
    model.config.get_text_config().use_cache = False  # no KV cache in training (and packed rows need none)
    model = apply_strategy(model, cfg)
    table = trainable_table(model, cfg)
    if cfg.deepspeed.stage == 3:
        blocks = zero3_leaf_blocks(model)
        if is_main():
            print(f"qvltune: ZeRO-3 gathers {blocks} transformer blocks whole", flush=True)
    if cfg.optim.compile:
        compile_blocks(model)
    t = _phase("model loaded and prepared", t)
    _begin(writer, "building the datasets and the trainer")

    root = Path(cfg.data.image_root) if cfg.data.image_root else None
    encoder = Encoder(processor, root=root, allow_outside_root=cfg.data.allow_media_outside_root, video=cfg.data.video_sampling(), thinking_turns=cfg.data.thinking_turns, image_pixel_limit=cfg.data.image_pixel_limit)
    pad_id = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else 0
    hf_config = unwrap(model).config
    from qvltune.attention import NAME as VARLEN

    varlen = hf_config.get_text_config()._attn_implementation == VARLEN
    vision_trains = any(p.requires_grad for n, p in model.named_parameters() if component_of(n) in ("vision", "merger", "deepstack"))
    # Text-only micro-batches get a dummy image when ranks must stay in step (see dummy_image).
    dummy = dummy_image(hf_config.image_token_id, hf_config.vision_config) if world_size() > 1 and (cfg.deepspeed.stage == 3 or vision_trains) else None
    if cfg.stage == "dpo":
        train_groups, train_set, eval_set, collator = dpo.preference_parts(cfg, index, encoder, source_encoders(cfg, encoder), pad_id, hf_config, dummy, varlen, run_dir)
    else:
        if cfg.data.packing:
            train_groups = pack_bins([e.tokens for e in index.train], cfg.data.max_seq_length, cfg.optim.seed)
            eval_groups = pack_bins([e.tokens for e in index.eval], cfg.data.max_seq_length, cfg.optim.seed) if index.eval else []
            collator = PackedCollator(pad_id, RopeIndex(hf_config), dummy, varlen=varlen)
        else:
            train_groups = [[i] for i in range(len(index.train))]
            eval_groups = [[i] for i in range(len(index.eval))]
            collator = PaddedCollator(pad_id, dummy, varlen=varlen)
        policy, skipped_log = cfg.data.on_bad_sample, run_dir / "skipped.jsonl"
        encoders = source_encoders(cfg, encoder)
        train_set = SFTDataset(index.train, encoder, train_groups, policy, skipped_log, encoders)
        eval_set = SFTDataset(index.eval, encoder, eval_groups, policy, skipped_log, encoders) if index.eval else None

    peak = None
    if torch.cuda.is_available():
        from qvltune.hardware import peak_tflops

        tflops = peak_tflops(torch.cuda.get_device_name())
        peak = tflops * 1e12 if tflops else None
    callback = make_callback(run_dir, writer, llm_flops_per_token(model), peak, cfg.optim)
    callbacks = [callback]
    if cfg.schedule.profile_steps:
        callbacks.append(profiler_callback(run_dir, *cfg.schedule.profile_steps))
    trainer_class, extra = make_trainer_class(), {}
    if cfg.stage == "dpo":
        trainer_class, extra, dpo_callback = dpo.trainer_and_callback(cfg, writer, train_set, eval_set)
        callbacks.append(dpo_callback)
    trainer = trainer_class(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, data_collator=collator, callbacks=callbacks, run_cfg=cfg, **extra
    )
    callback.trainer = trainer
    if cfg.stage == "dpo":
        dpo_callback.trainer = trainer
    t = _phase("trainer built", t)
    _install_stop_handlers(callback)

    resume_from = latest_complete_checkpoint(run_dir) if resume else None
    if writer:
        b = cfg.optim.per_device_batch
        batches = lambda groups: [[index.train[j].tokens for j in g] for g in groups]  # noqa: E731
        padded_rows = [[sum(r) for r in batches(train_groups)[i : i + b]] for i in range(0, len(train_groups), b)]
        unpacked = [[e.tokens for e in index.train[i : i + b]] for i in range(0, len(index.train), b)]
        writer.write(
            "start",
            world_size=world_size(),
            epochs=cfg.optim.epochs,
            components=[s.__dict__ for s in table],
            train_samples=len(index.train),
            eval_samples=len(index.eval),
            skipped=len(index.skipped),
            train_rows=len(train_groups),
            padding=padding_fraction(padded_rows),
            padding_unpacked=padding_fraction(unpacked),
            packing=cfg.data.packing,
            resumed_from=str(resume_from) if resume_from else None,
            device="cpu" if use_cpu else torch.cuda.get_device_name(),
        )
        _print_table(table)
        # The first step also restores a checkpoint, and compiles the decoder layers when asked.
        first = "compiling the decoder layers (first step)" if cfg.optim.compile else "first step"
        _begin(writer, ("restoring the checkpoint, " if resume_from else "") + first)
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        t = _phase("training", t)
    except (torch.OutOfMemoryError, OSError, BadSampleError, *_compile_errors(cfg)) as e:
        status, message, hint = explain_failure(e, cfg, trainer, run_dir)
        if writer:
            writer.write("end", status=status, step=trainer.state.global_step, message=message, hint=hint, last_checkpoint=_last(run_dir))
        raise UserError(message, hint) from None
    step = trainer.state.global_step
    if callback.nonfinite_step is not None:
        last = _last(run_dir)
        if writer:
            skipped = f" after {callback.skipped} skipped step(s) (optim.max_skipped_steps)" if callback.skipped else ""
            writer.write("end", status="nan", step=callback.nonfinite_step, message=f"loss became NaN/inf at step {callback.nonfinite_step}{skipped}", last_checkpoint=last)
        print(f"qvltune: loss became NaN/inf at step {callback.nonfinite_step}; last good checkpoint: {last or 'none'}", file=sys.stderr)
        return EXIT_NAN
    if callback.stopped_by_request:
        if writer:
            writer.write("end", status="interrupted", step=step, message="stopped on request; checkpoint saved", last_checkpoint=_last(run_dir))
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
            final=str(final), last_checkpoint=_last(run_dir), skipped_steps=callback.skipped, message=f"{step} steps, final model saved" + note,
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
    last = _last(run_dir)
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


def _last(run_dir: Path) -> str | None:
    c = latest_complete_checkpoint(run_dir)
    return str(c) if c else None


def _install_stop_handlers(callback) -> None:
    """SIGINT/SIGTERM (Ctrl-C, a cluster scheduler) ask for a checkpoint and a clean exit at the
    end of the current step instead of killing the process mid-step."""

    def handler(signum, frame):
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qvltune.worker")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--local_rank", type=int, default=None)  # added by the deepspeed launcher
    args = parser.parse_args(argv)
    try:
        code = run(args.run_dir, args.resume)
    except UserError as e:
        print(f"Error: {e.message}" + (f"\nHint: {e.hint}" if e.hint else ""), file=sys.stderr, flush=True)
        code = 1
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

    sys.exit(_main())
