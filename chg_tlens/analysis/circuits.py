"""Many sufficient circuits: does each seed find its own circuit, and does each one work alone?

The paper finds that heads facilitating in *every* seed are few while most heads (84%) are
facilitating or interfering in at least one: different seeds settle on different sparse circuits, each
sufficient for the task. :func:`seed_circuits` counts that from a result alone; :func:`sufficient_circuits`
also keeps each seed's facilitating set alone in the model (every other head gated to 0) against random
sets of the same size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from chg_tlens.analysis.ablation import circuit_gates, evaluate_gates, random_head_sets
from chg_tlens.core import checks
from chg_tlens.core.data import GateData
from chg_tlens.core.result import CHGResult
from chg_tlens.errors import InputError
from chg_tlens.models import adapter
from chg_tlens.models.protocol import TransformerLensModel

Head = tuple[int, int]


@dataclass(frozen=True)
class SeedCircuits:
    """Each seed's facilitating heads, how much the seeds share, and (optionally) how each set performs
    when kept alone."""

    threshold: float
    sets: list[list[Head]]
    """Facilitating heads of each seed (score >= ``threshold``)."""
    n_heads: int
    facilitating_any: list[Head]
    """Heads facilitating in at least one seed."""
    facilitating_every: list[Head]
    """Heads facilitating in every seed."""
    facilitating_or_interfering_any: list[Head]
    """Heads facilitating or interfering in at least one seed (the paper: 84% of heads)."""
    jaccard: Float[Tensor, "seed seed"]
    """Pairwise overlap |A and B| / |A or B| of the seeds' sets (NaN where both are empty)."""
    sufficiency: pd.DataFrame | None = None
    """From :func:`sufficient_circuits`: one row per condition (full model, no heads, each seed's
    circuit and its random sets): seed, condition, draw, n_heads, logprob, accuracy."""

    @property
    def n_seeds(self) -> int:
        return len(self.sets)

    @property
    def share_facilitating_or_interfering_any(self) -> float:
        return len(self.facilitating_or_interfering_any) / self.n_heads

    @property
    def mean_jaccard(self) -> float:
        """Mean overlap over pairs of distinct seeds whose overlap is defined (NaN with one seed)."""
        pairs = self.jaccard[~torch.eye(self.n_seeds, dtype=torch.bool)]
        pairs = pairs[~torch.isnan(pairs)]
        return float(pairs.mean()) if len(pairs) else math.nan

    def counts(self) -> dict[str, Any]:
        """The paper's numbers in one JSON-ready dict."""
        return {
            "threshold": self.threshold, "n_seeds": self.n_seeds, "n_heads": self.n_heads,
            "facilitating_per_seed": [len(s) for s in self.sets],
            "facilitating_any": len(self.facilitating_any),
            "facilitating_every": len(self.facilitating_every),
            "facilitating_or_interfering_any": len(self.facilitating_or_interfering_any),
            "share_facilitating_or_interfering_any": self.share_facilitating_or_interfering_any,
            "mean_jaccard": self.mean_jaccard,
        }

    def per_seed(self) -> pd.DataFrame:
        """One row per seed: its circuit's size, log-prob and accuracy kept alone, the random sets'
        mean, and the share of random sets the circuit matches or beats in log-prob."""
        if self.sufficiency is None:
            raise InputError("per_seed: this SeedCircuits has no sufficiency runs (seed_circuits counts "
                             "only); make it with sufficient_circuits(model, data, result).")
        frame = self.sufficiency
        rows = []
        for seed in range(self.n_seeds):
            mine = frame[frame["seed"] == seed]
            circuit = mine[mine["condition"] == "circuit"].iloc[0]
            random = mine[mine["condition"] == "random"]
            rows.append({
                "seed": seed, "n_heads": int(circuit["n_heads"]),
                "logprob": float(circuit["logprob"]), "accuracy": float(circuit["accuracy"]),
                "random_logprob": float(random["logprob"].mean()) if len(random) else math.nan,
                "random_accuracy": float(random["accuracy"].mean()) if len(random) else math.nan,
                "beats_random_share": (float((circuit["logprob"] >= random["logprob"]).mean())
                                       if len(random) else math.nan),
            })
        return pd.DataFrame(rows)


def seed_circuits(result: CHGResult, threshold: float = 0.5) -> SeedCircuits:
    """Each seed's facilitating set and how the seeds overlap: heads facilitating in at least one seed
    vs in every seed, the share facilitating or interfering in at least one, pairwise Jaccard."""
    checks.instance_of(result, CHGResult, "result", "CHGResult")
    checks.unit_interval(threshold, "threshold")
    labels = result.role_labels(threshold)  # [seed, layer, head]
    facilitating = labels == "facilitating"
    either = facilitating | (labels == "interfering")
    sets = [_heads_of(facilitating[seed]) for seed in range(result.n_seeds)]
    jaccard = torch.full((result.n_seeds, result.n_seeds), math.nan)
    for a in range(result.n_seeds):
        for b in range(result.n_seeds):
            union = int((facilitating[a] | facilitating[b]).sum())
            if union:
                jaccard[a, b] = int((facilitating[a] & facilitating[b]).sum()) / union
    return SeedCircuits(
        threshold=threshold, sets=sets, n_heads=result.n_layers * result.n_heads,
        facilitating_any=_heads_of(facilitating.any(axis=0)),
        facilitating_every=_heads_of(facilitating.all(axis=0)),
        facilitating_or_interfering_any=_heads_of(either.any(axis=0)),
        jaccard=jaccard,
    )


def sufficient_circuits(
    model: TransformerLensModel,
    data: GateData,
    result: CHGResult,
    threshold: float = 0.5,
    n_random: int = 10,
    rng_seed: int = 0,
    batch_size: int = 64,
) -> SeedCircuits:
    """:func:`seed_circuits`, plus each seed's facilitating set kept alone (every other head at 0)
    against ``n_random`` random sets of its size: several distinct sets that each beat random ones are
    the paper's many sufficient circuits. All conditions run through one :func:`evaluate_gates`."""
    layout = adapter.require_model(model)
    checks.chg_result(result, layout)
    circuits = seed_circuits(result, threshold)
    rng = np.random.default_rng(rng_seed)
    conditions = [(None, "full model", 0, layout.n_layers * layout.n_heads,
                   torch.ones(layout.n_layers, layout.n_heads)),
                  (None, "no heads", 0, 0, torch.zeros(layout.n_layers, layout.n_heads))]
    for seed, heads in enumerate(circuits.sets):
        conditions.append((seed, "circuit", 0, len(heads), circuit_gates(heads, layout, keep=True)))
        draws = random_head_sets(layout, len(heads), n_random if heads else 0, rng)
        conditions += [(seed, "random", d, len(s), circuit_gates(s, layout, keep=True))
                       for d, s in enumerate(draws)]
    logprob, accuracy = evaluate_gates(model, data, torch.stack([c[-1] for c in conditions]), batch_size)
    frame = pd.DataFrame([
        {"seed": seed, "condition": name, "draw": draw, "n_heads": size,
         "logprob": float(logprob[i]), "accuracy": float(accuracy[i])}
        for i, (seed, name, draw, size, _) in enumerate(conditions)
    ])
    frame["seed"] = frame["seed"].astype("Int64")
    return replace(circuits, sufficiency=frame)


def _heads_of(flags: np.ndarray) -> list[Head]:
    return [(int(layer), int(head)) for layer, head in zip(*np.nonzero(flags), strict=True)]
