"""Which heads move the answer to the output: attention on the answer and direct logit attribution.

A *mover* head (Wang et al. 2022's name movers in IOI) attends from the scored position to an earlier
occurrence of the answer token and writes that token's logit directly. Two measurements find them
without any fit, so they give a reference on real models that no attribution method defines:

- :func:`answer_attention`: mean attention from each scored position to the positions (up to and
  including it) that hold its answer token;
- :func:`direct_logit_attribution`: each head's output at the scored position, sent straight through
  the final norm (its scale frozen at the clean run's, the usual convention) and the unembedding, on
  ``logit(answer) - logit(contrast)``. Frozen-scale attribution is linear, so the heads, the other
  components and the embeddings add up to the model's own logit difference (less constant biases).

:func:`mover_roles` combines them: heads that attend to the answer and push it by a visible share of
the logit difference are facilitating (name movers), those that push against it interfering
(negative name movers).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from chg_tlens.core import checks
from chg_tlens.core.data import GateData
from chg_tlens.core.forward import on_device
from chg_tlens.core.objectives import target_positions
from chg_tlens.errors import InputError
from chg_tlens.models import adapter
from chg_tlens.models.protocol import TransformerLensModel

MOVER_ATTENTION = 0.4
"""A mover's mean attention on its answer exceeds this (the bar of the attention-pattern induction
reference)."""
MOVER_EFFECT_SHARE = 0.02
"""... and its direct effect is at least this share of the whole residual's mean logit difference, so
a head that attends to the answer but writes next to nothing is not called a mover."""


@dataclass(frozen=True)
class FinalReadout:
    """What one clean forward leaves for frozen-scale attribution."""

    z: list[Float[Tensor, "batch pos head d_head"]]
    """Every layer's ``hook_z``."""
    residual: Float[Tensor, "batch pos d_model"]
    """The final residual before the final norm."""
    scale: Float[Tensor, "batch pos"]
    """The final norm's scale (1 without a norm)."""
    centres: bool
    """Whether the norm subtracts the mean (LayerNorm) before scaling."""

    def read(self, vectors: Float[Tensor, "... d_model"], scale: Float[Tensor, "..."]) -> Tensor:
        """``vectors`` as the final norm sees them with its scale frozen (its weight comes later)."""
        if self.centres:
            vectors = vectors - vectors.mean(dim=-1, keepdim=True)
        return vectors / scale[..., None]


def final_readout(model: TransformerLensModel, tokens: Int[Tensor, "batch pos"]) -> FinalReadout:
    """One clean forward caching what :class:`FinalReadout` holds."""
    layout = adapter.require_model(model)
    last = f"blocks.{layout.n_layers - 1}.hook_resid_post"
    names = {adapter.hook_z_name(layer) for layer in range(layout.n_layers)} | {last}
    norm = adapter.final_norm_kind(model)
    if norm is not None:
        names.add("ln_final.hook_scale")
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens.to(adapter.model_device(model)),
                                        names_filter=lambda name: name in names)
    residual = cache[last].float().cpu()
    scale = (cache["ln_final.hook_scale"].float().cpu().squeeze(-1) if norm is not None
             else torch.ones(residual.shape[:2]))
    return FinalReadout([cache[adapter.hook_z_name(layer)].float().cpu() for layer in range(layout.n_layers)],
                        residual, scale, norm == "LN")


def answer_attention(model: TransformerLensModel, data: GateData, batch_size: int = 32) -> Float[Tensor,
                     "layer head"]:
    """Per head, mean attention from the scored position to every position up to it holding the
    answer token, over the scored answers that occur there (the others cannot be copied).

    Only next-token data: per-position targets have no "answer copied from the context".
    """
    layout = adapter.require_model(model)
    data = _checked(model, data, batch_size, "answer_attention")
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(layout.n_layers)]
    total, copied = torch.zeros(layout.n_layers, layout.n_heads), 0
    for batch, tokens, _ in on_device(data, batch_size, adapter.model_device(model)):
        example, position = target_positions(batch.target_mask)
        keys = torch.arange(batch.tokens.shape[1])[None, :]
        copies = (batch.tokens[example] == batch.labels()[:, None]) & (keys <= position[:, None])
        rows = copies.any(dim=1)
        if not rows.any():
            continue
        copied += int(rows.sum())
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=names)
        for layer, name in enumerate(names):
            picked = cache[name].float().cpu()[example[rows], :, position[rows]]  # [row, head, key]
            total[layer] += (picked * copies[rows, None, :]).sum(dim=(0, 2))
    if copied == 0:
        raise InputError("answer_attention: no answer token occurs in its prompt, so no head can copy it "
                         "from the context; this reference needs a task like ioi.")
    return total / copied


def direct_logit_attribution(
    model: TransformerLensModel, data: GateData, contrast: Int[Tensor, " target"] | None = None,
    batch_size: int = 32,
) -> Float[Tensor, "layer head"]:
    """Per head, mean direct effect on ``logit(answer) - logit(contrast)`` over the scored logits.

    ``contrast`` holds one id per scored logit (in ``data.labels()`` order, e.g. IOI's subject); without
    it the effect is on the answer's logit alone. The final norm's scale is frozen at the clean run's and
    a LayerNorm's centring applied, so the heads' effects are shares of :func:`residual_logit_attribution`.
    """
    data = _checked(model, data, batch_size, "direct_logit_attribution")
    return _readout_effects(model, data, contrast, batch_size)[0]


def residual_logit_attribution(
    model: TransformerLensModel, data: GateData, contrast: Int[Tensor, " target"] | None = None,
    batch_size: int = 32,
) -> Float[Tensor, " target"]:
    """The same readout of the whole final residual, per scored logit: what the head effects are shares
    of. It equals the model's logit difference less the unembedding's and the final norm's biases
    (tested), before any logit soft cap."""
    data = _checked(model, data, batch_size, "residual_logit_attribution")
    return _readout_effects(model, data, contrast, batch_size)[1]


def _readout_effects(
    model: TransformerLensModel, data: GateData, contrast: Int[Tensor, " target"] | None, batch_size: int,
) -> tuple[Float[Tensor, "layer head"], Float[Tensor, " target"]]:
    """Both readouts from one clean forward per batch: the heads' mean direct effects and the whole
    residual's effect per scored logit."""
    layout = adapter.require_model(model)
    direction = _readout_directions(model, data.labels(), contrast)  # [target, d_model]
    heads, residual, offset = torch.zeros(layout.n_layers, layout.n_heads), [], 0
    for batch, tokens, _ in on_device(data, batch_size, "cpu"):
        example, position = target_positions(batch.target_mask)
        rows = direction[offset:offset + len(example)]
        offset += len(example)
        readout = final_readout(model, tokens)
        scale = readout.scale[example, position]
        residual.append((readout.read(readout.residual[example, position], scale) * rows).sum(dim=-1))
        for layer in range(layout.n_layers):
            z = readout.z[layer][example, position]  # [row, head, d_head]
            out = torch.einsum("rhd,hdm->rhm", z, model.blocks[layer].attn.W_O.detach().float().cpu())
            heads[layer] += torch.einsum("rhm,rm->h", readout.read(out, scale[:, None]), rows)
    return heads / len(direction), torch.cat(residual)


def mover_roles(
    model: TransformerLensModel, data: GateData, contrast: Int[Tensor, " target"] | None = None,
    attention: float = MOVER_ATTENTION, effect_share: float = MOVER_EFFECT_SHARE, batch_size: int = 32,
) -> tuple[np.ndarray, dict[str, Any]]:
    """``[layer, head]`` roles: attention on the answer above ``attention`` and a direct effect of at
    least ``effect_share`` of the residual's mean logit difference, positive: facilitating (a mover),
    negative: interfering; the rest irrelevant. Also returns the measurements behind them."""
    checks.unit_interval(attention, "attention")
    checks.unit_interval(effect_share, "effect_share")
    attended = answer_attention(model, data, batch_size)  # checks data and batch_size
    effect, per_logit = _readout_effects(model, data, contrast, batch_size)  # one forward for both
    whole = float(per_logit.mean())
    movers = (attended > attention) & (effect.abs() >= effect_share * abs(whole))
    roles = np.full(tuple(attended.shape), "irrelevant", dtype=object)
    roles[(movers & (effect > 0)).numpy()] = "facilitating"
    roles[(movers & (effect < 0)).numpy()] = "interfering"
    return roles, {"answer_attention": attended, "direct_effect": effect, "residual_effect": whole}


# ------------------------------------------------------------------------------ pieces
def _checked(model: TransformerLensModel, data: Any, batch_size: Any, caller: str) -> GateData:
    data = checks.gate_data(data, model)
    checks.positive_int(batch_size, "batch_size")
    if data.per_position:
        raise InputError(f"{caller}: the data scores per-position targets; this measures heads that copy a "
                         "next-token answer from the context, so it needs next-token data.")
    if float(getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0) > 0:
        warnings.warn(f"{caller}: the model soft-caps its logits; direct effects are read before the cap, "
                      "so they no longer add up to its logit differences.", stacklevel=3)
    return data


def _readout_directions(
    model: TransformerLensModel, answer: Int[Tensor, " target"], contrast: Int[Tensor, " target"] | None
) -> Float[Tensor, "target d_model"]:
    """``W_U[:, answer] - W_U[:, contrast]``, times the final norm's weight when it has one."""
    unembed = model.W_U.detach().float().cpu()
    direction = unembed[:, answer].T
    if contrast is not None:
        contrast = torch.as_tensor(contrast)
        if contrast.shape != answer.shape:
            raise InputError(f"contrast must hold one id per scored logit ({answer.shape[0]}), got shape "
                             f"{list(contrast.shape)}.")
        if contrast.numel() and not 0 <= int(contrast.min()) <= int(contrast.max()) < unembed.shape[1]:
            raise InputError(f"contrast ids must be within the vocabulary [0, {unembed.shape[1]}), got "
                             f"{int(contrast.min())}..{int(contrast.max())}.")
        direction = direction - unembed[:, contrast].T
    if adapter.final_norm_kind(model) is not None and hasattr(model.ln_final, "w"):
        weight = model.ln_final.w.detach().float().cpu()
        if getattr(model.ln_final, "uses_weight_offset", False):
            weight = 1.0 + weight
        direction = direction * weight
    return direction
