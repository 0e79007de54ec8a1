"""Do the roles agree with causal mediation? Activation patching (TransformerLens' own) and path patching.

Metrics map logits to a scalar; every intervention is a hook inside ``model.hooks(...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from chg_tlens.core import checks, interventions
from chg_tlens.core.data import GateData
from chg_tlens.core.objectives import target_logprobs, target_positions
from chg_tlens.errors import InputError
from chg_tlens.models import adapter
from chg_tlens.models.protocol import TransformerLensModel

Head = tuple[int, int]
Metric = Callable[[Float[Tensor, "batch pos vocab"]], Tensor]
ExampleMetric = Callable[[Float[Tensor, "batch pos vocab"]], Float[Tensor, " batch"]]
"""A metric before its mean over examples: one value per example (what an interval over prompts needs)."""
ReceiverInput = interventions.HeadActivation


def target_logprob_metric(data: GateData) -> Metric:
    """Metric for patching: mean log-prob of ``data``'s own targets (a scalar per forward)."""
    per_example = target_logprob_per_example(data)

    def mean_target_logprob(logits: Float[Tensor, "batch pos vocab"]) -> Tensor:
        return per_example(logits).mean()

    return mean_target_logprob


def target_logprob_per_example(data: GateData) -> ExampleMetric:
    """:func:`target_logprob_metric` before the mean over examples: each example's mean target log-prob,
    so an effect can be resampled over prompts."""
    tokens, target_mask = data.tokens, data.target_mask

    def target_logprob_rows(logits: Float[Tensor, "batch pos vocab"]) -> Tensor:
        device = logits.device
        return target_logprobs(logits, tokens.to(device), target_mask.to(device),
                               targets=data.targets_to(device))[0]

    return target_logprob_rows


def logit_diff_metric(clean: GateData, corrupt: GateData) -> Metric:
    """Metric for patching: logit of the clean target minus logit of the corrupt target, averaged
    over target tokens of each example, then over examples. Needs both at the same positions."""
    per_example = logit_diff_per_example(clean, corrupt)

    def mean_logit_diff(logits: Float[Tensor, "batch pos vocab"]) -> Tensor:
        return per_example(logits).mean()

    return mean_logit_diff


def logit_diff_per_example(clean: GateData, corrupt: GateData) -> ExampleMetric:
    """:func:`logit_diff_metric` before the mean over examples: one logit difference per example."""
    if (clean.tokens.shape != corrupt.tokens.shape or clean.per_position != corrupt.per_position
            or not torch.equal(clean.target_mask, corrupt.target_mask)):
        raise InputError(
            "logit_diff_metric: clean and corrupt must have the same shape, the same target "
            f"positions and the same scoring mode (tokens {list(clean.tokens.shape)} vs "
            f"{list(corrupt.tokens.shape)})."
        )
    example, position = target_positions(clean.target_mask, clean.targets)
    clean_answer, corrupt_answer = clean.labels(), corrupt.labels()
    counts = torch.bincount(example, minlength=len(clean)).clamp(min=1)

    def logit_diff_rows(logits: Float[Tensor, "batch pos vocab"]) -> Tensor:
        picked = logits[example.to(logits.device), position.to(logits.device)].float()
        diff = (picked.gather(-1, clean_answer.to(logits.device)[:, None])
                - picked.gather(-1, corrupt_answer.to(logits.device)[:, None])).squeeze(-1)
        per_example = diff.new_zeros(len(clean)).index_add(0, example.to(logits.device), diff)
        return per_example / counts.to(logits.device)

    return logit_diff_rows


def patching_scores(model: TransformerLensModel, clean: GateData, corrupt: GateData | None = None,
                    metric: Metric | None = None, normalize: bool = True) -> Float[Tensor, "layer head"]:
    """Head-level activation patching through TransformerLens' own ``patching`` module.

    Runs ``transformer_lens.patching.get_act_patch_attn_head_out_all_pos``: the corrupt run with one
    head's ``hook_z`` (all positions) replaced by its clean value, once per head. ``metric`` maps logits
    to a scalar (default: mean target log-prob of ``clean``'s targets). With ``normalize`` the result
    is the fraction of the corrupt -> clean change recovered, ``(m - m_corrupt) / (m_clean - m_corrupt)``:
    about 1 for a head that carries the whole effect, 0 for none, negative for one that works against
    the clean answer. Works with TransformerBridge (TL 4) and HookedTransformer (TL 3.9).

    The whole dataset goes through each forward pass (as in TransformerLens); subset big datasets.
    TransformerLens draws its own progress bar; wrap the call in
    ``silent_patching_progress()`` (what ``--quiet`` does) to hide it.
    """
    adapter.require_model(model)
    clean, corrupt = clean_and_corrupt(model, clean, corrupt)
    metric = target_logprob_metric(clean) if metric is None else _require_metric(metric)
    with adapter.frozen(model), torch.no_grad():
        scores, clean_logits = _patch_each_head(model, clean, corrupt, metric)
        if not normalize:
            return scores
        clean_value = float(metric(clean_logits))
        corrupt_value = float(metric(model(corrupt.tokens.to(adapter.model_device(model)))))
    return (scores - corrupt_value) / _gap(clean_value, corrupt_value)


def patching_rows(model: TransformerLensModel, clean: GateData, corrupt: GateData | None = None,
                  metric: ExampleMetric | None = None) -> Float[Tensor, "example layer head"]:
    """:func:`patching_scores` (``normalize=False``) before its mean over examples: each example's
    ``metric`` (one value per example; default its mean target log-prob) on the corrupt run with one
    head's ``hook_z`` patched from the clean run, from the same forwards, so an interval over prompts
    costs nothing more.

    TransformerLens (3.9 and 4) wants a metric that returns a scalar: the one it is handed returns the
    mean of ``metric``'s rows and keeps the rows. It calls it once per head, layer by layer; the rows'
    means are checked against the scalars it returns, so another order is an error, not a shuffle.
    """
    adapter.require_model(model)
    clean, corrupt = clean_and_corrupt(model, clean, corrupt)
    rows_of = target_logprob_per_example(clean) if metric is None else _require_metric(metric)
    kept: list[Tensor] = []

    def mean_keeping_rows(logits: Float[Tensor, "batch pos vocab"]) -> Tensor:
        rows = rows_of(logits).float()
        kept.append(rows.detach().cpu())
        return rows.mean()

    with adapter.frozen(model), torch.no_grad():
        scores, _ = _patch_each_head(model, clean, corrupt, mean_keeping_rows)
    if len(kept) != scores.numel():
        raise RuntimeError(f"patching_rows: TransformerLens called the metric {len(kept)} times for "
                           f"{scores.numel()} heads.")
    rows = torch.stack(kept, dim=1).reshape(len(clean), *scores.shape)
    if not torch.allclose(rows.mean(dim=0), scores, rtol=1e-5, atol=1e-6):
        raise RuntimeError("patching_rows: TransformerLens patched the heads in an order other than "
                           "layer by layer, so its metric calls cannot be matched to heads.")
    return rows


def _patch_each_head(model: TransformerLensModel, clean: GateData, corrupt: GateData, metric: Metric
                     ) -> tuple[Float[Tensor, "layer head"], Float[Tensor, "batch pos vocab"]]:
    """TransformerLens' head patching of ``hook_z`` at all positions, clean into corrupt: ``metric`` per
    head, and the clean run's logits (for a caller that normalises)."""
    from transformer_lens import patching

    device = adapter.model_device(model)
    z_names = [adapter.hook_z_name(layer) for layer in range(model.cfg.n_layers)]
    clean_logits, cache = model.run_with_cache(clean.tokens.to(device), names_filter=z_names)
    scores = patching.get_act_patch_attn_head_out_all_pos(model, corrupt.tokens.to(device), cache, metric)
    return scores.detach().float().cpu(), clean_logits


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
    model: TransformerLensModel,
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
    On a grouped-query model a key/value head is shared by several query heads: a receiver's K or V
    input is patched at its key/value head and the heads sharing it are held at their clean output
    (:func:`receiver_input_hooks`), so K/V receivers must then lie in one layer. The whole dataset goes
    through each of the four forward passes.
    """
    layout = adapter.require_model(model)
    clean, corrupt = clean_and_corrupt(model, clean, corrupt)
    sender_list = checks.heads(senders, layout, "senders", allow_empty=False)
    metric = target_logprob_metric(clean) if metric is None else _require_metric(metric)
    if isinstance(receivers, str):
        if receivers != "logits":
            raise InputError(f"receivers: expected a list of (layer, head) or 'logits', got {receivers!r}.")
        receiver_list: list[Head] | str = "logits"
    else:
        receiver_list = checks.heads(receivers, layout, "receivers", allow_empty=False)
        overlap = sorted(set(sender_list) & set(receiver_list))
        if overlap:
            raise InputError(f"receivers: heads {overlap} are also senders; a head cannot be both.")
        require_receiver_input(model, receiver_input)
        _require_shared_inputs_in_one_layer(model, receiver_list, receiver_input)
    run = PathPatchingRun(model, clean, corrupt, metric)
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
    model: TransformerLensModel,
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
    clean, corrupt = clean_and_corrupt(model, clean, corrupt)
    sender_list = checks.heads(senders, layout, "senders", allow_empty=False)
    metric = target_logprob_metric(clean) if metric is None else _require_metric(metric)
    require_receiver_input(model, receiver_input)
    first = min(layer for layer, _ in sender_list)
    layers = list(range(first + 1, layout.n_layers))
    run = PathPatchingRun(model, clean, corrupt, metric)
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


class PathPatchingRun:
    """The three forward passes of path patching, sharing the clean and counterfactual caches.

    The senders' counterfactual ``hook_z`` comes from the corrupt run, or (``ablated_z`` given, one
    ``[pos, head, d_head]`` per layer, e.g. each head's mean over examples) from fixed values.
    """

    def __init__(self, model: TransformerLensModel, clean: GateData, corrupt: GateData | None,
                 metric: Metric | None = None, ablated_z: Sequence[Tensor] | None = None) -> None:
        if (corrupt is None) == (ablated_z is None):
            raise ValueError("PathPatchingRun: give exactly one of corrupt and ablated_z.")
        self.model = model
        self.metric = metric
        device = adapter.model_device(model)
        self.clean_tokens = clean.tokens.to(device)
        self.corrupt_tokens = None if corrupt is None else corrupt.tokens.to(device)
        self.ablated_z = ablated_z
        self.n_layers = model.cfg.n_layers
        self.z_names = [adapter.hook_z_name(layer) for layer in range(self.n_layers)]
        self.clean_z: dict[str, Tensor] = {}
        self.corrupt_z: dict[str, Tensor] = {}

    def caches(self) -> tuple[Tensor, Tensor]:
        """Step 1: clean and counterfactual ``hook_z`` of every head; the logits of both runs (the
        counterfactual run of fixed values is the clean input with every head set to them)."""
        clean_logits, cache = self.model.run_with_cache(self.clean_tokens, names_filter=self.z_names)
        self.clean_z = {name: cache[name] for name in self.z_names}
        if self.corrupt_tokens is not None:
            corrupt_logits, cache = self.model.run_with_cache(self.corrupt_tokens, names_filter=self.z_names)
            self.corrupt_z = {name: cache[name] for name in self.z_names}
            return clean_logits, corrupt_logits
        for layer, name in enumerate(self.z_names):
            clean_z = self.clean_z[name]
            self.corrupt_z[name] = interventions.replaced(clean_z, self.ablated_z[layer])
        with self.model.hooks(fwd_hooks=self.frozen_hooks(self.corrupt_z)):
            return clean_logits, self.model(self.clean_tokens)

    def baselines(self) -> tuple[float, float]:
        clean_logits, corrupt_logits = self.caches()
        return float(self.metric(clean_logits)), float(self.metric(corrupt_logits))

    def frozen_hooks(self, values: dict[str, Tensor], senders: Sequence[Head] = ()) -> list:
        """Every head's ``hook_z`` set to ``values``, the senders' to their counterfactual values."""
        hooks = []
        for layer, name in enumerate(self.z_names):
            frozen = values[name].clone()
            heads = [h for l_, h in senders if l_ == layer]
            frozen[:, :, heads] = self.corrupt_z[name][:, :, heads]
            hooks.append(interventions.replace(layer, frozen))
        return hooks

    def record(
        self, senders: list[Head], receiver_input: ReceiverInput, layers: list[int] | None
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Step 2: senders corrupt, all other heads frozen clean; record receivers' inputs."""
        logits, recorded = self.record_inputs(senders, (receiver_input,), layers)
        return logits, recorded[receiver_input]

    def record_inputs(
        self, senders: list[Head], receiver_inputs: Sequence[ReceiverInput], layers: list[int] | None
    ) -> tuple[Tensor, dict[str, dict[int, Tensor]]]:
        """Step 2 recording several kinds of input (``"q"``, ``"k"``, ...) of ``layers`` in one pass."""
        hooks: list = []
        recorded: dict[str, dict[int, Tensor]] = {}
        for kind in receiver_inputs:
            kind_hooks, recorded[kind] = interventions.record(layers or [], activation=kind)
            hooks += kind_hooks
        hooks += self.frozen_hooks(self.clean_z, senders)  # after the record of a "z" receiver
        with self.model.hooks(fwd_hooks=hooks):
            logits = self.model(self.clean_tokens)
        return logits, recorded

    def patched_logits(self, receivers: list[Head], receiver_input: ReceiverInput,
                       recorded: dict[int, Tensor]) -> Tensor:
        """Step 3: clean run with only the receivers' inputs replaced by the recorded ones."""
        hold = {layer: self.clean_z[name] for layer, name in enumerate(self.z_names)}
        hooks = receiver_input_hooks(receivers, receiver_input, recorded, key_value_group(self.model), hold)
        with self.model.hooks(fwd_hooks=hooks):
            return self.model(self.clean_tokens)

    def patched_metric(self, receivers: list[Head], receiver_input: ReceiverInput,
                       recorded: dict[int, Tensor]) -> float:
        """Step 3 measured by the metric."""
        return float(self.metric(self.patched_logits(receivers, receiver_input, recorded)))


def require_receiver_input(model: TransformerLensModel, receiver_input: str) -> None:
    if receiver_input not in ("q", "k", "v", "z"):
        raise InputError(f"receiver_input: expected 'q', 'k', 'v' or 'z', got {receiver_input!r}.")


def key_value_group(model: TransformerLensModel) -> int:
    """Query heads per key/value head: 1, or more under grouped-query attention (SmolLM2: 9 / 3 = 3)."""
    n_kv = getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads
    return int(model.cfg.n_heads) // int(n_kv)


def shares_key_values(group: int, receiver_input: str) -> bool:
    """Whether ``receiver_input`` is computed once for ``group`` > 1 query heads (a grouped-query key or
    value), so patching it for one receiver touches the heads sharing it."""
    return group > 1 and receiver_input in ("k", "v")


def receiver_input_hooks(
    receivers: Sequence[Head],
    receiver_input: ReceiverInput,
    recorded: dict[int, Tensor],
    group: int = 1,
    hold: dict[int, Tensor] | None = None,
) -> list[interventions.Hook]:
    """Hooks giving ``receivers`` (and only them) their ``recorded`` ``receiver_input``.

    Under grouped-query attention (``group`` > 1) a key or value is computed once per key/value head
    and read by ``group`` query heads (head ``h`` reads key/value head ``h // group``, as TransformerLens
    repeats them), so the recorded key/value head goes in and the heads sharing it that are not
    receivers are held at their clean output ``hold[layer]`` (``[batch, pos, head, d_head]``): the change
    reaches the receivers alone, as it does when each head has its own key. Holding is exact when those
    heads would otherwise see a clean residual stream, i.e. no receiver sits in an earlier layer
    (:func:`path_patching` checks this); ``hold=None`` skips it (every head's output is overwritten
    afterwards anyway).
    """
    heads_in: dict[int, list[int]] = {}
    for layer, head in receivers:
        heads_in.setdefault(layer, []).append(head)
    shared = shares_key_values(group, receiver_input)
    hooks = []
    for layer, heads in sorted(heads_in.items()):
        touched = sorted({head // group for head in heads}) if shared else heads
        hooks.append(interventions.replace(layer, recorded[layer], heads=touched, activation=receiver_input))
        partners = [head for kv in touched for head in range(kv * group, (kv + 1) * group)
                    if head not in heads] if shared else []
        if partners and hold is not None:
            hooks.append(interventions.replace(layer, hold[layer], heads=partners))
    return hooks


def _require_shared_inputs_in_one_layer(model: TransformerLensModel, receivers: Sequence[Head],
                                        receiver_input: str) -> None:
    """Grouped-query k/v receivers across layers: a head sharing a later receiver's key/value head would
    see the earlier receivers' change, so holding it at its clean output would not be path patching."""
    layers = sorted({layer for layer, _ in receivers})
    if shares_key_values(key_value_group(model), receiver_input) and len(layers) > 1:
        raise InputError(
            f"receivers: with receiver_input={receiver_input!r} on a grouped-query model (each key/value "
            f"head is shared by {key_value_group(model)} query heads), give receivers in one layer (got "
            f"layers {layers}); call path_patching once per layer, or use receiver_input='q' or 'z'.")


def clean_and_corrupt(model: TransformerLensModel, clean: Any, corrupt: Any, method: str = "corrupt"
                      ) -> tuple[GateData, GateData]:
    """Clean data and its corrupt twin (given, or ``clean.corrupt``), both fitting the model, same shape."""
    clean = checks.gate_data(clean, model, "clean")
    twin = checks.corrupt_twin(clean, method, corrupt)
    return clean, checks.gate_data(twin, model, "corrupt")


def _require_metric(metric: Any) -> Metric:
    if not callable(metric):
        raise InputError(
            f"metric: expected a function of logits returning a scalar, got {type(metric).__name__}."
        )
    return metric


def _gap(a: float, b: float) -> float:
    """Denominator of a normalised effect; an absent effect cannot be normalised."""
    if abs(a - b) < 1e-9:
        raise InputError(
            f"the metric is the same on clean and corrupt data ({a:.6g} vs {b:.6g}), so a normalised "
            "effect is undefined; check the corrupt twin or use another metric."
        )
    return a - b


@contextmanager
def silent_patching_progress(silent: bool = True) -> Iterator[None]:
    """Turn off the tqdm bars that ``transformer_lens.patching`` draws on its own.

    TransformerLens takes no progress flag and tqdm reads ``TQDM_DISABLE`` only at import, so
    ``--quiet`` swaps the module's ``tqdm`` for a disabled one while the block runs, then restores it.
    """
    if not silent:
        yield
        return
    from functools import partial

    from transformer_lens import patching

    original = patching.tqdm
    patching.tqdm = partial(original, disable=True)
    try:
        yield
    finally:
        patching.tqdm = original
