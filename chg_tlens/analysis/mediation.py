"""The paper's mediation check: do heads a mediation method flags have higher CHG facilitation?"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from chg_tlens.core import checks
from chg_tlens.core.checks import SeedReduce
from chg_tlens.core.result import CHGResult
from chg_tlens.errors import InputError
from chg_tlens.models import adapter

Head = tuple[int, int]


def mediation_test(
    result: CHGResult,
    flagged_heads: Sequence[Head] | Bool[Tensor, "layer head"] | Float[Tensor, "layer head"],
    seed_reduce: SeedReduce | int = "max",
    top_k: int | None = None,
) -> dict[str, Any]:
    """The paper's check: do heads a mediation method flags have higher CHG facilitation?

    Facilitation per head is reduced over seeds (``"max"``, the paper's choice; ``"mean"``, ``"min"``,
    or one seed's index). ``flagged_heads`` is a list of ``(layer, head)``, a boolean ``[layer, head]``
    mask, or continuous ``[layer, head]`` scores (e.g. :func:`patching_scores`, signed as given). With
    scores, the Spearman rank correlation with facilitation is reported, and the flagged group for the
    t-test is the ``top_k`` highest scores (no t-test without ``top_k``). Welch's t-test (unequal
    variances), flagged vs the rest; ``t > 0`` means flagged heads facilitate more.
    """
    from scipy import stats

    if not isinstance(result, CHGResult):
        raise InputError(f"result: expected a CHGResult, got {type(result).__name__}.")
    facilitation = checks.reduce_seeds(result.facilitating.detach().float().cpu(), seed_reduce)
    shape = (result.n_layers, result.n_heads)
    layout = adapter.HeadLayout(result.n_layers, result.n_heads, 0, 0, 0)
    scores: Tensor | None = None
    if isinstance(flagged_heads, (Tensor, np.ndarray)):
        given = torch.as_tensor(flagged_heads)
        if tuple(given.shape) != shape:
            raise InputError(
                f"flagged_heads: expected a [layer, head] = {list(shape)} tensor, got {list(given.shape)}."
            )
        if given.dtype == torch.bool:
            flags = given.clone()
        else:
            scores = given.float()
            if not torch.isfinite(scores).all():
                raise InputError("flagged_heads: scores must be finite.")
            flags = None
            if top_k is not None:
                checks.positive_int(top_k, "top_k")
                flags = torch.zeros(shape, dtype=torch.bool)
                flags.view(-1)[torch.sort(-scores.flatten(), stable=True).indices[:top_k]] = True
    else:
        flags = torch.zeros(shape, dtype=torch.bool)
        for layer, head in checks.heads(flagged_heads, layout, "flagged_heads", allow_empty=False):
            flags[layer, head] = True

    out: dict[str, Any] = {
        "seed_reduce": seed_reduce, "n_heads": int(facilitation.numel()),
        "n_flagged": None, "n_rest": None, "facilitation_flagged": None, "facilitation_rest": None,
        "t": None, "p": None, "spearman_rho": None, "spearman_p": None,
    }
    if flags is not None:
        flagged, rest = facilitation[flags].numpy(), facilitation[~flags].numpy()
        if len(flagged) < 2 or len(rest) < 2:
            raise InputError(
                f"flagged_heads: Welch's t-test needs at least two flagged heads and two others; got "
                f"{len(flagged)} flagged and {len(rest)} others."
            )
        test = stats.ttest_ind(flagged, rest, equal_var=False)
        out.update(n_flagged=len(flagged), n_rest=len(rest),
                   facilitation_flagged=float(flagged.mean()), facilitation_rest=float(rest.mean()),
                   t=float(test.statistic), p=float(test.pvalue))
    if scores is not None:
        rho = stats.spearmanr(scores.flatten().numpy(), facilitation.flatten().numpy())
        out.update(spearman_rho=float(rho.statistic), spearman_p=float(rho.pvalue))
    return out
