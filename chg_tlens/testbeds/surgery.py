"""Writing weights into a freshly built toy model: the only code in chg_tlens that edits a model.

Planted circuits draw their heads on a blank model from ``adapter.build_native_model``; the adapter
says where each weight lives on either TransformerLens, this module writes into it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from chg_tlens.models import adapter


@torch.no_grad()
def write_weights(
    model: nn.Module,
    embed: Tensor | None = None,
    pos_embed: Tensor | None = None,
    unembed: Tensor | None = None,
) -> None:
    """Overwrite embedding ``[vocab, d_model]``, positional ``[n_ctx, d_model]`` and unembedding
    ``[d_model, vocab]`` matrices (TransformerLens layouts)."""
    views = adapter.embedding_weights(model)
    for name, value in (("W_E", embed), ("W_pos", pos_embed), ("W_U", unembed)):
        if value is not None:
            views[name].copy_(value)


@torch.no_grad()
def write_head_weights(
    model: nn.Module, layer: int, head: int, w_q: Tensor, w_k: Tensor, w_v: Tensor, w_o: Tensor
) -> None:
    """Overwrite one head's W_Q, W_K, W_V ``[d_model, d_head]`` and W_O ``[d_head, d_model]``."""
    views = adapter.head_weights(model, layer, head)
    for name, value in (("W_Q", w_q), ("W_K", w_k), ("W_V", w_v), ("W_O", w_o)):
        views[name].copy_(value)


@torch.no_grad()
def zero_weights(model: nn.Module) -> None:
    """Every parameter (and bias) to zero: the blank slate a planted circuit is drawn on."""
    for parameter in model.parameters():
        parameter.zero_()
