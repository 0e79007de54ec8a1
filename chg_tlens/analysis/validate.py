"""Checking CHG against the tools interpretability researchers already trust, in one namespace.

    from chg_tlens import validate
    validate.targeted_ablation(model, data, result)          # every role's direction, random band
    validate.patching_scores(model, data, data.corrupt)      # [layer, head]
    validate.mediation_test(result, scores, top_k=10)
    fv = validate.function_vector_heads(model, icl_data)     # icl_data.corrupt: shuffled labels
    fv.mediation_test(result)
    symbols = validate.symbol_heads(model)                   # ABA/ABB: Yang et al.'s three head types
    symbols.mediation_test(result)

- Do the roles predict what ablation does? ``targeted_ablation`` (the paper's targeted ablation in all
  three directions, random orders as reference; ``ablation_summary`` reads it), ``ablation_curve``
  (one curve at a time), ``sufficiency`` and ``necessity``, and ``joint_knockout`` (a set removed together
  against its members one at a time: backups and ANDs single knockouts miss; ``analysis/knockouts.py``)
  (in ``analysis/ablation.py``).
- Many sufficient circuits? ``seed_circuits`` (overlap of the seeds' facilitating sets) and
  ``sufficient_circuits`` (each set kept alone vs random sets) (``analysis/circuits.py``).
- Do they agree with causal mediation? ``patching_scores`` runs TransformerLens' own head-level
  activation patching, ``path_patching`` the effect through chosen receivers (``analysis/patching.py``);
  ``function_vector_heads`` Todd et al.'s average indirect effect on in-context tasks
  (``analysis/function_vectors.py``); ``symbol_heads`` Yang et al.'s symbol-abstraction, symbolic-induction
  and retrieval heads on ABA/ABB (``analysis/symbols.py``); ``mediation_test`` is the paper's Welch t-test
  (``analysis/mediation.py``).

Figures of these frames are in ``chg_tlens.plot``; ``chg-tlens validate`` runs the standard set. (A
config's ``validate()`` is another thing: it checks settings, not roles; see ``chg_tlens``' docstring.)
"""

from chg_tlens.analysis.ablation import (
    PAPER_DIRECTIONS,
    AblationDirection,
    ablation_curve,
    ablation_summary,
    evaluate_gates,
    necessity,
    sufficiency,
    targeted_ablation,
)
from chg_tlens.analysis.circuits import SeedCircuits, seed_circuits, sufficient_circuits
from chg_tlens.analysis.function_vectors import FunctionVectorHeads, function_vector_heads
from chg_tlens.analysis.knockouts import JointKnockout, joint_knockout
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
from chg_tlens.analysis.symbols import SymbolHeads, symbol_heads, symbol_task_accuracy

__all__ = [
    "PAPER_DIRECTIONS",
    "AblationDirection",
    "FunctionVectorHeads",
    "JointKnockout",
    "PathPatchingResult",
    "SeedCircuits",
    "SymbolHeads",
    "ablation_curve",
    "ablation_summary",
    "joint_knockout",
    "evaluate_gates",
    "function_vector_heads",
    "logit_diff_metric",
    "mediation_test",
    "necessity",
    "path_patching",
    "path_patching_scores",
    "patching_scores",
    "seed_circuits",
    "silent_patching_progress",
    "sufficiency",
    "sufficient_circuits",
    "symbol_heads",
    "symbol_task_accuracy",
    "target_logprob_metric",
    "targeted_ablation",
]
