"""Do the roles predict what ablation does? The paper's targeted ablation, sufficiency and necessity.

Every condition is a fixed gate setting run through ``core.forward.score_gates``, several settings at a
time as masks of one pass; results are frames with one row per condition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from chg_tlens.core import checks
from chg_tlens.core.data import GateData
from chg_tlens.core.forward import score_gates
from chg_tlens.core.gates import HeadGates
from chg_tlens.core.result import ROLES, CHGResult
from chg_tlens.errors import InputError
from chg_tlens.models import adapter
from chg_tlens.models.protocol import TransformerLensModel

Head = tuple[int, int]


def evaluate_gates(
    model: TransformerLensModel,
    data: GateData,
    gate_values: Float[Tensor, "*config layer head"],
    batch_size: int = 64,
) -> tuple[Float[Tensor, " config"], Float[Tensor, " config"]]:
    """Mean target log-prob and accuracy of the model under each fixed gate setting.

    Gate settings run several at a time as masks of one forward pass; ``batch_size`` bounds the rows
    (examples x settings) of a pass. Means are over examples, each example's own mean over its targets
    first (the same averaging as the CHG loss).
    """
    logprob, accuracy = evaluate_gates_per_example(model, data, gate_values, batch_size)
    return logprob.mean(dim=1), accuracy.mean(dim=1)


def evaluate_gates_per_example(
    model: TransformerLensModel,
    data: GateData,
    gate_values: Float[Tensor, "*config layer head"],
    batch_size: int = 64,
) -> tuple[Float[Tensor, "config example"], Float[Tensor, "config example"]]:
    """:func:`evaluate_gates` before the mean over examples (each example's mean over its targets), so
    an effect can be resampled over prompts."""
    layout = adapter.require_model(model)
    data = checks.gate_data(data, model)
    values = torch.as_tensor(gate_values, dtype=torch.float32)
    given_shape = list(values.shape)
    if values.ndim == 2:
        values = values.unsqueeze(0)
    if values.ndim != 3 or tuple(values.shape[1:]) != (layout.n_layers, layout.n_heads):
        raise InputError(
            f"gate_values: expected [layer, head] or [config, layer, head] with layer x head = "
            f"{layout.n_layers} x {layout.n_heads}, got shape {given_shape}."
        )
    checks.positive_int(batch_size, "batch_size")
    examples_per_pass = min(len(data), batch_size)
    configs_per_pass = max(1, batch_size // examples_per_pass)
    device = adapter.model_device(model)
    logprob = torch.zeros(values.shape[0], len(data))
    accuracy = torch.zeros(values.shape[0], len(data))
    with adapter.frozen(model), torch.no_grad():
        for first in range(0, values.shape[0], configs_per_pass):
            chunk = slice(first, first + configs_per_pass)
            gates = HeadGates.fixed(values[chunk]).to(device)
            logprob[chunk], accuracy[chunk] = score_gates(model, data, gates, examples_per_pass)
    return logprob, accuracy


def ablation_curve(
    model: TransformerLensModel,
    data: GateData,
    result: CHGResult,
    score: str | Sequence[str] | Float[Tensor, "layer head"] = "facilitating",
    seed: int = 0,
    values: Sequence[float] = (0.0, 1.0),
    max_heads: int | None = None,
    start: Literal["g_plus", "ones"] = "g_plus",
    label: str | None = None,
    batch_size: int = 64,
    n_random: int = 0,
    rng_seed: int = 0,
) -> pd.DataFrame:
    """The paper's targeted ablation: change heads one at a time, in order of a score, and watch.

    Starting from seed ``seed``'s G+ gates (``start="g_plus"``, the paper's choice; ``"ones"`` starts
    from the full model), heads are sorted by ``score`` (descending) and set cumulatively to each
    value in ``values``. Expected, from G+: top facilitating heads set to 0 -> log-prob drops; top
    irrelevant heads set to 0 -> about flat; top interfering heads set to 1 (re-opened) -> drops, and
    set to 0 from the full model -> rises. Interfering heads are already near 0 in G+, so setting them
    to 0 there changes little. :func:`targeted_ablation` runs the three directions at once.

    ``score`` is a role name, several role names (one curve each), or a ``[layer, head]`` tensor from
    any other method (named by ``label``). ``n_random`` adds as many curves over random head orders
    (``score == "random"``, numbered by ``draw``, drawn with ``rng_seed``): the band a score's curve
    should leave. One row per (score, draw, value, number of heads changed), with the mean target
    log-prob and accuracy and their change from the starting gates.
    """
    layout = adapter.require_model(model)
    checks.chg_result(result, layout)
    seed = checks.seed_index(seed, result.n_seeds)
    names = list(score) if isinstance(score, (list, tuple)) else [score]
    if not names:
        raise InputError("score: expected a role name, a list of role names or a [layer, head] tensor, "
                         "got [].")
    rankings = [_ranking_scores(result, name, seed, layout, label) for name in names]
    values = _require_gate_values(values)
    if not isinstance(n_random, int) or isinstance(n_random, bool) or n_random < 0:
        raise InputError(f"n_random: expected a non-negative int, got {n_random!r}.")
    if start == "g_plus":
        start_gates = result.g_plus[seed].float().clone()
    elif start == "ones":
        start_gates = torch.ones(layout.n_layers, layout.n_heads)
    else:
        raise InputError(f"start: expected 'g_plus' or 'ones', got {start!r}.")
    n_total = layout.n_layers * layout.n_heads
    if max_heads is None:
        max_heads = n_total
    checks.positive_int(max_heads, "max_heads")
    max_heads = min(max_heads, n_total)

    rng = np.random.default_rng(rng_seed)
    curves = [(name, None, ranking, torch.sort(-ranking.flatten(), stable=True).indices[:max_heads])
              for ranking, name in rankings]
    curves += [("random", draw, None, torch.as_tensor(rng.permutation(n_total)[:max_heads]))
               for draw in range(n_random)]
    settings = [start_gates]
    for *_, order in curves:
        for value in values:
            current = start_gates.clone().flatten()
            for index in order:
                current[index] = value
                settings.append(current.view(layout.n_layers, layout.n_heads).clone())
    logprob, accuracy = evaluate_gates(model, data, torch.stack(settings), batch_size)

    rows = []
    for c, (name, draw, ranking, order) in enumerate(curves):
        for v, value in enumerate(values):
            for k in range(max_heads + 1):
                i = 0 if k == 0 else 1 + (c * len(values) + v) * max_heads + (k - 1)
                head = None if k == 0 else divmod(int(order[k - 1]), layout.n_heads)
                rows.append({
                    "score": name, "draw": draw, "value": float(value), "start": start, "seed": seed,
                    "n_changed": k, "layer": None if head is None else head[0],
                    "head": None if head is None else head[1],
                    "score_value": None if head is None or ranking is None else float(ranking[head]),
                    "logprob": float(logprob[i]), "accuracy": float(accuracy[i]),
                    "delta_logprob": float(logprob[i] - logprob[0]),
                    "delta_accuracy": float(accuracy[i] - accuracy[0]),
                })
    frame = pd.DataFrame(rows)
    for column in ("draw", "layer", "head"):
        frame[column] = frame[column].astype("Int64")
    return frame


Expected = Literal["drop", "flat", "rise"]


@dataclass(frozen=True)
class AblationDirection:
    """One curve of the targeted ablation: which heads, from which gates, set to what, and the sign
    the roles predict for the change in log-prob."""

    score: str
    start: Literal["g_plus", "ones"]
    value: float
    expected: Expected


PAPER_DIRECTIONS = (
    AblationDirection("facilitating", "g_plus", 0.0, "drop"),
    AblationDirection("irrelevant", "g_plus", 0.0, "flat"),
    AblationDirection("interfering", "ones", 0.0, "rise"),
    AblationDirection("interfering", "g_plus", 1.0, "drop"),
)
"""Facilitating heads removed from G+ hurt; irrelevant ones removed from G+ change nothing; interfering
heads, already closed in G+, help when removed from the full model and hurt when re-opened in G+."""


def targeted_ablation(
    model: TransformerLensModel,
    data: GateData,
    result: CHGResult,
    seed: int = 0,
    directions: Sequence[AblationDirection] = PAPER_DIRECTIONS,
    max_heads: int | None = None,
    n_random: int = 10,
    rng_seed: int = 0,
    threshold: float = 0.5,
    batch_size: int = 64,
) -> pd.DataFrame:
    """The targeted ablation in every direction the roles predict, with random orders as reference.

    One :func:`ablation_curve` per distinct (start, value) of ``directions``, the role curves and
    ``n_random`` random-order curves of that start and value together. Columns as there, plus
    ``expected`` (the predicted sign; empty for random rows) and ``role_size`` (how many heads of seed
    ``seed`` have that role at ``threshold``: where :func:`ablation_summary` reads each curve).
    """
    layout = adapter.require_model(model)
    checks.chg_result(result, layout)
    seed = checks.seed_index(seed, result.n_seeds)
    checks.unit_interval(threshold, "threshold")
    directions = list(directions)
    if not directions or not all(isinstance(d, AblationDirection) for d in directions):
        raise InputError(f"directions: expected a non-empty list of AblationDirection, got {directions!r}.")
    roles = result.roles(threshold, seed)
    frames = []
    for start, value in dict.fromkeys((d.start, d.value) for d in directions):
        scores = [d.score for d in directions if (d.start, d.value) == (start, value)]
        frame = ablation_curve(model, data, result, scores, seed, (value,), max_heads, start,
                               batch_size=batch_size, n_random=n_random, rng_seed=rng_seed)
        expected = {d.score: d.expected for d in directions if (d.start, d.value) == (start, value)}
        frame["expected"] = frame["score"].map(expected)
        frame["role_size"] = frame["score"].map({name: len(roles.get(name, [])) for name in scores})
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    frame["role_size"] = frame["role_size"].astype("Int64")
    return frame


def ablation_summary(frame: pd.DataFrame, k: int | None = None, tolerance: float = 0.05) -> pd.DataFrame:
    """Each role curve of a :func:`targeted_ablation` frame read at ``k`` heads, against its random band.

    ``k`` defaults to the curve's ``role_size`` (all heads of that role changed; at least 1, at most the
    curve's length). One row per curve: its change in log-prob and accuracy at k, the random orders'
    min / median / max change at the same k, and ``as_expected``: a drop below ``-tolerance``, a flat
    curve within ``tolerance``, or a rise above ``tolerance`` (log-prob, nats), as ``expected`` says;
    empty when the seed has no head of that role (nothing to test).
    """
    needed = {"score", "draw", "value", "start", "n_changed", "delta_logprob", "delta_accuracy", "expected",
              "role_size"}
    missing = needed - set(getattr(frame, "columns", ()))
    if missing:
        raise InputError(f"frame: expected the columns of targeted_ablation(...), missing {sorted(missing)}.")
    if k is not None:
        checks.positive_int(k, "k")
    checks.positive_number(tolerance, "tolerance")
    rows = []
    for (start, value, score), curve in frame[frame["score"] != "random"].groupby(
            ["start", "value", "score"], sort=False):
        size = curve["role_size"].iloc[0]
        size = None if pd.isna(size) else int(size)
        at = min(int(curve["n_changed"].max()), k if k is not None else max(1, size or 0))
        point = curve[curve["n_changed"] == at].iloc[0]
        band = frame[(frame["score"] == "random") & (frame["start"] == start) & (frame["value"] == value)
                     & (frame["n_changed"] == at)]["delta_logprob"]
        delta = float(point["delta_logprob"])
        expected = point["expected"]
        matches = {"drop": delta < -tolerance, "flat": abs(delta) <= tolerance, "rise": delta > tolerance}
        testable = expected in matches and size != 0
        rows.append({
            "score": score, "start": start, "value": float(value), "expected": expected,
            "role_size": size, "k": at,
            "delta_logprob": delta, "delta_accuracy": float(point["delta_accuracy"]),
            "random_min": float(band.min()) if len(band) else float("nan"),
            "random_median": float(band.median()) if len(band) else float("nan"),
            "random_max": float(band.max()) if len(band) else float("nan"),
            "as_expected": bool(matches[expected]) if testable else None,
        })
    return pd.DataFrame(rows)


def sufficiency(model: TransformerLensModel, data: GateData, result: CHGResult | None = None, seed: int = 0,
                threshold: float = 0.5, heads: Sequence[Head] | None = None, n_random: int = 10,
                rng_seed: int = 0, batch_size: int = 64) -> pd.DataFrame:
    """Performance with only the circuit kept (every other head gated to 0).

    The circuit is seed ``seed``'s facilitating heads (score >= ``threshold``), or ``heads`` when given.
    Reference rows: the full model, no heads at all, and ``n_random`` random head sets of the same size
    drawn uniformly from all heads. Columns: test, condition, draw, n_heads, logprob, accuracy.
    """
    return _circuit_test("sufficiency", model, data, result, seed, threshold, heads, n_random,
                         rng_seed, batch_size)


def necessity(model: TransformerLensModel, data: GateData, result: CHGResult | None = None, seed: int = 0,
              threshold: float = 0.5, heads: Sequence[Head] | None = None, n_random: int = 10,
              rng_seed: int = 0, batch_size: int = 64) -> pd.DataFrame:
    """Performance with only the circuit removed (gated to 0, every other head at 1).

    Same circuit, reference rows and columns as :func:`sufficiency`; random rows remove a random head
    set of the same size.
    """
    return _circuit_test("necessity", model, data, result, seed, threshold, heads, n_random,
                         rng_seed, batch_size)


def _circuit_test(
    test: str, model: TransformerLensModel, data: GateData, result: CHGResult | None, seed: int,
    threshold: float,
    heads: Sequence[Head] | None, n_random: int, rng_seed: int, batch_size: int,
) -> pd.DataFrame:
    layout = adapter.require_model(model)
    if heads is None:
        if result is None:
            raise InputError(f"{test}: give a CHGResult (result=...) or the circuit's heads (heads=...).")
        checks.chg_result(result, layout)
        seed = checks.seed_index(seed, result.n_seeds)
        heads = result.roles(threshold, seed)["facilitating"]
    circuit = checks.heads(heads, layout, "heads")
    random_sets = random_head_sets(layout, len(circuit), n_random, np.random.default_rng(rng_seed))
    n_total = layout.n_layers * layout.n_heads
    keep = test == "sufficiency"
    conditions = [("full model", 0, n_total, torch.ones(layout.n_layers, layout.n_heads)),
                  ("no heads", 0, 0, torch.zeros(layout.n_layers, layout.n_heads)),
                  ("circuit", 0, len(circuit), circuit_gates(circuit, layout, keep))]
    conditions += [("random", d, len(s), circuit_gates(s, layout, keep)) for d, s in enumerate(random_sets)]
    logprob, accuracy = evaluate_gates(model, data, torch.stack([c[3] for c in conditions]), batch_size)
    return pd.DataFrame([
        {"test": test, "condition": name, "draw": draw, "n_heads": size,
         "logprob": float(logprob[i]), "accuracy": float(accuracy[i])}
        for i, (name, draw, size, _) in enumerate(conditions)
    ])


def random_head_sets(layout: adapter.HeadLayout, size: int, n_random: int, rng: np.random.Generator
                     ) -> list[list[Head]]:
    """``n_random`` head sets of ``size`` heads each, drawn uniformly from all heads: the reference a
    circuit of that size is held against."""
    if not isinstance(n_random, int) or isinstance(n_random, bool) or n_random < 0:
        raise InputError(f"n_random: expected a non-negative int, got {n_random!r}.")
    n_total = layout.n_layers * layout.n_heads
    return [[divmod(int(i), layout.n_heads) for i in rng.choice(n_total, size=size, replace=False)]
            for _ in range(n_random)]


def circuit_gates(heads: list[Head], layout: adapter.HeadLayout, keep: bool) -> Float[Tensor, "layer head"]:
    """All 0 with ``heads`` at 1 (keep), or all 1 with ``heads`` at 0 (remove)."""
    gates = torch.full((layout.n_layers, layout.n_heads), 0.0 if keep else 1.0)
    for layer, head in heads:
        gates[layer, head] = 1.0 if keep else 0.0
    return gates


def _ranking_scores(
    result: CHGResult, score: Any, seed: int, layout: adapter.HeadLayout, label: str | None
) -> tuple[Tensor, str]:
    if isinstance(score, str):
        if score not in ROLES:
            raise InputError(
                f"score: expected one of {list(ROLES)} or a [layer, head] tensor, got {score!r}."
            )
        return getattr(result, score)[seed].detach().float().cpu(), score
    scores = torch.as_tensor(score, dtype=torch.float32).detach().cpu()
    if tuple(scores.shape) != (layout.n_layers, layout.n_heads):
        raise InputError(
            f"score: a score tensor must be [layer, head] = {[layout.n_layers, layout.n_heads]}, "
            f"got {list(scores.shape)}."
        )
    return scores, label or "custom"


def _require_gate_values(values: Any) -> list[float]:
    try:
        values = [float(v) for v in values]
    except TypeError:
        raise InputError(f"values: expected a sequence of gate values in [0, 1], got {values!r}.") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise InputError(f"values: expected a non-empty sequence of gate values in [0, 1], got {values!r}.")
    return values

