"""Checking CHG against the tools interpretability researchers already trust, in one namespace.

    from chg_tlens import validate
    validate.ablation_curve(model, data, result, ["facilitating", "irrelevant"])
    validate.patching_scores(model, data, data.corrupt)   # [layer, head]
    validate.mediation_test(result, scores, top_k=10)

- Do the roles predict what ablation does? ``ablation_curve`` (the paper's targeted ablation),
  ``sufficiency`` and ``necessity`` (in ``analysis/ablation.py``).
- Do they agree with causal mediation? ``patching_scores`` runs TransformerLens' own head-level
  activation patching, ``path_patching`` the effect through chosen receivers (``analysis/patching.py``);
  ``mediation_test`` is the paper's Welch t-test (``analysis/mediation.py``).

Figures of these frames are in ``chg_tlens.plot``; ``chg-tlens validate`` runs the standard set.
"""

from chg_tlens.analysis.ablation import ablation_curve, evaluate_gates, necessity, sufficiency
from chg_tlens.analysis.mediation import mediation_test
from chg_tlens.analysis.patching import (
    PathPatchingResult,
    logit_diff_metric,
    patching_scores,
    path_patching,
    path_patching_scores,
    silent_patching_progress,
    target_logprob_metric,
)

__all__ = [
    "PathPatchingResult",
    "ablation_curve",
    "evaluate_gates",
    "logit_diff_metric",
    "mediation_test",
    "necessity",
    "path_patching",
    "path_patching_scores",
    "patching_scores",
    "silent_patching_progress",
    "sufficiency",
    "target_logprob_metric",
]
