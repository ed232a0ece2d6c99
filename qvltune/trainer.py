"""What qvltune changes in ``transformers.Trainer``, and the callback that reports a run.

``QvlTrainer`` changes only what measurements and correctness required, each said where it is done:
a token-weighted loss over the whole accumulated batch (and a token-weighted eval loss), per-component
learning rates, and atomic checkpoints (a marker file written last; rotation only among complete
ones). ``make_callback``'s callback writes ``metrics.jsonl`` (rank 0), turns a stop request or a
NaN/inf loss on any rank into one agreed stop (profiling a run is qvltune.profiling's).

The classes are built inside functions so that importing this module does not import transformers
(the parent process imports qvltune without it).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import time
from pathlib import Path

import torch

from qvltune.checkpoint_writer import CheckpointWriter, SaveParts, snapshot_adapter
from qvltune.checkpoints import STOP_FILE, checkpoints, is_complete
from qvltune.config import RunConfig
from qvltune.data.packing import BatchStats
from qvltune.data.tokenize import IGNORE_INDEX
from qvltune.loss import install_loss_head
from qvltune.metrics import MetricsWriter
from qvltune.model import parameter_groups
from qvltune.phases import format_phases, split_first_step
from qvltune.stalls import GcSchedule, GcTimer, StallDetector, compiled_graphs, take_recompile_reasons


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def unwrap(model):
    """The HF model under DeepSpeed and peft wrappers."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model




def make_trainer_class():
    from transformers import Trainer

    class QvlTrainer(Trainer):
        # compute_loss normalises by the token count of the whole accumulated batch itself.
        loss_is_scaled_for_ga = True

        def __init__(self, *args, run_cfg: RunConfig, **kwargs):
            super().__init__(*args, **kwargs)
            self.run_cfg = run_cfg
            # Ask the Trainer to count label tokens over the accumulated batch (num_items_in_batch);
            # Qwen3-VL declares accepts_loss_kwargs=False, which would average per micro-batch and
            # weight short answers like long ones.
            self.model_accepts_loss_kwargs = True
            self.stats = BatchStats(0, 0, 0, 0)
            self.nonfinite: torch.Tensor | None = None
            self.loss_head = install_loss_head(unwrap(self.model)) if run_cfg.optim.fused_loss else None
            self.saving_step: int | None = None
            self.save_parts: SaveParts | None = None  # while a checkpoint is saved
            self.save_record: dict[str, float] = {}  # the last save's SaveParts.record
            self.data_wait = 0.0  # seconds spent fetching batches since the last step's end
            self.checkpointer = CheckpointWriter(
                self.args.process_index, self.args.world_size, enabled=run_cfg.schedule.async_save, rotate=lambda: self._rotate(Path(self.args.output_dir))
            )

        # -- loss --------------------------------------------------------------------------------

        def summed_loss(self, model, inputs):
            """(sum of the cross-entropy over every labelled token of the batch, their count, outputs)."""
            stats = inputs.pop("stats", None)
            if stats is not None and model.training:
                s = self.stats
                self.stats = BatchStats(s.real_tokens + stats.real_tokens, s.padded_tokens + stats.padded_tokens, s.samples + stats.samples, s.trained_tokens + stats.trained_tokens)
            labels = inputs.pop("labels")
            index, targets = inputs.pop("loss_index"), inputs.pop("loss_targets")
            if self.loss_head is not None:
                # lm_head computes the summed loss of the labelled positions itself (qvltune.loss).
                self.loss_head.set_targets(index, targets)
                try:
                    outputs = model(**inputs)
                finally:
                    self.loss_head.set_targets(None, None)
                return outputs.logits, targets.numel(), outputs
            outputs = model(**inputs)
            logits = outputs.logits[:, :-1, :]
            shifted = labels[:, 1:].to(logits.device)
            loss_sum = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
            return loss_sum, int((shifted != IGNORE_INDEX).sum()), outputs

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss_sum, count, outputs = self.summed_loss(model, inputs)
            if num_items_in_batch is None:  # not reached in training (the Trainer always counts); kept for safety
                loss = loss_sum / max(count, 1)
            else:
                # clamp: a batch whose every sample was skipped as bad has no labelled token anywhere
                loss = loss_sum / (num_items_in_batch.clamp(min=1) if torch.is_tensor(num_items_in_batch) else max(num_items_in_batch, 1))
                if self.args.average_tokens_across_devices:
                    # num_items_in_batch counts every rank's tokens and DeepSpeed averages gradients
                    # over ranks: scale back to a sum.
                    loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

        # -- evaluation: token-weighted, like training's loss and `qvltune eval` -----------------

        def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
            """The eval loss as the mean over every assistant token of the eval set on all ranks.

            The Trainer's own loop averages one mean per batch (weighted by samples), which weights
            the tokens of short answers more than those of long ones and so disagrees with the
            training loss's definition and with ``qvltune eval`` (3% on the demo task). qvltune
            evaluates only inside ``train()``, where the model is already prepared."""
            started = time.time()
            model = self._wrap_model(self.model, training=False)
            model.eval()
            device = self.args.device if torch.cuda.is_available() else torch.device("cpu")
            totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, tokens, samples
            with torch.no_grad():
                for inputs in dataloader:
                    stats = inputs.get("stats")
                    samples = stats.samples if stats is not None else int(inputs["input_ids"].shape[0])
                    inputs = self._prepare_inputs(inputs)
                    with self.compute_loss_context_manager():
                        loss_sum, count, _ = self.summed_loss(model, inputs)
                    totals += torch.stack([loss_sum.detach().to(device, torch.float64).reshape(()), torch.tensor(float(count), dtype=torch.float64, device=device), torch.tensor(float(samples), dtype=torch.float64, device=device)])
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(totals)
            loss_sum, count, samples = totals.tolist()
            from transformers.trainer_utils import EvalLoopOutput

            self.eval_seconds = time.time() - started
            return EvalLoopOutput(predictions=None, label_ids=None, metrics={f"{metric_key_prefix}_loss": loss_sum / max(count, 1.0)}, num_samples=int(samples))

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            # The time the step waited for its batches (data loader workers, collation): a stall's
            # record says how much of it was the data (qvltune.stalls).
            started = time.time()
            out = super().get_batch_samples(epoch_iterator, num_batches, device)
            self.data_wait += time.time() - started
            return out

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            # NaN guard: remember on the device (no sync) whether any micro-batch of this step went bad.
            bad = ~torch.isfinite(loss)
            self.nonfinite = bad if self.nonfinite is None else (self.nonfinite | bad)
            return loss

        # -- optimizer: per-component learning rates ---------------------------------------------

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                groups = parameter_groups(self.model, self.run_cfg)
                kwargs = {"betas": (self.args.adam_beta1, self.args.adam_beta2), "eps": self.args.adam_epsilon}
                # Always torch's AdamW: under ZeRO-Offload accelerate swaps the optimizer for
                # DeepSpeed's CPU Adam and keeps decoupled weight decay only when handed torch.optim.AdamW
                # (handed anything else, DeepSpeedCPUAdam included, it builds L2-regularised Adam).
                fused = self.run_cfg.optim.optimizer == "adamw_torch_fused" and torch.cuda.is_available() and not self.run_cfg.deepspeed.offload_optimizer
                self.optimizer = torch.optim.AdamW(groups, fused=fused or None, **kwargs)
            return self.optimizer

        # -- atomic checkpoints ------------------------------------------------------------------

        def _save_checkpoint(self, model, trial):
            """Training waits for the state's copy in host memory; qvltune.checkpoint_writer writes
            it in the background and marks the checkpoint complete when every rank's files are synced.
            ``save_parts`` times where the wait goes (the ``save`` record's ``parts``)."""
            run_dir = Path(self.args.output_dir)
            started = time.time()
            parts = self.save_parts = SaveParts()
            try:  # save_parts is set for this save only: a later save_model (the final one) must not take the snapshot path
                with parts.part("previous save"):
                    self.finish_saves()  # one save in flight: the previous one is complete (or raises here)
                self.saving_step = self.state.global_step  # read by explain_failure if the save fails
                target = run_dir / f"checkpoint-{self.state.global_step}"
                if self.args.should_save and target.exists() and not is_complete(target):
                    shutil.rmtree(target)  # leftovers of an interrupted save at this step
                with parts.part("ranks meet"):
                    self.accelerator.wait_for_everyone()
                self.checkpointer.begin()
                try:
                    with self.checkpointer.capturing(self.model_wrapped):  # DeepSpeed's files: snapshots, written by a thread
                        super()._save_checkpoint(model, trial)
                    with parts.part("host copies finish"):
                        self.checkpointer.buffers.synchronize()  # one wait for every queued device-to-host copy
                    with parts.part("ranks meet"):
                        self.accelerator.wait_for_everyone()  # every rank's synchronous part is on disk before the marker can be
                except BaseException:
                    self.checkpointer.discard()  # nothing will write the snapshots: the buffers are free again
                    raise
            finally:
                self.save_parts = None
            self.save_seconds = time.time() - started  # what training waited for
            self.save_record = parts.record(self.save_seconds)
            self.checkpointer.start(self.state.global_step, target, self.save_seconds, self.save_record)
            self.saving_step = None

        def _save_part(self, name: str):
            """Time a part of the checkpoint being saved (nothing outside a checkpoint: the final model)."""
            return self.save_parts.part(name) if self.save_parts is not None else contextlib.nullcontext()

        def save_model(self, output_dir=None, _internal_call=False):
            with self._save_part("model files"):
                if not self._adapter_snapshot():
                    super().save_model(output_dir, _internal_call)
                elif self.save_parts is not None and self.checkpointer.buffers.busy:
                    # A checkpoint's adapter (this save took the host buffers: begin()): copied to host
                    # memory here, written by the checkpoint's thread.
                    if self.args.should_save:
                        snapshot_adapter(self.checkpointer, self.accelerator.unwrap_model(self.model), Path(output_dir))
                        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))  # as the Trainer's _save
                else:
                    # Any other save of the adapter (the final model; a synchronous checkpoint): the
                    # Trainer's own _save, which is peft's save_pretrained of the adapter's tensors.
                    # Its save_model under DeepSpeed would first copy the whole model's state dict to
                    # host memory on every rank (4.3 GB at 2B, 17.5 GB at 8B) for peft to keep the
                    # adapter's part of it: the same files.
                    self._save(output_dir)

        def _adapter_snapshot(self) -> bool:
            """Whether a checkpoint's model files are a peft adapter whose weights are whole on every
            rank (not ZeRO-3: its partitions are gathered by the Trainer's own path) and saved as peft
            saves them by default (one adapter with a task type): checkpoint_writer.snapshot_adapter."""
            from peft import PeftModel

            peft_model = self.accelerator.unwrap_model(self.model)
            return (
                isinstance(peft_model, PeftModel)
                and self.run_cfg.deepspeed.stage != 3
                and len(peft_model.peft_config) == 1
                and peft_model.peft_config[peft_model.active_adapter].task_type is not None
            )

        def _save_optimizer_and_scheduler(self, output_dir):
            # Under DeepSpeed: its save_checkpoint, whose files SnapshotEngine copies to host memory.
            with self._save_part("DeepSpeed state to host"):
                super()._save_optimizer_and_scheduler(output_dir)

        def finish_saves(self):
            """Wait for the checkpoint being written (the next save, the end of training, a failure);
            its write error is raised here, with ``saving_step`` naming it for explain_failure."""
            try:
                self.checkpointer.wait()
            except BaseException as e:
                self.saving_step = getattr(e, "checkpoint_step", None)
                raise

        def _rotate(self, run_dir: Path):
            """Keep the newest ``save_total_limit`` complete checkpoints (the Trainer's own rotation
            is off: it could delete the previous checkpoint before the new one is marked complete)."""
            limit = self.run_cfg.schedule.save_total_limit
            done = [p for p in checkpoints(run_dir) if is_complete(p)]
            if limit:
                for old in done[:-limit]:
                    shutil.rmtree(old, ignore_errors=True)

    return QvlTrainer


# ----------------------------------------------------------------------------------------------
# Metrics, stop requests and NaN guard (one callback)


def make_callback(run_dir: Path, writer: MetricsWriter | None, flops_per_token: float | None, peak_flops: float | None, policy):
    from transformers import TrainerCallback

    class QvlCallback(TrainerCallback):
        def __init__(self):
            self.trainer = None
            self.stop_requested = False
            self.nonfinite_step: int | None = None
            self.last_time = time.time()
            self.last_stats = BatchStats(0, 0, 0, 0)
            self.stopped_by_request = False
            self.skipped = 0
            self.last_step_record = 0.0
            self.clock = None  # qvltune.phases.PhaseClock of the start-up, closed at the first step's end
            self.compiles = False
            # Step times without the eval, save and GC between steps: a step over 2x the median is a stall.
            self.stall_detector, self.gc_timer = StallDetector(), GcTimer()
            self.last_step_end: float | None = None
            self.between_steps = 0.0  # seconds of evals, saves and profile writing since the last step's end
            # Seconds of evals and saves since the last train record: the rate it reports is
            # training's (an 8B eval of 10 s in a 55 s log interval read as an 18% dip). A collection
            # between steps stays in: it is part of what training costs.
            self.outside_steps = 0.0
            self.gc_schedule = GcSchedule()  # also counts torch.compile's graphs
            self.graphs_seen = 0  # graphs at the last step's end or evaluation: a stall with more was a recompilation

        def on_train_begin(self, args, state, control, **kwargs):
            if self.clock is not None:  # the Trainer built DeepSpeed's engine (and restored a checkpoint)
                self.clock.mark("DeepSpeed engine" + (" and checkpoint restore" if state.global_step else ""))

        def _first_step_done(self) -> None:
            clock, self.clock = self.clock, None
            clock.mark("first step (compiling)" if self.compiles else "first step")
            record = clock.record()
            compile_s = 0.0
            if self.compiles:  # split the first step's compile (tracing, graphs, kernels, cache hits)
                from qvltune.compile_cache import compile_breakdown, compile_seconds

                # Nothing is compiled before the first step (only the decoder layers are, at their
                # first call), so the process's compile so far is the first step's.
                record["compile"] = compile_breakdown()
                compile_s = compile_seconds(record["compile"])
            record["first_step"] = split_first_step(clock.phases[-1][1], compile_s, self.trainer.data_wait)
            if writer:
                writer.write("phases", **record)
            if is_main():
                print("\n".join(f"qvltune: {line}" for line in format_phases(record).splitlines()), flush=True)

        def _all_reduce_max(self, bad: torch.Tensor, *flags: float, args) -> list[float]:
            device = args.device if torch.cuda.is_available() else "cpu"
            t = torch.stack([bad.to(device, torch.float64).reshape(()), *(torch.tensor(f, dtype=torch.float64, device=device) for f in flags)])
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            return t.tolist()

        def on_step_end(self, args, state, control, **kwargs):
            # One tiny all-reduce per optimizer step (the guard's only host sync) so every rank
            # agrees to stop at the same step: on a NaN/inf loss anywhere, or on a stop request.
            flag, self.trainer.nonfinite = self.trainer.nonfinite, None
            bad = torch.zeros((), dtype=torch.float64) if flag is None else flag.double()
            stop = 1.0 if (self.stop_requested or (run_dir / STOP_FILE).exists()) else 0.0
            # A checkpoint's background write that failed on any rank stops every rank at this step.
            save_failed = 1.0 if self.trainer.checkpointer.in_error() else 0.0
            bad, stop, save_failed = self._all_reduce_max(bad, stop, save_failed, args=args)  # a host sync: the step has ended on the device
            if save_failed:
                # Raises this rank's write error; rank 0's names the rank that failed and why.
                self.trainer.finish_saves()
                raise OSError(errno.EIO, "another rank could not write its part of the checkpoint being saved")
            if self.clock is not None:
                self._first_step_done()
            self._time_step(args, state)
            if bad and policy.nan_policy == "skip_step" and self.skipped < policy.max_skipped_steps:
                # DeepSpeed found the gradients non-finite and did not apply this step's update.
                self.skipped += 1
                if writer:
                    writer.write("skipped", step=state.global_step, count=self.skipped, limit=policy.max_skipped_steps)
                bad = 0.0
            if bad:
                self.nonfinite_step = state.global_step
                control.should_save = False
                control.should_training_stop = True
            elif stop:
                self.stopped_by_request = True
                control.should_save = True
                control.should_training_stop = True
            if writer:
                # A small record per step (at most one a second): the panel's step counter and ETA
                # move between log steps, and it can say when an evaluation or a save begins.
                now = time.time()
                if now - self.last_step_record >= 1.0 or state.global_step <= 2:
                    writer.write("step", step=state.global_step, max_steps=state.max_steps, epoch=state.epoch)
                    self.last_step_record = now
                if control.should_evaluate and not bad:
                    writer.write("phase", name="evaluating", step=state.global_step)
                elif control.should_save and not bad:
                    writer.write("phase", name=f"saving checkpoint-{state.global_step}", step=state.global_step)
            return control

        def _time_step(self, args, state) -> None:
            now = time.time()
            gc_seconds = self.gc_timer.take()
            data_wait, self.trainer.data_wait = self.trainer.data_wait, 0.0
            graphs = compiled_graphs()
            recompiled = take_recompile_reasons()
            if self.last_step_end is not None:
                stall = self.stall_detector.observe(state.global_step, now - self.last_step_end - self.between_steps, gc_seconds)
                if stall and writer:
                    writer.write("stall", **stall, data_wait_s=round(data_wait, 3), new_graphs=graphs - self.graphs_seen, recompiled=recompiled[:3])
            self.graphs_seen = graphs
            # At a step boundary: freeze what a compile made, or collect the loop's garbage
            # (qvltune.stalls). The next step is timed from after it: its seconds are in no step.
            self.gc_schedule.after_step(state.global_step, graphs)
            self.gc_timer.take()
            self.between_steps = 0.0
            self.last_step_end = time.time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "eval_loss" in logs:
                # The evaluation's own graph (no gradients) is not the next step's recompilation.
                take_recompile_reasons()
                self.graphs_seen = compiled_graphs()
                self.exclude_seconds(getattr(self.trainer, "eval_seconds", None) or 0.0)
                if writer:
                    writer.write("eval", step=state.global_step, eval_loss=logs["eval_loss"], eval_ppl=math.exp(min(logs["eval_loss"], 50)), seconds=getattr(self.trainer, "eval_seconds", None))
                return
            if "loss" not in logs:
                return
            s, prev = self.trainer.stats, self.last_stats
            delta = [s.real_tokens - prev.real_tokens, s.padded_tokens - prev.padded_tokens, s.samples - prev.samples]
            t = torch.tensor(delta, dtype=torch.float64, device=args.device if torch.cuda.is_available() else "cpu")
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(t)
            tokens, padded, samples = t.tolist()
            now = time.time()
            elapsed = now - self.last_time
            elapsed = elapsed - self.outside_steps if elapsed > self.outside_steps else max(elapsed, 1e-9)
            self.last_time, self.last_stats, self.outside_steps = now, s, 0.0
            if not writer:
                return
            tps = tokens / elapsed
            mfu = None
            if flops_per_token and peak_flops:
                mfu = flops_per_token * tps / (peak_flops * world_size())
            mem = peak = None
            if torch.cuda.is_available():
                mem = torch.cuda.memory_allocated() / 1024**3
                peak = torch.cuda.max_memory_allocated() / 1024**3
            writer.write(
                "train",
                step=state.global_step,
                max_steps=state.max_steps,
                epoch=logs.get("epoch", state.epoch),
                loss=logs["loss"],
                lr=logs.get("learning_rate"),
                grad_norm=logs.get("grad_norm"),
                tokens_per_s=tps,
                samples_per_s=samples / elapsed,
                mfu=mfu,
                mem_gb=mem,
                mem_peak_gb=peak,
                padding=(1 - tokens / padded) if padded else None,
            )

        def exclude_seconds(self, seconds: float) -> None:
            """Time spent between steps on something reported apart (writing a profile): neither step time nor training's rate."""
            self.between_steps += seconds
            self.outside_steps += seconds

        def on_save(self, args, state, control, **kwargs):
            self.exclude_seconds(getattr(self.trainer, "save_seconds", None) or 0.0)
            if writer:
                # Training goes on; the ``checkpoint`` record follows when the write is complete.
                writer.write(
                    "save",
                    step=state.global_step,
                    path=str(run_dir / f"checkpoint-{state.global_step}"),
                    seconds=getattr(self.trainer, "save_seconds", None),
                    parts=getattr(self.trainer, "save_record", None),
                )

    return QvlCallback()
