"""``chg-tlens validate``: the standard validation set on a run's held-out data, as one summary."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import torch

from chg_tlens.analysis.ablation import (
    PAPER_DIRECTIONS,
    ablation_summary,
    necessity,
    sufficiency,
    targeted_ablation,
)
from chg_tlens.analysis.mediation import mediation_test
from chg_tlens.analysis.patching import patching_scores
from chg_tlens.core import checks
from chg_tlens.core.data import GateData
from chg_tlens.core.result import CHGResult
from chg_tlens.models import adapter
from chg_tlens.models.protocol import TransformerLensModel

ROLE_DIRECTIONS = tuple(d for d in PAPER_DIRECTIONS if d.value == 0.0)
"""One targeted-ablation curve per role, each removing heads: facilitating and irrelevant from G+,
interfering from the full model (in G+ they are already closed)."""


def validate_run(model: TransformerLensModel, data: GateData, result: CHGResult, seed: int = 0,
                 threshold: float = 0.5,
                 max_heads: int = 20, n_random: int = 10, top_k: int = 10, patching: bool = True,
                 batch_size: int = 16, random_orders: int = 3) -> tuple[dict[str, Any], pd.DataFrame]:
    """Sufficiency, necessity, targeted ablation and (with a corrupt twin) activation patching vs CHG.

    ``data`` should be held out from the fit. Returns a JSON-ready summary (one block per check) and
    the ablation-curve frame. Random head sets give the reference for sufficiency and necessity: the
    circuit should match or beat nearly all of them. The ablation summary reads every role's curve at
    k = the circuit's size: removing k facilitating heads should cost far more than removing k
    irrelevant ones, and removing k interfering heads from the full model should help; each curve is
    set against ``random_orders`` random head orders from the same start.
    ``patching`` needs ``data.corrupt``; without it the block says so.
    """
    layout = adapter.require_model(model)
    data = checks.gate_data(data, model)
    checks.chg_result(result, layout)
    seed = checks.seed_index(seed, result.n_seeds)
    summary: dict[str, Any] = {"seed": seed, "threshold": threshold, "n_examples": len(data)}
    circuit = result.roles(threshold, seed)["facilitating"]
    summary["facilitating_heads"] = [f"{layer}.{head}" for layer, head in circuit]
    for name, test in (("sufficiency", sufficiency), ("necessity", necessity)):
        if not circuit:
            summary[name] = {"skipped": "no facilitating heads at this threshold"}
            continue
        frame = test(model, data, heads=circuit, n_random=n_random, batch_size=batch_size)
        summary[name] = _circuit_summary(frame)
    ablation = targeted_ablation(model, data, result, seed, ROLE_DIRECTIONS, max_heads, random_orders,
                                 threshold=threshold, batch_size=batch_size)
    k = max(1, min(len(circuit), int(ablation["n_changed"].max())))
    summary["ablation"] = {}
    for row in ablation_summary(ablation, k).itertuples():
        curve = ablation[(ablation["score"] == row.score) & (ablation["start"] == row.start)]
        summary["ablation"][row.score] = {
            "k": k, "start": row.start, "value": row.value, "expected": row.expected,
            "delta_logprob_at_k": row.delta_logprob, "delta_accuracy_at_k": row.delta_accuracy,
            "random_min_at_k": _number_or_none(row.random_min),
            "random_max_at_k": _number_or_none(row.random_max),
            "as_expected": None if pd.isna(row.as_expected) else bool(row.as_expected),
            "heads_changed": int(curve["n_changed"].max()),
            "delta_logprob_at_end": float(curve.sort_values("n_changed")["delta_logprob"].iloc[-1]),
        }
    if not patching:
        summary["activation_patching"] = {"skipped": "patching=False"}
    elif data.corrupt is None:
        summary["activation_patching"] = {"skipped": "the data has no corrupt twin"}
    else:
        scores = patching_scores(model, data, data.corrupt)
        test = mediation_test(result, scores, top_k=min(top_k, layout.n_layers * layout.n_heads - 2))
        top = torch.sort(-scores.flatten(), stable=True).indices[:top_k]
        summary["activation_patching"] = {
            **test, "top_heads": [f"{int(i) // layout.n_heads}.{int(i) % layout.n_heads}" for i in top],
        }
    return summary, ablation


def _circuit_summary(frame: pd.DataFrame) -> dict[str, Any]:
    """Full model, no heads, the circuit, and the random sets: their mean, and the share of them the
    circuit matches or beats (keeping it gives at least their log-prob; removing it costs at least as much).
    """
    by = {row.condition: row for row in frame.itertuples() if row.condition != "random"}
    random = frame[frame["condition"] == "random"]
    circuit = by["circuit"]
    out = {name: {"logprob": float(row.logprob), "accuracy": float(row.accuracy), "n_heads": int(row.n_heads)}
           for name, row in by.items()}
    if len(random):
        as_good = circuit.logprob >= random["logprob"] if frame["test"].iloc[0] == "sufficiency" \
            else circuit.logprob <= random["logprob"]
        out["random_mean"] = {"logprob": float(random["logprob"].mean()),
                              "accuracy": float(random["accuracy"].mean()), "n_draws": len(random)}
        out["circuit_at_least_as_strong_share"] = float(as_good.mean())
    return out


def _number_or_none(value: float) -> float | None:
    """JSON has no NaN: an undefined number (no random orders drawn) is written as null."""
    return None if math.isnan(value) else float(value)
