"""The plan ``qvltune init`` makes: answers + machine + model + data -> run config, with reasons.

- ``answers``: what is asked (``Answers``, the answers file);
- ``rules``: the small pure decisions and the numbers behind them (the practitioner's guide);
- ``reasons``: the sentence beside each value, built from the numbers that chose it;
- ``tree``: the walk through them, the memory search and the ``Plan``.
"""

from qvltune.plan.answers import ANSWER_FLAGS, Answers, parse_answers
from qvltune.plan.rules import *  # noqa: F403
from qvltune.plan.rules import Rung, builtin_param_count, compiles, ladder, unit_of
from qvltune.plan.tree import Decision, Plan, machine_for, make_plan

__all__ = ["ANSWER_FLAGS", "Answers", "Decision", "Plan", "Rung", "builtin_param_count", "compiles", "ladder", "machine_for", "make_plan", "parse_answers", "unit_of"]
