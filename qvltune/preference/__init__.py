"""Preference tuning (DPO / IPO) on qvltune's fast path.

- ``loss``: the losses of a pair and the per-answer log-probabilities, computed from the fused
  answer-only head (no full-vocabulary logits), with their gradients.
- ``formats``: preference records (LLaMA-Factory's ShareGPT layout, TRL's) as a prompt and two answers.
- ``data``: checking, counting and encoding pairs; both answers of a pair packed into one row.
- ``trainer``: the DPO trainer beside SFT's (reference log-probs, metrics).
"""
