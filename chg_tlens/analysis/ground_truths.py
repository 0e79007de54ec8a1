"""Reference head sets for a model whose circuit nobody planted, each encoding one notion of importance.

A comparison of head-scoring methods on a real model is only as fair as its reference: heads picked by
attention and direct effect (the *final stage*: induction heads, name movers) favour methods that measure
what a head writes to the answer, and say nothing of the heads that feed them or of heads that back
each other up. Two more references, each from a causal measurement:

    upstream_heads     the final stage plus every earlier head whose path-patching effect through a
                       final-stage head's query, key or value reaches a share of the task's total effect
                       (the *full circuit* as path patching draws it, Wang et al., 2022)
    backup_necessity   every candidate head whose removal costs the task on its own or once one other
                       candidate is gone (*necessity* from joint knockouts: a backup, invisible to
                       one-at-a-time removal, costs as soon as the head it backs up is removed)

:func:`reference_roles` turns a head list into the ``[layer, head]`` role array the comparisons read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from chg_tlens.analysis.ablation import circuit_gates, evaluate_gates_per_example
from chg_tlens.analysis.circuit import (
    KINDS,
    counterfactual_run,
    input_kinds,
    resolve_counterfactual,
    share_threshold,
)
from chg_tlens.analysis.patching import key_value_group, shares_key_values, target_logprob_metric
from chg_tlens.analysis.statistics import bootstrap
from chg_tlens.core import checks
from chg_tlens.core.data import GateData
from chg_tlens.errors import InputError
from chg_tlens.models import adapter
from chg_tlens.models.protocol import TransformerLensModel

Head = tuple[int, int]


@dataclass
class UpstreamHeads:
    """What :func:`upstream_heads` found.

    ``effects[i, layer, head]``: mean target log-prob lost (nats) when ``(layer, head)`` alone takes its
    counterfactual and the change reaches the final-stage heads only through input ``inputs[i]``
    (0 for heads that are targets or sit in or after the last target's layer). ``heads``: the targets
    and every head with ``max_i |effects[i]| >= threshold * |total_effect|``."""

    heads: list[Head]
    targets: list[Head]
    effects: Float[Tensor, "kind layer head"]
    inputs: tuple[str, ...]
    total_effect: float
    threshold: float
    counterfactual: str
    passes: int


def upstream_heads(
    model: TransformerLensModel,
    data: GateData,
    targets: Sequence[Head],
    threshold: float = 0.05,
    inputs: Sequence[str] = KINDS,
    counterfactual: str = "auto",
) -> UpstreamHeads:
    """The full circuit behind ``targets`` (the final stage): path patching from every earlier head into
    the targets' query, key and value inputs, each input separately.

    For a sender ``s``, every target in a later layer receives at once (path patching's receivers): ``s``
    takes its counterfactual with every other head frozen clean, the targets' ``kind`` input is recorded,
    and a clean run with only that input replaced measures the metric (mean target log-prob). On a
    grouped-query model the key/value receivers are patched one layer at a time (their shared key/value
    heads need it) and the layers' effects summed. The counterfactual is the corrupt twin (``"auto"``
    when there is one) or each head's mean (over its template when the data has groups).
    ``1 + len(inputs)`` passes per sender (more for key/value on a grouped-query model).
    """
    layout = adapter.require_model(model)
    data = checks.gate_data(data, model)
    targets = checks.heads(targets, layout, "targets", allow_empty=False)
    kinds = input_kinds(inputs)
    threshold = share_threshold(threshold)
    counterfactual = resolve_counterfactual(counterfactual, data)
    run, passes = counterfactual_run(model, data, counterfactual, "logprob")
    metric = target_logprob_metric(data)
    last = max(layer for layer, _ in targets)
    effects = torch.zeros(len(kinds), layout.n_layers, layout.n_heads)
    group = key_value_group(model)
    with adapter.frozen(model), torch.no_grad():
        clean, counterfactual_value = (float(metric(logits)) for logits in run.caches())
        passes += 2
        for sender in [(layer, head) for layer in range(last) for head in range(layout.n_heads)]:
            if sender in targets:
                continue
            receivers = [target for target in targets if target[0] > sender[0]]
            layers = sorted({layer for layer, _ in receivers})
            _, recorded = run.record_inputs([sender], kinds, layers)
            passes += 1
            for i, kind in enumerate(kinds):
                groups = ([[r for r in receivers if r[0] == layer] for layer in layers]
                          if shares_key_values(group, kind) else [receivers])
                for together in groups:
                    patched = float(metric(run.patched_logits(together, kind, recorded[kind])))
                    effects[i, sender[0], sender[1]] += clean - patched
                    passes += 1
    total = clean - counterfactual_value
    cut = threshold * abs(total)
    strongest = effects.abs().amax(dim=0)
    found = sorted(set(targets) | {(int(a), int(b)) for a, b in torch.nonzero(strongest >= cut)
                                   if strongest[a, b] > 0})
    return UpstreamHeads(found, targets, effects, kinds, float(total), float(threshold), counterfactual,
                         passes)


@dataclass
class BackupNecessity:
    """What :func:`backup_necessity` found.

    ``alone[h]``: mean target log-prob lost with candidate ``h`` removed (zero gate) from the full model;
    ``with_partner[h]``: the most it costs on top of removing one other candidate,
    ``max_g [loss(h and g removed) - loss(g removed)]`` (its partner ``partner[h]``);
    ``necessity[h] = max(alone[h], with_partner[h])`` with its ``level`` interval over prompts
    (``low``/``high``); ``heads``: the candidates whose necessity reaches ``threshold`` of ``total`` (the
    loss with every candidate removed) and whose interval excludes 0."""

    heads: list[Head]
    candidates: list[Head]
    alone: dict[Head, float]
    with_partner: dict[Head, float]
    partner: dict[Head, Head | None]
    necessity: dict[Head, float]
    low: dict[Head, float]
    high: dict[Head, float]
    total: float
    threshold: float


def backup_necessity(
    model: TransformerLensModel,
    data: GateData,
    candidates: Sequence[Head],
    threshold: float = 0.05,
    n_boot: int = 1000,
    level: float = 0.9,
    batch_size: int = 64,
) -> BackupNecessity:
    """Necessity from joint knockouts of the candidates, one pair at a time: does removing ``h`` cost the
    task alone, or once one other candidate is gone?

    One-at-a-time removal misses a backup (it costs only when the head it backs up is gone) and a head
    with a backup (the backup takes over); removing the pair shows both. ``2 + n + n (n - 1) / 2`` gate
    settings for ``n`` candidates (every pair once), run as masks of the same passes.
    """
    layout = adapter.require_model(model)
    data = checks.gate_data(data, model)
    candidates = checks.heads(candidates, layout, "candidates", allow_empty=False)
    if len(candidates) < 2:
        raise InputError("candidates: give at least two heads (necessity with a backup needs a partner).")
    pairs = [(i, j) for i in range(len(candidates)) for j in range(i + 1, len(candidates))]
    settings = torch.stack([torch.ones(layout.n_layers, layout.n_heads),
                            circuit_gates(candidates, layout, False),
                            *(circuit_gates([head], layout, False) for head in candidates),
                            *(circuit_gates([candidates[i], candidates[j]], layout, False)
                              for i, j in pairs)])
    logprob, _ = evaluate_gates_per_example(model, data, settings, batch_size)
    lost = (logprob[0] - logprob[1:]).T.double().numpy()  # [example, setting]: all, singles, pairs
    n = len(candidates)
    single = lost[:, 1 : 1 + n]
    pair = np.zeros((lost.shape[0], n, n))
    for column, (i, j) in enumerate(pairs, start=1 + n):
        pair[:, i, j] = pair[:, j, i] = lost[:, column]
    # on top of the partner's removal: loss(h, g) - loss(g), per example; [example, h, g]
    extra = pair - single[:, None, :]
    for i in range(n):
        extra[:, i, i] = -np.inf
    alone, with_partner, partner, necessity, low, high = {}, {}, {}, {}, {}, {}
    for i, head in enumerate(candidates):
        g = int(np.argmax(extra[:, i].mean(axis=0)))
        with_partner[head], partner[head] = float(extra[:, i, g].mean()), candidates[g]
        alone[head] = float(single[:, i].mean())
        column = extra[:, i, g] if with_partner[head] > alone[head] else single[:, i]
        interval = bootstrap([column[:, None, None]], lambda rows: rows[:, 0], n_boot=n_boot, level=level)
        necessity[head], low[head], high[head] = interval.estimate, interval.low, interval.high
    total = float(lost[:, 0].mean())
    cut = threshold * abs(total)
    heads = sorted(head for head in candidates if necessity[head] >= cut and low[head] > 0)
    return BackupNecessity(heads, candidates, alone, with_partner, partner, necessity, low, high, total,
                           float(threshold))


def reference_roles(heads: Sequence[Head], layout: adapter.HeadLayout) -> np.ndarray:
    """``[layer, head]`` role names: ``"facilitating"`` for ``heads``, ``"irrelevant"`` for the rest (the
    layout of a benchmark's ``roles``)."""
    roles = np.full((layout.n_layers, layout.n_heads), "irrelevant", dtype=object)
    for layer, head in heads:
        roles[layer, head] = "facilitating"
    return roles
