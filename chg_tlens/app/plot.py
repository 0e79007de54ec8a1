"""Pictures of a CHGResult: per-head heatmaps, G+ vs G- scatter, role shares, seed agreement, losses;
and of a ContrastiveResult: the mean gate per head with its closed heads marked, and its loss curve.

Every function takes a result (and optionally the axes to draw on) and returns the matplotlib
Figure. Figures are built as ``matplotlib.figure.Figure`` objects, not through pyplot: they render with
Agg, never open a window, never touch the user's backend, and are freed when dropped. In a notebook
the returned Figure displays inline as usual.

Heatmaps are ``[layer, head]`` with layer 0 at the top, like the tensors print.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Float
from matplotlib.axes import Axes
from matplotlib.colors import BoundaryNorm, ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from torch import Tensor

from chg_tlens.core.convergence import paired_roles
from chg_tlens.core.result import ROLES, STAGES, UNCLASSIFIED, CHGResult, ContrastiveResult
from chg_tlens.errors import InputError

ALL_ROLES = ROLES + (UNCLASSIFIED,)
ROLE_COLORS = {
    "facilitating": "#2ca02c",
    "interfering": "#d62728",
    "irrelevant": "#1f77b4",
    UNCLASSIFIED: "#c7c7c7",
}
"""One colour per role, the same in every picture (score heatmaps use the matching single-hue map)."""
RANDOM_BAND_COLORS = {"g_plus": "#999999", "ones": "#e0b080"}
"""Random-order bands of ``ablation_curves``, by start: from G+ grey, from the full model sand."""
ROLE_ABBREVIATIONS = {
    "facilitating": "fac", "interfering": "int", "irrelevant": "irr", UNCLASSIFIED: "\u2013",
}

QUANTITIES: dict[str, tuple[str, str]] = {
    "g_plus": ("G+", "viridis"),
    "g_minus": ("G\u2212", "viridis"),
    "facilitating": ("facilitating score", "Greens"),
    "interfering": ("interfering score", "Reds"),
    "irrelevant": ("irrelevant score", "Blues"),
    "g_zero": ("G0", "viridis"),
}
"""Per-head quantities a heatmap can show: CHGResult attribute -> (title, colour map)."""

DEFAULT_HEATMAPS = ("g_plus", "g_minus", "facilitating", "interfering", "irrelevant")
ANNOTATE_MAX_CELLS = 100
"""Heatmaps write each cell's value only up to this many heads; beyond it the numbers are unreadable."""
STAGE_TITLES = {
    "zero": "stage 1: G0 (\u03bb = 0)", "plus": "G+ (\u03bb > 0)", "minus": "G\u2212 (\u03bb < 0)",
    "contrastive": "contrastive (retain vs forget)",
}
CLOSED_OUTLINES = {
    "every": {"edgecolor": "#d62728", "linewidth": 2.4, "linestyle": "-"},
    "some": {"edgecolor": "#ff7f0e", "linewidth": 1.4, "linestyle": "--"},
}
"""How ``gate_map`` boxes a head whose gate is closed in every seed, or in some seeds only."""


# --------------------------------------------------------------------------- per-head numbers
def head_values(
    result: CHGResult, quantity: str, seed: int | None = None
) -> Float[Tensor, "layer head"]:
    """One quantity per head: the mean over seeds (``seed=None``) or one seed's values."""
    if quantity not in QUANTITIES:
        raise InputError(f"quantity must be one of {sorted(QUANTITIES)}, got {quantity!r}.")
    values = getattr(result, quantity).detach().float().cpu()
    if seed is None:
        return values.mean(dim=0)
    return values[_seed_index(result, seed)]


def role_agreement(result: CHGResult, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Majority role per head across seeds and the fraction of seeds that give it, both ``[layer, head]``.

    Ties go to the role listed first in ``ALL_ROLES``. Agreement 1.0 means every seed agrees; heads
    with low agreement are the ones the paper's "multiple sufficient sub-circuits" make unstable.
    """
    labels = result.role_labels(threshold)
    counts = np.stack([(labels == role).sum(axis=0) for role in ALL_ROLES])
    majority = np.array(ALL_ROLES, dtype=object)[counts.argmax(axis=0)]
    agreement = counts.max(axis=0) / labels.shape[0]
    return majority, agreement


# --------------------------------------------------------------------------- pictures
def heatmap(
    result: CHGResult,
    quantity: str = "facilitating",
    seed: int | None = None,
    ax: Axes | None = None,
    annotate: bool | None = None,
) -> Figure:
    """``[layer, head]`` heatmap of one quantity (see ``QUANTITIES``) on a fixed 0..1 colour scale.

    ``annotate=None`` writes the values into the cells only when there are few heads.
    """
    values = head_values(result, quantity, seed)
    title, cmap = QUANTITIES[quantity]
    fig, ax = _figure_and_axes(ax, _panel_size(result))
    _draw_heatmap(ax, values.numpy(), cmap, f"{title}{_seed_suffix(result, seed)}", annotate)
    return fig


def heatmaps(
    result: CHGResult,
    quantities: Sequence[str] = DEFAULT_HEATMAPS,
    seed: int | None = None,
    annotate: bool | None = None,
) -> Figure:
    """Side-by-side heatmaps of G+, G- and the three role scores (or ``quantities``), one colour bar each."""
    if isinstance(quantities, str) or len(quantities) == 0:
        raise InputError(f"quantities must be a non-empty list of names from {sorted(QUANTITIES)}, "
                         f"got {quantities!r}.")
    for quantity in quantities:
        head_values(result, quantity, seed)  # validates names and seed before drawing
    width, height = _panel_size(result)
    n_cols = max(1, min(len(quantities), int(18 // width)))
    n_rows = math.ceil(len(quantities) / n_cols)
    fig = Figure(figsize=(width * n_cols, height * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax, quantity in zip(axes, quantities, strict=False):
        title, cmap = QUANTITIES[quantity]
        _draw_heatmap(ax, head_values(result, quantity, seed).numpy(), cmap, title, annotate)
    for ax in axes[len(quantities):]:
        ax.set_visible(False)
    fig.suptitle(f"Per-head gates and role scores{_seed_suffix(result, seed)}")
    return fig


def role_map(
    result: CHGResult,
    seed: int | None = None,
    threshold: float = 0.5,
    ax: Axes | None = None,
    annotate: bool | None = None,
) -> Figure:
    """Each head coloured by its role: one seed's, or (``seed=None``) the majority role across seeds.

    The image holds role codes, indices into ``ALL_ROLES``.
    """
    if seed is None:
        labels, _ = role_agreement(result, threshold)
    else:
        labels = result.role_labels(threshold)[_seed_index(result, seed)]
    codes = np.zeros(labels.shape, dtype=float)
    for code, role in enumerate(ALL_ROLES):
        codes[labels == role] = code
    fig, ax = _figure_and_axes(ax, _panel_size(result, colorbar=False, legend=True))
    cmap = ListedColormap([ROLE_COLORS[r] for r in ALL_ROLES])
    norm = BoundaryNorm(np.arange(len(ALL_ROLES) + 1) - 0.5, cmap.N)
    ax.imshow(codes, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    _label_heads(ax, *codes.shape)
    if _should_annotate(codes.size, annotate):
        for (layer, head), role in np.ndenumerate(labels):
            ax.text(head, layer, ROLE_ABBREVIATIONS[role], ha="center", va="center", fontsize=7,
                    color="white")
    kind = f"majority role across {result.n_seeds} seeds" if seed is None else f"role, seed {seed}"
    ax.set_title(f"{kind}, threshold {threshold:g}", fontsize=9)
    ax.legend(handles=_role_patches(), loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7,
              frameon=False)
    return fig


def gate_scatter(
    result: CHGResult, seed: int | None = None, threshold: float = 0.5, ax: Axes | None = None
) -> Figure:
    """G+ against G-, one point per head and seed (or per head of one seed), coloured by role.

    The faint lines are where each role's score equals ``threshold``: facilitating above G- = t,
    interfering left of G+ = 1 - t, irrelevant below the curve G+ (1 - G-) = t.
    """
    labels = result.role_labels(threshold)
    g_plus, g_minus = result.g_plus.detach().cpu().numpy(), result.g_minus.detach().cpu().numpy()
    if seed is not None:
        index = _seed_index(result, seed)
        labels, g_plus, g_minus = labels[index], g_plus[index], g_minus[index]
    fig, ax = _figure_and_axes(ax, (5.6, 4.6))
    for role in ALL_ROLES:
        chosen = labels == role
        ax.scatter(g_plus[chosen], g_minus[chosen], s=18, alpha=0.7, color=ROLE_COLORS[role],
                   edgecolors="none", label=f"{role} ({int(chosen.sum())})")
    line = dict(color="0.55", lw=0.8, ls="--", zorder=0)
    ax.axhline(threshold, **line)
    ax.axvline(1.0 - threshold, **line)
    g = np.linspace(max(threshold, 1e-6), 1.0, 200)
    ax.plot(g, 1.0 - threshold / g, **line)
    ax.set(xlim=(-0.03, 1.03), ylim=(-0.03, 1.03), xlabel="G+ (opening rewarded)",
           ylabel="G\u2212 (closing rewarded)")
    points = f"every head of seed {_seed_index(result, seed)}" if seed is not None \
        else f"every head of {result.n_seeds} seeds"
    ax.set_title(f"G+ vs G\u2212, {points}", fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
    return fig


def role_shares(result: CHGResult, threshold: float = 0.5, ax: Axes | None = None) -> Figure:
    """Share of heads in each role, one stacked bar per seed."""
    summary = result.summary(threshold)
    per_seed = summary.drop(index="every seed")
    fig, ax = _figure_and_axes(ax, (max(4.0, 1.2 + 0.45 * result.n_seeds), 3.6))
    positions = np.arange(len(per_seed))
    bottom = np.zeros(len(per_seed))
    for role in ALL_ROLES:
        share = per_seed[role].to_numpy(dtype=float)
        ax.bar(positions, share, bottom=bottom, color=ROLE_COLORS[role], label=role, width=0.8)
        bottom += share
    ax.set_xticks(positions, list(per_seed.index))
    ax.set(ylim=(0, 1), xlabel="seed", ylabel="share of heads")
    ax.set_title(f"Role shares per seed, threshold {threshold:g}", fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
    return fig


def seed_agreement(
    result: CHGResult, threshold: float = 0.5, ax: Axes | None = None, annotate: bool | None = None
) -> Figure:
    """Per head, the fraction of seeds that agree with the majority role (1.0 = all agree)."""
    majority, agreement = role_agreement(result, threshold)
    fig, ax = _figure_and_axes(ax, _panel_size(result))
    _draw_heatmap(ax, agreement, "magma", f"seed agreement ({result.n_seeds} seeds)", annotate=False)
    if _should_annotate(agreement.size, annotate):
        for (layer, head), role in np.ndenumerate(majority):
            color = _text_color("magma", agreement[layer, head])
            ax.text(head, layer, f"{ROLE_ABBREVIATIONS[role]}\n{agreement[layer, head]:.2f}", ha="center",
                    va="center", fontsize=6.5, color=color)
    return fig


def loss_curves(result: CHGResult | ContrastiveResult, axes: Sequence[Axes] | None = None) -> Figure:
    """Loss per step of each stage (a ContrastiveResult has one): every seed thin, the mean thick, and the
    mean target NLL dashed."""
    stages = [s for s in STAGES if s in result.losses] + [s for s in result.losses if s not in STAGES]
    if axes is None:
        fig = Figure(figsize=(4.0 * max(1, len(stages)), 3.4), layout="constrained")
        axes = list(fig.subplots(1, max(1, len(stages)), squeeze=False).ravel())
    else:
        axes = list(axes)
        if len(axes) < max(1, len(stages)):
            raise InputError(f"axes must hold one Axes per stage ({len(stages)}), got {len(axes)}.")
        fig = axes[0].figure
    if not stages:
        axes[0].text(0.5, 0.5, "no loss curves recorded", ha="center", va="center",
                     transform=axes[0].transAxes)
        axes[0].set_axis_off()
        return fig
    colors = {"zero": "0.35", "plus": "#9467bd", "minus": "#ff7f0e"}
    for ax, stage in zip(axes, stages, strict=False):
        loss = result.losses[stage]["loss"].detach().float().cpu().numpy()
        steps = np.arange(loss.shape[0])
        color = colors.get(stage, "0.35")
        for seed_curve in loss.T:
            ax.plot(steps, seed_curve, color=color, lw=0.7, alpha=0.35)
        ax.plot(steps, loss.mean(axis=1), color=color, lw=2.0, label="loss, mean of seeds")
        if "nll" in result.losses[stage]:
            nll = result.losses[stage]["nll"].detach().float().cpu().numpy()
            ax.plot(steps, nll.mean(axis=1), color="black", lw=1.2, ls="--", label="target NLL, mean")
        ax.set(xlabel="step", ylabel="loss")
        ax.set_title(STAGE_TITLES.get(stage, stage), fontsize=9)
        ax.legend(fontsize=7, frameon=False)
    return fig


def role_trace(result: CHGResult, threshold: float = 0.5, max_seeds: int = 4) -> Figure:
    """Each head's role at every snapshot of the G+/G- fit (one panel per seed, heads down, updates
    across): a converged fit shows straight bands; late changes on the right are roles not yet settled."""
    if not {"plus", "minus"} <= set(result.trace):
        fig, ax = _figure_and_axes(None, (4.0, 2.0))
        ax.text(0.5, 0.5, "no trace recorded (older result)", ha="center", va="center")
        ax.set_axis_off()
        return fig
    steps, codes = paired_roles(result.trace["plus"], result.trace["minus"], threshold)
    seeds = min(result.n_seeds, max_seeds)
    fig = Figure(figsize=(2.6 * seeds + 1.6, 3.6), layout="constrained")
    axes = fig.subplots(1, seeds, squeeze=False).ravel()
    colormap = ListedColormap([ROLE_COLORS[role] for role in ALL_ROLES])
    for seed, ax in enumerate(axes):
        image = codes[:, seed].flatten(1).T.numpy()  # [head (layer-major), snapshot]
        ax.imshow(image, aspect="auto", cmap=colormap, vmin=-0.5, vmax=len(ALL_ROLES) - 0.5,
                  interpolation="nearest", extent=(float(steps[0]), float(steps[-1]), image.shape[0], 0))
        ax.set(xlabel="update", title=f"seed {seed}")
        ax.set_ylabel("head (layer-major)" if seed == 0 else "")
    fig.legend(handles=_role_patches(), loc="outside right center", fontsize=7, frameon=False)
    return fig


def gate_map(
    result: ContrastiveResult,
    threshold: float | None = None,
    ax: Axes | None = None,
    annotate: bool | None = None,
) -> Figure:
    """``[layer, head]`` heatmap of a ContrastiveResult's gate, mean over seeds, on a fixed 0..1 scale.

    Heads whose gate ends below ``threshold`` (default: the fit's own) are boxed: solid red when closed
    in every seed, dashed orange when closed in some seeds only (see ``CLOSED_OUTLINES``).
    """
    if not isinstance(result, ContrastiveResult):
        raise InputError(f"result: expected a chg_tlens.ContrastiveResult, got {type(result).__name__}.")
    closed = result.closed(threshold).numpy()  # rejects a bad threshold before drawing
    threshold = result.config.get("threshold", 0.5) if threshold is None else threshold
    every, some = closed.all(axis=0), closed.any(axis=0)
    values = result.gates.detach().float().cpu().mean(dim=0).numpy()
    fig, ax = _figure_and_axes(ax, _panel_size(result))
    title = (f"mean gate of {closed.shape[0]} seed(s)\n"
             f"{int(every.sum())} closed (< {threshold:g}) in every seed")
    _draw_heatmap(ax, values, "viridis", title, annotate)
    for (layer, head), in_every in np.ndenumerate(every):
        if some[layer, head]:
            outline = CLOSED_OUTLINES["every" if in_every else "some"]
            ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1.0, 1.0, fill=False, clip_on=False,
                                   **outline))
    return fig


def figures_contrastive(result: ContrastiveResult, threshold: float | None = None) -> dict[str, Figure]:
    """Every standard picture of a ContrastiveResult, by file stem: the gate map and the loss curve."""
    return {"gate_map": gate_map(result, threshold), "loss_curves": loss_curves(result)}


def figures(
    result: CHGResult | ContrastiveResult, threshold: float = 0.5, seed: int | None = None
) -> dict[str, Figure]:
    """Every standard picture, by file stem: what ``save_all`` writes and the HTML report shows (roles over
    updates only for results that carry a trace). A ContrastiveResult gets ``figures_contrastive`` (its
    ``threshold`` is the closing one); its pictures show every seed, so ``seed`` must stay None."""
    if isinstance(result, ContrastiveResult):
        if seed is not None:
            raise InputError(f"seed: a ContrastiveResult's pictures show every seed; expected None, "
                             f"got {seed!r}.")
        return figures_contrastive(result, threshold)
    return {
        "heatmaps": heatmaps(result, seed=seed),
        "role_map": role_map(result, seed=seed, threshold=threshold),
        "seed_agreement": seed_agreement(result, threshold=threshold),
        "gate_scatter": gate_scatter(result, seed=seed, threshold=threshold),
        "role_shares": role_shares(result, threshold=threshold),
        "loss_curves": loss_curves(result),
    } | ({"role_trace": role_trace(result, threshold=threshold)} if result.trace else {})


def save_all(
    result: CHGResult | ContrastiveResult,
    folder: str | os.PathLike,
    threshold: float = 0.5,
    seed: int | None = None,
    dpi: int = 110,
) -> dict[str, Path]:
    """Write every standard picture (``figures``) as ``<folder>/<name>.png``; returns name -> path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fig in figures(result, threshold, seed).items():
        paths[name] = folder / f"{name}.png"
        paths[name].write_bytes(figure_png(fig, dpi))
    return paths


def ablation_curves(frame: Any, ax: Axes | None = None, metric: str = "delta_logprob",
                    title: str | None = None) -> Figure:
    """The paper's targeted ablation: one line per curve of a ``validate.targeted_ablation`` (or
    ``validate.ablation_curve``) frame, random head orders as a shaded band.

    A curve is a (score, start, value): role curves take the role's colour (facilitating should fall,
    irrelevant stay flat, interfering rise when removed from the full model), solid when heads are set
    to 0 and dashed when set to 1. Rows with score ``"random"`` are drawn, per start and value, as the
    band from their lowest to their highest value at each number of heads changed.
    """
    needed = {"score", "value", "n_changed", metric}
    missing = needed - set(getattr(frame, "columns", ()))
    if missing:
        raise InputError(
            f"frame: expected the columns of validate.ablation_curve(...) including {sorted(needed)}, "
            f"missing {sorted(missing)}."
        )
    fig, ax = _figure_and_axes(ax, (6, 4))
    frame = frame if "start" in frame.columns else frame.assign(start="g_plus")
    random = frame["score"] == "random"
    for (start, value), group in frame[random].groupby(["start", "value"], sort=False):
        band = group.groupby("n_changed")[metric].agg(["min", "max"])
        ax.fill_between(band.index.to_numpy(), band["min"].to_numpy(), band["max"].to_numpy(),
                        color=RANDOM_BAND_COLORS.get(start, "#bbbbbb"), alpha=0.35, linewidth=0,
                        label=f"random orders -> {value:g}{_start_suffix(start)}")
    for (name, start, value), group in frame[~random].groupby(["score", "start", "value"], sort=False):
        group = group.sort_values("n_changed")
        ax.plot(group["n_changed"], group[metric], marker=".", color=ROLE_COLORS.get(name),
                linestyle="--" if value == 1.0 else "-", label=f"{name} -> {value:g}{_start_suffix(start)}")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("heads changed (in order of score)")
    ax.set_ylabel({"delta_logprob": "change in mean target log-prob",
                   "delta_accuracy": "change in accuracy"}.get(metric, metric))
    if title:
        ax.set_title(title)
    ax.legend(fontsize="small")
    return fig


def _start_suffix(start: str) -> str:
    return " (from full model)" if start == "ones" else ""


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (white background, so it reads on any page)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    return buffer.getvalue()


# --------------------------------------------------------------------------- drawing pieces
def _draw_heatmap(ax: Axes, values: np.ndarray, cmap: str, title: str, annotate: bool | None) -> None:
    image = ax.imshow(values, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    _label_heads(ax, *values.shape)
    ax.set_title(title, fontsize=9)
    colorbar = ax.figure.colorbar(image, ax=ax, fraction=0.08, pad=0.03, ticks=[0.0, 0.5, 1.0])
    colorbar.ax.tick_params(labelsize=7)
    if _should_annotate(values.size, annotate):
        for (layer, head), value in np.ndenumerate(values):
            ax.text(head, layer, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color=_text_color(cmap, value))


def _label_heads(ax: Axes, n_layers: int, n_heads: int) -> None:
    ax.set_xticks(_ticks(n_heads, 12))
    ax.set_yticks(_ticks(n_layers, 16))
    ax.tick_params(labelsize=7, length=2)
    ax.set_xlabel("head", fontsize=8)
    ax.set_ylabel("layer", fontsize=8)


def _ticks(n: int, most: int) -> list[int]:
    """Tick positions 0, step, 2 step, ... with a round step that keeps at most ``most`` labels."""
    step = next(s for s in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, n) if math.ceil(n / s) <= most)
    return list(range(0, n, step))


def _should_annotate(n_cells: int, annotate: bool | None) -> bool:
    return n_cells <= ANNOTATE_MAX_CELLS if annotate is None else bool(annotate)


def _text_color(cmap: str, value: float) -> str:
    """Black on light cells, white on dark ones."""
    from matplotlib import colormaps

    red, green, blue, _ = colormaps[cmap](Normalize(0.0, 1.0)(value))
    return "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"


def head_layout(result: CHGResult | ContrastiveResult) -> tuple[int, int, int]:
    """``(seeds, layers, heads)`` of either kind of result."""
    if isinstance(result, ContrastiveResult):
        n_seeds, n_layers, n_heads = result.theta.shape
        return int(n_seeds), int(n_layers), int(n_heads)
    return result.n_seeds, result.n_layers, result.n_heads


def _panel_size(result: CHGResult | ContrastiveResult, colorbar: bool = True,
                legend: bool = False) -> tuple[float, float]:
    """Inches for one layer x head panel: cells stay readable from 1 x 4 to 32 x 32 heads."""
    _, n_layers, n_heads = head_layout(result)
    width = min(max(0.14 * n_heads + (1.4 if colorbar else 0.9), 2.6), 5.8)
    height = min(max(0.16 * n_layers + 1.3, 2.2), 6.5)
    return width + (1.4 if legend else 0.0), height


def _figure_and_axes(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        if not isinstance(ax, Axes):
            raise InputError(f"ax must be a matplotlib Axes or None, got {type(ax).__name__}.")
        return ax.figure, ax
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def _role_patches() -> list[Patch]:
    return [Patch(color=ROLE_COLORS[role], label=role) for role in ALL_ROLES]


def _seed_index(result: CHGResult, seed: Any) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) \
            or not -result.n_seeds <= seed < result.n_seeds:
        raise InputError(f"seed must be None (mean over seeds) or an integer in [0, {result.n_seeds}), "
                         f"got {seed!r}.")
    return int(seed) % result.n_seeds


def _seed_suffix(result: CHGResult, seed: int | None) -> str:
    if seed is None:
        return f" (mean of {result.n_seeds} seeds)" if result.n_seeds > 1 else ""
    return f" (seed {_seed_index(result, seed)})"


__all__ = [
    "ALL_ROLES", "CLOSED_OUTLINES", "DEFAULT_HEATMAPS", "QUANTITIES", "ROLE_COLORS", "ablation_curves",
    "figure_png", "figures", "figures_contrastive", "gate_map", "gate_scatter", "head_layout", "head_values",
    "heatmap", "heatmaps", "loss_curves", "role_agreement", "role_map", "role_shares", "role_trace",
    "save_all", "seed_agreement",
]
