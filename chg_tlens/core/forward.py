"""Running a model under gates: the one batched primitive fitting, scoring and analysis share.

    for batch, tokens, target_mask in on_device(data, batch_size, device):   # the one batch loop
        targets = batch.targets_to(device)                                   # None: next-token data
        picked = gated_target_logits(model, gates, tokens, target_mask, targets)  # [mask, target, vocab]

Only the logits that are scored are computed: the forward stops at the unembedding's input and
just those rows are unembedded (with a 49k-128k vocabulary the unembedding dominates a small model).
Because a model could scale or cap its logits after the unembedding in ways we do not see, the first
batch a model meets is checked once against its full logits (:func:`check_target_logits`).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from chg_tlens.core.data import GateData
from chg_tlens.core.gates import HeadGates
from chg_tlens.core.objectives import picked_accuracy, picked_logprobs, target_positions
from chg_tlens.models import adapter
from chg_tlens.models.protocol import TransformerLensModel

_CHECKED_MODELS: weakref.WeakSet = weakref.WeakSet()
"""Models whose target-only logits have been checked against their full logits in this process."""

TARGET_LOGIT_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 5e-2, torch.float16: 1e-2}
"""Largest allowed |full - target-only| logit difference, relative to the logits' scale, by dtype."""


def on_device(
    data: GateData, batch_size: int, device: torch.device | str
) -> Iterator[tuple[GateData, Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]]:
    """Every example once, in order, ``batch_size`` at a time, with its tokens and mask on ``device``."""
    for start in range(0, len(data), batch_size):
        batch = data.subset(slice(start, start + batch_size))
        yield batch, batch.tokens.to(device), batch.target_mask.to(device)


def gated_logits(
    model: TransformerLensModel, gates: HeadGates, tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "mask_batch pos vocab"]:
    """Full logits of the batch repeated once per mask, each replica under its own gates."""
    with model.hooks(fwd_hooks=gates.hooks()):
        return model(gates.repeat_batch(tokens))


def gated_target_logits(
    model: TransformerLensModel,
    gates: HeadGates,
    tokens: Int[Tensor, "batch pos"],
    target_mask: Bool[Tensor, "batch pos"],
    targets: Int[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "mask target vocab"]:
    """Only the logits that are scored, per mask: the loss needs nothing else. ``targets`` (per-position
    data, ``GateData.targets``) only says which positions those are."""
    example, position = target_positions(target_mask, targets)
    replica = torch.arange(gates.n_masks, device=tokens.device)[:, None] * tokens.shape[0]
    rows = (replica + example[None, :]).flatten()
    logits = logits_at(model, gates.repeat_batch(tokens), rows, position.repeat(gates.n_masks), gates.hooks())
    return logits.reshape(gates.n_masks, len(example), logits.shape[-1])


@torch.no_grad()
def score_gates(
    model: TransformerLensModel, data: GateData, gates: HeadGates, batch_size: int = 32
) -> tuple[Float[Tensor, "mask example"], Float[Tensor, "mask example"]]:
    """Mean target log-prob and top-1 accuracy of every example under each mask's gates."""
    device = gates.theta.device
    logprobs, accuracies = [], []
    for batch, tokens, target_mask in on_device(data, batch_size, device):
        targets = batch.targets_to(device)
        check_target_logits(model, gates, tokens, target_mask, targets=targets)
        picked = gated_target_logits(model, gates, tokens, target_mask, targets)
        logprobs.append(picked_logprobs(picked, tokens, target_mask, targets).cpu())
        accuracies.append(picked_accuracy(picked, tokens, target_mask, targets).cpu())
    return torch.cat(logprobs, dim=1), torch.cat(accuracies, dim=1)


def logits_at(
    model: TransformerLensModel,
    tokens: Int[Tensor, "batch pos"],
    example: Int[Tensor, " n"],
    position: Int[Tensor, " n"],
    fwd_hooks: list | None = None,
) -> Float[Tensor, "n vocab"]:
    """Logits at ``(example, position)`` pairs only, under ``fwd_hooks``.

    The forward is stopped at the final residual (``adapter.final_residual``); the model's own final
    norm (where the residual is caught before it), unembedding and logit soft cap run on those rows.
    """
    site = adapter.final_residual(model)
    captured: dict[str, Tensor] = {}

    def capture(resid: Tensor, hook: Any) -> Tensor:
        captured["resid"] = resid
        raise _StopForward

    try:
        with model.hooks(fwd_hooks=[*(fwd_hooks or []), (site.hook_name, capture)]):
            model(tokens)
    except _StopForward:
        pass
    if "resid" not in captured:
        raise RuntimeError(f"the forward pass never reached {site.hook_name}; cannot take target logits.")
    rows = site.norm(captured["resid"][example, position].unsqueeze(0))
    logits = model.unembed(rows).squeeze(0)
    soft_cap = float(getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0)
    if soft_cap > 0:
        logits = soft_cap * torch.tanh(logits / soft_cap)
    return logits


@torch.no_grad()
def check_target_logits(
    model: TransformerLensModel,
    gates: HeadGates,
    tokens: Int[Tensor, "batch pos"],
    target_mask: Bool[Tensor, "batch pos"],
    force: bool = False,
    targets: Int[Tensor, "batch pos"] | None = None,
) -> None:
    """Compare target-only logits with the model's full logits on a few examples, once per model.

    Fits call it with ``force=True`` on their first batch, so a model changed between fits is checked
    again; evaluations check each model object once per process. A mismatch means the shortcut does
    not hold for this model (e.g. a logit scale after the unembedding), which is a limitation of ours,
    not bad input: it raises ``RuntimeError`` naming the model.
    """
    if model in _CHECKED_MODELS and not force:
        return
    few = slice(0, min(4, tokens.shape[0]))
    tokens, target_mask = tokens[few], target_mask[few]
    one = HeadGates.fixed(gates.values()[:1].detach())
    example, position = target_positions(target_mask, None if targets is None else targets[few])
    if len(example) == 0:
        return
    short = logits_at(model, tokens, example, position, one.hooks()).float()
    full = gated_logits(model, one, tokens)[example, position].float()
    if not (torch.isfinite(full).all() and torch.isfinite(short).all()):
        return  # nothing to compare; a fit names non-finite losses itself, with the step and batch
    scale = full.abs().max().clamp(min=1.0)
    error = float((short - full).abs().max() / scale)
    # compared in float32, so never tighter than float32 allows; looser for a half-precision model
    floor = TARGET_LOGIT_TOLERANCE[torch.float32]
    tolerance = max(floor, TARGET_LOGIT_TOLERANCE.get(_param_dtype(model), floor))
    if not error <= tolerance:
        raise RuntimeError(
            f"target-only logits differ from the full logits of model {adapter.model_name(model)!r} "
            f"({type(model).__name__}) by {error:.3g} of their scale (tolerance {tolerance:g}): its "
            "output is not final norm -> unembed -> soft cap. Please report this model to chg_tlens."
        )
    _CHECKED_MODELS.add(model)


def _param_dtype(model: TransformerLensModel) -> torch.dtype:
    for parameter in model.parameters():
        return parameter.dtype
    return torch.float32


class _StopForward(Exception):
    """Raised from a hook once the final residual is captured: the full unembedding is never run."""
