"""Comparing head scores: method against method, method against known roles, and by what they keep.

    spearman, top_k_overlap        do two methods rank heads alike?
    roc_auc, precision_at_k        does a method find the heads known to matter?
    faithfulness_curve             how much of the task do a method's top-k heads carry on their own?
    ablated_faithfulness_curve     the same with the other heads mean- or corrupt-ablated, not zeroed
    chg_head_scores, run_chg       CHG facilitation as one more ``HeadScores``
    chg_head_scores_both           ... ranked both ways: max and mean of G- over seeds
    run_methods                    every method of ``chg_tlens.baselines`` plus CHG on one model and task
    Benchmark, compare_methods     many methods on many benchmarks -> one table (+ Markdown)

The rank statistics are written out here in numpy (average ranks for ties), so they have no
dependency beyond numpy and are checked on hand-made examples in the tests.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from chg_tlens.analysis import acdc, baselines, statistics
from chg_tlens.analysis.ablation import evaluate_gates
from chg_tlens.analysis.baselines import HeadScores
from chg_tlens.analysis.metrics import (
    ScoresLike,
    flat_scores,
    spearman,
    sweep_roc,
    truth_metrics,
)
from chg_tlens.analysis.movers import MOVER_ATTENTION, MOVER_EFFECT_SHARE, mover_roles
from chg_tlens.analysis.patching import logit_diff_metric, target_logprob_metric
from chg_tlens.core import checks, interventions
from chg_tlens.core.config import CHGConfig
from chg_tlens.core.data import GateData
from chg_tlens.core.fit import fit_chg
from chg_tlens.core.forward import on_device
from chg_tlens.core.result import CHGResult
from chg_tlens.errors import InputError
from chg_tlens.models import adapter
from chg_tlens.models.protocol import TransformerLensModel

SeedReduce = Literal["max", "mean"]
SEED_REDUCTIONS: tuple[SeedReduce, ...] = ("max", "mean")
"""CHG is read both ways: ``max`` (a head some seed needs) and ``mean`` (a head every seed needs)."""
ComplementAblation = Literal["mean", "corrupt"]
FaithfulnessMetric = Literal["logprob", "logit_diff"]


# ------------------------------------------------------------------------------ faithfulness
def faithfulness_curve(
    model: TransformerLensModel,
    data: GateData,
    scores: ScoresLike,
    ks: Sequence[int] | None = None,
    batch_size: int = 64,
) -> pd.DataFrame:
    """The task with only a method's top-k heads kept (every other head gated to 0), for each k.

    Columns: k, logprob (mean target log-prob), accuracy, faithfulness = (logprob - none) / (all -
    none), where "all" keeps every head and "none" none: 1 = the top k carry the whole task, above 1
    = they do better than the full model (the interfering heads are out).
    """
    layout = adapter.require_model(model)
    ks, kept = top_k_kept(scores, ks, layout, "faithfulness_curve")
    logprob, accuracy = evaluate_gates(model, data, kept.float(), batch_size)
    full, none = float(logprob[0]), float(logprob[1])
    gap = full - none
    rows = []
    for i, k in enumerate(ks):
        value = float(logprob[2 + i])
        rows.append({"k": k, "logprob": value, "accuracy": float(accuracy[2 + i]),
                     "faithfulness": (value - none) / gap if abs(gap) > 1e-12 else float("nan"),
                     "logprob_all": full, "logprob_none": none})
    return pd.DataFrame(rows)


def ablated_faithfulness_curve(
    model: TransformerLensModel,
    data: GateData,
    scores: ScoresLike,
    ks: Sequence[int] | None = None,
    ablation: ComplementAblation = "mean",
    metric: FaithfulnessMetric = "logprob",
    reference: GateData | None = None,
    batch_size: int = 64,
    mean_reference: baselines.MeanReference | None = None,
) -> pd.DataFrame:
    """The task with only a method's top-k heads kept and every other head mean- or corrupt-ablated.

    Zeroing the other heads (:func:`faithfulness_curve`) also removes what they write on every prompt
    alike, which the kept heads may rely on, so a circuit can look unfaithful for a reason that has
    nothing to do with the task. Here each other head's ``hook_z`` is replaced by its mean over
    ``reference`` (default ``data``) at each position (``ablation="mean"``), or by its value on the
    example's corrupt twin (``"corrupt"``, needs ``data.corrupt``). ``mean_reference="template"`` (the
    default when the data has ``groups``, e.g. ioi's templates) takes the mean over the reference
    examples of each example's own template, as IOI and ACDC do; ``"all"`` pools every example.
    ``metric`` is the mean target log-prob or the logit difference clean answer - corrupt answer
    (``"logit_diff"``, needs the twin).

    Columns: k, metric (its mean over examples), faithfulness = (metric - none) / (all - none), where
    "all" keeps every head (1) and "none" ablates every head (0), metric_all, metric_none, ablation,
    metric_name.
    """
    layout = adapter.require_model(model)
    data = checks.gate_data(data, model)
    if ablation not in ("mean", "corrupt"):
        raise InputError(
            f"ablated_faithfulness_curve: ablation must be 'mean' or 'corrupt', got {ablation!r}.")
    if metric not in ("logprob", "logit_diff"):
        raise InputError(
            f"ablated_faithfulness_curve: metric must be 'logprob' or 'logit_diff', got {metric!r}.")
    if ablation == "corrupt" or metric == "logit_diff":
        checks.corrupt_twin(data, f"ablated_faithfulness_curve (ablation={ablation!r}, metric={metric!r})")
    checks.positive_int(batch_size, "batch_size")
    ks, kept = top_k_kept(scores, ks, layout, "ablated_faithfulness_curve")
    means = None
    if ablation == "mean":
        reference = data if reference is None else checks.gate_data(reference, model, "reference")
        if reference.tokens.shape[1] < data.tokens.shape[1]:
            raise InputError(f"reference: its prompts ({reference.tokens.shape[1]} positions) must be at "
                             f"least as long as data's ({data.tokens.shape[1]}) (a mean per position).")
        chosen = baselines.mean_reference(data, mean_reference)
        means = baselines.ablation_means(model, data, chosen, over=reference, batch_size=batch_size)
    elif mean_reference is not None:
        raise InputError(f"ablated_faithfulness_curve: mean_reference={mean_reference!r} picks what "
                         "ablation='mean' averages over; the corrupt twin has no mean.")
    values = _metric_with_complement_replaced(model, data, kept, means, metric, batch_size)
    full, none = float(values[0]), float(values[1])
    gap = full - none
    return pd.DataFrame([
        {"k": k, "metric": float(values[2 + i]),
         "faithfulness": (float(values[2 + i]) - none) / gap if abs(gap) > 1e-12 else float("nan"),
         "metric_all": full, "metric_none": none, "ablation": ablation, "metric_name": metric}
        for i, k in enumerate(ks)
    ])


def top_k_kept(
    scores: ScoresLike, ks: Sequence[int] | None, layout: adapter.HeadLayout, function: str
) -> tuple[list[int], Bool[Tensor, "setting layer head"]]:
    """The faithfulness curves' head sets: every head, no head, then a method's top k for each k
    (ties to the earlier head, row-major); ``ks`` defaults to every k from 0 to all heads."""
    flat = flat_scores(scores)
    n_total = layout.n_layers * layout.n_heads
    if len(flat) != n_total:
        raise InputError(
            f"{function}: scores hold {len(flat)} heads, the model has {n_total} "
            f"({layout.n_layers} layers x {layout.n_heads} heads)."
        )
    ks = list(range(n_total + 1)) if ks is None else [int(k) for k in ks]
    for k in ks:
        if not 0 <= k <= n_total:
            raise InputError(f"{function}: every k must be within [0, {n_total}], got {k}.")
    order = torch.as_tensor(np.argsort(-flat, kind="stable").copy(), dtype=torch.long)
    kept = torch.zeros(2 + len(ks), n_total, dtype=torch.bool)
    kept[0] = True
    for i, k in enumerate(ks):
        kept[2 + i, order[:k]] = True
    return ks, kept.reshape(-1, layout.n_layers, layout.n_heads)


def _metric_with_complement_replaced(
    model: TransformerLensModel,
    data: GateData,
    kept: Bool[Tensor, "setting layer head"],
    means: list[Float[Tensor, "pos head d_head"]] | list[Float[Tensor, "example pos head d_head"]] | None,
    metric: FaithfulnessMetric,
    batch_size: int,
) -> Float[Tensor, " setting"]:
    """Mean metric under each kept set, every other head's ``hook_z`` replaced by ``means`` (one for all
    examples, or each example's own row) or, when ``means`` is None, by the corrupt twin's. Several
    settings share a pass as replicas of the batch (``batch_size`` bounds examples x settings), each
    replica with its own replace hooks."""
    layout = adapter.require_model(model)
    device = adapter.model_device(model)
    examples_per_pass = min(len(data), batch_size)
    settings_per_pass = max(1, batch_size // examples_per_pass)
    totals = torch.zeros(len(kept))
    start = 0
    with adapter.frozen(model), torch.no_grad():
        for batch, tokens, _ in on_device(data, examples_per_pass, device):
            n = len(batch)
            rows = slice(start, start + n)
            start += n
            measure = (target_logprob_metric(batch) if metric == "logprob"
                       else logit_diff_metric(batch, batch.corrupt))
            if means is None:
                record_hooks, per_example = interventions.record(range(layout.n_layers))
                with model.hooks(fwd_hooks=record_hooks):
                    model(batch.corrupt.tokens.to(device))
            else:
                per_example = {layer: mean[rows] for layer, mean in enumerate(means) if mean.ndim == 4}
            for first in range(0, len(kept), settings_per_pass):
                chunk = kept[first : first + settings_per_pass]
                replicas = len(chunk)
                value = [per_example[layer].repeat(replicas, 1, 1, 1) if layer in per_example
                         else means[layer] for layer in range(layout.n_layers)]
                hooks = [interventions.replace(layer, value[layer], heads=~heads,
                                               rows=slice(s * n, (s + 1) * n))
                         for s, setting in enumerate(chunk) for layer, heads in enumerate(setting)
                         if not heads.all()]
                with model.hooks(fwd_hooks=hooks):
                    logits = model(tokens.repeat(replicas, 1))
                for s in range(replicas):
                    totals[first + s] += float(measure(logits[s * n : (s + 1) * n])) * n
    return totals / len(data)


# ------------------------------------------------------------------------------ CHG as a method
def chg_head_scores(result: CHGResult, reduce: SeedReduce = "max") -> HeadScores:
    """CHG facilitation (``G-``) reduced over seeds: ``max`` (a head some seed needs) or ``mean``.

    ``details["role_labels"]`` keeps CHG's own ``[seed, layer, head]`` role names (threshold 0.5).
    The cost is what the fit recorded: three stages of ``steps`` updates of ``batch_size`` examples,
    each repeated once per seed.
    """
    if not isinstance(result, CHGResult):
        raise InputError(f"result: expected a CHGResult, got {type(result).__name__}.")
    if reduce not in ("max", "mean"):
        raise InputError(f"chg_head_scores: reduce must be 'max' or 'mean', got {reduce!r}.")
    scores = checks.reduce_seeds(result.facilitating, reduce)
    passes = result.example_passes()
    return HeadScores(scores.detach().float().cpu(), f"chg_{reduce}", passes, passes,
                      float(result.provenance.get("seconds", 0.0)), signed=False,
                      details={"n_seeds": result.n_seeds, "reduce": reduce,
                               "role_labels": result.role_labels()})


def chg_head_scores_both(result: CHGResult) -> list[HeadScores]:
    """CHG ranked both ways, ``chg_max`` then ``chg_mean``: a head one seed needs can rank high by max
    and low by mean (seeds that found another circuit), and a comparison should show both readings."""
    return [chg_head_scores(result, reduce) for reduce in SEED_REDUCTIONS]


def chg_budget_label(result: CHGResult) -> str:
    """The fit's budget in the words the tables use: ``updates x batch, seeds``."""
    seeds = f"{result.n_seeds} seed" + ("s" if result.n_seeds != 1 else "")
    return f"{result.config.get('steps')} x {result.config.get('batch_size')}, {seeds}"


def fitted_chg_scores(results: Sequence[CHGResult], data: GateData) -> list[HeadScores]:
    """CHG read from fits already made on ``data`` (e.g. a long reference fit), max and mean over
    seeds, each named by its budget; the cost is what each fit recorded.

    A fit made on other data is refused: its roles would be scored against the wrong prompts.
    """
    scored = []
    fingerprint = data.fingerprint()
    for result in results:
        made_on = result.provenance.get("data_fingerprint")
        if made_on != fingerprint:
            raise InputError(
                f"a CHG fit ({chg_budget_label(result)}) was made on other data (fingerprint {made_on}) "
                f"than this benchmark's ({fingerprint}): fit it on the same task, n and seed."
            )
        for item in chg_head_scores_both(result):
            item.method = f"{item.method} ({chg_budget_label(result)})" if len(results) > 1 else item.method
            scored.append(item)
    return scored


def run_chg(
    model: TransformerLensModel, data: GateData, config: CHGConfig | None = None
) -> tuple[list[HeadScores], CHGResult]:
    """Fit CHG once and read it both ways (max and mean over seeds); the fit is returned too."""
    config = config or CHGConfig(n_seeds=4, steps=150, batch_size=32, progress=False)
    started = time.time()
    result = fit_chg(model, data, config)
    seconds = time.time() - started
    scored = chg_head_scores_both(result)
    for item in scored:
        item.seconds = seconds
    return scored, result


# ------------------------------------------------------------------------------ all methods at once
@dataclass
class MethodSettings:
    """Sizes of every method in :func:`run_methods`, small enough for a CPU by default."""

    batch_size: int = 32
    subnetwork_steps: int = 300
    subnetwork_l0_weight: float = 1.0
    subnetwork_l0_weights: tuple[float, ...] = baselines.SP_L0_WEIGHTS
    """Sparsity weights of SP's sweep (``subnetwork_probing_sweep``: KL, a run per weight, ROC over them)."""
    subnetwork_sweep_steps: int = 1000
    eap_ig_steps: int = baselines.EAP_IG_STEPS
    acdc_tau: float = acdc.DEFAULT_TAU
    acdc_taus: tuple[float, ...] = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
    """Thresholds of ACDC's sweep (its ROC curve); the run at ``acdc_tau`` gives the per-head scores."""
    acdc_ablation: acdc.AcdcAblation = "corrupt"
    acdc_distance: acdc.AcdcDistance = "kl"
    acdc_checkpoint: str | None = None
    """File where ACDC keeps what it measured, so a stopped sweep continues (``compare_methods`` with a
    ``cache_dir`` puts one beside the cache); not part of the cache key."""
    chg: CHGConfig = field(default_factory=lambda: CHGConfig(n_seeds=4, steps=150, batch_size=32,
                                                             progress=False))
    chg_fits: tuple[CHGResult, ...] = ()
    """Fits already made on the benchmark's fit data: when given, CHG reads these instead of fitting."""
    random_seed: int = 0


MethodFn = Callable[[Any, GateData, MethodSettings], list[HeadScores]]


def _single(fn: Callable[..., HeadScores], **kwargs: Any) -> MethodFn:
    def run(model: TransformerLensModel, data: GateData, settings: MethodSettings) -> list[HeadScores]:
        return [fn(model, data, **kwargs, batch_size=settings.batch_size)]

    return run


METHODS: dict[str, tuple[MethodFn, bool | Callable[[MethodSettings], bool]]] = {
    "chg": (lambda model, data, settings: fitted_chg_scores(settings.chg_fits, data) if settings.chg_fits
            else run_chg(model, data, settings.chg)[0], False),
    "hisp": (_single(baselines.gradient_importance), False),
    "hisp_raw": (_single(baselines.gradient_importance, normalize=False), False),
    "ablation_zero": (_single(baselines.ablation_scores, kind="zero"), False),
    "ablation_mean": (_single(baselines.ablation_scores, kind="mean"), False),
    "activation_patching_denoise": (_single(baselines.activation_patching, direction="denoise"), True),
    "activation_patching_noise": (_single(baselines.activation_patching, direction="noise"), True),
    "attribution_patching": (_single(baselines.attribution_patching), True),
    "eap_clean": (_single(baselines.attribution_patching, endpoint="clean"), True),
    "eap_ig": (lambda model, data, settings: [baselines.eap_ig(
        model, data, steps=settings.eap_ig_steps, batch_size=settings.batch_size)], True),
    "acdc": (lambda model, data, settings: [acdc.acdc(
        model, data, tau=settings.acdc_tau, taus=settings.acdc_taus, ablation=settings.acdc_ablation,
        distance=settings.acdc_distance, batch_size=settings.batch_size,
        checkpoint=settings.acdc_checkpoint)],
        lambda settings: settings.acdc_ablation == "corrupt"),
    "subnetwork_probing": (
        lambda model, data, settings: [baselines.subnetwork_probing(
            model, data, steps=settings.subnetwork_steps, l0_weight=settings.subnetwork_l0_weight,
            batch_size=settings.batch_size, seed=settings.random_seed)],
        False,
    ),
    "subnetwork_probing_sweep": (
        lambda model, data, settings: [baselines.subnetwork_probing_sweep(
            model, data, l0_weights=settings.subnetwork_l0_weights, steps=settings.subnetwork_sweep_steps,
            batch_size=settings.batch_size, seed=settings.random_seed)],
        False,
    ),
    "random": (lambda model, data, settings: [baselines.random_scores(model, settings.random_seed)], False),
}
"""Name -> (runner, needs a corrupt twin: a bool or a rule on the settings). A runner may return
several readings (CHG: max and mean). ``hisp``: Michel et al.'s head importance, as ACDC names it,
normalised per layer as published (``hisp_raw``: without). ``attribution_patching`` takes its gradient at
the corrupt run (Nanda), ``eap_clean`` at the clean run (Syed et al.'s EAP); ``eap_ig`` is Hanna et al.'s
right Riemann sum."""
METHOD_VERSIONS = {"hisp": 2, "eap_ig": 2, "ablation_mean": 2, "activation_patching_denoise": 2,
                   "activation_patching_noise": 2}
"""Bumped when a method's published form replaces an earlier one under the same name (``hisp`` gained
Michel et al.'s per-layer normalisation, ``eap_ig`` Hanna et al.'s k = 1..m points, ``ablation_mean``
the mean over each example's own template), or its scores gain what the tables read (activation
patching's per-example rows), so scores cached by the earlier form are not read back as the new one.
Methods not listed are at version 1."""
METHOD_ALIASES = {"gradient_importance": "hisp"}
"""Older names still accepted by :func:`run_methods`."""


OPT_IN_METHODS = ("subnetwork_probing_sweep",)
"""Run only when named: SP's sweep trains one mask set per sparsity weight (7 x 1000 updates by default)."""


def method_names(names: Sequence[str] | None = None) -> list[str]:
    """The methods to run (all but :data:`OPT_IN_METHODS` by default), old names mapped to current ones;
    unknown names are refused before anything runs."""
    if names is None:
        names = [name for name in METHODS if name not in OPT_IN_METHODS]
    else:
        names = [METHOD_ALIASES.get(name, name) for name in names]
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise InputError(f"run_methods: unknown method(s) {unknown}; choose from {list(METHODS)}.")
    return names


def run_methods(
    model: TransformerLensModel,
    data: GateData,
    names: Sequence[str] | None = None,
    settings: MethodSettings | None = None,
) -> tuple[list[HeadScores], dict[str, str]]:
    """Run the named methods (all by default); those that need ``data.corrupt`` are skipped without one.

    Returns the scores and, per skipped method, why.
    """
    names = method_names(names)
    settings = settings or MethodSettings()
    scored: list[HeadScores] = []
    skipped: dict[str, str] = {}
    for name in names:
        runner, needs_twin = METHODS[name]
        if needs_twin is not False and data.corrupt is None and (needs_twin is True or needs_twin(settings)):
            skipped[name] = "the data has no corrupt twin"
            continue
        scored.extend(runner(model, data, settings))
    return scored, skipped


# ------------------------------------------------------------------------------ benchmarks -> a table
REAL_INDUCTION_THRESHOLD = 0.4
"""On a real model, a head whose mean attention on the induction position exceeds this is a reference head."""
REAL_K_SHARE = 0.1
"""Without reference roles, faithfulness is measured at this share of all heads."""


@dataclass
class Benchmark:
    """One model and task to score heads on: scores come from ``fit_data``, faithfulness from ``eval_data``.

    ``roles`` is a ``[layer, head]`` array of role names when the truth is known (planted circuits, a
    trained model, attention-pattern references), else None; ``k`` is the head count for precision
    and faithfulness at k.
    """

    name: str
    model: TransformerLensModel
    fit_data: GateData
    eval_data: GateData
    roles: np.ndarray | None
    k: int
    settings: MethodSettings
    note: str = ""


def known_role_benchmarks(n: int = 64, include_trained: bool = True) -> list[Benchmark]:
    """The planted circuits of :mod:`chg_tlens.testbeds.benchmark_models`, the 32-head composite model
    that separates methods (:mod:`chg_tlens.testbeds.composite`), and a model trained here."""
    from chg_tlens.testbeds import benchmark_models
    from chg_tlens.testbeds.composite import composite_circuit

    circuits = [*benchmark_models.all_benchmarks(include_trained=False), composite_circuit()]
    if include_trained:
        circuits.append(benchmark_models.trained_induction())
    suite = []
    for circuit in circuits:
        roles = circuit.true_roles()
        suite.append(Benchmark(circuit.name, circuit.model, circuit.data(n, 0), circuit.data(n, 1), roles,
                               int((roles == "facilitating").sum()), MethodSettings(), circuit.description))
    return suite


def tracr_benchmarks(n: int = 64) -> list[Benchmark]:
    """Every compiled RASP program of :mod:`chg_tlens.testbeds.tracr_models`: heads the compiler wrote
    are facilitating, its zero padding irrelevant. ACDC runs as its paper ran it on tracr (zero ablation,
    L2 on the outputs). Needs the ``tracr`` extra."""
    from chg_tlens.testbeds import tracr_models

    suite = []
    for name in sorted(tracr_models.RECIPES):
        program = tracr_models.load_program(name)
        roles = program.true_roles()
        settings = MethodSettings(acdc_ablation="zero", acdc_distance="l2")
        suite.append(Benchmark(f"tracr/{name}", program.model, program.data(n, 0), program.data(n, 1), roles,
                               int((roles == "facilitating").sum()), settings, program.description))
    return suite


def task_benchmark(model: TransformerLensModel, model_name: str, task: str, n: int = 8, steps: int = 20,
                   n_seeds: int = 2, seed: int = 0, chg_batch: int | None = None,
                   chg_fits: Sequence[CHGResult] = ()) -> Benchmark:
    """A built-in task on a real model; ``induction`` and ``ioi`` get reference roles from attention
    patterns (induction heads; name movers, signed by their direct effect, :mod:`.movers`).

    CHG fits ``n_seeds`` x ``steps`` updates per stage of ``chg_batch`` examples (default: all ``n``),
    or, with ``chg_fits``, reads fits already made on this task's data (same ``n`` and ``seed``).
    """
    from chg_tlens.tasks import make_task

    layout = adapter.require_model(model)
    settings = MethodSettings(batch_size=n, subnetwork_steps=steps, chg_fits=tuple(chg_fits),
                              chg=CHGConfig(n_seeds=n_seeds, steps=steps, batch_size=chg_batch or n,
                                            progress=False))
    options = {"seq_len": 8} if task == "induction" else {}
    fit_data = make_task(task, model, n=n, seed=seed, **options)
    eval_data = make_task(task, model, n=n, seed=seed + 1, **options)
    roles, note = None, "no reference roles"
    k = max(1, round(REAL_K_SHARE * layout.n_layers * layout.n_heads))
    if task == "induction":
        roles = induction_reference(model, fit_data)
        note = f"reference: attention-pattern induction score > {REAL_INDUCTION_THRESHOLD}"
    elif task == "ioi":
        roles, note = ioi_reference(model, fit_data)
    if roles is not None:
        k = max(1, int((roles == "facilitating").sum()))
    return Benchmark(f"{model_name}/{task}", model, fit_data, eval_data, roles, k, settings, note)


def ioi_reference(model: TransformerLensModel, data: GateData) -> tuple[np.ndarray | None, str]:
    """Name movers (:func:`.movers.mover_roles` against the subject, each prompt's distractor), and a
    note that says how they were found; no roles when no head qualifies."""
    names = data.meta["distractors"]  # one token each: ioi keeps only single-token names
    subject = torch.tensor([adapter.encode(model, name, prepend_bos=False)[0] for name in names])
    roles, _ = mover_roles(model, data, subject)
    found = {role: int((roles == role).sum()) for role in ("facilitating", "interfering")}
    rule = (f"attention from the end to the indirect object > {MOVER_ATTENTION} and a direct effect on "
            f"logit(IO) - logit(S) of at least {MOVER_EFFECT_SHARE:.0%} of the whole residual's")
    if found["facilitating"] == 0:
        return None, f"no reference roles: no head is a name mover ({rule})"
    return roles, (f"reference: {found['facilitating']} name movers ({rule}, positive); "
                   f"{found['interfering']} negative name movers are interfering")


def induction_reference(model: TransformerLensModel, data: GateData) -> np.ndarray:
    """Heads whose attention goes to the token after the current token's earlier occurrence."""
    from chg_tlens.testbeds import benchmark_models

    seq_len = int(data.meta["options"]["seq_len"])
    n = len(data)
    scores = benchmark_models.attention_diagnostics(
        model, data.tokens, torch.full((n,), seq_len), torch.ones(n, dtype=torch.long))
    flagged = scores["induction"] > REAL_INDUCTION_THRESHOLD
    return np.where(flagged.numpy(), "facilitating", "irrelevant").astype(object)


def compare_methods(
    suite: Iterable[Benchmark], methods: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None, cache_dir: str | Path | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Every named method on every benchmark: one row per (benchmark, method), plus per-benchmark details
    (note, k, skipped methods, raw scores, seconds).

    With ``cache_dir`` each method's scores are saved as soon as they exist and read back by a later
    call with the same benchmark, data and settings, so a long comparison that was stopped continues
    where it stopped (methods on a real model take minutes to an hour each on a CPU).
    """
    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {}
    names = method_names(methods)  # a bad name fails now, not after hours of the methods before it
    for benchmark in suite:
        started = time.time()
        scored, skipped = [], {}
        cache = None if cache_dir is None else _cache_folder(Path(cache_dir), benchmark)
        for name in names:
            cached = None if cache is None else cache(name)
            if cached is not None and cached.is_file():
                scored.extend(torch.load(cached, weights_only=False))
                continue
            began = time.time()
            settings = benchmark.settings
            if cached is not None and name == "acdc" and settings.acdc_checkpoint is None:
                settings = replace(settings, acdc_checkpoint=str(cached.with_suffix(".checkpoint.json")))
            new, missed = run_methods(benchmark.model, benchmark.fit_data, [name], settings)
            scored.extend(new)
            skipped.update(missed)
            if cached is not None and new:
                cached.parent.mkdir(parents=True, exist_ok=True)
                torch.save(new, cached.with_suffix(".partial"))
                cached.with_suffix(".partial").replace(cached)  # never a half-written cache file
            if log is not None and new:
                log(f"[{benchmark.name}] {name}: {time.time() - began:.1f} s")
        rows.extend(evaluate_benchmark(benchmark, scored))
        details[benchmark.name] = {
            "note": benchmark.note, "k": benchmark.k, "skipped": skipped,
            "roles": None if benchmark.roles is None else benchmark.roles.tolist(),
            "scores": {s.method: s.scores.tolist() for s in scored},
            "seconds": round(time.time() - started, 1),
        }
        if log is not None:
            log(f"[{benchmark.name}] {len(scored)} scores in {time.time() - started:.1f} s")
    return pd.DataFrame(rows), details


def _cache_folder(folder: Path, benchmark: Benchmark) -> Callable[[str], Path]:
    """Where each method's scores on one benchmark are kept: named by everything they depend on (the
    benchmark, its fit data, the method's settings, any saved CHG fits it reads)."""
    settings = {item.name: getattr(benchmark.settings, item.name) for item in fields(benchmark.settings)
                if item.name not in ("chg_fits", "acdc_checkpoint")}  # by repr: dataclasses and tuples alike
    fits = [(fit.provenance.get("data_fingerprint"), fit.config, fit.provenance.get("seconds"))
            for fit in benchmark.settings.chg_fits]
    fingerprint = benchmark.fit_data.fingerprint()  # once per benchmark, not once per method
    slug = "".join(c if c.isalnum() else "_" for c in benchmark.name)

    def cache_file(method: str) -> Path:
        version = METHOD_VERSIONS.get(method, 1)
        key = [benchmark.name, fingerprint, method, settings, fits] + ([version] if version > 1 else [])
        key = json.dumps(key, sort_keys=True, default=str)
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return folder / slug / f"{method}-{digest}.pt"

    return cache_file


AUC_LEVEL = 0.9
"""Coverage of the AUC intervals ``evaluate_benchmark`` reports."""


def auc_interval(item: HeadScores, positives: np.ndarray, n_boot: int = 1000) -> dict[str, float | None]:
    """``auc_low`` / ``auc_high``: the AUC's percentile interval over bootstrap resamples of the prompts,
    for methods that keep per-example rows (``baselines.PER_EXAMPLE``); None for the others (a CHG fit,
    ACDC, ablations), whose prompt noise needs refits (``chg_tlens.error_bars``) rather than resampling."""
    if item.details.get(baselines.PER_EXAMPLE) is None:
        return {"auc_low": None, "auc_high": None}
    interval = statistics.bootstrap_auc(item, positives, n_boot=n_boot, level=AUC_LEVEL)
    return {"auc_low": interval.low, "auc_high": interval.high}


def evaluate_benchmark(benchmark: Benchmark, scored: list[HeadScores]) -> list[dict[str, Any]]:
    """One row per method: truth metrics (the AUC with its interval over prompts where the method keeps
    per-example rows), faithfulness at k, agreement with CHG, cost."""
    reference = next((s for s in scored if s.method.startswith("chg_max")), None)
    rows = []
    for item in scored:
        curve = faithfulness_curve(benchmark.model, benchmark.eval_data, item, ks=[benchmark.k])
        row: dict[str, Any] = {
            "benchmark": benchmark.name, "method": item.method, "k": benchmark.k,
            "auc": None, "auc_low": None, "auc_high": None, "auc_sweep": None, "precision_at_k": None,
            "faithfulness_at_k": float(curve["faithfulness"].iloc[0]),
            "logprob_at_k": float(curve["logprob"].iloc[0]),
            "logprob_all": float(curve["logprob_all"].iloc[0]),
            "spearman_vs_chg": None if reference is None else spearman(item, reference),
            **item.cost(),
        }
        roles = benchmark.roles
        if roles is not None and 0 < (roles == "facilitating").sum() < roles.size:
            truth = truth_metrics(item, roles, k=benchmark.k)
            row["auc"], row["precision_at_k"] = truth["auc"], truth["precision_at_k"]
            row.update(auc_interval(item, roles == "facilitating"))
            if item.details.get("sweep"):  # ACDC's tau sweep, SP's lambda sweep: their ROC, as published
                kept = [point["kept"] for point in item.details["sweep"]]
                if "kept" in item.details:
                    kept.insert(0, item.details["kept"])
                row["auc_sweep"] = sweep_roc(kept, roles == "facilitating")[2]
        labels = item.details.get("role_labels")
        if item.method.startswith("chg_max") and labels is not None and roles is not None:
            row["chg_role_accuracy"] = float(np.mean(labels == roles[None]))
            needed = roles == "facilitating"
            row["chg_facilitating_found_every_seed"] = float(np.mean(
                np.all(labels[:, needed] == "facilitating", axis=0))) if needed.any() else None
        rows.append(row)
    return rows
