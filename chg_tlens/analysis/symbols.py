"""Symbol heads on ABA/ABB (Yang et al., 2025): the heads that abstract, induce and retrieve the rule.

Each head type is found by one causal-mediation contrast (Algorithm 1 of the paper): one head's
``hook_z`` from a *source* context is patched into a *target* context at the positions the type works
at, and the score is the rise of ``logit(y*) - logit(y)`` on the target, where ``y`` is the target's own
answer and ``y*`` the answer it should give once the patched variable takes over:

    head type            context pair (tasks.aba_abb.paired_contexts)            patched at
    symbol_abstraction   abstract: rule flipped, every third word the same token  third word of each line
    symbolic_induction   abstract                                                 last position
    retrieval            token: same rule, the query's two words swapped          last position

On the abstract pair the literal tokens at the third words, and the answers, are the same in both
contexts: only a head carrying the abstract variable (A or B) moves the answer. On the token pair the
rule is the same: only a head carrying the literal answer moves it. The paper keeps the pairs the model
answers right in both contexts (``only_correct``), so where the model is weak on the task few pairs are
left: :func:`symbol_task_accuracy` says how many. :meth:`SymbolHeads.mediation_test` is the CHG paper's
check (CHG facilitation of flagged heads vs the rest; Llama-3: t = 11.18).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from chg_tlens.analysis.accuracy import task_accuracy
from chg_tlens.analysis.mediation import mediation_test
from chg_tlens.core import checks, interventions
from chg_tlens.core.checks import SeedReduce
from chg_tlens.core.data import GateData
from chg_tlens.core.forward import logits_at, on_device
from chg_tlens.core.objectives import target_labels, target_positions
from chg_tlens.core.result import CHGResult
from chg_tlens.errors import InputError
from chg_tlens.models import adapter
from chg_tlens.models.protocol import TransformerLensModel
from chg_tlens.tasks.aba_abb import PairedContexts, paired_contexts

Head = tuple[int, int]

HEAD_TYPES: dict[str, tuple[str, str]] = {
    "symbol_abstraction": ("abstract", "items"),
    "symbolic_induction": ("abstract", "final"),
    "retrieval": ("token", "final"),
}
"""Head type -> (context pair kind, where its output is patched: each line's third word or the last
position)."""


@dataclass(frozen=True)
class SymbolHeads:
    """Per head type: scores ``[layer, head]``, the top heads, and the pairs and cost behind them."""

    scores: dict[str, Float[Tensor, "layer head"]]
    """Mean rise of ``logit(y*) - logit(y)`` on the target contexts when the head is patched in."""
    heads: dict[str, list[Head]]
    """The ``top_k`` heads by score per type, largest first."""
    contexts: dict[str, PairedContexts]
    """The pairs scored, by kind (``abstract``, ``token``): after the ``only_correct`` filter."""
    baseline: dict[str, float]
    """Mean ``logit(y*) - logit(y)`` on the unpatched targets, by kind (negative: the model gives ``y``)."""
    n_candidates: dict[str, int]
    """Pairs built per kind, before the filter."""
    forward_passes: int
    """Example forward passes: the filter's two per pair, then per scored pair one source run, one target
    run and one patched run per head and head type."""
    seconds: float

    @property
    def n_pairs(self) -> dict[str, int]:
        """Pairs scored per kind."""
        return {kind: len(pairs) for kind, pairs in self.contexts.items()}

    def flags(self, head_types: Sequence[str] | None = None) -> Bool[Tensor, "layer head"]:
        """The top heads of ``head_types`` (default: every type scored) as one ``[layer, head]`` mask."""
        chosen = list(self.scores) if head_types is None else _require_types(head_types, list(self.scores))
        flags = torch.zeros(next(iter(self.scores.values())).shape, dtype=torch.bool)
        for head_type in chosen:
            for layer, head in self.heads[head_type]:
                flags[layer, head] = True
        return flags

    def to_frame(self) -> pd.DataFrame:
        """One row per head: layer, head, then per type its score and whether it is a top head."""
        n_layers, n_heads = next(iter(self.scores.values())).shape
        frame = pd.DataFrame({"layer": torch.arange(n_layers).repeat_interleave(n_heads).numpy(),
                              "head": torch.arange(n_heads).repeat(n_layers).numpy()})
        for head_type, scores in self.scores.items():
            frame[head_type] = scores.flatten().numpy()
            frame[f"{head_type}_top"] = self.flags([head_type]).flatten().numpy()
        return frame

    def mediation_test(self, result: CHGResult, seed_reduce: SeedReduce | int = "max") -> dict[str, Any]:
        """The CHG paper's check: CHG facilitation (max over seeds) of the top heads vs the rest.

        One :func:`mediation_test` per head type (Welch's t on its top heads when there are at least
        two, and the Spearman correlation of facilitation with its scores) and one for the top heads of
        every type together under ``"any"`` (the paper, Llama-3: t = 11.18).
        """
        if not isinstance(result, CHGResult):
            raise InputError(f"result: expected a CHGResult, got {type(result).__name__}.")
        shape = tuple(next(iter(self.scores.values())).shape)
        if (result.n_layers, result.n_heads) != shape:
            raise InputError(
                f"result: gates are [layer, head] = {[result.n_layers, result.n_heads]}, but the symbol-head "
                f"scores are {list(shape)}; was it fitted on another model?"
            )
        out: dict[str, Any] = {}
        for head_type, scores in self.scores.items():
            k = len(self.heads[head_type])
            out[head_type] = mediation_test(result, scores, seed_reduce, top_k=k if k >= 2 else None)
        out["any"] = mediation_test(result, self.flags(), seed_reduce)
        return out


def symbol_heads(
    model: TransformerLensModel,
    contexts: Mapping[str, PairedContexts] | None = None,
    *,
    head_types: Sequence[str] = tuple(HEAD_TYPES),
    n: int = 32,
    seed: int = 0,
    n_shots: int = 4,
    rule: str = "both",
    words: Sequence[str] | None = None,
    top_k: int = 10,
    only_correct: bool = True,
    batch_size: int = 16,
    progress: bool = True,
) -> SymbolHeads:
    """Score every head as a symbol-abstraction, symbolic-induction and retrieval head (Yang et al.).

    ``contexts`` maps a pair kind (``"abstract"``, ``"token"``) to :class:`PairedContexts`; kinds not
    given are built with ``tasks.aba_abb.paired_contexts(model, n, seed, rule=rule, n_shots=n_shots,
    words=words)``. ``rule="both"`` (ours; the authors' CMA script defaults to an ABA source) alternates
    the source rule so that a head copying the last word, which follows the rule's literal layout, cancels
    out instead of posing as a symbolic induction head. ``only_correct`` keeps, as the paper does, the
    pairs whose source and target the model answers right (top-1); the contrast needs a model that does
    the task. Every head is patched alone, over every pair, in batches of ``batch_size``.
    """
    started = time.perf_counter()
    layout = adapter.require_model(model)
    chosen = _require_types(head_types, list(HEAD_TYPES))
    n_layers, n_heads = layout.n_layers, layout.n_heads
    top_k = min(checks.positive_int(top_k, "top_k"), n_layers * n_heads)
    checks.positive_int(batch_size, "batch_size")
    pairs_by_kind = _contexts(model, contexts, chosen, n, seed, n_shots, rule, words)
    device = adapter.model_device(model)
    passes = 0
    n_candidates = {kind: len(pairs) for kind, pairs in pairs_by_kind.items()}
    means: dict[tuple[str, str], Tensor] = {}
    baseline: dict[str, float] = {}
    with adapter.frozen(model), torch.no_grad():
        if only_correct:
            for kind, pairs in pairs_by_kind.items():
                right = _answered(model, pairs.source, batch_size, device) & _answered(
                    model, pairs.target, batch_size, device)
                passes += 2 * len(pairs)
                if not right.any():
                    raise InputError(
                        f"only_correct: the model answers none of the {len(pairs)} {kind} pairs right in "
                        "both contexts, so no pair is left to score; check symbol_task_accuracy, or pass "
                        "only_correct=False."
                    )
                pairs_by_kind[kind] = pairs.subset(torch.nonzero(right).flatten())
        n_patches = sum(len(pairs_by_kind[HEAD_TYPES[t][0]]) for t in chosen) * n_layers * n_heads
        bar = tqdm(total=n_patches, desc="symbol heads", disable=not progress, leave=False)
        for kind, pairs in pairs_by_kind.items():
            wheres = [HEAD_TYPES[t][1] for t in chosen if HEAD_TYPES[t][0] == kind]
            totals, baseline_total = _patch_every_head(model, layout, pairs, wheres, batch_size, device, bar)
            passes += len(pairs) * (2 + len(wheres) * n_layers * n_heads)
            baseline[kind] = baseline_total / len(pairs)
            means.update({(kind, where): total / len(pairs) for where, total in totals.items()})
        bar.close()
    scores = {t: means[HEAD_TYPES[t]].float() for t in chosen}
    heads = {t: [divmod(int(i), n_heads) for i in torch.sort(-s.flatten(), stable=True).indices[:top_k]]
             for t, s in scores.items()}
    return SymbolHeads(scores=scores, heads=heads, contexts=pairs_by_kind, baseline=baseline,
                       n_candidates=n_candidates, forward_passes=passes,
                       seconds=time.perf_counter() - started)


def symbol_task_accuracy(
    model: TransformerLensModel,
    contexts: Mapping[str, PairedContexts] | None = None,
    *,
    n: int = 32,
    seed: int = 0,
    n_shots: int = 4,
    rule: str = "both",
    words: Sequence[str] | None = None,
    batch_size: int = 32,
) -> dict[str, dict[str, Any]]:
    """How well the model does the contexts :func:`symbol_heads` patches, by pair kind.

    Per kind: :func:`task_accuracy` of the source and of the target contexts (their ``contrast_accuracy``
    is the two-way choice between the query's words) and ``pairs_correct``, the share of pairs right in
    both, which is what ``only_correct`` keeps: a low share means few pairs carry the test. Builds the
    same pairs as :func:`symbol_heads` with the same arguments.
    """
    checks.positive_int(batch_size, "batch_size")
    pairs_by_kind = _contexts(model, contexts, list(HEAD_TYPES), n, seed, n_shots, rule, words)
    device = adapter.model_device(model)
    report: dict[str, dict[str, Any]] = {}
    for kind, pairs in pairs_by_kind.items():
        with adapter.frozen(model), torch.no_grad():
            right = _answered(model, pairs.source, batch_size, device) & _answered(
                model, pairs.target, batch_size, device)
        report[kind] = {"n": len(pairs), "source": task_accuracy(model, pairs.source, batch_size),
                        "target": task_accuracy(model, pairs.target, batch_size),
                        "pairs_correct": float(right.float().mean())}
    return report


# ---------------------------------------------------------------------------- pieces
def _contexts(model: TransformerLensModel, given: Mapping[str, PairedContexts] | None,
              head_types: Sequence[str], n: int,
              seed: int, n_shots: int, rule: str, words: Sequence[str] | None) -> dict[str, PairedContexts]:
    """The pairs each kind the head types need: given ones (checked against the model), the rest built."""
    given = {} if given is None else given
    if not isinstance(given, Mapping):
        raise InputError(
            f"contexts: expected a dict of pair kind -> PairedContexts, got {type(given).__name__}."
        )
    out: dict[str, PairedContexts] = {}
    for kind in dict.fromkeys(HEAD_TYPES[t][0] for t in head_types):
        pairs = given.get(kind)
        if pairs is None:
            pairs = paired_contexts(model, n, seed, kind=kind, rule=rule, n_shots=n_shots, words=words)
        elif not isinstance(pairs, PairedContexts) or pairs.kind != kind:
            raise InputError(
                f"contexts[{kind!r}]: expected PairedContexts of kind {kind!r}, got "
                f"{getattr(pairs, 'kind', type(pairs).__name__)!r}."
            )
        checks.gate_data(pairs.source, model, f"contexts[{kind!r}].source")
        checks.gate_data(pairs.target, model, f"contexts[{kind!r}].target")
        out[kind] = pairs
    return out


def _require_types(head_types: Any, known: list[str]) -> list[str]:
    if isinstance(head_types, str):
        head_types = [head_types]
    chosen = list(dict.fromkeys(head_types))
    unknown = [t for t in chosen if t not in known]
    if unknown or not chosen:
        raise InputError(f"head_types: expected some of {known}, got {list(head_types)!r}.")
    return chosen


def _answered(model: TransformerLensModel, data: GateData, batch_size: int,
              device: torch.device) -> Bool[Tensor, " example"]:
    """Whether the model's top-1 token at the answer position is the answer, per example."""
    right = []
    for _, tokens, target_mask in on_device(data, batch_size, device):
        example, position = target_positions(target_mask)
        logits = logits_at(model, tokens, example, position)
        right.append((logits.argmax(dim=-1) == target_labels(tokens, target_mask)).cpu())
    return torch.cat(right)


def _patch_every_head(
    model: TransformerLensModel, layout: adapter.HeadLayout, pairs: PairedContexts, wheres: list[str],
    batch_size: int,
    device: torch.device, bar: Any,
) -> tuple[dict[str, Float[Tensor, "layer head"]], float]:
    """Summed over pairs, per patch site in ``wheres``: each head's rise in the target's logit difference
    when its source ``hook_z`` replaces the target's there; and the summed unpatched difference."""
    totals = {where: torch.zeros(layout.n_layers, layout.n_heads, dtype=torch.float64) for where in wheres}
    baseline = 0.0
    for start in range(0, len(pairs), batch_size):
        batch = pairs.subset(torch.arange(start, min(start + batch_size, len(pairs))))
        sites = {"items": batch.item_positions, "final": batch.final_positions}
        source, target = batch.source.tokens.to(device), batch.target.tokens.to(device)
        example, position = (index.to(device) for index in target_positions(batch.target.target_mask))
        wanted = batch.target.corrupt.labels().to(device)  # y*: the target twin's answer
        own = batch.target.labels().to(device)
        hooks, source_z = interventions.record(range(layout.n_layers))  # layer -> [batch, pos, head, d_head]
        logits_at(model, source, example, position, hooks)
        unpatched = _logit_diff(logits_at(model, target, example, position), wanted, own)
        baseline += float(unpatched.sum())
        for where in wheres:
            site = sites[where].to(device)
            for layer in range(layout.n_layers):
                for head in range(layout.n_heads):
                    hook = interventions.replace(layer, source_z[layer], heads=head, positions=site)
                    logits = logits_at(model, target, example, position, [hook])
                    totals[where][layer, head] += float((_logit_diff(logits, wanted, own) - unpatched).sum())
                    bar.update(len(batch))
    return totals, baseline


def _logit_diff(logits: Float[Tensor, "n vocab"], wanted: Int[Tensor, " n"], own: Int[Tensor, " n"]
                ) -> Float[Tensor, " n"]:
    logits = logits.float()
    return (logits.gather(-1, wanted[:, None]) - logits.gather(-1, own[:, None])).squeeze(-1)
