"""Checking CHG against the tools interpretability researchers already trust.

Four questions, each answered in the ``[layer, head]`` layout CHG itself uses:

- Do the roles predict what ablation does? :func:`ablation_curve` (the paper's targeted ablation),
  :func:`sufficiency` and :func:`necessity` (the facilitating heads alone, and the model without them).
- Do they agree with causal mediation? :func:`patching_scores` runs TransformerLens' own head-level
  activation patching; :func:`mediation_test` is the paper's Welch t-test of CHG facilitation for
  heads a mediation method flags against the rest, plus a Spearman correlation.
- Which routes carry the effect? :func:`path_patching` and :func:`path_patching_scores`: the effect of
  sender heads that flows only through chosen receivers' inputs (Wang et al., 2022).

:func:`validate_run` runs the standard set on held-out data in one call (``chg-tlens validate``).

All interventions are hooks inside ``model.hooks(...)`` contexts; the model is never modified.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from chg_tlens import adapter
from chg_tlens.data import GateData
from chg_tlens.fit import score_gates
from chg_tlens.gates import HeadGates
from chg_tlens.objectives import target_logprobs
from chg_tlens.result import ROLES, CHGResult

Head = tuple[int, int]
Metric = Callable[[Float[Tensor, "batch pos vocab"]], Tensor]
ReceiverInput = Literal["q", "k", "v", "z"]
SeedReduce = Literal["max", "mean", "min"]


# ====================================================================== performance under fixed gates
def evaluate_gates(
    model: Any,
    data: GateData,
    gate_values: Float[Tensor, "*config layer head"],
    batch_size: int = 64,
) -> tuple[Float[Tensor, " config"], Float[Tensor, " config"]]:
    """Mean target log-prob and accuracy of the model under each fixed gate setting.

    Gate settings run several at a time as masks of one forward pass; ``batch_size`` bounds the rows
    (examples x settings) of a pass. Means are over examples, each example's own mean over its targets
    first (the same averaging as the CHG loss).
    """
    layout = adapter.require_model(model)
    data = _require_data(data, model, "data")
    values = torch.as_tensor(gate_values, dtype=torch.float32)
    given_shape = list(values.shape)
    if values.ndim == 2:
        values = values.unsqueeze(0)
    if values.ndim != 3 or tuple(values.shape[1:]) != (layout.n_layers, layout.n_heads):
        raise ValueError(
            f"gate_values: expected [layer, head] or [config, layer, head] with layer x head = "
            f"{layout.n_layers} x {layout.n_heads}, got shape {given_shape}."
        )
    _require_positive_int(batch_size, "batch_size")
    examples_per_pass = min(len(data), batch_size)
    configs_per_pass = max(1, batch_size // examples_per_pass)
    device = adapter.model_device(model)
    logprob = torch.zeros(values.shape[0])
    accuracy = torch.zeros(values.shape[0])
    with adapter.frozen(model), torch.no_grad():
        for first in range(0, values.shape[0], configs_per_pass):
            chunk = slice(first, first + configs_per_pass)
            gates = HeadGates.fixed(values[chunk]).to(device)
            per_example_logprob, per_example_accuracy = score_gates(model, data, gates, examples_per_pass)
            logprob[chunk] = per_example_logprob.sum(dim=1)
            accuracy[chunk] = per_example_accuracy.sum(dim=1)
    return logprob / len(data), accuracy / len(data)


# ====================================================================== targeted ablation
def ablation_curve(
    model: Any,
    data: GateData,
    result: CHGResult,
    score: str | Sequence[str] | Float[Tensor, "layer head"] = "facilitating",
    seed: int = 0,
    values: Sequence[float] = (0.0, 1.0),
    max_heads: int | None = None,
    start: Literal["g_plus", "ones"] = "g_plus",
    label: str | None = None,
    batch_size: int = 64,
) -> pd.DataFrame:
    """The paper's targeted ablation: change heads one at a time, in order of a score, and watch.

    Starting from seed ``seed``'s G+ gates (``start="g_plus"``, the paper's choice; ``"ones"`` starts
    from the full model), heads are sorted by ``score`` (descending) and set cumulatively to each
    value in ``values``. Expected, from G+: top facilitating heads set to 0 -> log-prob drops; top
    irrelevant heads set to 0 -> about flat; top interfering heads set to 1 (re-opened) -> drops, and
    set to 0 from the full model -> rises. Interfering heads are already near 0 in G+, so setting them
    to 0 there changes little.

    ``score`` is a role name, several role names (one curve each), or a ``[layer, head]`` tensor from
    any other method (named by ``label``). One row per (score, value, number of heads changed), with
    the mean target log-prob and accuracy and their change from the starting gates.
    """
    layout = adapter.require_model(model)
    _require_result(result, layout)
    seed = _require_seed(result, seed)
    if isinstance(score, (list, tuple)):
        frames = [ablation_curve(model, data, result, name, seed, values, max_heads, start, None,
                                 batch_size) for name in score]
        return pd.concat(frames, ignore_index=True)
    ranking, name = _ranking_scores(result, score, seed, layout, label)
    values = _require_gate_values(values)
    if start == "g_plus":
        start_gates = result.g_plus[seed].float().clone()
    elif start == "ones":
        start_gates = torch.ones(layout.n_layers, layout.n_heads)
    else:
        raise ValueError(f"start: expected 'g_plus' or 'ones', got {start!r}.")
    n_total = layout.n_layers * layout.n_heads
    if max_heads is None:
        max_heads = n_total
    _require_positive_int(max_heads, "max_heads")
    max_heads = min(max_heads, n_total)

    order = torch.sort(-ranking.flatten(), stable=True).indices[:max_heads]
    settings = [start_gates]
    for value in values:
        current = start_gates.clone().flatten()
        for index in order:
            current[index] = value
            settings.append(current.view(layout.n_layers, layout.n_heads).clone())
    logprob, accuracy = evaluate_gates(model, data, torch.stack(settings), batch_size)

    rows = []
    for v, value in enumerate(values):
        for k in range(max_heads + 1):
            i = 0 if k == 0 else 1 + v * max_heads + (k - 1)
            head = None if k == 0 else divmod(int(order[k - 1]), layout.n_heads)
            rows.append({
                "score": name, "value": float(value), "start": start, "seed": seed, "n_changed": k,
                "layer": None if head is None else head[0], "head": None if head is None else head[1],
                "score_value": None if head is None else float(ranking[head]),
                "logprob": float(logprob[i]), "accuracy": float(accuracy[i]),
                "delta_logprob": float(logprob[i] - logprob[0]),
                "delta_accuracy": float(accuracy[i] - accuracy[0]),
            })
    frame = pd.DataFrame(rows)
    for column in ("layer", "head"):
        frame[column] = frame[column].astype("Int64")
    return frame


def plot_ablation_curve(frame: pd.DataFrame, ax: Any = None, metric: str = "delta_logprob") -> Any:
    """One line per (score, value) of an :func:`ablation_curve` frame; returns the matplotlib axes."""
    import matplotlib.pyplot as plt

    needed = {"score", "value", "n_changed", metric}
    missing = needed - set(frame.columns)
    if missing:
        raise ValueError(
            f"frame: expected the columns of ablation_curve(...) including {sorted(needed)}, "
            f"missing {sorted(missing)}."
        )
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    for (name, value), group in frame.groupby(["score", "value"], sort=False):
        group = group.sort_values("n_changed")
        ax.plot(group["n_changed"], group[metric], marker=".", label=f"{name} -> {value:g}")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("heads changed (in order of score)")
    ax.set_ylabel({"delta_logprob": "change in mean target log-prob",
                   "delta_accuracy": "change in accuracy"}.get(metric, metric))
    ax.legend()
    return ax


# ====================================================================== sufficiency and necessity
def sufficiency(
    model: Any,
    data: GateData,
    result: CHGResult | None = None,
    seed: int = 0,
    threshold: float = 0.5,
    heads: Sequence[Head] | None = None,
    n_random: int = 10,
    rng_seed: int = 0,
    batch_size: int = 64,
) -> pd.DataFrame:
    """Performance with only the circuit kept (every other head gated to 0).

    The circuit is seed ``seed``'s facilitating heads (score >= ``threshold``), or ``heads`` when given.
    Reference rows: the full model, no heads at all, and ``n_random`` random head sets of the same size
    drawn uniformly from all heads. Columns: test, condition, draw, n_heads, logprob, accuracy.
    """
    return _circuit_test("sufficiency", model, data, result, seed, threshold, heads, n_random,
                         rng_seed, batch_size)


def necessity(
    model: Any,
    data: GateData,
    result: CHGResult | None = None,
    seed: int = 0,
    threshold: float = 0.5,
    heads: Sequence[Head] | None = None,
    n_random: int = 10,
    rng_seed: int = 0,
    batch_size: int = 64,
) -> pd.DataFrame:
    """Performance with only the circuit removed (gated to 0, every other head at 1).

    Same circuit, reference rows and columns as :func:`sufficiency`; random rows remove a random head
    set of the same size.
    """
    return _circuit_test("necessity", model, data, result, seed, threshold, heads, n_random,
                         rng_seed, batch_size)


def _circuit_test(
    test: str, model: Any, data: GateData, result: CHGResult | None, seed: int, threshold: float,
    heads: Sequence[Head] | None, n_random: int, rng_seed: int, batch_size: int,
) -> pd.DataFrame:
    layout = adapter.require_model(model)
    if heads is None:
        if result is None:
            raise ValueError(f"{test}: give a CHGResult (result=...) or the circuit's heads (heads=...).")
        _require_result(result, layout)
        seed = _require_seed(result, seed)
        heads = result.roles(threshold, seed)["facilitating"]
    circuit = _require_heads(heads, layout, "heads")
    if not isinstance(n_random, int) or isinstance(n_random, bool) or n_random < 0:
        raise ValueError(f"n_random: expected a non-negative int, got {n_random!r}.")
    n_total = layout.n_layers * layout.n_heads
    rng = np.random.default_rng(rng_seed)
    random_sets = [
        [divmod(int(i), layout.n_heads) for i in rng.choice(n_total, size=len(circuit), replace=False)]
        for _ in range(n_random)
    ]
    keep = test == "sufficiency"
    conditions = [("full model", 0, n_total, torch.ones(layout.n_layers, layout.n_heads)),
                  ("no heads", 0, 0, torch.zeros(layout.n_layers, layout.n_heads)),
                  ("circuit", 0, len(circuit), _gates_for(circuit, layout, keep))]
    conditions += [("random", d, len(s), _gates_for(s, layout, keep)) for d, s in enumerate(random_sets)]
    logprob, accuracy = evaluate_gates(model, data, torch.stack([c[3] for c in conditions]), batch_size)
    return pd.DataFrame([
        {"test": test, "condition": name, "draw": draw, "n_heads": size,
         "logprob": float(logprob[i]), "accuracy": float(accuracy[i])}
        for i, (name, draw, size, _) in enumerate(conditions)
    ])


def _gates_for(heads: list[Head], layout: adapter.HeadLayout, keep: bool) -> Tensor:
    """All 0 with ``heads`` at 1 (keep), or all 1 with ``heads`` at 0 (remove)."""
    gates = torch.full((layout.n_layers, layout.n_heads), 0.0 if keep else 1.0)
    for layer, head in heads:
        gates[layer, head] = 1.0 if keep else 0.0
    return gates


# ====================================================================== metrics for patching
def target_logprob_metric(data: GateData) -> Metric:
    """Metric for patching: mean log-prob of ``data``'s own targets (a scalar per forward)."""
    tokens, target_mask = data.tokens, data.target_mask

    def mean_target_logprob(logits: Float[Tensor, "batch pos vocab"]) -> Tensor:
        return target_logprobs(logits, tokens.to(logits.device), target_mask.to(logits.device)).mean()

    return mean_target_logprob


def logit_diff_metric(clean: GateData, corrupt: GateData) -> Metric:
    """Metric for patching: logit of the clean target minus logit of the corrupt target, averaged
    over target tokens of each example, then over examples. Needs both at the same positions."""
    if clean.tokens.shape != corrupt.tokens.shape or not torch.equal(clean.target_mask,
                                                                     corrupt.target_mask):
        raise ValueError(
            "logit_diff_metric: clean and corrupt must have the same shape and the same target "
            f"positions (tokens {list(clean.tokens.shape)} vs {list(corrupt.tokens.shape)})."
        )
    example, position = torch.nonzero(clean.target_mask[:, 1:], as_tuple=True)
    clean_answer = clean.tokens[example, position + 1]
    corrupt_answer = corrupt.tokens[example, position + 1]
    counts = torch.bincount(example, minlength=len(clean)).clamp(min=1)

    def mean_logit_diff(logits: Float[Tensor, "batch pos vocab"]) -> Tensor:
        picked = logits[example.to(logits.device), position.to(logits.device)].float()
        diff = (picked.gather(-1, clean_answer.to(logits.device)[:, None])
                - picked.gather(-1, corrupt_answer.to(logits.device)[:, None])).squeeze(-1)
        per_example = diff.new_zeros(len(clean)).index_add(0, example.to(logits.device), diff)
        return (per_example / counts.to(logits.device)).mean()

    return mean_logit_diff


# ====================================================================== activation patching
def patching_scores(
    model: Any,
    clean: GateData,
    corrupt: GateData | None = None,
    metric: Metric | None = None,
    normalize: bool = True,
) -> Float[Tensor, "layer head"]:
    """Head-level activation patching through TransformerLens' own ``patching`` module.

    Runs ``transformer_lens.patching.get_act_patch_attn_head_out_all_pos``: the corrupt run with one
    head's ``hook_z`` (all positions) replaced by its clean value, once per head. ``metric`` maps logits
    to a scalar (default: mean target log-prob of ``clean``'s targets). With ``normalize`` the result
    is the fraction of the corrupt -> clean change recovered, ``(m - m_corrupt) / (m_clean - m_corrupt)``:
    about 1 for a head that carries the whole effect, 0 for none, negative for one that works against
    the clean answer. Works with TransformerBridge (TL 4) and HookedTransformer (TL 3.9).

    The whole dataset goes through each forward pass (as in TransformerLens); subset big datasets.
    TransformerLens draws its own progress bar; wrap the call in
    ``adapter.silent_patching_progress()`` (what ``--quiet`` does) to hide it.
    """
    from transformer_lens import patching

    adapter.require_model(model)
    clean, corrupt = _clean_and_corrupt(model, clean, corrupt)
    metric = target_logprob_metric(clean) if metric is None else _require_metric(metric)
    device = adapter.model_device(model)
    clean_tokens, corrupt_tokens = clean.tokens.to(device), corrupt.tokens.to(device)
    z_names = [adapter.hook_z_name(layer) for layer in range(model.cfg.n_layers)]
    with adapter.frozen(model), torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean_tokens, names_filter=z_names)
        scores = patching.get_act_patch_attn_head_out_all_pos(model, corrupt_tokens, clean_cache, metric)
        if not normalize:
            return scores.detach().float().cpu()
        clean_value = float(metric(clean_logits))
        corrupt_value = float(metric(model(corrupt_tokens)))
    return ((scores.detach().float().cpu() - corrupt_value) / _gap(clean_value, corrupt_value))


# ====================================================================== path patching
@dataclass(frozen=True)
class PathPatchingResult:
    """Metric values of one path-patching experiment and the share of the effect the path carries.

    ``effect = (patched - clean) / (corrupt - clean)``: 1 when the path alone carries the whole
    clean -> corrupt change of the metric, 0 when it carries none.
    """

    clean: float
    corrupt: float
    patched: float
    effect: float
    senders: list[Head]
    receivers: list[Head] | str
    receiver_input: str


def path_patching(
    model: Any,
    clean: GateData,
    corrupt: GateData | None,
    senders: Sequence[Head],
    receivers: Sequence[Head] | Literal["logits"],
    metric: Metric | None = None,
    receiver_input: ReceiverInput = "v",
) -> PathPatchingResult:
    """The effect of ``senders`` that flows only through ``receivers``' inputs (Wang et al., 2022).

    1. Run clean and corrupt, caching every head's ``hook_z``.
    2. Run clean again with the senders' ``hook_z`` set to their corrupt values and every other head's
       ``hook_z`` frozen to its clean value; record the receivers' ``receiver_input`` (their query,
       key, value or output ``hook_q/k/v/z``, as computed in this run).
    3. Run clean with only the receivers' inputs replaced by the recorded ones, everything else free;
       measure ``metric``.

    ``receivers="logits"`` takes the direct path to the output: the metric of step 2 itself. Only
    attention heads are frozen; MLPs recompute, so sender -> MLP -> receiver routes count as part of
    the path. Senders and receivers are ``(layer, head)`` lists, as :meth:`CHGResult.roles` returns.
    K and V inputs are refused on grouped-query models (a key/value head is shared by several query
    heads); use ``"q"`` or ``"z"`` there. The whole dataset goes through each of the four forward passes.
    """
    layout = adapter.require_model(model)
    clean, corrupt = _clean_and_corrupt(model, clean, corrupt)
    sender_list = _require_heads(senders, layout, "senders", allow_empty=False)
    metric = target_logprob_metric(clean) if metric is None else _require_metric(metric)
    if isinstance(receivers, str):
        if receivers != "logits":
            raise ValueError(f"receivers: expected a list of (layer, head) or 'logits', got {receivers!r}.")
        receiver_list: list[Head] | str = "logits"
    else:
        receiver_list = _require_heads(receivers, layout, "receivers", allow_empty=False)
        overlap = sorted(set(sender_list) & set(receiver_list))
        if overlap:
            raise ValueError(f"receivers: heads {overlap} are also senders; a head cannot be both.")
        _require_receiver_input(model, receiver_input)
    run = _PathPatchingRun(model, clean, corrupt, metric)
    with adapter.frozen(model), torch.no_grad():
        clean_value, corrupt_value = run.baselines()
        layers = None if receiver_list == "logits" else sorted({layer for layer, _ in receiver_list})
        frozen_logits, recorded = run.record(sender_list, receiver_input, layers)
        if receiver_list == "logits":
            patched = float(metric(frozen_logits))
        else:
            patched = run.patched_metric(receiver_list, receiver_input, recorded)
    return PathPatchingResult(
        clean=clean_value, corrupt=corrupt_value, patched=patched,
        effect=(patched - clean_value) / _gap(corrupt_value, clean_value),
        senders=sender_list, receivers=receiver_list, receiver_input=receiver_input,
    )


def path_patching_scores(
    model: Any,
    clean: GateData,
    corrupt: GateData | None,
    senders: Sequence[Head],
    metric: Metric | None = None,
    receiver_input: ReceiverInput = "v",
) -> Float[Tensor, "layer head"]:
    """:func:`path_patching` effect with each head alone as the receiver, as a ``[layer, head]`` map.

    Steps 1 and 2 run once; step 3 once per head after the first sender layer. Heads in or before the
    first sender's layer cannot receive from any sender and the senders themselves are not receivers:
    both are 0.0 by construction, not measured.
    """
    layout = adapter.require_model(model)
    clean, corrupt = _clean_and_corrupt(model, clean, corrupt)
    sender_list = _require_heads(senders, layout, "senders", allow_empty=False)
    metric = target_logprob_metric(clean) if metric is None else _require_metric(metric)
    _require_receiver_input(model, receiver_input)
    first = min(layer for layer, _ in sender_list)
    layers = list(range(first + 1, layout.n_layers))
    run = _PathPatchingRun(model, clean, corrupt, metric)
    scores = torch.zeros(layout.n_layers, layout.n_heads)
    with adapter.frozen(model), torch.no_grad():
        clean_value, corrupt_value = run.baselines()
        _, recorded = run.record(sender_list, receiver_input, layers)
        gap = _gap(corrupt_value, clean_value)
        for layer in layers:
            for head in range(layout.n_heads):
                if (layer, head) in sender_list:
                    continue
                patched = run.patched_metric([(layer, head)], receiver_input, recorded)
                scores[layer, head] = (patched - clean_value) / gap
    return scores


class _PathPatchingRun:
    """The three forward passes of path patching, sharing the clean and corrupt caches."""

    def __init__(self, model: Any, clean: GateData, corrupt: GateData, metric: Metric) -> None:
        self.model = model
        self.metric = metric
        device = adapter.model_device(model)
        self.clean_tokens = clean.tokens.to(device)
        self.corrupt_tokens = corrupt.tokens.to(device)
        self.n_layers = model.cfg.n_layers
        self.z_names = [adapter.hook_z_name(layer) for layer in range(self.n_layers)]
        self._clean_z: dict[str, Tensor] | None = None

    def baselines(self) -> tuple[float, float]:
        clean_logits, cache = self.model.run_with_cache(self.clean_tokens, names_filter=self.z_names)
        self._clean_z = {name: cache[name] for name in self.z_names}
        corrupt_logits, cache = self.model.run_with_cache(self.corrupt_tokens, names_filter=self.z_names)
        self._corrupt_z = {name: cache[name] for name in self.z_names}
        return float(self.metric(clean_logits)), float(self.metric(corrupt_logits))

    def record(
        self, senders: list[Head], receiver_input: str, layers: list[int] | None
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Step 2: senders corrupt, all other heads frozen clean; record receivers' inputs."""
        senders_in = {layer: [h for l_, h in senders if l_ == layer] for layer in range(self.n_layers)}
        recorded: dict[int, Tensor] = {}

        def freeze_z(z: Tensor, hook: Any, layer: int) -> Tensor:
            if receiver_input == "z" and layers is not None and layer in layers:
                recorded[layer] = z.detach().clone()
            name = adapter.hook_z_name(layer)
            frozen = self._clean_z[name].clone()
            for head in senders_in[layer]:
                frozen[:, :, head] = self._corrupt_z[name][:, :, head]
            return frozen

        def record_input(activation: Tensor, hook: Any, layer: int) -> Tensor:
            recorded[layer] = activation.detach().clone()
            return activation

        hooks = [(adapter.hook_z_name(layer), _bind(freeze_z, layer)) for layer in range(self.n_layers)]
        if receiver_input != "z" and layers is not None:
            hooks += [(_input_hook_name(layer, receiver_input), _bind(record_input, layer))
                      for layer in layers]
        with self.model.hooks(fwd_hooks=hooks):
            logits = self.model(self.clean_tokens)
        return logits, recorded

    def patched_metric(self, receivers: list[Head], receiver_input: str, recorded: dict[int, Tensor]
                       ) -> float:
        """Step 3: clean run with only the receivers' inputs replaced by the recorded ones."""
        heads_in: dict[int, list[int]] = {}
        for layer, head in receivers:
            heads_in.setdefault(layer, []).append(head)

        def patch_input(activation: Tensor, hook: Any, layer: int) -> Tensor:
            patched = activation.clone()
            index = heads_in[layer]
            patched[:, :, index] = recorded[layer][:, :, index].to(patched.dtype)
            return patched

        hooks = [(_input_hook_name(layer, receiver_input), _bind(patch_input, layer)) for layer in heads_in]
        with self.model.hooks(fwd_hooks=hooks):
            return float(self.metric(self.model(self.clean_tokens)))


def _bind(fn: Callable[..., Tensor], layer: int) -> Callable[[Tensor, Any], Tensor]:
    def hook(activation: Tensor, hook: Any) -> Tensor:
        return fn(activation, hook, layer)

    return hook


def _input_hook_name(layer: int, receiver_input: str) -> str:
    if receiver_input == "z":
        return adapter.hook_z_name(layer)
    return f"blocks.{layer}.attn.hook_{receiver_input}"


def _require_receiver_input(model: Any, receiver_input: str) -> None:
    if receiver_input not in ("q", "k", "v", "z"):
        raise ValueError(f"receiver_input: expected 'q', 'k', 'v' or 'z', got {receiver_input!r}.")
    n_kv = getattr(model.cfg, "n_key_value_heads", None)
    if receiver_input in ("k", "v") and n_kv is not None and n_kv != model.cfg.n_heads:
        raise ValueError(
            f"receiver_input={receiver_input!r}: this model has {n_kv} key/value heads for "
            f"{model.cfg.n_heads} query heads (grouped-query attention), so one query head's "
            "key/value input is shared with others. Use receiver_input='q' or 'z'."
        )


# ====================================================================== mediation vs CHG
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
        raise TypeError(f"result: expected a CHGResult, got {type(result).__name__}.")
    facilitation = _reduce_seeds(result.facilitating, seed_reduce)
    shape = (result.n_layers, result.n_heads)
    layout = adapter.HeadLayout(result.n_layers, result.n_heads, 0, 0, 0)
    scores: Tensor | None = None
    if isinstance(flagged_heads, (Tensor, np.ndarray)):
        given = torch.as_tensor(flagged_heads)
        if tuple(given.shape) != shape:
            raise ValueError(
                f"flagged_heads: expected a [layer, head] = {list(shape)} tensor, got {list(given.shape)}."
            )
        if given.dtype == torch.bool:
            flags = given.clone()
        else:
            scores = given.float()
            if not torch.isfinite(scores).all():
                raise ValueError("flagged_heads: scores must be finite.")
            flags = None
            if top_k is not None:
                _require_positive_int(top_k, "top_k")
                flags = torch.zeros(shape, dtype=torch.bool)
                flags.view(-1)[torch.sort(-scores.flatten(), stable=True).indices[:top_k]] = True
    else:
        flags = torch.zeros(shape, dtype=torch.bool)
        for layer, head in _require_heads(flagged_heads, layout, "flagged_heads", allow_empty=False):
            flags[layer, head] = True

    out: dict[str, Any] = {
        "seed_reduce": seed_reduce, "n_heads": int(facilitation.numel()),
        "n_flagged": None, "n_rest": None, "facilitation_flagged": None, "facilitation_rest": None,
        "t": None, "p": None, "spearman_rho": None, "spearman_p": None,
    }
    if flags is not None:
        flagged, rest = facilitation[flags].numpy(), facilitation[~flags].numpy()
        if len(flagged) < 2 or len(rest) < 2:
            raise ValueError(
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


def _reduce_seeds(per_seed: Float[Tensor, "seed layer head"], how: SeedReduce | int
                  ) -> Float[Tensor, "layer head"]:
    per_seed = per_seed.detach().float().cpu()
    if isinstance(how, int) and not isinstance(how, bool):
        if not -per_seed.shape[0] <= how < per_seed.shape[0]:
            raise ValueError(f"seed_reduce: seed index must be in [0, {per_seed.shape[0]}), got {how}.")
        return per_seed[how]
    if how == "max":
        return per_seed.max(dim=0).values
    if how == "mean":
        return per_seed.mean(dim=0)
    if how == "min":
        return per_seed.min(dim=0).values
    raise ValueError(f"seed_reduce: expected 'max', 'mean', 'min' or a seed index, got {how!r}.")


# ====================================================================== input checks
def _require_data(data: Any, model: Any, argument: str) -> GateData:
    if not isinstance(data, GateData):
        raise TypeError(f"{argument}: expected a chg_tlens.GateData, got {type(data).__name__}.")
    return data.checked_for(model, argument)


def _clean_and_corrupt(model: Any, clean: Any, corrupt: Any) -> tuple[GateData, GateData]:
    clean = _require_data(clean, model, "clean")
    if corrupt is None:
        if clean.corrupt is None:
            raise ValueError(
                "corrupt: no corrupt data was given and clean has no corrupt twin "
                "(attach one with clean.with_corrupt(...))."
            )
        corrupt = clean.corrupt
    corrupt = _require_data(corrupt, model, "corrupt")
    if corrupt.tokens.shape != clean.tokens.shape:
        raise ValueError(
            f"corrupt: tokens must have the clean tokens' shape {list(clean.tokens.shape)} so that "
            f"positions line up, got {list(corrupt.tokens.shape)}."
        )
    return clean, corrupt


def _require_result(result: Any, layout: adapter.HeadLayout) -> None:
    if not isinstance(result, CHGResult):
        raise TypeError(f"result: expected a CHGResult, got {type(result).__name__}.")
    if (result.n_layers, result.n_heads) != (layout.n_layers, layout.n_heads):
        raise ValueError(
            f"result: gates are [layer, head] = {[result.n_layers, result.n_heads]}, but the model has "
            f"{[layout.n_layers, layout.n_heads]}; was it fitted on another model?"
        )


def _require_seed(result: CHGResult, seed: int) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool) or not -result.n_seeds <= seed < result.n_seeds:
        raise ValueError(f"seed: expected an int in [0, {result.n_seeds}), got {seed!r}.")
    return seed % result.n_seeds


def _ranking_scores(
    result: CHGResult, score: Any, seed: int, layout: adapter.HeadLayout, label: str | None
) -> tuple[Tensor, str]:
    if isinstance(score, str):
        if score not in ROLES:
            raise ValueError(
                f"score: expected one of {list(ROLES)} or a [layer, head] tensor, got {score!r}."
            )
        return getattr(result, score)[seed].detach().float().cpu(), score
    scores = torch.as_tensor(score, dtype=torch.float32).detach().cpu()
    if tuple(scores.shape) != (layout.n_layers, layout.n_heads):
        raise ValueError(
            f"score: a score tensor must be [layer, head] = {[layout.n_layers, layout.n_heads]}, "
            f"got {list(scores.shape)}."
        )
    return scores, label or "custom"


def _require_gate_values(values: Any) -> list[float]:
    try:
        values = [float(v) for v in values]
    except TypeError:
        raise ValueError(f"values: expected a sequence of gate values in [0, 1], got {values!r}.") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"values: expected a non-empty sequence of gate values in [0, 1], got {values!r}.")
    return values


def _require_heads(
    heads: Any, layout: adapter.HeadLayout, argument: str, allow_empty: bool = True
) -> list[Head]:
    """``(layer, head)`` pairs within the model, in the order given, without duplicates."""
    try:
        pairs = [(int(layer), int(head)) for layer, head in heads]
    except (TypeError, ValueError):
        raise ValueError(
            f"{argument}: expected a list of (layer, head) pairs, got {heads!r}."
        ) from None
    if not pairs and not allow_empty:
        raise ValueError(f"{argument}: expected at least one (layer, head) pair, got none.")
    outside = [p for p in pairs if not (0 <= p[0] < layout.n_layers and 0 <= p[1] < layout.n_heads)]
    if outside:
        raise ValueError(
            f"{argument}: heads {outside[:5]} lie outside the model's {layout.n_layers} layers x "
            f"{layout.n_heads} heads."
        )
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"{argument}: a head is listed twice in {pairs}.")
    return pairs


def _require_metric(metric: Any) -> Metric:
    if not callable(metric):
        raise TypeError(
            f"metric: expected a function of logits returning a scalar, got {type(metric).__name__}."
        )
    return metric


def _require_positive_int(value: Any, argument: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{argument}: expected a positive int, got {value!r}.")


def _gap(a: float, b: float) -> float:
    """Denominator of a normalised effect; an absent effect cannot be normalised."""
    if abs(a - b) < 1e-9:
        raise ValueError(
            f"the metric is the same on clean and corrupt data ({a:.6g} vs {b:.6g}), so a normalised "
            "effect is undefined; check the corrupt twin or use another metric."
        )
    return a - b


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
    "plot_ablation_curve",
    "sufficiency",
    "target_logprob_metric",
]


# ====================================================================== the standard set, in one call
def validate_run(
    model: Any,
    data: GateData,
    result: CHGResult,
    seed: int = 0,
    threshold: float = 0.5,
    max_heads: int = 20,
    n_random: int = 10,
    top_k: int = 10,
    patching: bool = True,
    batch_size: int = 16,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Sufficiency, necessity, targeted ablation and (with a corrupt twin) activation patching vs CHG.

    ``data`` should be held out from the fit. Returns a JSON-ready summary (one block per check) and
    the ablation-curve frame. Random head sets give the reference for sufficiency and necessity: the
    circuit should match or beat nearly all of them. The ablation summary reads both curves at k = the
    circuit's size: removing k facilitating heads should cost far more than removing k irrelevant ones.
    ``patching`` needs ``data.corrupt``; without it the block says so.
    """
    layout = adapter.require_model(model)
    data = _require_data(data, model, "data")
    _require_result(result, layout)
    seed = _require_seed(result, seed)
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
