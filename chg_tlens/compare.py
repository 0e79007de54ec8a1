"""Comparing head scores: method against method, method against known roles, and by what they keep.

    spearman, top_k_overlap        do two methods rank heads alike?
    roc_auc, precision_at_k        does a method find the heads known to matter?
    faithfulness_curve             how much of the task do a method's top-k heads carry on their own?
    chg_head_scores, run_chg       CHG facilitation as one more ``HeadScores``
    run_methods                    every method of ``chg_tlens.baselines`` plus CHG on one model and task
    Benchmark, compare_methods     many methods on many benchmarks -> one table (+ Markdown)

The rank statistics are written out here in numpy (average ranks for ties), so they have no
dependency beyond numpy and are checked on hand-made examples in the tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool
from torch import Tensor

from chg_tlens import adapter, baselines
from chg_tlens.baselines import HeadScores
from chg_tlens.data import GateData
from chg_tlens.fit import CHGConfig, fit_chg
from chg_tlens.result import CHGResult
from chg_tlens.validate import evaluate_gates

SeedReduce = Literal["max", "mean"]
ScoresLike = HeadScores | Tensor | np.ndarray


# ------------------------------------------------------------------------------ rank statistics
def average_ranks(values: ScoresLike) -> np.ndarray:
    """Ranks 1..n of the flattened values, ties sharing the mean of the ranks they span."""
    flat = _flat(values)
    order = np.argsort(flat, kind="stable")
    sorted_values = flat[order]
    ranks = np.empty(len(flat))
    start = 0
    while start < len(flat):
        stop = start
        while stop + 1 < len(flat) and sorted_values[stop + 1] == sorted_values[start]:
            stop += 1
        ranks[order[start : stop + 1]] = (start + stop) / 2 + 1
        start = stop + 1
    return ranks


def spearman(a: ScoresLike, b: ScoresLike) -> float:
    """Spearman rank correlation of two score tables (Pearson on average ranks); NaN if one is flat."""
    ra, rb = average_ranks(a), average_ranks(b)
    if len(ra) != len(rb):
        raise ValueError(f"spearman: the score tables hold {len(ra)} and {len(rb)} heads.")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def top_k_heads(scores: ScoresLike, k: int) -> list[tuple[int, int]]:
    """The ``k`` highest-scoring ``(layer, head)``; ties go to the earlier head (row-major)."""
    shape = _shape(scores)
    flat = _flat(scores)
    _check_k(k, len(flat))
    order = np.argsort(-flat, kind="stable")[:k]
    return [(int(i) // shape[1], int(i) % shape[1]) for i in order]


def top_k_overlap(a: ScoresLike, b: ScoresLike, k: int) -> float:
    """Share of the top ``k`` heads two methods have in common (0 = none, 1 = the same set)."""
    return len(set(top_k_heads(a, k)) & set(top_k_heads(b, k))) / k


def roc_auc(scores: ScoresLike, positives: Bool[Tensor, "layer head"] | np.ndarray) -> float:
    """Probability that a random positive head outscores a random negative one (ties count half).

    The Mann-Whitney form: ``(sum of positive ranks - P(P+1)/2) / (P N)`` with average ranks.
    """
    flat = _flat(scores)
    labels = _labels(positives, len(flat), "roc_auc")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"roc_auc: needs at least one positive and one negative head, got {n_pos} and {n_neg}."
        )
    ranks = average_ranks(flat)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_at_k(
    scores: ScoresLike, positives: Bool[Tensor, "layer head"] | np.ndarray, k: int | None = None
) -> float:
    """Share of positives among the ``k`` top heads (``k`` = number of positives by default).

    Ties at the cut share the remaining places in proportion, so the value does not depend on
    which of several equal heads the sort happens to put first.
    """
    flat = _flat(scores)
    labels = _labels(positives, len(flat), "precision_at_k")
    if k is None:
        k = int(labels.sum())
    _check_k(k, len(flat))
    cut = np.sort(flat)[::-1][k - 1]
    above = flat > cut
    tied = flat == cut
    places_left = k - int(above.sum())
    hits = labels[above].sum() + places_left * labels[tied].mean()
    return float(hits / k)


# ------------------------------------------------------------------------------ faithfulness
def faithfulness_curve(
    model: Any,
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
    flat = _flat(scores)
    n_total = layout.n_layers * layout.n_heads
    if len(flat) != n_total:
        raise ValueError(
            f"faithfulness_curve: scores hold {len(flat)} heads, the model has {n_total} "
            f"({layout.n_layers} layers x {layout.n_heads} heads)."
        )
    ks = list(range(n_total + 1)) if ks is None else [int(k) for k in ks]
    for k in ks:
        if not 0 <= k <= n_total:
            raise ValueError(f"faithfulness_curve: every k must be within [0, {n_total}], got {k}.")
    order = np.argsort(-flat, kind="stable")
    settings = [torch.ones(n_total), torch.zeros(n_total)]
    for k in ks:
        keep = torch.zeros(n_total)
        keep[torch.as_tensor(order[:k].copy(), dtype=torch.long)] = 1.0
        settings.append(keep)
    values = torch.stack(settings).reshape(-1, layout.n_layers, layout.n_heads)
    logprob, accuracy = evaluate_gates(model, data, values, batch_size)
    full, none = float(logprob[0]), float(logprob[1])
    gap = full - none
    rows = []
    for i, k in enumerate(ks):
        value = float(logprob[2 + i])
        rows.append({"k": k, "logprob": value, "accuracy": float(accuracy[2 + i]),
                     "faithfulness": (value - none) / gap if abs(gap) > 1e-12 else float("nan"),
                     "logprob_all": full, "logprob_none": none})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------ against the truth
def truth_metrics(
    scores: ScoresLike, roles: np.ndarray, positive_role: str = "facilitating", k: int | None = None
) -> dict[str, float]:
    """ROC AUC and precision at ``k`` of ``scores`` for the heads whose true role is ``positive_role``."""
    roles = np.asarray(roles, dtype=object)
    positives = roles == positive_role
    return {
        "auc": roc_auc(scores, positives),
        "precision_at_k": precision_at_k(scores, positives, k),
        "n_positive": int(positives.sum()),
    }


def method_agreement(methods: Sequence[HeadScores], k: int) -> pd.DataFrame:
    """Every pair of methods: Spearman correlation and top-k overlap, one row per pair."""
    rows = []
    for i, first in enumerate(methods):
        for second in methods[i + 1 :]:
            rows.append({"method_a": first.method, "method_b": second.method,
                         "spearman": spearman(first, second),
                         "top_k_overlap": top_k_overlap(first, second, k), "k": k})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------ CHG as a method
def chg_head_scores(result: CHGResult, reduce: SeedReduce = "max") -> HeadScores:
    """CHG facilitation (``G-``) reduced over seeds: ``max`` (a head some seed needs) or ``mean``.

    ``details["role_labels"]`` keeps CHG's own ``[seed, layer, head]`` role names (threshold 0.5).
    The cost is what the fit recorded: three stages of ``steps`` updates of ``batch_size`` examples,
    each repeated once per seed.
    """
    if not isinstance(result, CHGResult):
        raise TypeError(f"result: expected a CHGResult, got {type(result).__name__}.")
    if reduce == "max":
        scores = result.facilitating.max(dim=0).values
    elif reduce == "mean":
        scores = result.facilitating.mean(dim=0)
    else:
        raise ValueError(f"chg_head_scores: reduce must be 'max' or 'mean', got {reduce!r}.")
    config = result.config
    passes = 3 * int(config.get("steps", 0)) * int(config.get("batch_size", 0)) * result.n_seeds
    return HeadScores(scores.detach().float().cpu(), f"chg_{reduce}", passes, passes,
                      float(result.provenance.get("seconds", 0.0)), signed=False,
                      details={"n_seeds": result.n_seeds, "reduce": reduce,
                               "role_labels": result.role_labels()})


def run_chg(
    model: Any, data: GateData, config: CHGConfig | None = None
) -> tuple[list[HeadScores], CHGResult]:
    """Fit CHG once and read it both ways (max and mean over seeds); the fit is returned too."""
    config = config or CHGConfig(n_seeds=4, steps=150, batch_size=32, progress=False)
    started = time.time()
    result = fit_chg(model, data, config)
    seconds = time.time() - started
    scored = [chg_head_scores(result, reduce) for reduce in ("max", "mean")]
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
    chg: CHGConfig = field(default_factory=lambda: CHGConfig(n_seeds=4, steps=150, batch_size=32,
                                                             progress=False))
    random_seed: int = 0


MethodFn = Callable[[Any, GateData, MethodSettings], list[HeadScores]]


def _single(fn: Callable[..., HeadScores], **kwargs: Any) -> MethodFn:
    def run(model: Any, data: GateData, settings: MethodSettings) -> list[HeadScores]:
        return [fn(model, data, **kwargs, batch_size=settings.batch_size)]

    return run


METHODS: dict[str, tuple[MethodFn, bool]] = {
    "chg": (lambda model, data, settings: run_chg(model, data, settings.chg)[0], False),
    "gradient_importance": (_single(baselines.gradient_importance), False),
    "ablation_zero": (_single(baselines.ablation_scores, kind="zero"), False),
    "ablation_mean": (_single(baselines.ablation_scores, kind="mean"), False),
    "activation_patching_denoise": (_single(baselines.activation_patching, direction="denoise"), True),
    "activation_patching_noise": (_single(baselines.activation_patching, direction="noise"), True),
    "attribution_patching": (_single(baselines.attribution_patching), True),
    "subnetwork_probing": (
        lambda model, data, settings: [baselines.subnetwork_probing(
            model, data, steps=settings.subnetwork_steps, l0_weight=settings.subnetwork_l0_weight,
            batch_size=settings.batch_size, seed=settings.random_seed)],
        False,
    ),
    "random": (lambda model, data, settings: [baselines.random_scores(model, settings.random_seed)], False),
}
"""Name -> (runner, needs a corrupt twin). A runner may return several readings (CHG: max and mean)."""


def run_methods(
    model: Any,
    data: GateData,
    names: Sequence[str] | None = None,
    settings: MethodSettings | None = None,
) -> tuple[list[HeadScores], dict[str, str]]:
    """Run the named methods (all by default); those that need ``data.corrupt`` are skipped without one.

    Returns the scores and, per skipped method, why.
    """
    names = list(METHODS) if names is None else list(names)
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise ValueError(f"run_methods: unknown method(s) {unknown}; choose from {list(METHODS)}.")
    settings = settings or MethodSettings()
    scored: list[HeadScores] = []
    skipped: dict[str, str] = {}
    for name in names:
        runner, needs_twin = METHODS[name]
        if needs_twin and data.corrupt is None:
            skipped[name] = "the data has no corrupt twin"
            continue
        scored.extend(runner(model, data, settings))
    return scored, skipped


# ------------------------------------------------------------------------------ pieces
def _flat(values: ScoresLike) -> np.ndarray:
    if isinstance(values, HeadScores):
        values = values.scores
    if isinstance(values, Tensor):
        values = values.detach().float().cpu().numpy()
    flat = np.asarray(values, dtype=float).ravel()
    if not np.isfinite(flat).all():
        raise ValueError("scores must be finite (found NaN or inf).")
    return flat


def _shape(values: ScoresLike) -> tuple[int, int]:
    if isinstance(values, HeadScores):
        values = values.scores
    shape = tuple(np.shape(values))
    if len(shape) != 2:
        raise ValueError(f"scores must be [layer, head], got shape {list(shape)}.")
    return shape[0], shape[1]


def _labels(positives: Any, n: int, function: str) -> np.ndarray:
    if isinstance(positives, Tensor):
        positives = positives.detach().cpu().numpy()
    labels = np.asarray(positives).ravel()
    if labels.dtype != bool:
        raise TypeError(f"{function}: positives must be a boolean [layer, head] mask, got {labels.dtype}.")
    if len(labels) != n:
        raise ValueError(f"{function}: positives cover {len(labels)} heads, the scores {n}.")
    return labels


def _check_k(k: Any, n: int) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer within [1, {n}], got {k!r}.")




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
    model: Any
    fit_data: GateData
    eval_data: GateData
    roles: np.ndarray | None
    k: int
    settings: MethodSettings
    note: str = ""


def known_role_benchmarks(n: int = 64, include_trained: bool = True) -> list[Benchmark]:
    """The planted circuits (and a model trained here) of :mod:`chg_tlens.benchmark_models`."""
    from chg_tlens import benchmark_models

    suite = []
    for circuit in benchmark_models.all_benchmarks(include_trained=include_trained):
        roles = circuit.true_roles()
        suite.append(Benchmark(circuit.name, circuit.model, circuit.data(n, 0), circuit.data(n, 1), roles,
                               int((roles == "facilitating").sum()), MethodSettings(), circuit.description))
    return suite


def task_benchmark(model: Any, model_name: str, task: str, n: int = 8, steps: int = 20,
                   n_seeds: int = 2, seed: int = 0) -> Benchmark:
    """A built-in task on a real model; only ``induction`` gets reference roles (attention patterns)."""
    from chg_tlens.tasks import make_task

    layout = adapter.require_model(model)
    settings = MethodSettings(batch_size=n, subnetwork_steps=steps,
                              chg=CHGConfig(n_seeds=n_seeds, steps=steps, batch_size=n, progress=False))
    options = {"seq_len": 8} if task == "induction" else {}
    fit_data = make_task(task, model, n=n, seed=seed, **options)
    eval_data = make_task(task, model, n=n, seed=seed + 1, **options)
    roles, note = None, "no reference roles"
    k = max(1, round(REAL_K_SHARE * layout.n_layers * layout.n_heads))
    if task == "induction":
        roles = induction_reference(model, fit_data)
        k = max(1, int((roles == "facilitating").sum()))
        note = f"reference: attention-pattern induction score > {REAL_INDUCTION_THRESHOLD}"
    return Benchmark(f"{model_name}/{task}", model, fit_data, eval_data, roles, k, settings, note)


def induction_reference(model: Any, data: GateData) -> np.ndarray:
    """Heads whose attention goes to the token after the current token's earlier occurrence."""
    from chg_tlens import benchmark_models

    seq_len = int(data.meta["options"]["seq_len"])
    n = len(data)
    scores = benchmark_models.attention_diagnostics(
        model, data.tokens, torch.full((n,), seq_len), torch.ones(n, dtype=torch.long))
    flagged = scores["induction"] > REAL_INDUCTION_THRESHOLD
    return np.where(flagged.numpy(), "facilitating", "irrelevant").astype(object)


def compare_methods(
    suite: Iterable[Benchmark], methods: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Every named method on every benchmark: one row per (benchmark, method), plus per-benchmark details
    (note, k, skipped methods, raw scores, seconds)."""
    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {}
    for benchmark in suite:
        started = time.time()
        scored, skipped = run_methods(benchmark.model, benchmark.fit_data, methods, benchmark.settings)
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


def evaluate_benchmark(benchmark: Benchmark, scored: list[HeadScores]) -> list[dict[str, Any]]:
    """One row per method: truth metrics, faithfulness at k, agreement with CHG, cost."""
    reference = next((s for s in scored if s.method == "chg_max"), None)
    rows = []
    for item in scored:
        curve = faithfulness_curve(benchmark.model, benchmark.eval_data, item, ks=[benchmark.k])
        row: dict[str, Any] = {
            "benchmark": benchmark.name, "method": item.method, "k": benchmark.k,
            "auc": None, "precision_at_k": None,
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
        labels = item.details.get("role_labels")
        if item.method == "chg_max" and labels is not None and roles is not None:
            row["chg_role_accuracy"] = float(np.mean(labels == roles[None]))
            needed = roles == "facilitating"
            row["chg_facilitating_found_every_seed"] = float(np.mean(
                np.all(labels[:, needed] == "facilitating", axis=0))) if needed.any() else None
        rows.append(row)
    return rows


COMPARISON_TABLES = (
    ("auc", "ROC AUC (facilitating heads)"),
    ("precision_at_k", "Precision at k"),
    ("faithfulness_at_k", "Faithfulness at k"),
    ("spearman_vs_chg", "Spearman correlation with CHG (max over seeds)"),
    ("chg_role_accuracy", "CHG's own role labels: share of heads labelled as the truth says "
     "(mean over seeds)"),
    ("chg_facilitating_found_every_seed", "CHG: share of truly facilitating heads labelled facilitating in "
     "every seed"),
    ("forward_passes", "Cost: example forward passes"),
    ("backward_passes", "Cost: example backward passes"),
    ("seconds", "Cost: seconds"),
)


def comparison_markdown(frame: pd.DataFrame, details: dict[str, Any]) -> str:
    """The :func:`compare_methods` table as Markdown: one method x benchmark table per metric."""
    lines = ["# Head-scoring methods on benchmarks with known roles", "",
             "Positives = heads whose true role is *facilitating*. AUC: chance 0.5, perfect 1. "
             "Faithfulness at k: mean target log-prob with only the method's top-k heads kept, "
             "scaled so 0 = no heads, 1 = all heads (above 1: the kept set beats the full model). "
             "k = number of true facilitating heads (10% of heads where no reference exists).", ""]
    for metric, title in COMPARISON_TABLES:
        if metric not in frame:
            continue
        table = frame.pivot_table(index="method", columns="benchmark", values=metric, aggfunc="first",
                                  sort=False, dropna=False)
        table = table.reindex(columns=list(details))
        if metric.startswith("chg_"):
            table = table.dropna(how="all")
        lines += [f"## {title}", "", _markdown_table(table, metric), ""]
    lines += ["## Benchmarks", ""]
    for name, info in details.items():
        skipped = ", ".join(f"{m} ({why})" for m, why in info["skipped"].items()) or "none"
        lines.append(f"- **{name}** (k = {info['k']}): {info['note']}. Skipped: {skipped}. "
                     f"{info['seconds']} s.")
    return "\n".join(lines) + "\n"


def _markdown_table(table: pd.DataFrame, metric: str) -> str:
    integer = metric.endswith("passes")
    header = "| method | " + " | ".join(str(c) for c in table.columns) + " |"
    rule = "|---|" + "---|" * len(table.columns)
    body = []
    for method, values in table.iterrows():
        cells = []
        for value in values:
            if value is None or (isinstance(value, float) and np.isnan(value)):
                cells.append("n/a")
            elif integer:
                cells.append(f"{int(value):,}")
            else:
                cells.append(f"{value:.3f}" if metric != "seconds" else f"{value:.1f}")
        body.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join([header, rule, *body])


def jsonable(value: Any) -> Any:
    """Tensors and arrays as lists, anything unknown as its string: for results files."""
    if isinstance(value, (Tensor, np.ndarray)):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return str(value)
