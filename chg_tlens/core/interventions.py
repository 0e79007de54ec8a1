"""Head interventions: record, scale or replace attention heads' outputs, as TransformerLens hooks.

Every experiment in the package that touches a head (the CHG gates, ablations, activation and path
patching, ACDC, function-vector and symbol heads, attribution) is built from the hooks here, so the
indexing, broadcasting, dtype and device handling of a per-head activation ``[batch, pos, head, d_head]``
live in one place. Each builder returns TransformerLens ``(hook_name, fn)`` pairs with ``fn(z, hook)``:

    hooks, recorded = record(range(n_layers), positions=last)       # recorded[layer]: [batch, head, d_head]
    hooks.append(scale(layer, 0.0, heads=[3]))                      # zero-ablate head 3 at every position
    hooks.append(replace(layer, corrupt_z, heads=[3], positions=site))  # patch it from another run
    with model.hooks(fwd_hooks=hooks):
        model(tokens)

Which entries an intervention touches is a :class:`Site`: ``heads`` (None = all, an index, a list, or a
``[head]`` bool mask), ``positions`` (None = all, one index for every row, one index per row ``[batch]``,
or a ``[batch, pos]`` bool mask) and ``rows`` (None = every row, or a slice of the batch, e.g. one
replica of a repeated batch). Hooks on the same name run in the order given, on either TransformerLens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from chg_tlens.errors import InputError
from chg_tlens.models.adapter import hook_z_name

HeadActivation = Literal["z", "q", "k", "v"]
"""Which per-head activation: the output before W_O (``hook_z``) or the query, key or value input."""
HookFn = Callable[[Tensor, Any], Tensor]
Hook = tuple[str, HookFn]
Heads = int | Sequence[int] | Bool[Tensor, " head"] | None
Positions = int | Int[Tensor, " batch"] | Bool[Tensor, "batch pos"] | None


def head_hook_name(layer: int, activation: HeadActivation = "z") -> str:
    """Name of a layer's per-head activation hook (``[batch, pos, head, d_head]``), the same on either
    TransformerLens."""
    if activation == "z":
        return hook_z_name(layer)
    if activation not in ("q", "k", "v"):
        raise InputError(f"activation: expected 'q', 'k', 'v' or 'z', got {activation!r}.")
    return f"blocks.{layer}.attn.hook_{activation}"


@dataclass(frozen=True)
class Site:
    """The entries of a head activation ``[batch, pos, head, d_head]`` an intervention touches."""

    heads: Heads = None
    positions: Positions = None
    rows: slice | None = None

    @property
    def everywhere(self) -> bool:
        return self.heads is None and self.positions is None and self.rows is None

    def mask(self, z: Float[Tensor, "batch pos head d_head"]) -> Bool[Tensor, "batch pos head 1"]:
        """True at the chosen entries (broadcast over ``d_head``), on ``z``'s device."""
        batch, pos, n_heads = z.shape[:3]
        rows = self.rows if self.rows is not None else slice(None)
        where = torch.zeros(batch, pos, dtype=torch.bool, device=z.device)
        n_rows = len(range(batch)[rows])
        if self.positions is None:
            where[rows] = True
        elif isinstance(self.positions, int):
            where[rows, self.positions] = True
        elif self.positions.dtype == torch.bool:
            where[rows] = self.positions.to(z.device)
        else:
            chosen = torch.zeros(n_rows, pos, dtype=torch.bool, device=z.device)
            chosen[torch.arange(n_rows, device=z.device), self.positions.to(z.device)] = True
            where[rows] = chosen
        heads = torch.zeros(n_heads, dtype=torch.bool, device=z.device)
        heads[_head_index(self.heads, z.device)] = True
        return where[:, :, None, None] & heads[None, None, :, None]

    def pick(self, z: Float[Tensor, "batch pos head d_head"]) -> Tensor:
        """The chosen entries: ``[row, pos, head, d_head]`` with all positions, ``[row, head, d_head]`` with
        one position per row, ``[entry, head, d_head]`` with a bool mask; an int head drops the head axis."""
        if self.rows is not None:
            z = z[self.rows]
        if self.positions is None:
            picked = z
        elif isinstance(self.positions, int):
            picked = z[:, self.positions]
        elif self.positions.dtype == torch.bool:
            picked = z[self.positions.to(z.device)]
        else:
            picked = z[torch.arange(z.shape[0], device=z.device), self.positions.to(z.device)]
        return picked if self.heads is None else picked[..., _head_index(self.heads, z.device), :]


def record(
    layers: Iterable[int],
    heads: Heads = None,
    positions: Positions = None,
    rows: slice | None = None,
    activation: HeadActivation = "z",
) -> tuple[list[Hook], dict[int, Tensor]]:
    """Hooks that keep each layer's activation at the site (detached copies, the model's dtype), and the
    dict ``layer -> tensor`` they fill during the forward (see :meth:`Site.pick` for the shapes)."""
    site = Site(heads, positions, rows)
    recorded: dict[int, Tensor] = {}

    def keep(layer: int) -> HookFn:
        def record_heads(z: Tensor, hook: Any) -> Tensor:
            recorded[layer] = site.pick(z.detach()).clone()
            return z

        return record_heads

    return [(head_hook_name(layer, activation), keep(layer)) for layer in layers], recorded


def scale(
    layer: int,
    factor: float | Float[Tensor, "*group head"],
    heads: Heads = None,
    positions: Positions = None,
    rows: slice | None = None,
    activation: HeadActivation = "z",
) -> Hook:
    """A hook multiplying the chosen heads by ``factor`` (0 = zero ablation): see :func:`scaled`."""
    site = Site(heads, positions, rows)

    def scale_heads(z: Tensor, hook: Any) -> Tensor:
        return scaled(z, factor, site)

    return head_hook_name(layer, activation), scale_heads


def replace(
    layer: int,
    value: Float[Tensor, "*value"],
    heads: Heads = None,
    positions: Positions = None,
    rows: slice | None = None,
    activation: HeadActivation = "z",
) -> Hook:
    """A hook setting the chosen entries to ``value`` (patching from another run, a mean, a constant):
    see :func:`replaced`."""
    site = Site(heads, positions, rows)

    def replace_heads(z: Tensor, hook: Any) -> Tensor:
        return replaced(z, value, site)

    return head_hook_name(layer, activation), replace_heads


def probe(layers: Iterable[int], activation: HeadActivation = "z") -> tuple[list[Hook], dict[int, Tensor]]:
    """Hooks adding a zero leaf to each layer's activation, and the dict ``layer -> leaf`` they fill:
    ``d metric / d leaf`` is the gradient at the activation (a bridge's hook sees a reshaped view whose
    own ``.grad`` never fills)."""
    leaves: dict[int, Tensor] = {}

    def add(layer: int) -> HookFn:
        def add_probe(z: Tensor, hook: Any) -> Tensor:
            leaves[layer] = torch.zeros_like(z, requires_grad=True)
            return z + leaves[layer]

        return add_probe

    return [(head_hook_name(layer, activation), add(layer)) for layer in layers], leaves


def scaled(
    z: Float[Tensor, "batch pos head d_head"],
    factor: float | Float[Tensor, "*group head"],
    site: Site = Site(),
) -> Float[Tensor, "batch pos head d_head"]:
    """``z`` with the site's entries multiplied by ``factor``, differentiable in both.

    ``factor`` is a number, one per head ``[head]``, or ``[group, head]``: the batch is then ``group``
    equal replicas, replica-major (rows ``g*B:(g+1)*B`` get ``factor[g]``), as :class:`HeadGates` and a
    per-example factor (``group = batch``) need.
    """
    factor = _like(torch.as_tensor(factor), z)
    if factor.ndim < 2:
        out = z * factor[..., None]
    elif factor.shape[0] == 1:
        out = z * factor[0][None, None, :, None]
    else:
        groups = factor.shape[0]
        if z.shape[0] % groups:
            raise InputError(f"scale: a batch of {z.shape[0]} rows does not split into the factor's "
                             f"{groups} groups.")
        out = (z.reshape(groups, -1, *z.shape[1:]) * factor[:, None, None, :, None]).reshape(z.shape)
    return out if site.everywhere else torch.where(site.mask(z), out, z)


def replaced(
    z: Float[Tensor, "batch pos head d_head"],
    value: Float[Tensor, "*value"],
    site: Site = Site(),
) -> Float[Tensor, "batch pos head d_head"]:
    """``z`` with the site's entries taken from ``value``, which broadcasts to ``z``: ``[batch, pos, head,
    d_head]`` (a cached run), ``[pos, head, d_head]`` (a mean over examples; longer positions are cut to
    ``z``'s), ``[head, d_head]`` or ``[d_head]`` (a constant at every position)."""
    value = _like(value, z)
    if value.ndim >= 3 and value.shape[-3] > z.shape[1]:
        value = value[..., : z.shape[1], :, :]
    return torch.where(site.mask(z), value, z)


def _like(value: Tensor, z: Tensor) -> Tensor:
    """``value`` on ``z``'s device and in its dtype: the one place interventions convert."""
    return value.to(device=z.device, dtype=z.dtype)


def _head_index(heads: Heads, device: torch.device) -> slice | int | list[int] | Tensor:
    if heads is None:
        return slice(None)
    if isinstance(heads, Tensor):
        return heads.to(device)
    if isinstance(heads, int):
        return heads
    return list(heads)
