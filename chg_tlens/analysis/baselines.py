"""Head scores from other methods, in CHG's ``[layer, head]`` layout, each with what it cost.

Every method answers the same question CHG does ("which heads matter for this task?") with one number
per head, higher = more important, so the results line up with ``CHGResult.facilitating`` and with
each other (see ``chg_tlens.compare``):

    gradient_importance   |d loss / d gate| at every gate = 1, normalised per layer ("hisp";
                          "hisp_raw" without the normalisation)   (Michel et al., 2019)
    ablation_scores       task metric lost when one head is zeroed or mean-ablated (the mean over the
                          example's own template: Wang et al., 2022; Conmy et al., 2023)
    activation_patching   transformer_lens.patching on hook_z, clean <-> corrupt twin
    attribution_patching  (clean z - corrupt z) . d metric / d z, summed per head, the gradient taken at
                          the corrupt run (Nanda) or at the clean run ("eap_clean": Syed et al., 2023)
    eap_ig                the same with integrated gradients along the input embeddings (Hanna et al., 2024)
    eap_ig_sweep          eap_ig at several step counts from one run of the largest
                          (eap_ig_step_counts: the counts it accepts)
    subnetwork_probing    hard-concrete L0 masks trained on task NLL + sparsity (Cao et al., 2021)
    random_scores         seeded noise, the floor every method must beat

The task metric throughout is the mean target log-probability of ``GateData`` (the negative of CHG's
NLL), so "positive = the head helps the task" means the same thing in every method. Costs are counted
in example passes: a forward of a batch of 32 counts 32.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from chg_tlens.analysis.ablation import evaluate_gates_per_example
from chg_tlens.analysis.patching import patching_rows, target_logprob_metric, target_logprob_per_example
from chg_tlens.core import checks, interventions
from chg_tlens.core.data import GateData
from chg_tlens.core.forward import on_device
from chg_tlens.core.gates import HeadGates
from chg_tlens.core.objectives import pick_target_logits, target_logprobs, target_positions
from chg_tlens.errors import InputError
from chg_tlens.models import adapter
from chg_tlens.models.protocol import TransformerLensModel

AblationKind = Literal["zero", "mean"]
MeanReference = Literal["template", "all"]
"""What mean ablation averages a head over: the examples of the ablated example's own group
(``GateData.groups``, its template), or every example."""
PatchDirection = Literal["denoise", "noise"]
AttributionBackend = Literal["auto", "transformer_lens", "hooks"]
AttributionEndpoint = Literal["corrupt", "clean"]
SubnetworkObjective = Literal["nll", "kl"]
"""Where attribution patching takes its gradient: the corrupt run (Nanda) or the clean run (Syed et al.)."""
Riemann = Literal["right", "left"]
"""EAP-IG's points: alpha = k/m for k = 1..m (Hanna et al., ending at the clean input) or k = 0..m-1."""

EAP_IG_STEPS = 5
"""Default integrated-gradient steps of :func:`eap_ig` (Hanna et al. find a handful already close)."""
EAP_IG_STEP_SWEEP = (1, 2, 4, 8, 16, 32)
"""Step counts :func:`eap_ig_sweep` reads off one run by default (each divides the largest)."""
EMBEDDING_HOOK = "hook_embed"
"""Where EAP-IG interpolates inputs: the token embedding (positions are the same in both prompts)."""
HARD_CONCRETE_BETA = 2.0 / 3.0
"""Temperature of the hard-concrete distribution (Louizos et al., 2018; Cao et al., 2021)."""
HARD_CONCRETE_GAMMA = -0.1
"""Lower end of the stretched interval, so a mask can be exactly 0."""
HARD_CONCRETE_ZETA = 1.1
"""Upper end of the stretched interval, so a mask can be exactly 1."""


PER_EXAMPLE = "per_example"
"""``HeadScores.details`` key of a method's ``[example, layer, head]`` scores, whose mean over examples is
its ``scores``: methods that are means over prompts keep them, so a comparison can resample prompts
(``chg_tlens.analysis.statistics``)."""


@dataclass
class HeadScores:
    """One method's verdict on every head, ``[layer, head]``, higher = more important for the task.

    ``signed`` says whether a negative score means "the head hurts the task" (ablation, patching,
    attribution) or the method only measures magnitude (Michel's gradient importance, masks).
    """

    scores: Float[Tensor, "layer head"]
    method: str
    forward_passes: int = 0
    """Example forward passes (a batch of B counts B)."""
    backward_passes: int = 0
    """Example backward passes."""
    seconds: float = 0.0
    signed: bool = True
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scores.ndim != 2:
            raise InputError(
                f"HeadScores.scores must be [layer, head], got shape {list(self.scores.shape)}."
            )

    def cost(self) -> dict[str, float]:
        return {"forward_passes": self.forward_passes, "backward_passes": self.backward_passes,
                "seconds": round(self.seconds, 3)}


# ------------------------------------------------------------------------------ methods
def gradient_importance(
    model: TransformerLensModel, data: GateData, batch_size: int = 32, absolute: bool = True,
    normalize: bool | None = None,
) -> HeadScores:
    """Michel et al. (2019): ``I_h = E_x |d NLL(x) / d g_h|`` at every gate ``g = 1`` (the gate value, not
    its logit), then divided by the L2 norm of its layer's ``I`` (their Sec. 4.2, which finds the
    normalisation essential; ACDC's HISP keeps it). Named ``hisp`` in tables, as the ACDC paper calls it
    ("head importance score for pruning"), so figures line up with theirs.

    ``normalize=False`` keeps the raw ``I_h`` (``hisp_raw``), comparable across layers as is: the
    normalisation puts every layer on one scale, so a layer with one large head and a layer with
    several moderate ones can swap places. Each example gets its own copy of the gates (one mask per
    example), so a single backward gives every per-example gradient and the absolute value is taken
    before averaging, as in the paper. ``absolute=False`` instead returns the signed mean
    ``d logprob / d g`` (``gradient_signed``, never normalised): positive when opening the head helps.
    A layer whose heads all score 0 stays 0.
    """
    layout = adapter.require_model(model)
    data = checks.gate_data(data, model)
    checks.positive_int(batch_size, "batch_size")
    normalize = absolute if normalize is None else normalize
    if normalize and not absolute:
        raise InputError("gradient_importance: normalize=True needs absolute=True (Michel et al. normalise "
                         "magnitudes; a signed layer norm would mix helping and hurting heads).")
    device = adapter.model_device(model)
    started = time.time()
    rows = []
    with adapter.frozen(model):
        for batch, tokens, target_mask in on_device(data, batch_size, device):
            values = torch.ones(len(batch), layout.n_layers, layout.n_heads, device=device,
                                requires_grad=True)
            gates = differentiable_gates(values)
            with model.hooks(fwd_hooks=gates.hooks()):
                logits = model(tokens)  # mask m gates example m
            logprob = target_logprobs(logits, tokens, target_mask, targets=batch.targets_to(device))
            (grad,) = torch.autograd.grad(logprob.sum(), values)
            rows.append((grad.abs() if absolute else grad).float().cpu())
    per_example = torch.cat(rows)
    scores = per_example.mean(dim=0)
    name = "gradient_signed" if not absolute else "hisp" if normalize else "hisp_raw"
    details: dict[str, Any] = {"absolute": absolute, "normalized": normalize}
    if not normalize:  # a per-layer norm of the mean is no mean of per-example rows
        details[PER_EXAMPLE] = per_example
    return HeadScores(layer_normalized(scores) if normalize else scores, name, len(data), len(data),
                      time.time() - started, signed=not absolute, details=details)


def layer_normalized(scores: Float[Tensor, "layer head"]) -> Float[Tensor, "layer head"]:
    """Each layer's scores divided by their L2 norm (Michel et al.'s normalisation); an all-zero layer
    stays zero rather than becoming NaN."""
    norms = scores.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, scores / norms.clamp(min=torch.finfo(scores.dtype).tiny), scores)


def ablation_scores(
    model: TransformerLensModel,
    data: GateData,
    kind: AblationKind = "zero",
    batch_size: int = 32,
    rows_per_pass: int = 256,
    reference: MeanReference | None = None,
) -> HeadScores:
    """Task metric lost when one head is ablated, one head at a time: ``metric(all) - metric(-h)``.

    ``zero`` gates the head to 0 (all heads in a few batched passes, ``rows_per_pass`` examples x
    settings each); ``mean`` replaces its ``hook_z`` by its mean over a reference distribution at
    each position (over the examples that reach that position), which keeps the head's constant part.
    The ``reference`` of ``mean``: ``"template"`` (the default when ``data.groups`` is set) averages
    over the examples of the ablated example's own group, as IOI (Wang et al., 2022) and ACDC (Conmy et
    al., 2023) take the mean over prompts of the same template: a pooled mean would mix templates whose
    words sit at other positions, and count that as the head's effect. ``"all"`` (the default without
    groups) averages over every example. ``details["reference"]`` says which was used.
    Positive = the task needs the head; negative = the task is better without it.
    """
    layout = adapter.require_model(model)
    data = checks.gate_data(data, model)
    if kind not in ("zero", "mean"):
        raise InputError(f"ablation_scores: kind must be 'zero' or 'mean', got {kind!r}.")
    started = time.time()
    n_heads_total = layout.n_layers * layout.n_heads
    details: dict[str, Any] = {}
    if kind == "zero":
        if reference is not None:
            raise InputError(f"ablation_scores: reference={reference!r} picks what kind='mean' averages "
                             "over; zero ablation has no reference.")
        settings = torch.cat([torch.ones(1, layout.n_layers, layout.n_heads),
                              one_head_off(layout.n_layers, layout.n_heads)])
        logprob, _ = evaluate_gates_per_example(model, data, settings, rows_per_pass)
        full_rows = logprob[0]
        per_example = (full_rows - logprob[1:]).T.reshape(len(data), layout.n_layers, layout.n_heads)
        forward = len(data) * (1 + n_heads_total)
    else:
        reference = mean_reference(data, reference)
        means = ablation_means(model, data, reference, batch_size=batch_size)
        full_rows, per_example = _mean_ablation_rows(model, data, means, batch_size)
        forward = len(data) * (2 + n_heads_total)
        details = {"reference": reference, "n_reference_groups": 1 if reference == "all"
                   else int(data.groups.unique().numel())}
    return HeadScores(per_example.mean(dim=0), f"ablation_{kind}", forward, 0, time.time() - started,
                      signed=True, details={"metric_all_heads": float(full_rows.mean()),
                                            PER_EXAMPLE: per_example, **details})


def mean_reference(data: GateData, reference: MeanReference | None) -> MeanReference:
    """The reference mean ablation uses on ``data``: as given, else ``"template"`` when the data has
    groups and ``"all"`` when it has none; a template reference without groups is refused."""
    if reference is None:
        return "all" if data.groups is None else "template"
    if reference not in ("template", "all"):
        raise InputError(f"reference must be 'template' or 'all', got {reference!r}.")
    if reference == "template" and data.groups is None:
        raise InputError("reference='template' needs data.groups (the template of each example, which "
                         "the ioi task sets); give them with data.with_groups(...), or use reference='all' "
                         "for the mean over every example.")
    return reference


def ablation_means(
    model: TransformerLensModel, data: GateData, reference: MeanReference,
    over: GateData | None = None, batch_size: int = 32,
) -> list[Float[Tensor, "pos head d_head"]] | list[Float[Tensor, "example pos head d_head"]]:
    """What mean ablation sets each head of ``data`` to, per layer: its mean over ``over`` (default
    ``data``) at each position, ``[pos, head, d_head]`` with ``reference="all"``; with ``"template"``,
    each example's row ``[example, pos, head, d_head]`` is the mean over the examples of ``over`` that
    share its template (``groups`` id), so every template of ``data`` must occur in ``over``."""
    over = data if over is None else over
    if reference == "all":
        return mean_head_activations(model, over, batch_size)
    mean_reference(data, "template")
    mean_reference(over, "template")
    rows_of_over = mean_head_activations(model, over, batch_size, over.groups)
    first = {}
    for row, group in enumerate(over.groups.tolist()):
        first.setdefault(group, row)
    missing = sorted(set(data.groups.tolist()) - set(first))
    if missing:
        raise InputError(f"reference: templates {missing[:8]} of the data have no example in the reference "
                         "data, so there is no template mean for them; give a reference with every template, "
                         "or use the mean over all examples.")
    rows = torch.tensor([first[group] for group in data.groups.tolist()])
    return [mean[rows] for mean in rows_of_over]


def _mean_ablation_rows(
    model: TransformerLensModel, data: GateData,
    means: list[Float[Tensor, "pos head d_head"]] | list[Float[Tensor, "example pos head d_head"]],
    batch_size: int,
) -> tuple[Float[Tensor, " example"], Float[Tensor, "example layer head"]]:
    """Each example's metric with every head open, and what it loses when one head's ``hook_z`` is
    replaced by ``means`` (one mean for all, or each example's own row)."""
    layout = adapter.require_model(model)
    device = adapter.model_device(model)
    full_rows = torch.zeros(len(data))
    per_example = torch.zeros(len(data), layout.n_layers, layout.n_heads)
    start = 0
    with torch.no_grad():
        for batch, tokens, _ in on_device(data, batch_size, device):
            rows = slice(start, start + len(batch))
            start += len(batch)
            metric_rows = target_logprob_per_example(batch)
            full_rows[rows] = metric_rows(model(tokens)).float().cpu()
            for layer in range(layout.n_layers):
                value = means[layer] if means[layer].ndim == 3 else means[layer][rows]
                for head in range(layout.n_heads):
                    with model.hooks(fwd_hooks=[interventions.replace(layer, value, heads=head)]):
                        ablated = metric_rows(model(tokens)).float().cpu()
                    per_example[rows, layer, head] = full_rows[rows] - ablated
    return full_rows, per_example


def activation_patching(model: TransformerLensModel, data: GateData, direction: PatchDirection = "denoise",
                        batch_size: int = 32) -> HeadScores:
    """Per-head activation patching of ``hook_z`` at all positions, via ``transformer_lens.patching``
    (through :func:`chg_tlens.analysis.patching.patching_rows`, one chunk of ``batch_size`` examples at a
    time).

    ``denoise`` runs the corrupt twin and patches in one head's clean output: score = metric(patched)
    - metric(corrupt), "how much of the task this head restores" (TransformerLens' convention).
    ``noise`` runs the clean data and patches in the head's corrupt output: score = metric(clean) -
    metric(patched), "how much of the task is lost". Denoising misses heads that only work together
    (an AND), noising misses heads that back each other up (an OR). Needs ``data.corrupt``.
    Each example's own effect is kept in ``details[PER_EXAMPLE]`` (read off the same patched forwards,
    so prompts can be resampled at no extra cost): ``2 + layers x heads`` forwards per example, one
    clean cache, one unpatched reference and one per head.
    TransformerLens draws its own progress bar; ``validate.silent_patching_progress()`` hides it.
    """
    layout = adapter.require_model(model)
    data = checks.gate_data(data, model)
    checks.corrupt_twin(data, "activation_patching")
    if direction not in ("denoise", "noise"):
        raise InputError(f"activation_patching: direction must be 'denoise' or 'noise', got {direction!r}.")
    checks.positive_int(batch_size, "batch_size")
    device = adapter.model_device(model)
    started = time.time()
    effects, references = [], []
    for batch, _, _ in on_device(data, batch_size, "cpu"):  # patching_rows moves them itself
        metric_rows = target_logprob_per_example(batch)
        source, run_on = (batch, batch.corrupt) if direction == "denoise" else (batch.corrupt, batch)
        patched = patching_rows(model, source, run_on, metric=metric_rows)
        with torch.no_grad(), adapter.frozen(model):
            reference = metric_rows(model(run_on.tokens.to(device))).float().cpu()[:, None, None]
        effects.append(patched - reference if direction == "denoise" else reference - patched)
        references.append(reference.flatten())
    per_example = torch.cat(effects)
    forward = len(data) * (2 + layout.n_layers * layout.n_heads)
    details = {"direction": direction, "reference_metric": float(torch.cat(references).mean()),
               "backend": "transformer_lens.patching", PER_EXAMPLE: per_example}
    return HeadScores(per_example.mean(dim=0), f"activation_patching_{direction}", forward, 0,
                      time.time() - started, signed=True, details=details)


def attribution_patching(model: TransformerLensModel, data: GateData, backend: AttributionBackend = "auto",
                         batch_size: int = 32, endpoint: AttributionEndpoint = "corrupt") -> HeadScores:
    """Attribution patching: ``sum_{pos, d} (z_clean - z_corrupt) * d metric / d z``, summed per head, the
    gradient taken at the ``endpoint`` run, in two forwards and one backward.

    ``corrupt`` (Nanda's attribution patching; ``attribution_patching`` in tables) is the first-order
    estimate of denoising activation patching, ``metric(corrupt + clean head) - metric(corrupt)``.
    ``clean`` (Syed, Rager & Conmy, 2023, EAP; ``eap_clean``) is the first-order estimate of noising,
    ``metric(clean) - metric(clean + corrupt head)``. Syed et al. write it ``(z_corrupt - z_clean) . d L
    / d z`` for a loss; with our metric (target log-prob, higher = better) that is its negation, so
    here positive = the head helps the task at both endpoints, as in every method. The two agree where
    the metric is linear in the heads' outputs and differ where it bends (a saturated softmax, heads
    that only act together: the corrupt endpoint misses the first head of an AND, the clean one does not).

    ``transformer_lens`` uses TransformerLens 4's ``tools.analysis.attribution_patch`` (node level,
    one example at a time, head nodes summed over positions; the clean endpoint by swapping its two
    prompts and negating); it needs ``hook_mlp_out`` on every layer, so attention-only models and
    TransformerLens 3.9 use ``hooks``: the same estimate from our own hooks on ``hook_z``, batched.
    ``auto`` picks TransformerLens' when it can run. Needs ``data.corrupt``.
    """
    layout = adapter.require_model(model)
    data = checks.gate_data(data, model)
    checks.corrupt_twin(data, "attribution_patching")
    if backend not in ("auto", "transformer_lens", "hooks"):
        raise InputError(
            f"attribution_patching: backend must be 'auto', 'transformer_lens' or 'hooks', got {backend!r}."
        )
    if endpoint not in ("corrupt", "clean"):
        raise InputError(f"attribution_patching: endpoint must be 'corrupt' or 'clean', got {endpoint!r}.")
    checks.positive_int(batch_size, "batch_size")
    available, why_not = transformer_lens_attribution_available(model)
    if backend == "transformer_lens" and not available:
        raise InputError(f"attribution_patching: backend='transformer_lens' cannot run: {why_not}.")
    use_tl = backend == "transformer_lens" or (backend == "auto" and available)
    started = time.time()
    if use_tl:
        with adapter.frozen(model, track_weights=True):
            per_example = _attribution_transformer_lens(model, data, layout, endpoint)
    else:
        with adapter.frozen(model):
            per_point, _ = _attribution_hooks(model, data, layout, batch_size,
                                              [1.0 if endpoint == "clean" else 0.0])
            per_example = per_point[0]
    return HeadScores(per_example.mean(dim=0), "eap_clean" if endpoint == "clean" else "attribution_patching",
                      2 * len(data), len(data), time.time() - started, signed=True,
                      details={"backend": "transformer_lens" if use_tl else "hooks", "endpoint": endpoint,
                               "fallback_reason": None if use_tl else why_not, PER_EXAMPLE: per_example})


def eap_ig(model: TransformerLensModel, data: GateData, steps: int = EAP_IG_STEPS,
           batch_size: int = 32, riemann: Riemann = "right") -> HeadScores:
    """EAP-IG at node level (Hanna, Pezzelle & Belinkov, 2024, "Have Faith in Faithfulness").

    Attribution patching with integrated gradients: the gradient of the task metric at each head's
    ``hook_z`` is averaged over ``steps`` runs whose input embeddings are interpolated from the
    corrupt prompt (alpha = 0) to the clean one (alpha = 1), then dotted with ``(clean z - corrupt z)``
    and summed per head. ``riemann="right"`` (the default) takes alpha = k / steps for k = 1..steps, as
    Hanna et al. do, ending at the clean input, so ``steps=1`` is :func:`attribution_patching` at the
    clean endpoint (``eap_clean``); ``"left"`` takes k = 0..steps-1 (this package's earlier default,
    ``eap_ig_left`` in tables), starting at the corrupt run, so ``steps=1`` is attribution patching at
    the corrupt endpoint. More steps correct the linearisation where the metric bends (a saturated
    softmax, heads that only act together), and the two sums meet. Positive = the head helps the task,
    as in every method here. Needs ``data.corrupt``; costs ``1 + steps`` forwards (the endpoint the sum
    leaves out is one forward without gradients) and ``steps`` backwards per example.
    """
    return eap_ig_sweep(model, data, (steps,), batch_size, riemann)[0]


def eap_ig_sweep(model: TransformerLensModel, data: GateData, steps: int | Sequence[int] = EAP_IG_STEP_SWEEP,
                 batch_size: int = 32, riemann: Riemann = "right") -> list[HeadScores]:
    """:func:`eap_ig` at several step counts for the price of the largest: one :class:`HeadScores` each,
    from fewest steps to most (repeated counts once).

    With ``m`` steps the gradient is taken at alpha = k / m (k = 1..m right, 0..m-1 left), a subset of
    the points of any ``M`` that ``m`` divides (point k of ``m`` is point k * M / m of ``M``), so every
    count is read off one run of ``M = max(steps)`` and equals a separate ``eap_ig(steps=m)`` (tested
    for both sums). Each entry carries the passes a separate run would cost and the seconds its own
    points took plus the run's shared time (the largest count's seconds are the run's);
    ``details["shared_run"]`` the run's actual passes. Use it to see how many steps a model and task
    need before the scores stop moving.
    """
    layout = adapter.require_model(model)
    data = checks.gate_data(data, model)
    checks.corrupt_twin(data, "eap_ig")
    counts = eap_ig_step_counts(steps)
    checks.positive_int(batch_size, "batch_size")
    if riemann not in ("right", "left"):
        raise InputError(f"eap_ig: riemann must be 'right' or 'left', got {riemann!r}.")
    if EMBEDDING_HOOK not in model.hook_dict:
        raise InputError(f"eap_ig: the model has no {EMBEDDING_HOOK} hook to interpolate its inputs at.")
    most = counts[-1]
    started = time.time()
    with adapter.frozen(model):
        per_point, point_seconds = _attribution_hooks(model, data, layout, batch_size,
                                                      riemann_points(most, riemann))
    shared_seconds = time.time() - started - sum(point_seconds)  # endpoint runs, batching, freezing
    scored = []
    for count in counts:
        stride = most // count
        points = slice(stride - 1 if riemann == "right" else 0, None, stride)
        shared_run = {"steps": most, "forward_passes": (1 + most) * len(data),
                      "backward_passes": most * len(data)}
        name = "eap_ig" if riemann == "right" else "eap_ig_left"
        per_example = per_point[points].mean(dim=0)
        scored.append(HeadScores(per_example.mean(dim=0), name, (1 + count) * len(data),
                                 count * len(data), shared_seconds + sum(point_seconds[points]), signed=True,
                                 details={"steps": count, "riemann": riemann,
                                          "path": "input embeddings, corrupt -> clean",
                                          "shared_run": shared_run, PER_EXAMPLE: per_example}))
    return scored


def riemann_points(steps: int, riemann: Riemann = "right") -> list[float]:
    """EAP-IG's interpolation points alpha = k / steps: k = 1..steps (right, Hanna et al.) or 0..steps-1."""
    first = 1 if riemann == "right" else 0
    return [k / steps for k in range(first, first + steps)]


def eap_ig_step_counts(steps: int | Sequence[int]) -> list[int]:
    """The step counts :func:`eap_ig_sweep` will run, sorted and unique, each dividing the largest;
    refused by name otherwise (callers check before a long run)."""
    if isinstance(steps, int) and not isinstance(steps, bool):
        steps = [steps]
    if isinstance(steps, str | bytes) or not isinstance(steps, Sequence):
        raise InputError(f"eap_ig: steps must be a positive int or a sequence of them, got {steps!r}.")
    if not steps:
        raise InputError("eap_ig: steps must name at least one step count, got none.")
    for count in steps:
        checks.positive_int(count, "steps")
    counts = sorted(set(steps))
    uneven = [count for count in counts if counts[-1] % count]
    if uneven:
        raise InputError(f"eap_ig: every step count must divide the largest ({counts[-1]}) so their "
                         f"interpolation points are shared; {uneven} do not.")
    return counts


def subnetwork_probing(model: TransformerLensModel, data: GateData, steps: int = 300, lr: float = 0.1,
                       l0_weight: float = 1.0,
                       batch_size: int = 32, init_log_alpha: float = 3.0, seed: int = 0,
                       objective: SubnetworkObjective = "nll") -> HeadScores:
    """Cao et al. (2021): hard-concrete L0 masks on heads trained on a task loss + sparsity.

    Each step samples ``z = clamp(sigmoid((log u - log(1-u) + log_alpha) / beta) * (zeta - gamma) +
    gamma, 0, 1)`` per head and gates ``hook_z`` with it; the loss is the task loss plus ``l0_weight``
    times the mean probability that a mask is non-zero. ``objective="nll"``: target NLL (Cao et al.);
    ``"kl"``: the KL divergence from the unmasked model's output distribution at the target positions
    (the form the ACDC paper runs SP in). Score = ``log_alpha`` (monotone in that probability, without its
    saturation ties); the probability is in ``details["p_open"]``. For SP as the ACDC paper reports it
    (KL, a sweep of ``l0_weight``, an ROC over the sweep) use :func:`subnetwork_probing_sweep`.
    """
    layout = adapter.require_model(model)
    data = checks.gate_data(data, model)
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        checks.positive_int(value, name)
    if not (math.isfinite(lr) and lr > 0):
        raise InputError(f"subnetwork_probing: lr must be a positive number, got {lr!r}.")
    if not (math.isfinite(l0_weight) and l0_weight >= 0):
        raise InputError(f"subnetwork_probing: l0_weight must be >= 0, got {l0_weight!r}.")
    if objective not in ("nll", "kl"):
        raise InputError(f"subnetwork_probing: objective must be 'nll' or 'kl', got {objective!r}.")
    device = adapter.model_device(model)
    generator = torch.Generator().manual_seed(seed)
    started = time.time()
    log_alpha = (init_log_alpha + 0.01 * torch.randn(layout.n_layers, layout.n_heads,
                                                     generator=generator)).to(device)
    log_alpha.requires_grad_(True)
    optimizer = torch.optim.Adam([log_alpha], lr=lr)
    stream = data.batches(batch_size, seed=seed)
    with adapter.frozen(model):
        for _ in range(steps):
            batch = next(stream)
            uniform = torch.rand(log_alpha.shape, generator=generator).clamp(1e-6, 1 - 1e-6).to(device)
            mask = hard_concrete_sample(log_alpha, uniform)
            gates = differentiable_gates(mask)
            tokens, target_mask = batch.tokens.to(device), batch.target_mask.to(device)
            targets = batch.targets_to(device)
            with model.hooks(fwd_hooks=gates.hooks()):
                logits = model(tokens)
            if objective == "nll":
                task_loss = -target_logprobs(logits, tokens, target_mask, targets=targets).mean()
            else:
                with torch.no_grad():
                    reference = pick_target_logits(model(tokens), target_mask, targets=targets)
                task_loss = _target_kl(reference, pick_target_logits(logits, target_mask, targets=targets),
                                       target_mask, targets)
            loss = task_loss + l0_weight * hard_concrete_p_open(log_alpha).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    scores = log_alpha.detach().float().cpu()
    n = steps * batch_size
    name = "subnetwork_probing" if objective == "nll" else "subnetwork_probing_kl"
    return HeadScores(scores, name, n * (2 if objective == "kl" else 1), n, time.time() - started,
                      signed=False, details={"p_open": hard_concrete_p_open(scores), "steps": steps,
                                             "l0_weight": l0_weight, "lr": lr, "objective": objective})


SP_L0_WEIGHTS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
"""``subnetwork_probing_sweep``'s default sparsity weights: from nearly every head kept to nearly none."""


def subnetwork_probing_sweep(model: TransformerLensModel, data: GateData,
                             l0_weights: Sequence[float] = SP_L0_WEIGHTS, steps: int = 1000, lr: float = 0.1,
                             batch_size: int = 32, seed: int = 0) -> HeadScores:
    """Subnetwork probing as the ACDC paper (Conmy et al., 2023) runs it: masks trained on the KL
    divergence from the unmasked model, once per sparsity weight in ``l0_weights``; the kept set of each
    run (heads with ``log_alpha > 0``, i.e. a mask more likely open than closed) is one point of an ROC
    over the sweep (``details["sweep"]``, read by ``compare.evaluate_benchmark`` as ``auc_sweep``, like ACDC's
    threshold sweep). Per-head score: the number of sweep runs that keep the head, plus its mean
    open-probability over the runs (< 1) to break ties, so a head kept under stronger pressure ranks higher.

    Departures from the paper, for a CPU: ``steps`` updates per run (the paper trains for thousands of
    epochs), Adam at ``lr``, and the sweep's seven weights rather than its longer list; the scores are a
    lower bound on what SP reaches when trained longer.
    """
    checks.positive_int(steps, "steps")
    if len(l0_weights) == 0:
        raise InputError("subnetwork_probing_sweep: l0_weights must hold at least one weight.")
    runs = [subnetwork_probing(model, data, steps=steps, lr=lr, l0_weight=float(weight),
                               batch_size=batch_size, seed=seed, objective="kl") for weight in l0_weights]
    kept = [run.scores > 0 for run in runs]
    p_open = torch.stack([run.details["p_open"] for run in runs])
    scores = torch.stack(kept).float().sum(dim=0) + 0.999 * p_open.mean(dim=0)
    return HeadScores(scores, "subnetwork_probing_sweep", sum(run.forward_passes for run in runs),
                      sum(run.backward_passes for run in runs), sum(run.seconds for run in runs),
                      signed=False, details={
                          "sweep": [{"l0_weight": float(w), "kept": k} for w, k in zip(l0_weights, kept,
                                                                                      strict=True)],
                          "steps": steps, "lr": lr, "objective": "kl"})


def _target_kl(reference: Float[Tensor, "mask target vocab"], masked: Float[Tensor, "mask target vocab"],
               target_mask: Tensor, targets: Tensor | None) -> Tensor:
    """Mean over examples of each example's mean KL(reference || masked) over its target positions."""
    log_p = reference.float().log_softmax(dim=-1)
    kl = (log_p.exp() * (log_p - masked.float().log_softmax(dim=-1))).sum(dim=-1)[0]
    example, _ = target_positions(target_mask, targets)
    totals = kl.new_zeros(target_mask.shape[0]).index_add(0, example, kl)
    counts = torch.bincount(example, minlength=target_mask.shape[0]).clamp(min=1)
    return (totals / counts).mean()


def random_scores(model: TransformerLensModel, seed: int = 0) -> HeadScores:
    """Seeded standard-normal scores: the floor every method must beat."""
    layout = adapter.require_model(model)
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(layout.n_layers, layout.n_heads, generator=generator)
    return HeadScores(scores, "random", 0, 0, 0.0, signed=False, details={"seed": seed})


# ------------------------------------------------------------------------------ pieces
def hard_concrete_sample(
    log_alpha: Float[Tensor, "layer head"], uniform: Float[Tensor, "layer head"]
) -> Float[Tensor, "layer head"]:
    """A hard-concrete mask in [0, 1], differentiable in ``log_alpha`` (reparameterised by ``uniform``)."""
    logistic = torch.log(uniform) - torch.log1p(-uniform)
    soft = torch.sigmoid((logistic + log_alpha) / HARD_CONCRETE_BETA)
    return (soft * (HARD_CONCRETE_ZETA - HARD_CONCRETE_GAMMA) + HARD_CONCRETE_GAMMA).clamp(0.0, 1.0)


def hard_concrete_p_open(log_alpha: Float[Tensor, "layer head"]) -> Float[Tensor, "layer head"]:
    """Probability that a hard-concrete mask is non-zero: the differentiable L0 norm."""
    shift = HARD_CONCRETE_BETA * math.log(-HARD_CONCRETE_GAMMA / HARD_CONCRETE_ZETA)
    return torch.sigmoid(log_alpha - shift)


def differentiable_gates(values: Float[Tensor, "*mask layer head"]) -> HeadGates:
    """Gates whose values are ``values`` itself, so gradients reach whatever ``values`` came from.

    ``HeadGates.fixed`` stores a detached copy; here the stored tensor is swapped for ``values`` so
    ``d metric / d gate value`` (not the gate logit) is what autograd returns.
    """
    gates = HeadGates.fixed(values.detach().clamp(0.0, 1.0).cpu())
    gates.fixed_values = values if values.ndim == 3 else values.unsqueeze(0)
    return gates


def one_head_off(n_layers: int, n_heads: int) -> Float[Tensor, "mask layer head"]:
    """``n_layers * n_heads`` gate sets, set ``i`` closing head ``i`` (row-major) and nothing else."""
    eye = torch.eye(n_layers * n_heads)
    return (1.0 - eye).reshape(-1, n_layers, n_heads)


def mean_head_activations(
    model: TransformerLensModel, data: GateData, batch_size: int = 32,
    groups: Int[Tensor, " example"] | None = None,
) -> list[Float[Tensor, "pos head d_head"]] | list[Float[Tensor, "example pos head d_head"]]:
    """Per layer, each head's ``hook_z`` averaged over the examples that reach each position.

    Without ``groups``, over all of ``data``: ``[pos, head, d_head]``. With ``groups`` (one id per
    example, e.g. ``data.groups``), over the examples of each example's own group: ``[example, pos,
    head, d_head]``, row i the mean of example i's group, so templates that put their words at other
    positions are not averaged into each other.
    """
    layout = adapter.require_model(model)
    device = adapter.model_device(model)
    index, n_groups = _group_index(groups, len(data))
    width = data.tokens.shape[1]
    sums = [torch.zeros(n_groups, width, layout.n_heads, layout.d_head) for _ in range(layout.n_layers)]
    counts = torch.zeros(n_groups, width)
    start = 0
    with torch.no_grad():
        for batch, tokens, _ in on_device(data, batch_size, device):
            rows = index[start : start + len(batch)]
            start += len(batch)
            _, cache = model.run_with_cache(tokens, names_filter=adapter.is_hook_z)
            present = (torch.arange(batch.tokens.shape[1])[None, :] < batch.lengths[:, None]).float()
            counts[:, : present.shape[1]].index_add_(0, rows, present)
            for layer in range(layout.n_layers):
                z = cache[adapter.hook_z_name(layer)].float().cpu() * present[:, :, None, None]
                sums[layer][:, : z.shape[1]].index_add_(0, rows, z)
    means = [total / counts.clamp(min=1)[:, :, None, None] for total in sums]
    return [mean[0] for mean in means] if groups is None else [mean[index] for mean in means]


def _group_index(groups: Int[Tensor, " example"] | None, n_examples: int
                 ) -> tuple[Int[Tensor, " example"], int]:
    """Each example's group as 0..G-1 (all 0 without groups), and G."""
    if groups is None:
        return torch.zeros(n_examples, dtype=torch.long), 1
    groups = torch.as_tensor(groups)
    if groups.is_floating_point() or groups.dtype == torch.bool or tuple(groups.shape) != (n_examples,):
        raise InputError(f"groups must be one integer id per example, shape [{n_examples}], got "
                         f"{groups.dtype} {list(groups.shape)}.")
    _, index = torch.unique(groups.cpu(), return_inverse=True)
    return index, int(index.max()) + 1


def transformer_lens_attribution_available(model: TransformerLensModel) -> tuple[bool, str]:
    """Whether TransformerLens' own node-level attribution patching can run on ``model``, and why not."""
    try:
        from transformer_lens.tools.analysis import attribution_patch  # noqa: F401
    except ImportError:
        return False, "this TransformerLens has no tools.analysis.attribution_patch (needs TransformerLens 4)"
    if not adapter.is_bridge(model):
        return False, ("TransformerLens' attribution_patch needs a TransformerBridge (TransformerLens 4), "
                       f"got a {type(model).__name__}; backend='hooks' gives the same estimate")
    names = set(model.hook_dict)
    needed = ["hook_embed"] + [f"blocks.{layer}.hook_mlp_out" for layer in range(model.cfg.n_layers)]
    missing = [name for name in needed if name not in names]
    if missing:
        return False, f"the model has no {missing[0]} (attention-only?), which its node graph requires"
    return True, ""


def _attribution_transformer_lens(model: TransformerLensModel, data: GateData,
                                  layout: adapter.HeadLayout,
                                  endpoint: AttributionEndpoint) -> Float[Tensor, "example layer head"]:
    from transformer_lens.tools.analysis import attribution_patch

    device = adapter.model_device(model)
    per_example = torch.zeros(len(data), layout.n_layers, layout.n_heads)
    sign = -1.0 if endpoint == "clean" else 1.0  # swapped prompts: (corrupt - clean) . grad at the clean run
    for index in range(len(data)):
        example = data.subset([index])
        clean, corrupt = example.tokens.to(device), example.corrupt.tokens.to(device)
        if endpoint == "clean":
            clean, corrupt = corrupt, clean
        result = attribution_patch(model, clean, corrupt, target_logprob_metric(example))
        for node, score in result.node_scores.items():
            if node.kind == "attn_head_out":
                per_example[index, node.layer, node.head] += sign * score
    return per_example


def _attribution_hooks(
    model: TransformerLensModel, data: GateData, layout: adapter.HeadLayout, batch_size: int,
    alphas: Sequence[float],
) -> tuple[Float[Tensor, "point example layer head"], list[float]]:
    """``(clean z - corrupt z) . d metric / d z`` per example and head at each point ``alpha`` of the path
    whose input embeddings go from the corrupt prompt (0) to the clean one (1), with the seconds each point
    took.

    Alpha 0 is the corrupt run and alpha 1 the clean run themselves (the endpoints of attribution
    patching); they run first, as they give both runs' ``z`` and the clean embedding the inner points
    interpolate to; an endpoint that is not a point is one forward without gradients. The mean over
    points is EAP-IG's integrated gradients. Each gradient is taken at a zero ``probe`` leaf added to
    ``hook_z``, the total derivative there on either TransformerLens.
    """
    device = adapter.model_device(model)
    layers = list(range(layout.n_layers))
    per_example = torch.zeros(len(alphas), len(data), layout.n_layers, layout.n_heads)
    point_seconds = [0.0] * len(alphas)
    start = 0
    for batch, clean, _ in on_device(data, batch_size, device):
        rows = slice(start, start + len(batch))
        start += len(batch)
        corrupt = batch.corrupt.tokens.to(device)
        metric_of = target_logprob_metric(batch)
        z, grads = {}, {}
        clean_embedding = None
        for alpha, tokens in ((1.0, clean), (0.0, corrupt)):
            point = alphas.index(alpha) if alpha in alphas else None
            began = time.time()
            z[alpha], embedding, grad = _attribution_point(model, tokens, metric_of, layers, None,
                                                           gradient=point is not None)
            if alpha == 1.0:
                clean_embedding = embedding
            if point is not None:
                grads[point] = grad
                point_seconds[point] += time.time() - began
        delta = {layer: z[1.0][layer] - z[0.0][layer] for layer in layers}
        for point, alpha in enumerate(alphas):
            began = time.time()
            if point not in grads:
                _, _, grads[point] = _attribution_point(model, corrupt, metric_of, layers,
                                                        _interpolate_hook(clean_embedding, alpha))
            for layer, grad in grads.pop(point).items():
                # the metric is a mean over the batch, so each example's own term is len(batch) x its share
                term = (delta[layer] * grad).float().sum(dim=(1, 3)).cpu()
                per_example[point, rows, layer] = term * len(batch)
            point_seconds[point] += time.time() - began
    return per_example, point_seconds


def _attribution_point(
    model: TransformerLensModel, tokens: Tensor, metric_of: Callable[[Tensor], Tensor], layers: list[int],
    interpolate: Callable[..., Tensor] | None, gradient: bool = True,
) -> tuple[dict[int, Tensor], Tensor | None, dict[int, Tensor]]:
    """One run of the path: each layer's ``z``, the input embedding it saw, and (with ``gradient``) the
    gradient of the metric at each layer's ``hook_z`` (layers the metric does not reach are left out)."""
    hooks, captured = interventions.record(layers)
    seen: list[Tensor] = []
    if interpolate is not None:
        hooks.append((EMBEDDING_HOOK, interpolate))
    hooks.append((EMBEDDING_HOOK, lambda embedding, hook: seen.append(embedding.detach()) or embedding))
    if not gradient:
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            model(tokens)
        return captured, seen[0] if seen else None, {}
    probe_hooks, probes = interventions.probe(layers)
    with model.hooks(fwd_hooks=hooks + probe_hooks):
        metric = metric_of(model(tokens))
    grads = torch.autograd.grad(metric, [probes[layer] for layer in layers], allow_unused=True)
    return captured, seen[0] if seen else None, {
        layer: grad for layer, grad in zip(layers, grads, strict=True) if grad is not None}


def _interpolate_hook(clean_embedding: Tensor, alpha: float) -> Callable[..., Tensor]:
    """Replace the (corrupt) input embedding by ``corrupt + alpha * (clean - corrupt)``."""
    def interpolate(embedding: Tensor, hook: Any) -> Tensor:
        return embedding + alpha * (clean_embedding.to(embedding.dtype) - embedding)

    return interpolate


def _metric_with_hooks(model: TransformerLensModel, data: GateData, hooks: list, batch_size: int) -> float:
    return float(_metric_rows_with_hooks(model, data, hooks, batch_size).mean())


def _metric_rows_with_hooks(model: TransformerLensModel, data: GateData, hooks: list, batch_size: int
                            ) -> Float[Tensor, " example"]:
    """Each example's mean target log-prob under ``hooks``."""
    device = adapter.model_device(model)
    rows = []
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        for batch, tokens, _ in on_device(data, batch_size, device):
            rows.append(target_logprob_per_example(batch)(model(tokens)).float().cpu())
    return torch.cat(rows)
