"""Necessity from joint knockouts: does removing a set of heads cost more than its members one at a time?

Single-head scores (ablation, patching, gradients, CHG's G-) discount heads that back each other up: with
a backup in place, each alone looks unneeded. Knocking the set out together, against each member alone,
measures that redundancy (and its opposite, an AND whose members each cost the whole effect), with
bootstrap intervals over prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from chg_tlens.analysis.ablation import circuit_gates, evaluate_gates_per_example
from chg_tlens.analysis.statistics import bootstrap
from chg_tlens.core import checks
from chg_tlens.core.data import GateData
from chg_tlens.models import adapter
from chg_tlens.models.protocol import TransformerLensModel

Head = tuple[int, int]

@dataclass
class JointKnockout:
    """Removing a set of heads together against removing each alone (zero gates, target log-prob).

    ``joint`` is the log-prob lost with every head of the set off; ``singles`` what each costs alone;
    ``redundancy = joint - sum(singles)``: > 0 when the heads back each other up (an OR: each alone looks
    unneeded), < 0 when they only work together partly (overlapping effects counted twice by the singles).
    ``joint_low``/``joint_high`` and ``redundancy_low``/``redundancy_high``: percentile intervals over
    bootstrap resamples of the prompts."""

    heads: list[Head]
    joint: float
    singles: list[float]
    redundancy: float
    joint_low: float
    joint_high: float
    redundancy_low: float
    redundancy_high: float


def joint_knockout(model: TransformerLensModel, data: GateData, heads: Sequence[Head], n_boot: int = 1000,
                   level: float = 0.9, batch_size: int = 64) -> JointKnockout:
    """Necessity of a candidate set measured jointly (the ground truth single-head methods cannot see):
    does removing the set cost more than its members one at a time? ``len(heads) + 2`` gate settings,
    run as masks of the same passes."""
    layout = adapter.require_model(model)
    data = checks.gate_data(data, model)
    heads = checks.heads(heads, layout, "heads", allow_empty=False)
    settings = torch.stack([torch.ones(layout.n_layers, layout.n_heads), circuit_gates(heads, layout, False),
                            *(circuit_gates([head], layout, False) for head in heads)])
    logprob, _ = evaluate_gates_per_example(model, data, settings, batch_size)
    lost = (logprob[0] - logprob[1:]).T.numpy()  # [example, 1 + n_heads]: joint, then each single
    rows = lost[:, None, :]  # a bootstrap source: [example, 1, column]
    joint = bootstrap([rows], lambda read: read[:, 0], n_boot=n_boot, level=level)
    redundancy = bootstrap([rows], lambda read: read[:, 0] - read[:, 1:].sum(axis=1), n_boot=n_boot,
                           level=level)
    return JointKnockout(heads, joint.estimate, [float(v) for v in lost[:, 1:].mean(axis=0)],
                         redundancy.estimate, joint.low, joint.high, redundancy.low, redundancy.high)
