"""Which heads move the answer to the output: attention on the answer and direct logit attribution.

A *mover* head (Wang et al. 2022's name movers in IOI) attends from the scored position to an earlier
occurrence of the answer token and writes that token's logit directly. Two measurements find them
without any fit, so they give a reference on real models that nobody's attribution method defines:

- :func:`answer_attention`: mean attention from each scored position to the earlier copies of its
  answer token;
- :func:`direct_logit_attribution`: each head's output at the scored position, sent straight through
  the final norm (its scale frozen at the clean run's, the usual convention) and the unembedding, on
  ``logit(answer) - logit(contrast)``. Frozen-scale attribution is linear, so the heads, the other
  components and the embeddings add up to the model's own logit difference.

:func:`mover_roles` combines them: heads that attend to the answer and push it are facilitating
(name movers), heads that attend to it and push against it interfering (negative name movers).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from chg_tlens.core.data import GateData
from chg_tlens.core.objectives import target_positions
from chg_tlens.errors import InputError
from chg_tlens.models import adapter

MOVER_ATTENTION = 0.4
"""A head whose mean attention on the answer's earlier copies exceeds this is a mover candidate (the
same bar as the attention-pattern induction reference)."""


def answer_attention(model: Any, data: GateData, batch_size: int = 32) -> Float[Tensor, "layer head"]:
    """Per head, mean (over scored answers) attention from the scored position to every earlier
    position holding the answer token; answers with no earlier copy are left out.

    Only next-token data: per-position targets have no "answer copied from the context".
    """
    layout = adapter.require_model(model)
    _require_next_token(data, "answer_attention")
    example, position = target_positions(data.target_mask)
    answer = data.labels()
    tokens = data.tokens
    earlier = torch.arange(tokens.shape[1])[None, :] <= position[:, None]
    copies = (tokens[example] == answer[:, None]) & earlier  # [target, key]
    has_copy = copies.any(dim=1)
    if not has_copy.any():
        raise InputError("answer_attention: no answer token occurs earlier in its prompt, so no head can "
                         "copy it from the context; this reference needs a task like ioi.")
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(layout.n_layers)]
    total = torch.zeros(layout.n_layers, layout.n_heads)
    for start in range(0, len(data), batch_size):
        rows = torch.nonzero((example >= start) & (example < start + batch_size) & has_copy).squeeze(1)
        if len(rows) == 0:
            continue
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens[start:start + batch_size].to(adapter.model_device(model)),
                                            names_filter=names)
        for layer, name in enumerate(names):
            pattern = cache[name].float().cpu()  # [batch, head, query, key]
            picked = pattern[example[rows] - start, :, position[rows]]  # [row, head, key]
            total[layer] += (picked * copies[rows, None, :]).sum(dim=(0, 2))
    return total / int(has_copy.sum())


def direct_logit_attribution(
    model: Any, data: GateData, contrast: Int[Tensor, " target"] | None = None, batch_size: int = 32,
) -> Float[Tensor, "layer head"]:
    """Per head, mean direct effect on ``logit(answer) - logit(contrast)`` at the scored positions.

    ``contrast`` holds one id per scored logit (``data.corrupt.labels()`` for a counterfactual answer,
    e.g. IOI's subject); without it the effect is on the answer's logit alone. The final norm's scale
    is frozen at the clean run's and a LayerNorm's centring applied, so the effect of the whole final
    residual is the model's logit difference less the unembedding bias (tested). Logit soft caps are
    not applied (they are not linear).
    """
    layout = adapter.require_model(model)
    _require_next_token(data, "direct_logit_attribution")
    example, position = target_positions(data.target_mask)
    answer = data.labels()
    if contrast is not None and contrast.shape != answer.shape:
        raise InputError(f"direct_logit_attribution: contrast must hold one id per scored logit "
                         f"({answer.shape[0]}), got shape {list(contrast.shape)}.")
    direction = _readout_directions(model, answer, contrast)  # [target, d_model]
    total = torch.zeros(layout.n_layers, layout.n_heads)
    for start in range(0, len(data), batch_size):
        rows = torch.nonzero((example >= start) & (example < start + batch_size)).squeeze(1)
        if len(rows) == 0:
            continue
        residual = final_readout(model, data.tokens[start:start + batch_size])
        scale, centre = residual["scale"][example[rows] - start, position[rows]], residual["centre"]
        for layer in range(layout.n_layers):
            z = residual["z"][layer][example[rows] - start, position[rows]]  # [row, head, d_head]
            out = torch.einsum("rhd,hdm->rhm", z, _w_o(model, layer))
            if centre:
                out = out - out.mean(dim=-1, keepdim=True)
            total[layer] += torch.einsum("rhm,rm->h", out / scale[:, None, None], direction[rows])
    return total / len(answer)


def residual_logit_attribution(
    model: Any, data: GateData, contrast: Int[Tensor, " target"] | None = None,
) -> Float[Tensor, " target"]:
    """The same frozen-scale readout applied to the whole final residual, per scored logit: what the
    head effects are a share of (equal to the logit difference less the unembedding bias)."""
    _require_next_token(data, "residual_logit_attribution")
    example, position = target_positions(data.target_mask)
    direction = _readout_directions(model, data.labels(), contrast)
    residual = final_readout(model, data.tokens)
    stream = residual["resid"][example, position]
    if residual["centre"]:
        stream = stream - stream.mean(dim=-1, keepdim=True)
    return (stream / residual["scale"][example, position][:, None] * direction).sum(dim=-1)


def mover_roles(
    model: Any, data: GateData, contrast: Int[Tensor, " target"] | None = None,
    threshold: float = MOVER_ATTENTION,
) -> tuple[np.ndarray, dict[str, Float[Tensor, "layer head"]]]:
    """``[layer, head]`` roles: attention on the answer above ``threshold`` with a positive direct
    effect is facilitating (a mover), with a negative one interfering; the rest irrelevant. Also
    returns both measurements."""
    attention = answer_attention(model, data)
    effect = direct_logit_attribution(model, data, contrast)
    movers = attention > threshold
    roles = np.full(tuple(attention.shape), "irrelevant", dtype=object)
    roles[(movers & (effect > 0)).numpy()] = "facilitating"
    roles[(movers & (effect < 0)).numpy()] = "interfering"
    return roles, {"answer_attention": attention, "direct_effect": effect}


# ------------------------------------------------------------------------------ pieces
def final_readout(model: Any, tokens: Int[Tensor, "batch pos"]) -> dict[str, Any]:
    """One clean forward: every layer's ``hook_z``, the final (pre-norm) residual, the final norm's
    scale ``[batch, pos]`` (1 without a norm) and whether the norm centres (LayerNorm)."""
    layout = adapter.require_model(model)
    last = f"blocks.{layout.n_layers - 1}.hook_resid_post"
    names = {adapter.hook_z_name(layer) for layer in range(layout.n_layers)} | {last}
    norm = _final_norm_kind(model)
    if norm is not None:
        names.add("ln_final.hook_scale")
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens.to(adapter.model_device(model)),
                                        names_filter=lambda name: name in names)
    resid = cache[last].float().cpu()
    scale = (cache["ln_final.hook_scale"].float().cpu().squeeze(-1) if norm is not None
             else torch.ones(resid.shape[:2]))
    return {"z": [cache[adapter.hook_z_name(layer)].float().cpu() for layer in range(layout.n_layers)],
            "resid": resid, "scale": scale, "centre": norm == "LN"}


def _readout_directions(
    model: Any, answer: Tensor, contrast: Tensor | None
) -> Float[Tensor, "target d_model"]:
    """``W_U[:, answer] - W_U[:, contrast]``, times the final norm's weight when it has one."""
    unembed = model.W_U.detach().float().cpu()
    direction = unembed[:, answer].T
    if contrast is not None:
        direction = direction - unembed[:, contrast].T
    if _final_norm_kind(model) is not None and hasattr(model.ln_final, "w"):
        weight = model.ln_final.w.detach().float().cpu()
        if getattr(model.ln_final, "uses_weight_offset", False):
            weight = 1.0 + weight
        direction = direction * weight
    return direction


def _final_norm_kind(model: Any) -> str | None:
    """``"RMS"``, ``"LN"`` (centring) or None for no final norm, from the model's config."""
    kind = getattr(model.cfg, "normalization_type", None)
    if kind is None or getattr(model, "ln_final", None) is None:
        return None
    if str(kind).startswith("RMS"):
        return "RMS"
    if str(kind).startswith("LN"):
        return "LN"
    raise InputError(f"direct logit attribution does not know the final norm {kind!r}; it handles RMSNorm "
                     "and LayerNorm (and their folded 'Pre' forms).")


def _w_o(model: Any, layer: int) -> Float[Tensor, "head d_head d_model"]:
    return model.blocks[layer].attn.W_O.detach().float().cpu()


def _require_next_token(data: GateData, caller: str) -> None:
    if data.per_position:
        raise InputError(f"{caller}: the data scores per-position targets; this measures heads that copy a "
                         "next-token answer from the context, so it needs next-token data.")
