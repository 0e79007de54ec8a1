"""HeadGates: one scalar gate per attention head, applied on ``hook_z``.

This is the whole intervention of Causal Head Gating: ``z[..., h, :] *= G[l, h]`` before the output
projection, with ``G = sigmoid(theta)`` (``core.interventions.scaled``, the scale every head intervention
shares). Several independent gate sets ("masks", one per seed) run in one forward pass: the user batch is
repeated once per mask and mask ``m`` gates replica ``m``.

    gates = HeadGates.from_model(model, n_masks=4, seed=0)
    with model.hooks(fwd_hooks=gates.hooks()):
        logits = model(gates.repeat_batch(tokens))   # [4 * batch, pos, vocab]
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from chg_tlens.core.interventions import Hook, HookFn, scaled
from chg_tlens.errors import InputError
from chg_tlens.models.adapter import hook_z_name, require_model


class HeadGates(nn.Module):
    """Gate logits ``theta [mask, layer, head]`` and the hooks that apply ``sigmoid(theta)``.

    Trainable gates hold ``theta`` as a parameter. Fixed gates (for ablations and evaluation) hold the
    gate values themselves, so a gate of exactly 0 or 1 stays exact.
    """

    def __init__(
        self,
        n_layers: int,
        n_heads: int,
        n_masks: int = 1,
        seed: int = 0,
        theta: Float[Tensor, "mask layer head"] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("n_layers", n_layers), ("n_heads", n_heads), ("n_masks", n_masks)):
            if not isinstance(value, int) or value <= 0:
                raise InputError(f"HeadGates: {name} must be a positive int, got {value!r}.")
        if theta is None:
            theta = initial_theta(n_masks, n_layers, n_heads, seed)
        else:
            expected = (n_masks, n_layers, n_heads)
            if tuple(theta.shape) != expected:
                raise InputError(
                    f"HeadGates: theta must have shape [mask, layer, head] = {list(expected)}, "
                    f"got {list(theta.shape)}."
                )
        self.theta = nn.Parameter(theta.detach().clone().float())
        self.register_buffer("fixed_values", None)

    @classmethod
    def from_model(cls, model: nn.Module, n_masks: int = 1, seed: int = 0) -> HeadGates:
        """Trainable gates sized for ``model``, initial gates uniform in [0, 1], one draw per mask."""
        layout = require_model(model)
        return cls(layout.n_layers, layout.n_heads, n_masks=n_masks, seed=seed)

    @classmethod
    def fixed(cls, values: Float[Tensor, "*mask layer head"]) -> HeadGates:
        """Non-trainable gates with values in [0, 1], ``[layer, head]`` or ``[mask, layer, head]``."""
        values = torch.as_tensor(values, dtype=torch.float32)
        if values.ndim == 2:
            values = values.unsqueeze(0)
        if values.ndim != 3:
            raise InputError(
                f"HeadGates.fixed: values must be [layer, head] or [mask, layer, head], "
                f"got shape {list(values.shape)}."
            )
        if not torch.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            raise InputError("HeadGates.fixed: gate values must be finite and within [0, 1].")
        n_masks, n_layers, n_heads = values.shape
        gates = cls(n_layers, n_heads, n_masks=n_masks, theta=torch.logit(values.clamp(1e-6, 1 - 1e-6)))
        gates.theta.requires_grad_(False)
        gates.fixed_values = values.clone()
        return gates

    @property
    def n_masks(self) -> int:
        return self.theta.shape[0]

    @property
    def n_layers(self) -> int:
        return self.theta.shape[1]

    @property
    def n_heads(self) -> int:
        return self.theta.shape[2]

    @property
    def trainable(self) -> bool:
        return self.fixed_values is None

    def values(self) -> Float[Tensor, "mask layer head"]:
        """Gate values ``G = sigmoid(theta)`` (or the fixed values)."""
        if self.fixed_values is not None:
            return self.fixed_values
        return torch.sigmoid(self.theta)

    def _layer_values(self, layer: int) -> Float[Tensor, "mask head"]:
        """One layer's gates; the hook of each layer applies the sigmoid to its own slice only."""
        if self.fixed_values is not None:
            return self.fixed_values[:, layer]
        return torch.sigmoid(self.theta[:, layer])

    def repeat_batch(self, tokens: Int[Tensor, "batch pos"]) -> Int[Tensor, "mask_batch pos"]:
        """The batch repeated once per mask, replica-major: rows ``m*B:(m+1)*B`` belong to mask m."""
        return tokens.repeat(self.n_masks, *([1] * (tokens.ndim - 1)))

    def hooks(self) -> list[Hook]:
        """``(hook_name, fn)`` pairs for ``model.hooks(fwd_hooks=...)``, one per layer."""
        return [(hook_z_name(layer), self._make_hook(layer)) for layer in range(self.n_layers)]

    def _make_hook(self, layer: int) -> HookFn:
        """:func:`interventions.scaled` by this layer's gates, one gate set per replica of the batch."""
        def gate_hook_z(z: Float[Tensor, "mask_batch pos head d_head"], hook: object) -> Tensor:
            if z.ndim != 4 or z.shape[2] != self.n_heads:
                raise InputError(
                    f"HeadGates: {hook_z_name(layer)} has shape {list(z.shape)}; expected "
                    f"[batch, pos, {self.n_heads}, d_head]. Were the gates built for another model?"
                )
            if z.shape[0] % self.n_masks:
                raise InputError(
                    f"HeadGates: batch of {z.shape[0]} rows is not a multiple of n_masks="
                    f"{self.n_masks}; pass gates.repeat_batch(tokens) to the model."
                )
            return scaled(z, self._layer_values(layer))  # [mask, head]

        return gate_hook_z


def initial_theta(n_masks: int, n_layers: int, n_heads: int, seed: int) -> Float[Tensor, "mask layer head"]:
    """Logits of gates drawn uniformly in [0, 1], one independent draw per mask, reproducible by seed.

    Mask ``m`` draws from its own generator (seed, m), so adding masks never changes the earlier ones.
    """
    draws = []
    for mask in range(n_masks):
        generator = torch.Generator().manual_seed(_mask_seed(seed, mask))
        uniform = torch.rand(n_layers, n_heads, generator=generator)
        draws.append(torch.logit(uniform.clamp(1e-4, 1 - 1e-4)))
    return torch.stack(draws)


def _mask_seed(seed: int, mask: int) -> int:
    return (seed * 1_000_003 + mask * 7919 + 12345) % (2**63 - 1)
