"""``chg-tlens validate``: the standard validation set on a run's held-out data, as one summary."""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from chg_tlens.analysis.ablation import ablation_curve, necessity, sufficiency
from chg_tlens.analysis.mediation import mediation_test
from chg_tlens.analysis.patching import patching_scores
from chg_tlens.core import checks
from chg_tlens.core.data import GateData
from chg_tlens.core.result import CHGResult
from chg_tlens.models import adapter


def validate_run(model: Any, data: GateData, result: CHGResult, seed: int = 0, threshold: float = 0.5,
                 max_heads: int = 20, n_random: int = 10, top_k: int = 10, patching: bool = True,
                 batch_size: int = 16) -> tuple[dict[str, Any], pd.DataFrame]:
    """Sufficiency, necessity, targeted ablation and (with a corrupt twin) activation patching vs CHG.

    ``data`` should be held out from the fit. Returns a JSON-ready summary (one block per check) and
    the ablation-curve frame. Random head sets give the reference for sufficiency and necessity: the
    circuit should match or beat nearly all of them. The ablation summary reads both curves at k = the
    circuit's size: removing k facilitating heads should cost far more than removing k irrelevant ones.
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
    ablation = ablation_curve(model, data, result, ["facilitating", "irrelevant"], seed=seed, values=(0.0,),
                              max_heads=max_heads, batch_size=batch_size)
    k = max(1, min(len(circuit), int(ablation["n_changed"].max())))
    summary["ablation"] = {}
    for score, group in ablation.groupby("score", sort=False):
        group = group.set_index("n_changed")
        summary["ablation"][score] = {
            "k": k, "delta_logprob_at_k": float(group.loc[k, "delta_logprob"]),
            "delta_accuracy_at_k": float(group.loc[k, "delta_accuracy"]),
            "heads_changed": int(group.index.max()),
            "delta_logprob_at_end": float(group["delta_logprob"].iloc[-1]),
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
