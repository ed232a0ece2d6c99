"""The DPO trainer: ``QvlTrainer`` (checkpoints, per-component learning rates, NaN guard, metrics)
with the preference loss in place of the token cross-entropy, and the reference model's log-probs.

The reference is the model training starts from, without a second copy of it in memory:

- ``adapter_off``: the same model with its LoRA adapters switched off (peft's ``disable_adapter``),
  one extra forward without gradients per micro-batch. The modules trained fully beside LoRA (the
  mixed strategy's merger and DeepStack mergers, a trained ``lm_head``) are peft ``modules_to_save``:
  peft keeps their starting weights as the wrapped original module and switching adapters off uses
  those, so the reference is exactly the starting model at the cost of a copy of those small modules
  only.
- ``precomputed``: the starting model's log-probs of every answer, computed in one pass before the
  first step (every rank the same batches, so ZeRO-3 ranks stay in step) and kept in the run folder
  (``reference_logps.pt``; reused on resume). Works for full fine-tuning, where there is nothing to
  switch off.
- a model path: another model's log-probs, precomputed the same way (it is loaded whole, used, and
  freed before training continues).

The loss of an optimizer step is the mean over every pair of the accumulated batch on all ranks
(``num_items_in_batch`` counts pairs, not tokens). The metrics (reward margin, chosen and rejected
rewards, preference accuracy, KL estimate) are summed on the device and reduced once per log step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path

import torch

from qvltune.config import RunConfig
from qvltune.data.packing import BatchStats
from qvltune.preference.loss import Pairs, PreferenceLoss, linear_preference, linear_sequence_logps, logits_sequence_logps, pair_loss_sum, preference_losses

REFERENCE_FILE = "reference_logps.pt"
# Sums kept per log step / eval: pairs, loss, correct, margin, chosen reward, rejected reward, log-ratio, answer tokens.
N_SUMS = 8


def preference_sums(logps: torch.Tensor, reference: torch.Tensor, pairs: Pairs, spec: PreferenceLoss, loss_sum: torch.Tensor) -> torch.Tensor:
    """This batch's contribution to the metrics (float64, on the device; no host sync)."""
    logps, reference = logps.detach().double(), reference.double()
    tokens = pairs.tokens.to(logps.device)
    _, rc, rr = preference_losses(logps[pairs.chosen], logps[pairs.rejected], reference[pairs.chosen], reference[pairs.rejected], spec, tokens[pairs.chosen], tokens[pairs.rejected])
    return torch.stack([
        torch.tensor(float(pairs.chosen.numel()), dtype=torch.float64, device=logps.device),
        loss_sum.detach().double().reshape(()),
        (rc > rr).double().sum(),
        (rc - rr).sum(),
        rc.sum(),
        rr.sum(),
        (logps - reference).sum(),
        tokens.double().sum(),
    ])


def summarise(sums: list[float], prefix: str = "") -> dict[str, float | None]:
    """The metrics of summed batches: per-pair means, and the log-ratio per answer token."""
    pairs, loss, correct, margin, chosen, rejected, logratio, tokens = sums
    if not pairs:
        return {}
    return {
        f"{prefix}loss": loss / pairs,
        f"{prefix}accuracy": correct / pairs,
        f"{prefix}reward_margin": margin / pairs,
        f"{prefix}chosen_reward": chosen / pairs,
        f"{prefix}rejected_reward": rejected / pairs,
        # log pi(y|x) - log ref(y|x) per answer token over both answers: a sampled estimate of
        # KL(policy || reference) per token (exact in expectation on the policy's own samples only).
        f"{prefix}kl": logratio / tokens if tokens else None,
    }


def _peft_model(model):
    """The peft model under DeepSpeed's wrapper (None when there are no adapters)."""
    while hasattr(model, "module"):
        model = model.module
    return model if hasattr(model, "disable_adapter") else None


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


def make_dpo_trainer_class():
    from qvltune.trainer import make_trainer_class

    QvlTrainer = make_trainer_class()

    class DPOTrainer(QvlTrainer):
        def __init__(self, *args, run_cfg: RunConfig, reference_batches=None, **kwargs):
            super().__init__(*args, run_cfg=run_cfg, **kwargs)
            d = run_cfg.preference()
            self.spec = PreferenceLoss(d.beta, d.loss, d.label_smoothing, d.rpo_alpha)
            self.reference_mode = d.reference
            self.reference_table: dict[str, torch.Tensor] | None = None
            self.reference_batches = reference_batches  # split -> dataset, for the precomputed reference
            self.sums = None  # metrics of the micro-batches since the last log
            self.last_preference: dict[str, float | None] = {}

        # -- the loss ----------------------------------------------------------------------------

        def _get_num_items_in_batch(self, batch_samples, device):
            """Pairs in the accumulated batch on every rank: the step's loss is their mean."""
            n = torch.tensor(float(sum(len(b["pair_keys"]) for b in batch_samples)), device=device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                n = self.accelerator.gather(n.reshape(1)).sum()
            return n

        def answer_logps(self, model, inputs, index, targets, pairs: Pairs, head=None) -> torch.Tensor:
            """Every answer's summed log-prob without gradients (the reference)."""
            head = self.loss_head if head is None else head
            with torch.no_grad():
                if head is not None:
                    head.set_targets(index, targets, reduce=lambda h, w: linear_sequence_logps(h, w, targets, pairs.row_sample, pairs.samples))
                    try:
                        return model(**inputs).logits.detach()
                    finally:
                        head.set_targets(None, None)
                logits = model(**inputs).logits
                rows = logits.reshape(-1, logits.shape[-1]).index_select(0, index)
                return logits_sequence_logps(rows, targets, pairs.row_sample, pairs.samples)

        def reference_logps(self, model, inputs, index, targets, pairs: Pairs, keys) -> torch.Tensor:
            if self.reference_mode == "adapter_off":
                peft = _peft_model(model)
                with peft.disable_adapter():
                    return self.answer_logps(model, inputs, index, targets, pairs)
            self.ensure_reference(model)
            rows = [self.reference_table[split][j] for split, j in keys]  # (chosen, rejected) each
            device = index.device
            return torch.stack(rows).reshape(-1).to(device) if rows else torch.zeros(0, dtype=torch.float64, device=device)

        def preference_step(self, model, inputs):
            """(summed pair loss, metric sums) of one micro-batch."""
            stats = inputs.pop("stats", None)
            if stats is not None and model.training:
                s = self.stats
                self.stats = BatchStats(s.real_tokens + stats.real_tokens, s.padded_tokens + stats.padded_tokens, s.samples + stats.samples, s.trained_tokens + stats.trained_tokens)
            inputs.pop("labels")
            index, targets = inputs.pop("loss_index"), inputs.pop("loss_targets")
            keys = inputs.pop("pair_keys")
            pairs = inputs.pop("pairs").to(index.device)
            reference = self.reference_logps(model, inputs, index, targets, pairs, keys)
            if self.loss_head is not None:
                kept = {}

                def reduce(h, w):
                    loss, kept["logps"] = linear_preference(h, w, targets, pairs, reference, self.spec)
                    return loss

                self.loss_head.set_targets(index, targets, reduce=reduce)
                try:
                    loss_sum = model(**inputs).logits
                finally:
                    self.loss_head.set_targets(None, None)
                logps = kept["logps"]
            else:
                logits = model(**inputs).logits
                rows = logits.reshape(-1, logits.shape[-1]).index_select(0, index)
                logps = logits_sequence_logps(rows, targets, pairs.row_sample, pairs.samples)
                loss_sum = pair_loss_sum(logps, reference.to(logps.dtype), pairs, self.spec)[0]
            return loss_sum, preference_sums(logps, reference, pairs, self.spec, loss_sum)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss_sum, sums = self.preference_step(model, inputs)
            if model.training:
                self.sums = sums if self.sums is None else self.sums + sums
            n = num_items_in_batch if num_items_in_batch is not None else sums[0]
            loss = loss_sum / (n.clamp(min=1) if torch.is_tensor(n) else max(n, 1))
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # DeepSpeed averages over ranks: back to a mean over all pairs
            return (loss, None) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            if "loss" in logs:  # a training log step (every rank logs): the metrics since the last one
                device = self.args.device if torch.cuda.is_available() else torch.device("cpu")
                sums = self.sums if self.sums is not None else torch.zeros(N_SUMS, dtype=torch.float64)
                self.sums = None
                self.last_preference = summarise(_all_reduce(sums.to(device)).tolist())
            super().log(logs, *args, **kwargs)

        # -- evaluation: the pair loss and preference accuracy over the held-out pairs ----------

        def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
            started = time.time()
            model = self._wrap_model(self.model, training=False)
            model.eval()
            device = self.args.device if torch.cuda.is_available() else torch.device("cpu")
            totals = torch.zeros(N_SUMS, dtype=torch.float64, device=device)
            with torch.no_grad():
                for inputs in dataloader:
                    inputs = self._prepare_inputs(inputs)
                    with self.compute_loss_context_manager():
                        _, sums = self.preference_step(model, inputs)
                    totals += sums.to(device)
            metrics = summarise(_all_reduce(totals).tolist(), f"{metric_key_prefix}_")
            from transformers.trainer_utils import EvalLoopOutput

            self.eval_seconds = time.time() - started
            return EvalLoopOutput(predictions=None, label_ids=None, metrics={k: v for k, v in metrics.items() if v is not None}, num_samples=int(totals[0].item()))

        # -- the precomputed reference -----------------------------------------------------------

        def ensure_reference(self, model) -> None:
            """Compute (or load) every answer's reference log-prob once: at the first micro-batch,
            when DeepSpeed has prepared the model (ZeRO-3 gathers weights through its hooks)."""
            if self.reference_table is not None:
                return
            path = Path(self.args.output_dir) / REFERENCE_FILE
            key = self._reference_key()
            if path.exists():
                doc = torch.load(path)
                if doc.get("key") == key:
                    self.reference_table = doc["table"]
                    return
            started = time.time()
            was_training = model.training
            model.eval()
            ref_model, head = model, None
            if self.reference_mode not in ("adapter_off", "precomputed"):
                ref_model, head = self._load_reference_model()
            table = {}
            peft = _peft_model(model) if ref_model is model else None
            for split, dataset in (self.reference_batches or {}).items():
                values = torch.zeros(len(dataset.entries), 2, dtype=torch.float64)
                b = self.args.per_device_eval_batch_size
                for i in range(0, len(dataset), b):
                    # Every rank takes every batch (same order, same media): ZeRO-3 ranks stay in step.
                    batch = self._prepare_inputs(self.data_collator([dataset[g] for g in range(i, min(i + b, len(dataset)))]))
                    batch.pop("stats", None), batch.pop("labels")
                    index, targets, keys, pairs = batch.pop("loss_index"), batch.pop("loss_targets"), batch.pop("pair_keys"), batch.pop("pairs")
                    pairs = pairs.to(index.device)
                    # At the start LoRA's B matrices are zero, so adapters off changes nothing; it
                    # makes the reference the starting model even when a run resumes.
                    with peft.disable_adapter() if peft is not None else contextlib.nullcontext():
                        logps = self.answer_logps(ref_model, batch, index, targets, pairs, head=head).double().cpu()
                    for k, (_, j) in enumerate(keys):
                        values[j] = logps[2 * k : 2 * k + 2]
                table[split] = values
            if ref_model is not model:
                del ref_model
            model.train(was_training)
            self.reference_table = table
            if self.args.should_save:
                tmp = path.with_suffix(".tmp")
                torch.save({"key": key, "reference": self.reference_mode, "table": table, "seconds": time.time() - started}, tmp)
                tmp.replace(path)

        def _reference_key(self) -> str:
            """What the cached reference log-probs depend on: the reference and the run's pairs."""
            index = Path(self.args.output_dir) / "data_index.json"
            data = index.read_bytes() if index.exists() else b""
            doc = json.dumps({"reference": self.reference_mode, "start": self.run_cfg.model.path}).encode()
            return hashlib.blake2b(doc + data, digest_size=16).hexdigest()

        def _load_reference_model(self):
            """The reference model, whole on this rank (outside ZeRO-3's partitioning: it only runs
            forwards, once, before training), with its own fused head."""
            from transformers.integrations import deepspeed as hf_deepspeed

            from qvltune.loss import install_loss_head
            from qvltune.model import load_model

            cfg = self.run_cfg
            saved = hf_deepspeed._hf_deepspeed_config_weak_ref
            hf_deepspeed._hf_deepspeed_config_weak_ref = None  # load whole, not partitioned (restored below)
            try:
                ref = load_model(cfg.preference().reference, dtype="bfloat16" if cfg.optim.bf16 else "float32", attn_implementation=cfg.model.attn_implementation, trust_remote_code=cfg.model.trust_remote_code)
            finally:
                hf_deepspeed._hf_deepspeed_config_weak_ref = saved
            ref.config.use_cache = False
            ref.config.get_text_config().use_cache = False
            device = self.args.device if torch.cuda.is_available() else torch.device("cpu")
            ref.to(device).eval().requires_grad_(False)
            head = install_loss_head(ref) if cfg.optim.fused_loss else None
            return ref, head

    return DPOTrainer


def make_preference_callback(writer):
    """Writes a ``preference`` record (metrics.jsonl) at every training log step and evaluation."""
    from transformers import TrainerCallback

    class PreferenceCallback(TrainerCallback):
        def __init__(self):
            self.trainer = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if writer is None:
                return
            if "eval_loss" in logs:
                fields = {k[len("eval_"):]: v for k, v in logs.items() if k.startswith("eval_") and k[5:] in ("loss", "accuracy", "reward_margin", "chosen_reward", "rejected_reward", "kl")}
                writer.write("preference", split="eval", step=state.global_step, **fields)
            elif "loss" in logs and self.trainer is not None and self.trainer.last_preference:
                writer.write("preference", split="train", step=state.global_step, **self.trainer.last_preference)

    return PreferenceCallback()
