"""Circuits from CHG's heads: which node feeds which, through the receiver's query, key or value.

CHG says *which* heads a task needs; :func:`circuit` says how they are wired. Its nodes are the heads a
CHG result calls facilitating (or the top heads of any ``[layer, head]`` score map); its edges are path
patching effects (Wang et al., 2022) of every node on every later node, through each of the receiver's
three inputs separately, plus each node's direct effect on the logits. Every edge carries a bootstrap
interval over prompts and a flag saying whether it passes the threshold; :meth:`Circuit.ablate` keeps
only the circuit (nodes and edges) and measures how much of the task it keeps against random circuits
of its size. :mod:`chg_tlens.analysis.circuit_html` draws it.

An effect is in the metric's units and signed so that positive means *the edge helps the clean answer*:
``effect = metric(clean) - metric(the edge alone carries the counterfactual)``, averaged over prompts.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from chg_tlens.analysis import baselines, circuit_html
from chg_tlens.analysis.ablation import random_head_sets
from chg_tlens.analysis.baselines import HeadScores, MeanReference
from chg_tlens.analysis.patching import (
    PathPatchingRun,
    key_value_group,
    logit_diff_per_example,
    receiver_input_hooks,
    shares_key_values,
    target_logprob_per_example,
)
from chg_tlens.analysis.statistics import bootstrap
from chg_tlens.core import checks, interventions
from chg_tlens.core.checkpoint import atomic_write_bytes
from chg_tlens.core.data import GateData
from chg_tlens.core.provenance import provenance as run_provenance
from chg_tlens.core.result import CHGResult
from chg_tlens.core.result_files import ResultFileError
from chg_tlens.errors import InputError
from chg_tlens.models import adapter
from chg_tlens.models.protocol import TransformerLensModel

Head = tuple[int, int]
Kind = Literal["q", "k", "v"]
KINDS: tuple[Kind, ...] = ("q", "k", "v")
LOGITS = "logits"
"""The receiver (and input) of a node's direct edge to the output."""
CIRCUIT_FILE = "circuit.json"
CIRCUIT_HTML = "circuit.html"
FORMAT = "chg_tlens.Circuit"
FORMAT_VERSION = 1
BUILT_IN_METRICS = ("logprob", "logit_diff")
NodeSource = CHGResult | HeadScores | Float[Tensor, "layer head"] | np.ndarray | Sequence[Head]
"""What names the nodes: a CHG result (its facilitating heads), a score map ``[layer, head]`` (its top
heads), or the heads themselves."""
UserMetric = Callable[[Float[Tensor, "batch pos vocab"]], Tensor]
"""Logits to one value per example ``[batch]``, or to a scalar that is a mean over examples (as
``target_logprob_metric`` and ``logit_diff_metric`` return)."""


@dataclass(frozen=True)
class Edge:
    """One measured edge: ``sender`` -> ``receiver``'s ``input`` (``"logits"``: the direct path to the
    output), its mean effect over prompts with the bootstrap interval, and whether it passes the threshold."""

    sender: Head
    receiver: Head | str
    input: str
    effect: float
    low: float
    high: float
    kept: bool


@dataclass
class CircuitAblation:
    """The task metric with only the circuit kept (nodes and kept edges; everything else ablated), next
    to the full model, everything ablated, the circuit's nodes with all their edges, and random node sets
    of the same size with all their edges."""

    full: float
    nothing: float
    circuit: float
    nodes_only: float
    random: list[float]
    random_sets: list[list[Head]]
    n_nodes: int
    n_edges_kept: int
    n_edges_cut: int
    counterfactual: str
    metric: str
    passes: int
    seconds: float

    def _share(self, value: float) -> float:
        return (value - self.nothing) / (self.full - self.nothing)

    @property
    def share(self) -> float:
        """Share of the task metric the circuit keeps: ``(circuit - nothing) / (full - nothing)``."""
        return self._share(self.circuit)

    @property
    def nodes_only_share(self) -> float:
        return self._share(self.nodes_only)

    @property
    def random_shares(self) -> list[float]:
        return [self._share(value) for value in self.random]

    @property
    def random_mean(self) -> float:
        return float(np.mean(self.random_shares)) if self.random else float("nan")

    @property
    def random_std(self) -> float:
        return float(np.std(self.random_shares, ddof=1)) if len(self.random) > 1 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the metric values, the shares, and the random draws."""
        return {"full": self.full, "nothing": self.nothing, "circuit": self.circuit,
                "nodes_only": self.nodes_only, "share": self.share, "nodes_only_share": self.nodes_only_share,
                "random_shares": self.random_shares, "random_mean": self.random_mean,
                "random_std": self.random_std,
                "random_sets": [[list(head) for head in heads] for heads in self.random_sets],
                "n_nodes": self.n_nodes, "n_edges_kept": self.n_edges_kept, "n_edges_cut": self.n_edges_cut,
                "counterfactual": self.counterfactual, "metric": self.metric, "passes": self.passes,
                "seconds": self.seconds}


@dataclass
class Circuit:
    """Nodes (heads), every measured edge between them, and how they were measured.

    ``node_info`` holds, per node, its ``role`` and (nodes from a CHG result) ``g_plus``, ``g_minus`` and
    ``confidence``, or (nodes from a score map) its ``score``, and always ``ablation_effect`` with its
    interval: the metric's fall when that node alone is ablated, everything else running free.
    """

    nodes: list[Head]
    edges: list[Edge]
    node_info: dict[Head, dict[str, Any]]
    n_layers: int
    n_heads: int
    source: str
    metric: str
    counterfactual: str
    inputs: tuple[str, ...]
    """The receivers' inputs measured (``"q"``, ``"k"``, ``"v"``)."""
    carry: str
    """How a receiver's changed input reaches the metric: ``"exact"`` (one pass per edge),
    ``"direct exact, indirect first order"`` or ``"first order"`` (see :func:`circuit`)."""
    threshold: float
    clean_metric: float
    counterfactual_metric: float
    level: float
    n_boot: int
    n_examples: int
    passes: int
    """Forward passes of the whole dataset (the one backward pass of the fast method counted as one)."""
    seconds: float
    provenance: dict[str, Any] = field(default_factory=dict)
    ablation: dict[str, Any] | None = None
    """The last :meth:`ablate`'s summary (``CircuitAblation.as_dict``), saved and drawn with the circuit."""
    mean_reference: str | None = None
    """With the mean counterfactual: ``"template"`` (each example's own template's mean) or ``"all"``."""

    @property
    def exact(self) -> bool:
        return self.carry == "exact"

    @property
    def total_effect(self) -> float:
        """``metric(clean) - metric(counterfactual)``: what the threshold is a share of."""
        return self.clean_metric - self.counterfactual_metric

    def kept_edges(self) -> list[Edge]:
        return [edge for edge in self.edges if edge.kept]

    def prune(self, threshold: float) -> Circuit:
        """The same measurements with ``kept`` re-marked at another threshold (a share of
        :attr:`total_effect`); the ablation summary, which belonged to the old edges, is dropped."""
        threshold = share_threshold(threshold)
        cut = threshold * abs(self.total_effect)
        edges = [replace(edge, kept=abs(edge.effect) >= cut) for edge in self.edges]
        return replace(self, edges=edges, threshold=threshold, ablation=None)

    def to_frame(self) -> pd.DataFrame:
        """One row per measured edge: sender, receiver (``"L1H0"`` or ``"logits"``), input (q, k, v or
        logits), effect, low, high, kept."""
        return pd.DataFrame({
            "sender": [head_name(edge.sender) for edge in self.edges],
            "receiver": [head_name(edge.receiver) for edge in self.edges],
            "input": [edge.input for edge in self.edges],
            "effect": [edge.effect for edge in self.edges],
            "low": [edge.low for edge in self.edges],
            "high": [edge.high for edge in self.edges],
            "kept": [edge.kept for edge in self.edges],
        }, columns=["sender", "receiver", "input", "effect", "low", "high", "kept"])

    # ----------------------------------------------------------------- keeping only the circuit
    def ablate(self, model: TransformerLensModel, data: GateData, metric: str | UserMetric | None = None,
               n_random: int = 10, seed: int = 0) -> CircuitAblation:
        """Keep only the circuit's nodes and kept edges, ablate everything else, and measure the metric.

        Every head that is not a node has its output set to its counterfactual value (the corrupt twin's,
        or its mean: the circuit's own ``counterfactual``). A node's query, key and value are each computed
        from a residual stream in which every earlier node whose edge into that input is *not* kept sits at
        its counterfactual output, and every other earlier node at its output in this circuit run; a node
        whose edge to the logits is not kept sits at its counterfactual output in the final residual only.
        So "keeping only the edges" is exact for head-to-head paths through the residual stream; what a
        head writes through an MLP is carried by whichever edge it belongs to (MLPs are not nodes and run
        free, as in path patching).

        The reference is ``n_random`` random node sets of the circuit's size (``analysis.ablation.
        random_head_sets``), each kept with all its edges, which favours them. An input kind the circuit
        did not measure (``inputs``) is never cut. Cost: one pass per layer holding nodes, one per node
        input with a cut edge, one per random set, and five more (six for mean ablation). The summary is
        also kept on the circuit (:attr:`ablation`), so :meth:`save` and the HTML carry it.
        """
        started = time.perf_counter()
        layout = adapter.require_model(model)
        if (layout.n_layers, layout.n_heads) != (self.n_layers, self.n_heads):
            raise InputError(f"model: the circuit was measured on {self.n_layers} layers x {self.n_heads} "
                             f"heads, this model has {layout.n_layers} x {layout.n_heads}.")
        if not isinstance(n_random, int) or isinstance(n_random, bool) or n_random < 0:
            raise InputError(f"n_random: expected a non-negative int, got {n_random!r}.")
        data = checks.gate_data(data, model)
        if metric is None:
            if self.metric not in BUILT_IN_METRICS:
                raise InputError(f"metric: the circuit was measured with a metric of your own "
                                 f"({self.metric}); pass it again, as metric=...")
            metric = self.metric
        run, passes = counterfactual_run(model, data, self.counterfactual, metric, self.mean_reference)
        with adapter.frozen(model), torch.no_grad():
            full_logits, _ = run.caches()
            passes += 2
            scorer = _Scorer(metric, data, full_logits)
            value = scorer.value
            nothing = value(_run(run, run.frozen_hooks(run.corrupt_z)))
            kept = {(e.sender, e.receiver, e.input) for e in self.edges if e.kept}
            logits, circuit_passes = _circuit_logits(run, self.nodes, kept, self.inputs)
            nodes_only = value(_run(run, _keep_only(run, self.nodes)))
            random_sets = random_head_sets(layout, len(self.nodes), n_random, np.random.default_rng(seed))
            random = [value(_run(run, _keep_only(run, heads))) for heads in random_sets]
            passes += circuit_passes + 2 + len(random_sets)
            result = CircuitAblation(
                full=value(full_logits), nothing=nothing, circuit=value(logits), nodes_only=nodes_only,
                random=random, random_sets=random_sets, n_nodes=len(self.nodes), n_edges_kept=len(kept),
                n_edges_cut=len(self.edges) - len(kept), counterfactual=self.counterfactual,
                metric=_metric_name(metric), passes=passes, seconds=time.perf_counter() - started)
        if abs(result.full - result.nothing) < 1e-9:
            raise InputError(f"the metric is the same with every head ablated ({result.nothing:.6g}) as in "
                             "the full model, so the share the circuit keeps is undefined; check the "
                             "counterfactual.")
        self.ablation = result.as_dict()
        return result

    # ----------------------------------------------------------------- files
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "nodes": [list(node) for node in self.nodes],
            "node_info": [{"layer": node[0], "head": node[1], **self.node_info.get(node, {})}
                          for node in self.nodes],
            "edges": [{"sender": list(e.sender), "receiver": e.receiver if e.receiver == LOGITS
                       else list(e.receiver), "input": e.input, "effect": e.effect, "low": e.low,
                       "high": e.high, "kept": e.kept} for e in self.edges],
            "settings": {"n_layers": self.n_layers, "n_heads": self.n_heads, "source": self.source,
                         "metric": self.metric, "counterfactual": self.counterfactual,
                         "mean_reference": self.mean_reference, "carry": self.carry,
                         "inputs": list(self.inputs),
                         "threshold": self.threshold, "clean_metric": self.clean_metric,
                         "counterfactual_metric": self.counterfactual_metric, "level": self.level,
                         "n_boot": self.n_boot, "n_examples": self.n_examples, "passes": self.passes,
                         "seconds": self.seconds},
            "ablation": self.ablation,
            "provenance": self.provenance,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the circuit as JSON (``path``, or ``path/circuit.json`` for a folder), atomically."""
        target = Path(path)
        if target.is_dir():
            target = target / CIRCUIT_FILE
        text = json.dumps(self.to_json(), indent=1, default=str, allow_nan=True)
        atomic_write_bytes(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        return target

    @classmethod
    def load(cls, path: str | os.PathLike) -> Circuit:
        """Read a file written by :meth:`save` (or a folder holding ``circuit.json``)."""
        target = Path(path)
        if target.is_dir():
            target = target / CIRCUIT_FILE
        if not target.is_file():
            raise ResultFileError(f"circuit file missing: {target}")
        try:
            raw = json.loads(target.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ResultFileError(f"circuit file {target} is not valid JSON: {error}") from error
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ResultFileError(f"{target} is not a chg_tlens circuit file.")
        version = raw.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
            raise ResultFileError(f"{target} has format_version {version!r}; this chg_tlens reads 1 to "
                                  f"{FORMAT_VERSION}.")
        try:
            settings = raw["settings"]
            nodes = [(int(a), int(b)) for a, b in raw["nodes"]]
            info = {(int(e["layer"]), int(e["head"])):
                    {k: v for k, v in e.items() if k not in ("layer", "head")} for e in raw["node_info"]}
            edges = [Edge(sender=(int(e["sender"][0]), int(e["sender"][1])),
                          receiver=LOGITS if e["receiver"] == LOGITS else (int(e["receiver"][0]),
                                                                           int(e["receiver"][1])),
                          input=str(e["input"]), effect=float(e["effect"]), low=float(e["low"]),
                          high=float(e["high"]), kept=bool(e["kept"])) for e in raw["edges"]]
            return cls(nodes=nodes, edges=edges, node_info=info, n_layers=int(settings["n_layers"]),
                       n_heads=int(settings["n_heads"]), source=str(settings["source"]),
                       metric=str(settings["metric"]), counterfactual=str(settings["counterfactual"]),
                       carry=str(settings["carry"]), inputs=tuple(str(k) for k in settings["inputs"]),
                       threshold=float(settings["threshold"]),
                       clean_metric=float(settings["clean_metric"]),
                       counterfactual_metric=float(settings["counterfactual_metric"]),
                       level=float(settings["level"]), n_boot=int(settings["n_boot"]),
                       n_examples=int(settings["n_examples"]), passes=int(settings["passes"]),
                       seconds=float(settings["seconds"]), provenance=dict(raw.get("provenance") or {}),
                       ablation=raw.get("ablation"), mean_reference=settings.get(
                           "mean_reference", "all" if settings["counterfactual"] == "mean" else None))
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise ResultFileError(f"{target}: a field is missing or malformed ({error!r}).") from error

    # ----------------------------------------------------------------- pictures
    def to_html(self, title: str | None = None) -> str:
        """The circuit as a self-contained HTML page (no network, no external files)."""
        return circuit_html.circuit_page(self._drawing(), title)

    def write_html(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """:meth:`to_html` written atomically to ``path`` (or ``path/circuit.html`` for a folder)."""
        target = Path(path)
        if target.is_dir():
            target = target / CIRCUIT_HTML
        page = self.to_html(title)
        atomic_write_bytes(target, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
        return target

    def _repr_html_(self) -> str:
        return circuit_html.circuit_fragment(self._drawing())

    def _drawing(self) -> circuit_html.Drawing:
        nodes = [circuit_html.DrawnNode(name=head_name(node), layer=node[0], head=node[1],
                                        info=dict(self.node_info.get(node, {}))) for node in self.nodes]
        edges = [circuit_html.DrawnEdge(sender=head_name(e.sender), receiver=head_name(e.receiver),
                                        input=e.input, effect=e.effect, low=e.low, high=e.high, kept=e.kept)
                 for e in self.edges]
        over = "each template" if self.mean_reference == "template" else "all prompts"
        counterfactual = self.counterfactual + (f" (over {over})" if self.counterfactual == "mean" else "")
        facts = {"source": self.source, "metric": self.metric, "counterfactual": counterfactual,
                 "inputs": ", ".join(self.inputs), "carry": self.carry,
                 "threshold": f"{self.threshold:g} of the total effect {self.total_effect:.4g}",
                 "interval": f"{self.level:.0%} bootstrap over "
                 f"{self.n_examples} prompts ({self.n_boot} resamples)",
                 "cost": f"{self.passes} passes, {self.seconds:.2f} s"}
        if self.ablation:
            facts["kept alone"] = (f"{self.ablation['share']:.1%} of the metric; random node sets of the "
                                   f"same size {self.ablation['random_mean']:.1%} \u00b1 "
                                   f"{self.ablation['random_std']:.1%}")
        model = self.provenance.get("model_name")
        return circuit_html.Drawing(nodes=nodes, edges=edges, n_layers=self.n_layers, n_heads=self.n_heads,
                                    facts=facts, model=str(model) if model else "")


def head_name(head: Head | str) -> str:
    """``(1, 0)`` -> ``"L1H0"``; ``"logits"`` stays."""
    return head if isinstance(head, str) else f"L{head[0]}H{head[1]}"


# ---------------------------------------------------------------------------------------- discovery
def circuit(
    model: TransformerLensModel,
    data: GateData,
    source: NodeSource,
    *,
    interfering: bool = False,
    min_confidence: float = 0.0,
    role_threshold: float = 0.5,
    seed: int | None = None,
    top_k: int | None = None,
    score_threshold: float | None = None,
    metric: str | UserMetric = "logprob",
    counterfactual: Literal["auto", "corrupt", "mean"] = "auto",
    mean_reference: MeanReference | None = None,
    inputs: Sequence[Kind] | None = None,
    threshold: float = 0.05,
    exact: bool = False,
    n_boot: int = 1000,
    level: float = 0.9,
    bootstrap_seed: int = 0,
) -> Circuit:
    """The circuit of ``source``'s heads on ``data``: nodes, and path-patching edges between them.

    **Nodes.** A :class:`CHGResult` gives its facilitating heads (``interfering=True`` adds the
    interfering ones) at ``role_threshold``, in every seed (``seed=None``) or one, leaving out heads
    whose confidence is below ``min_confidence``. A score map (``[layer, head]`` tensor or array, or a
    ``HeadScores``) gives its ``top_k`` heads or those scoring at least ``score_threshold``. A list of
    ``(layer, head)`` is taken as it is.

    **Edges.** For every node ``s`` and every node ``r`` in a later layer, and each of ``r``'s inputs
    in ``inputs`` separately (query, key, value; by default all three): path patching's
    effect of ``s`` through that input of ``r`` alone (``s`` set to its counterfactual, every other head
    frozen at its clean output, the change reaching ``r``'s input; then ``r`` alone gets the changed
    input and the rest runs free). On a grouped-query model (SmolLM2) a key/value head serves several
    query heads: ``r``'s key or value input is changed at its key/value head while the heads sharing it
    keep their clean output, so the edge is ``r``'s alone (the same numbers as the model with each
    key/value head copied per query head; tested).
    Plus each node's direct edge to the logits (``s`` counterfactual, every other head frozen).
    ``effect = metric(clean) - metric(patched)``: positive = the edge helps the clean answer. The
    counterfactual is the data's corrupt twin (``"corrupt"``) or each head's mean output (``"mean"``:
    over the examples of each example's own template when the data has ``groups``, as IOI and ACDC
    average, else over all of it; ``mean_reference`` overrides); ``"auto"`` takes the twin when there
    is one. ``metric`` is ``"logprob"`` (mean target
    log-prob, what CHG fits), ``"logit_diff"`` (needs the twin), or a function of the logits returning
    one value per example or a mean over examples (e.g. ``logit_diff_metric(clean, corrupt)``): a scalar
    metric is read per example by putting one example's patched logits among the clean ones (which is
    exact for a mean over examples). An edge is ``kept`` when ``|effect| >= threshold * |metric(clean) -
    metric(counterfactual)|``; every measured edge stays in the circuit. Each effect is a mean over prompts
    and gets a ``level`` percentile interval over ``n_boot`` resamples of the prompts (the same resamples
    for every edge), from :func:`chg_tlens.analysis.statistics.bootstrap`.

    **Cost: O(nodes) forward passes** (``exact=False``, the default). Per sender: one frozen pass
    (path patching's step 2) records the query, key and value of *every* later layer at once; then one
    pass per input kind sets every later receiver's input of that kind to its recorded value at once,
    with every head's output frozen clean, so each receiver's output is recomputed by the model itself
    (its softmax included) from its own changed input and nothing else, and recorded. That is 4 passes
    per sender instead of path patching's one per (receiver, input). The receiver's output change is
    then carried to the metric without another pass: *exactly* along its direct path to the logits
    (``clean logits + dz W_O W_U`` scored by the metric; models without a final norm or logit soft cap),
    and to *first order* through whatever later heads and MLPs make of it (the gradient at the
    receiver's output from one clean forward and backward pass, minus its direct part). With a final
    norm, all of it is first order (``Circuit.carry`` says which). So the fast edges equal the exact
    ones where no later component reads the receiver's output (the planted models), and approximate
    them to first order in the downstream part otherwise. The receiver's own attention is never
    linearised: first order at its *input*, as edge attribution patching does, reads 0 for key and
    query edges whenever the attention is saturated. One more pass per node gives its ablation effect.
    Total: ``2 + 1 + n + k s + n <= 5 n + 3`` passes for ``n`` nodes of which ``s`` have a later node and
    ``k`` input kinds (one more collecting the means for ``"mean"``); ``Circuit.passes`` and
    ``Circuit.seconds`` report them. ``exact=True`` runs step 3 of path patching (``analysis.patching``'s
    own run) for every edge: ``2 + 2 n + k E`` passes for ``E`` (sender, later receiver) pairs. The whole
    dataset goes through each pass; subset big datasets.
    """
    started = time.perf_counter()
    layout = adapter.require_model(model)
    data = checks.gate_data(data, model)
    nodes, info, source_name = _select_nodes(source, layout, interfering, min_confidence, role_threshold,
                                             seed, top_k, score_threshold)
    counterfactual = resolve_counterfactual(counterfactual, data)
    kinds = input_kinds(inputs)
    threshold = share_threshold(threshold)
    checks.positive_int(n_boot, "n_boot")
    if not 0.0 < level < 1.0:
        raise InputError(f"level: expected a number within (0, 1), got {level!r}.")
    if counterfactual == "mean":
        mean_reference = baselines.mean_reference(data, mean_reference)
    elif mean_reference is not None:
        raise InputError(f"mean_reference={mean_reference!r} picks what the mean counterfactual averages "
                         "over; this circuit's counterfactual is the corrupt twin.")
    run, passes = counterfactual_run(model, data, counterfactual, metric, mean_reference)
    with adapter.frozen(model), torch.no_grad():
        clean_logits, corrupt_logits = run.caches()
        passes += 2
        scorer = _Scorer(metric, data, clean_logits)
        clean_value, corrupt_value = scorer.value(clean_logits), scorer.value(corrupt_logits)
        measure = _ExactEdges(run, scorer, kinds) if exact else _FastEdges(run, scorer, kinds, nodes)
        changes, node_changes = {}, {}
        for sender in nodes:
            receivers = [node for node in nodes if node[0] > sender[0]]
            found = measure.from_sender(sender, receivers)
            order = [(sender, receiver, kind) for receiver in receivers for kind in kinds]
            changes.update({key: found[key] for key in [*order, (sender, LOGITS, LOGITS)]})
        for node in nodes:
            node_changes[node] = scorer.change(_run(run, [interventions.replace(
                node[0], run.corrupt_z[adapter.hook_z_name(node[0])], heads=[node[1]])]))
        passes += measure.passes + len(nodes)
    cut = threshold * abs(clean_value - corrupt_value)
    edges = []
    for (sender, receiver, kind), change in changes.items():
        interval = _interval(-change, n_boot, level, bootstrap_seed)
        edges.append(Edge(sender, receiver, kind, interval.estimate, interval.low, interval.high,
                          kept=abs(interval.estimate) >= cut))
    for node, change in node_changes.items():
        interval = _interval(-change, n_boot, level, bootstrap_seed)
        info[node].update(ablation_effect=interval.estimate, ablation_low=interval.low,
                          ablation_high=interval.high)
    seconds = time.perf_counter() - started
    return Circuit(nodes=nodes, edges=edges, node_info=info, n_layers=layout.n_layers, n_heads=layout.n_heads,
                   source=source_name, metric=_metric_name(metric), counterfactual=counterfactual,
                   mean_reference=mean_reference,
                   inputs=kinds, carry=measure.carry, threshold=threshold, clean_metric=clean_value,
                   counterfactual_metric=corrupt_value, level=level, n_boot=n_boot, n_examples=len(data),
                   passes=passes, seconds=seconds, provenance=run_provenance(model, data, seconds))


# ---------------------------------------------------------------------------------------- edges
class _ExactEdges:
    """Path patching step 3 for every (sender, receiver, input): one pass per edge."""

    carry = "exact"

    def __init__(self, run: PathPatchingRun, scorer: _Scorer, kinds: tuple[Kind, ...]) -> None:
        self.run, self.scorer, self.kinds, self.passes = run, scorer, kinds, 0

    def from_sender(self, sender: Head, receivers: list[Head]) -> dict[tuple, Tensor]:
        layers = sorted({layer for layer, _ in receivers})
        frozen_logits, recorded = self.run.record_inputs([sender], self.kinds, layers)
        self.passes += 1
        out = {}
        for receiver in receivers:
            for kind in self.kinds:
                logits = self.run.patched_logits([receiver], kind, recorded[kind])
                out[(sender, receiver, kind)] = self.scorer.change(logits)
                self.passes += 1
        out[(sender, LOGITS, LOGITS)] = self.scorer.change(frozen_logits)
        return out


class _FastEdges:
    """O(1) passes per sender: see :func:`circuit` (Cost)."""

    def __init__(self, run: PathPatchingRun, scorer: _Scorer, kinds: tuple[Kind, ...], nodes: list[Head]
                 ) -> None:
        self.run, self.scorer, self.kinds, self.passes = run, scorer, kinds, 0
        receivers = sorted({node for node in nodes if node[0] > nodes[0][0]})
        self.readout = self._readout(run.model, receivers)
        self.direct = self.readout is not None
        self.carry = "direct exact, indirect first order" if self.direct else "first order"
        self.grad_z: dict[int, Tensor] = {}
        self.grad_logits: Tensor | None = None
        if receivers:
            self._gradients(sorted({layer for layer, _ in receivers}))

    @staticmethod
    def _readout(model: TransformerLensModel, receivers: list[Head]) -> dict[Head, Tensor] | None:
        """Each receiver's ``W_O W_U`` ``[d_head, vocab]``, when its output reaches the logits through an
        affine map (no final norm, no logit soft cap, weights where the adapter finds them); else None."""
        soft_cap = float(getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0)
        if adapter.final_norm_kind(model) is not None or soft_cap > 0:
            return None
        try:
            unembed = adapter.embedding_weights(model)["W_U"].detach().float()
            return {(layer, head): adapter.head_weights(model, layer, head)["W_O"].detach().float() @ unembed
                    for layer, head in receivers}
        except (AttributeError, KeyError, IndexError):  # a hub model laid out otherwise: first order
            return None

    def _gradients(self, layers: list[int]) -> None:
        """d metric / d (each receiver layer's z) and d metric / d logits, per example, at the clean run."""
        hooks, leaves = interventions.probe(layers)
        with torch.enable_grad(), self.run.model.hooks(fwd_hooks=hooks):
            logits = self.run.model(self.run.clean_tokens)
            objective = self.scorer.objective(logits)
            grads = torch.autograd.grad(objective, [leaves[layer] for layer in layers] + [logits],
                                        allow_unused=True)
        self.passes += 1
        for layer, grad in zip(layers, grads[:-1], strict=True):
            self.grad_z[layer] = torch.zeros_like(leaves[layer]) if grad is None else grad.detach()
        self.grad_logits = grads[-1].detach().float()

    def from_sender(self, sender: Head, receivers: list[Head]) -> dict[tuple, Tensor]:
        run = self.run
        layers = sorted({layer for layer, _ in receivers})
        frozen_logits, recorded = run.record_inputs([sender], self.kinds, layers)
        self.passes += 1
        out = {}
        for kind in self.kinds:
            if not receivers:
                break
            outputs = self._receiver_outputs(receivers, kind, recorded[kind])
            for layer, head in receivers:
                clean = run.clean_z[adapter.hook_z_name(layer)][:, :, head]
                delta = (outputs[layer][:, :, head] - clean).float()
                out[(sender, (layer, head), kind)] = self._carry((layer, head), delta)
        out[(sender, LOGITS, LOGITS)] = self.scorer.change(frozen_logits)
        return out

    def _receiver_outputs(self, receivers: list[Head], kind: Kind, recorded: dict[int, Tensor]
                          ) -> dict[int, Tensor]:
        """Each receiver's output with only its ``kind`` input changed: all receivers in one pass, every
        head's output frozen clean after it is recorded, so no receiver sees another's change."""
        run = self.run
        hooks = receiver_input_hooks(receivers, kind, recorded, key_value_group(run.model))
        record_hooks, outputs = interventions.record(sorted({layer for layer, _ in receivers}))
        _run(run, hooks + record_hooks + run.frozen_hooks(run.clean_z))  # record before freezing
        self.passes += 1
        return outputs

    def _carry(self, receiver: Head, delta: Float[Tensor, "batch pos d_head"]) -> Float[Tensor, " batch"]:
        """The metric's change, per example, when ``receiver``'s output moves by ``delta``."""
        layer, head = receiver
        if not bool(delta.any()):
            return torch.zeros(delta.shape[0], dtype=torch.float64)
        total = (self.grad_z[layer][:, :, head].float() * delta).sum(dim=(1, 2))
        if not self.direct:
            return total.double().cpu()
        logits_delta = delta @ self.readout[receiver].to(delta.device)
        direct_first_order = (self.grad_logits * logits_delta).sum(dim=(1, 2))
        clean_logits = self.scorer.clean_logits
        exact_direct = self.scorer.change(clean_logits + logits_delta.to(clean_logits))
        return exact_direct + (total - direct_first_order).double().cpu()


# ---------------------------------------------------------------------------------------- metric
class _Scorer:
    """The metric per example, as a change from the clean run (what effects and intervals are made of)."""

    def __init__(self, metric: str | UserMetric, data: GateData, clean_logits: Tensor) -> None:
        self.n = len(data)
        self.clean_logits = clean_logits
        self.rows: Callable[[Tensor], Tensor] | None = None
        self.scalar: Callable[[Tensor], Tensor] | None = None
        if metric == "logprob":
            self.rows = target_logprob_per_example(data)
        elif metric == "logit_diff":
            self.rows = logit_diff_per_example(data, data.corrupt)
        else:
            found = torch.as_tensor(metric(clean_logits))
            if found.ndim == 0:
                self.scalar = metric
            elif tuple(found.shape) == (self.n,):
                self.rows = metric
            else:
                raise InputError(f"metric: expected a scalar or one value per example ({self.n}) from the "
                                 f"logits, got shape {list(found.shape)}.")
        if self.rows is not None:
            self.clean_rows = self.rows(clean_logits).detach().double().cpu()
        else:
            self.clean_scalar = float(self.scalar(clean_logits))

    def change(self, logits: Tensor) -> Float[Tensor, " batch"]:
        """``metric_i(logits) - metric_i(clean)`` for every example ``i`` (float64, CPU)."""
        if self.rows is not None:
            return self.rows(logits).detach().double().cpu() - self.clean_rows
        mixed = self.clean_logits.clone()  # a mean over examples moves by (m_i' - m_i) / n when only i moves
        out = torch.zeros(self.n, dtype=torch.float64)
        for i in range(self.n):
            mixed[i] = logits[i]
            out[i] = (float(self.scalar(mixed)) - self.clean_scalar) * self.n
            mixed[i] = self.clean_logits[i]
        return out

    def value(self, logits: Tensor) -> float:
        if self.rows is not None:
            return float(self.rows(logits).double().mean())
        return float(self.scalar(logits))

    def objective(self, logits: Tensor) -> Tensor:
        """A scalar whose gradient at example ``i``'s activations is that of ``metric_i``."""
        return self.rows(logits).sum() if self.rows is not None else self.scalar(logits) * self.n


def _metric_name(metric: str | UserMetric) -> str:
    return metric if isinstance(metric, str) else getattr(metric, "__name__", type(metric).__name__)


# ---------------------------------------------------------------------------------------- pieces
def _select_nodes(source: Any, layout: adapter.HeadLayout, interfering: bool, min_confidence: float,
                  role_threshold: float, seed: int | None, top_k: int | None, score_threshold: float | None
                  ) -> tuple[list[Head], dict[Head, dict[str, Any]], str]:
    """The nodes, what to show about each, and what named them."""
    if isinstance(source, CHGResult):
        if top_k is not None or score_threshold is not None:
            raise InputError("top_k / score_threshold: they pick heads from a score map; a CHG result gives "
                             "its roles (use role_threshold and min_confidence).")
        return _chg_nodes(checks.chg_result(source, layout, "source"), interfering, min_confidence,
                          role_threshold, seed)
    if isinstance(source, HeadScores):
        return _score_nodes(source.scores, layout, top_k, score_threshold, f"scores: {source.method}")
    if isinstance(source, (Tensor, np.ndarray)) and np.ndim(source) == 2:
        return _score_nodes(torch.as_tensor(np.asarray(source, dtype=float)), layout, top_k, score_threshold,
                            "scores")
    if isinstance(source, (str, bytes)) or not isinstance(source, (Sequence, Tensor, np.ndarray)):
        raise InputError(f"source: expected a CHGResult, a [layer, head] score map or a list of (layer, "
                         f"head), got {type(source).__name__}.")
    nodes = sorted(checks.heads(source, layout, "source", allow_empty=False))
    return nodes, {node: {"role": "node"} for node in nodes}, "heads"


def _chg_nodes(result: CHGResult, interfering: bool, min_confidence: float, role_threshold: float,
               seed: int | None) -> tuple[list[Head], dict[Head, dict[str, Any]], str]:
    roles = result.roles(role_threshold, seed, min_confidence)
    wanted = ("facilitating", "interfering") if interfering else ("facilitating",)
    nodes = sorted(head for role in wanted for head in roles[role])
    if not nodes:
        where = "in every seed" if seed is None else f"in seed {seed}"
        raise InputError(f"source: the CHG result has no {' or '.join(wanted)} head {where} at "
                         f"role_threshold={role_threshold} and min_confidence={min_confidence}, so the "
                         "circuit would have no nodes; lower them, pass interfering=True, or pick a seed.")
    pick = (lambda t: t.mean(dim=0)) if seed is None else (lambda t: t[seed])
    g_plus, g_minus = pick(result.g_plus), pick(result.g_minus)
    try:
        confidence = pick(result.confidence(role_threshold))
    except InputError:  # a result without a trace (built by hand, or saved by an old version)
        confidence = None
    role_of = {head: role for role, heads in roles.items() for head in heads}
    info = {node: {"role": role_of[node], "g_plus": float(g_plus[node]), "g_minus": float(g_minus[node]),
                   "confidence": None if confidence is None else float(confidence[node])} for node in nodes}
    return nodes, info, "chg" if seed is None else f"chg seed {seed}"


def _score_nodes(scores: Tensor, layout: adapter.HeadLayout, top_k: int | None, score_threshold: float | None,
                 name: str) -> tuple[list[Head], dict[Head, dict[str, Any]], str]:
    scores = scores.detach().float().cpu()
    if tuple(scores.shape) != (layout.n_layers, layout.n_heads):
        raise InputError(f"source: the score map is {list(scores.shape)}, the model has [layer, head] = "
                         f"{[layout.n_layers, layout.n_heads]}.")
    if (top_k is None) == (score_threshold is None):
        raise InputError("top_k / score_threshold: give exactly one to pick the nodes from a score map.")
    flat = scores.flatten()
    if top_k is not None:
        checks.positive_int(top_k, "top_k")
        chosen = torch.sort(-flat, stable=True).indices[: min(top_k, flat.numel())]
    else:
        if not isinstance(score_threshold, (int, float)) or not math.isfinite(score_threshold):
            raise InputError(f"score_threshold: expected a finite number, got {score_threshold!r}.")
        chosen = torch.nonzero(flat >= score_threshold).flatten()
    nodes = sorted(divmod(int(i), layout.n_heads) for i in chosen)
    if not nodes:
        raise InputError(f"score_threshold: no head scores at least {score_threshold} (highest "
                         f"{float(flat.max()):.4g}), so the circuit would have no nodes.")
    return nodes, {node: {"role": "node", "score": float(scores[node])} for node in nodes}, name


def resolve_counterfactual(counterfactual: Any, data: GateData) -> str:
    """``"corrupt"`` or ``"mean"`` from ``"auto"`` / either, refusing a corrupt one without a twin."""
    if counterfactual not in ("auto", "corrupt", "mean"):
        raise InputError(f"counterfactual: expected 'auto', 'corrupt' or 'mean', got {counterfactual!r}.")
    if counterfactual == "corrupt" and data.corrupt is None:
        raise InputError("counterfactual='corrupt': the data has no corrupt twin (data.corrupt is None); "
                         "attach one with data.with_corrupt(...) or use counterfactual='mean'.")
    if counterfactual == "auto":
        return "corrupt" if data.corrupt is not None else "mean"
    return counterfactual


def counterfactual_run(model: TransformerLensModel, data: GateData, counterfactual: str,
                        metric: Any, mean_reference: str | None = None) -> tuple[PathPatchingRun, int]:
    """Path patching's run with the senders' counterfactual, and the passes spent finding it."""
    if isinstance(metric, str) and metric not in BUILT_IN_METRICS:
        raise InputError(f"metric: expected one of {BUILT_IN_METRICS} or a function of the logits, got "
                         f"{metric!r}.")
    if not isinstance(metric, str) and not callable(metric):
        raise InputError(f"metric: expected one of {BUILT_IN_METRICS} or a function of the logits, got "
                         f"{type(metric).__name__}.")
    if metric == "logit_diff" and data.corrupt is None:
        raise InputError("metric='logit_diff': the data has no corrupt twin, so there is no corrupt answer "
                         "to compare with; use metric='logprob' or attach a twin.")
    if counterfactual == "corrupt":
        checks.corrupt_twin(data, "circuit")
        return PathPatchingRun(model, data, checks.gate_data(data.corrupt, model, "data.corrupt")), 0
    reference = baselines.mean_reference(data, mean_reference)  # a template reference needs groups
    means = baselines.ablation_means(model, data, reference)  # one pass over the data, in batches
    return PathPatchingRun(model, data, None, ablated_z=means), 1


def input_kinds(inputs: Any) -> tuple[Kind, ...]:
    """The receivers' inputs asked for (None: q, k, v), checked, in q, k, v order."""
    if inputs is None:
        return KINDS
    if isinstance(inputs, str) or not isinstance(inputs, Sequence) or not inputs:
        raise InputError(f"inputs: expected a non-empty list drawn from {list(KINDS)}, got {inputs!r}.")
    if len(set(inputs)) != len(inputs) or any(kind not in KINDS for kind in inputs):
        raise InputError(f"inputs: expected distinct entries drawn from {list(KINDS)}, got {list(inputs)!r}.")
    return tuple(kind for kind in KINDS if kind in inputs)




def share_threshold(threshold: Any) -> float:
    """A non-negative, finite share of the total effect."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0 \
            or not math.isfinite(threshold):
        raise InputError(f"threshold: expected a non-negative share of the total effect, got {threshold!r}.")
    return float(threshold)


def _interval(values: Tensor, n_boot: int, level: float, seed: int) -> Any:
    """The mean of per-example effects and its interval over resampled prompts."""
    column = values.numpy()[:, None, None]
    return bootstrap([column], lambda rows: rows[:, 0], n_boot=n_boot, level=level, seed=seed)


def _run(run: PathPatchingRun, hooks: list) -> Tensor:
    """The clean input through the model under ``hooks``: its logits."""
    with run.model.hooks(fwd_hooks=hooks):
        return run.model(run.clean_tokens)


def _keep_only(run: PathPatchingRun, heads: Sequence[Head]) -> list:
    """Hooks setting every head not in ``heads`` to its counterfactual output."""
    hooks = []
    for layer, name in enumerate(run.z_names):
        others = [h for h in range(run.model.cfg.n_heads) if (layer, h) not in heads]
        hooks.append(interventions.replace(layer, run.corrupt_z[name], heads=others))
    return hooks


def _circuit_logits(run: PathPatchingRun, nodes: list[Head], kept: set[tuple], kinds: tuple[Kind, ...]
                    ) -> tuple[Tensor, int]:
    """Logits with only the circuit kept (see :meth:`Circuit.ablate`), layer by layer, and the passes."""
    outputs: dict[str, Tensor] = {}  # every head's output in the circuit run, layer by layer
    passes = 0
    group = key_value_group(run.model)
    # Nodes of a layer that share a key/value head may need different keys: one pass per node then.
    shared = any(shares_key_values(group, kind) for kind in kinds)
    for layer, name in enumerate(run.z_names):
        heads = [head for node_layer, head in nodes if node_layer == layer]
        if not heads:
            outputs[name] = run.corrupt_z[name]
            continue
        earlier = run.z_names[:layer]
        input_hooks: dict[int, list] = {head: [] for head in heads}
        for head in heads:
            for kind in kinds:
                cut = [s for s in nodes if s[0] < layer and (s, (layer, head), kind) not in kept]
                if not cut:
                    continue
                record_hooks, recorded = interventions.record([layer], activation=kind)
                _run(run, [_with_counterfactual(run, i, outputs[n], cut) for i, n in enumerate(earlier)]
                     + record_hooks)
                passes += 1
                input_hooks[head] += receiver_input_hooks([(layer, head)], kind, recorded, group)
        layer_outputs = run.corrupt_z[name].clone()
        for together in ([[head] for head in heads] if shared else [heads]):
            record_hooks, recorded = interventions.record([layer])
            others = [h for h in range(run.model.cfg.n_heads) if h not in together]
            _run(run, [interventions.replace(i, outputs[n]) for i, n in enumerate(earlier)]
                 + [hook for head in together for hook in input_hooks[head]]
                 + [interventions.replace(layer, run.corrupt_z[name], heads=others)] + record_hooks)
            passes += 1
            layer_outputs[:, :, together] = recorded[layer][:, :, together]
        outputs[name] = layer_outputs
    no_logit_edge = [node for node in nodes if (node, LOGITS, LOGITS) not in kept]
    logits = _run(run, [_with_counterfactual(run, i, outputs[n], no_logit_edge)
                        for i, n in enumerate(run.z_names)])
    return logits, passes + 1


def _with_counterfactual(run: PathPatchingRun, layer: int, values: Tensor, heads: list[Head]) -> Any:
    """A hook setting ``layer``'s output to ``values``, with those of ``heads`` at their counterfactual."""
    frozen = values.clone()
    chosen = [head for node_layer, head in heads if node_layer == layer]
    frozen[:, :, chosen] = run.corrupt_z[run.z_names[layer]][:, :, chosen]
    return interventions.replace(layer, frozen)
