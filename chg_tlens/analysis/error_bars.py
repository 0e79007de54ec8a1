"""Error bars by source: what moves a head's role, the initial gates or the sample of prompts?

Three things move a CHG role, and a user should see which. The *optimiser* is answered by the
convergence certificate (a certified stage sits at a stationary point, and ``confidence(source=
"optimiser")`` says how long each head has held its role). The *initial gates* (the paper's many
sufficient circuits) and the *sample of prompts* are answered here, by one fit of both kinds of gate set
side by side in the mask dimension:

    seeds      ``n_seeds`` gate sets, each from its own uniform initial draw, on every prompt
    prompts    ``n_resamples`` gate sets, all from seed 0's initial draw, each on its own bootstrap
               resample of the prompts (example weights = how often each prompt is drawn)

    bars = error_bars(model, data, CHGConfig(n_seeds=3, ...), n_resamples=3)
    bars.to_frame()      # per head: seed 0's role, and the share of seeds / of resamples per role
    bars.summary()       # per source: the mean share of gate sets that agree with the head's modal role
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from chg_tlens.core import checks
from chg_tlens.core.config import CHGConfig
from chg_tlens.core.convergence import ROLES, UNCLASSIFIED
from chg_tlens.core.data import GateData
from chg_tlens.core.fit import bootstrap_weights, fit_chg
from chg_tlens.core.gates import initial_theta
from chg_tlens.core.result import CHGResult
from chg_tlens.errors import InputError
from chg_tlens.models import adapter
from chg_tlens.models.protocol import TransformerLensModel

SOURCES = ("seeds", "prompts")


@dataclass
class RoleErrorBars:
    """Two views of one joint fit: ``seeds`` (initial gates vary) and ``prompts`` (prompts vary)."""

    seeds: CHGResult
    prompts: CHGResult
    threshold: float = 0.5

    def role_shares(self, source: str) -> dict[str, np.ndarray]:
        """Role -> ``[layer, head]`` share of the source's gate sets that give each head that role."""
        return _shares(getattr(self, _checked(source)).role_labels(self.threshold))

    def to_frame(self) -> pd.DataFrame:
        """One row per head: seed 0's role on every prompt, then per source the share of gate sets per role
        and the share agreeing with seed 0's role; ``optimiser`` is seed 0's certificate-window stability."""
        reference = self.seeds.role_labels(self.threshold)[0]
        n_layers, n_heads = reference.shape
        layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
        columns: dict[str, Any] = {"layer": layer.ravel(), "head": head.ravel(), "role": reference.ravel()}
        for source in SOURCES:
            labels = getattr(self, source).role_labels(self.threshold)
            for role, share in _shares(labels).items():
                columns[f"{source}_{role}"] = share.ravel()
            columns[f"{source}_agree"] = (labels == reference).mean(axis=0).ravel()
        stability = self.seeds.confidence(self.threshold, source="optimiser")[0]
        columns["optimiser_agree"] = stability.numpy().ravel()
        return pd.DataFrame(columns)

    def summary(self) -> pd.DataFrame:
        """Per source, over heads: the mean share of gate sets agreeing with seed 0's role, the share of
        heads every gate set agrees on, and whether every stage of every gate set is certified."""
        frame = self.to_frame()
        certified = {view: _all_certified(getattr(self, view), self.threshold) for view in SOURCES}
        rows = []
        for source in ("optimiser",) + SOURCES:
            agree = frame[f"{source}_agree"]
            view = "prompts" if source == "prompts" else "seeds"
            rows.append({"source": source, "mean_agreement": float(agree.mean()),
                         "heads_all_agree": float((agree == 1.0).mean()),
                         "gate_sets": 1 if source == "optimiser" else getattr(self, view).n_seeds,
                         "all_certified": certified[view]})
        return pd.DataFrame(rows).set_index("source")


def error_bars(model: TransformerLensModel, data: GateData, config: CHGConfig | None = None,
               n_resamples: int = 3,
               resample_seed: int = 0, run_dir: str | os.PathLike | None = None,
               resume: bool = False) -> RoleErrorBars:
    """Fit ``config.n_seeds`` gate sets from their own initial draws on every prompt, and ``n_resamples``
    from seed 0's draw on bootstrap resamples of the prompts, in one pass; return both views.
    ``run_dir`` / ``resume``: checkpoints of the joint fit, as for :func:`~chg_tlens.fit_chg`."""
    config = replace(config or CHGConfig()).validate()
    checks.positive_int(n_resamples, "n_resamples")
    layout = adapter.require_model(model)
    draws = initial_theta(config.n_seeds, layout.n_layers, layout.n_heads, config.seed)
    init = torch.cat([draws, draws[:1].repeat(n_resamples, 1, 1)])
    weights = torch.cat([torch.ones(config.n_seeds, len(data)),
                         bootstrap_weights(len(data), n_resamples, resample_seed)])
    joint = replace(config, n_seeds=config.n_seeds + n_resamples)
    result = fit_chg(model, data, joint, init_theta=init, example_weights=weights, run_dir=run_dir,
                     resume=resume)
    result.provenance = result.provenance | {"error_bars": {"seeds": config.n_seeds,
                                                            "resamples": n_resamples,
                                                            "resample_seed": resample_seed}}
    return RoleErrorBars(result.select_seeds(slice(0, config.n_seeds)),
                         result.select_seeds(slice(config.n_seeds, None)))


def _checked(source: str) -> str:
    if source not in SOURCES:
        raise InputError(f"source must be one of {SOURCES}, got {source!r}.")
    return source


def _all_certified(result: CHGResult, threshold: float) -> bool | None:
    """Whether every stage of every gate set carries the certificate (None without a trace)."""
    return bool(result.convergence(threshold)["certified"].all()) if result.trace else None


def _shares(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Role -> ``[layer, head]`` share of the gate sets (first axis of ``labels``) with that role."""
    return {role: (labels == role).mean(axis=0) for role in ROLES + (UNCLASSIFIED,)}
