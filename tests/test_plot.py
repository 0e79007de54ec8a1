"""Pictures: each function draws exactly the result's numbers, at every model size, without pyplot state."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from matplotlib.collections import PathCollection
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from PIL import Image

from chg_tlens.app import plot
from chg_tlens.core.result import CHGResult, ContrastiveResult

GATE_OPEN, GATE_CLOSED = 5.0, -5.0  # logits: sigmoid 0.993 and 0.007


def random_result(n_seeds: int, n_layers: int, n_heads: int, seed: int = 0) -> CHGResult:
    """Gates spread over (0, 1) and made-up loss curves: enough to check what is drawn."""
    generator = torch.Generator().manual_seed(seed)
    shape = (n_seeds, n_layers, n_heads)
    thetas = [3 * torch.randn(shape, generator=generator) for _ in range(3)]
    losses = {
        stage: {"loss": torch.rand(20, n_seeds, generator=generator) + 1.0,
                "nll": torch.rand(20, n_seeds, generator=generator)}
        for stage in ("zero", "plus", "minus")
    }
    return CHGResult(*thetas, losses=losses)


def known_roles_result() -> tuple[CHGResult, np.ndarray, np.ndarray]:
    """3 seeds x 2 layers x 3 heads whose roles are set through the gates, one head disputed.

    Returns the result, the expected majority role codes and the expected agreement.
    """
    plan = {  # role -> (G+ logit, G- logit)
        "facilitating": (GATE_OPEN, GATE_OPEN),
        "interfering": (GATE_CLOSED, GATE_CLOSED),
        "irrelevant": (GATE_OPEN, GATE_CLOSED),
        "unclassified": (0.4, -0.2),  # G+ 0.60, G- 0.45: every score below 0.5
    }
    roles = np.array([["facilitating", "interfering", "irrelevant"],
                      ["unclassified", "irrelevant", "facilitating"]], dtype=object)
    per_seed = np.stack([roles.copy() for _ in range(3)])
    per_seed[2, 1, 2] = "interfering"  # seed 2 disputes head 1.2: agreement 2/3, majority facilitating
    theta_plus = torch.tensor([[[plan[r][0] for r in row] for row in seed] for seed in per_seed])
    theta_minus = torch.tensor([[[plan[r][1] for r in row] for row in seed] for seed in per_seed])
    codes = np.vectorize(plot.ALL_ROLES.index)(roles).astype(float)
    agreement = np.ones(roles.shape)
    agreement[1, 2] = 2 / 3
    return CHGResult(torch.zeros_like(theta_plus), theta_plus, theta_minus), codes, agreement


def contrastive_result() -> ContrastiveResult:
    """2 seeds x 2 layers x 3 heads: head 0.1 closed in both seeds, head 1.2 in seed 1 only."""
    theta = torch.full((2, 2, 3), GATE_OPEN)
    theta[:, 0, 1] = GATE_CLOSED
    theta[1, 1, 2] = GATE_CLOSED
    theta[0, 1, 0] = 0.3  # gate 0.57: open at the fit's threshold 0.5, closed at 0.6
    generator = torch.Generator().manual_seed(0)
    losses = {"contrastive": {"loss": torch.rand(20, 2, generator=generator),
                              "nll": torch.rand(20, 2, generator=generator)}}
    return ContrastiveResult(theta, losses=losses, config={"threshold": 0.5})


def images_of(fig: Figure) -> list:
    return [image for ax in fig.axes for image in ax.images]


@pytest.mark.parametrize("quantity", sorted(plot.QUANTITIES))
def test_heatmap_draws_the_seed_mean_or_one_seed(quantity):
    result = random_result(4, 30, 9)
    expected = getattr(result, quantity)

    fig = plot.heatmap(result, quantity)
    (image,) = images_of(fig)
    assert np.allclose(image.get_array(), expected.mean(0).numpy(), atol=1e-6)
    assert image.get_clim() == (0.0, 1.0)
    assert not fig.axes[0].texts  # 270 heads: too many to write numbers into

    (image,) = images_of(plot.heatmap(result, quantity, seed=2))
    assert np.allclose(image.get_array(), expected[2].numpy(), atol=1e-6)
    (image,) = images_of(plot.heatmap(result, quantity, seed=-1))
    assert np.allclose(image.get_array(), expected[3].numpy(), atol=1e-6)


@pytest.mark.parametrize("shape", [(30, 9), (32, 32), (1, 4)])
def test_heatmaps_show_gates_and_scores_readably(shape):
    result = random_result(3, *shape)
    fig = plot.heatmaps(result)
    images = images_of(fig)
    assert len(images) == len(plot.DEFAULT_HEATMAPS) == 5
    for image, quantity in zip(images, plot.DEFAULT_HEATMAPS, strict=True):
        assert np.allclose(image.get_array(), getattr(result, quantity).mean(0).numpy(), atol=1e-6)
    width, height = fig.get_size_inches()
    assert width <= 20 and height <= 20
    fig.canvas.draw()
    dpi = 110  # what save_all and the report use
    for image in images:
        box = image.axes.get_window_extent()
        assert box.width / shape[1] * dpi / fig.dpi >= 6, "head columns too thin to read"
        assert box.height / shape[0] * dpi / fig.dpi >= 6, "layer rows too thin to read"


def test_small_heatmaps_write_their_values():
    result = random_result(2, 2, 4)
    fig = plot.heatmap(result, "g_minus")
    texts = [t.get_text() for t in fig.axes[0].texts]
    expected = [f"{v:.2f}" for v in result.g_minus.mean(0).numpy().ravel()]
    assert texts == expected
    assert not plot.heatmap(result, "g_minus", annotate=False).axes[0].texts
    assert len(plot.heatmap(random_result(1, 30, 9), "g_plus", annotate=True).axes[0].texts) == 270


def test_role_map_and_seed_agreement_show_known_roles():
    result, codes, agreement = known_roles_result()

    (image,) = images_of(plot.role_map(result))
    assert np.array_equal(image.get_array(), codes)
    (image,) = images_of(plot.role_map(result, seed=2))
    disputed = codes.copy()
    disputed[1, 2] = plot.ALL_ROLES.index("interfering")
    assert np.array_equal(image.get_array(), disputed)

    majority, fraction = plot.role_agreement(result)
    assert np.allclose(fraction, agreement)
    assert majority[1, 2] == "facilitating" and majority[1, 0] == "unclassified"
    fig = plot.seed_agreement(result)
    (image,) = images_of(fig)
    assert np.allclose(image.get_array(), agreement)
    assert any(t.get_text() == "fac\n0.67" for t in fig.axes[0].texts)


def test_gate_scatter_has_one_point_per_head_and_seed_coloured_by_role():
    result = random_result(3, 4, 5)
    labels = result.role_labels()
    fig = plot.gate_scatter(result)
    groups = [c for c in fig.axes[0].collections if isinstance(c, PathCollection)]
    assert len(groups) == len(plot.ALL_ROLES)
    total = 0
    for group, role in zip(groups, plot.ALL_ROLES, strict=True):
        points = group.get_offsets()
        chosen = labels == role
        assert len(points) == chosen.sum()
        assert np.allclose(np.sort(points[:, 0]), np.sort(result.g_plus.numpy()[chosen]))
        assert np.allclose(np.sort(points[:, 1]), np.sort(result.g_minus.numpy()[chosen]))
        if len(points):
            assert to_hex(group.get_facecolor()[0]) == plot.ROLE_COLORS[role]
        total += len(points)
    assert total == 3 * 4 * 5

    one_seed = plot.gate_scatter(result, seed=1)
    assert sum(len(c.get_offsets()) for c in one_seed.axes[0].collections
               if isinstance(c, PathCollection)) == 4 * 5


def test_role_shares_stack_each_seeds_summary():
    result = random_result(5, 6, 4)
    summary = result.summary()
    bars = plot.role_shares(result).axes[0].patches
    assert len(bars) == 5 * len(plot.ALL_ROLES)
    heights = np.array([bar.get_height() for bar in bars]).reshape(len(plot.ALL_ROLES), 5)
    for row, role in zip(heights, plot.ALL_ROLES, strict=True):
        assert np.allclose(row, summary[role].to_numpy()[:5])
    assert np.allclose(heights.sum(axis=0), 1.0)


def test_loss_curves_one_panel_per_stage():
    result = random_result(3, 2, 2)
    fig = plot.loss_curves(result)
    assert len(fig.axes) == 3
    for ax, stage in zip(fig.axes, ("zero", "plus", "minus"), strict=True):
        loss = result.losses[stage]["loss"].numpy()
        assert len(ax.lines) == 3 + 2  # each seed, the mean loss, the mean NLL
        assert np.allclose(ax.lines[3].get_ydata(), loss.mean(axis=1))
        assert np.allclose(ax.lines[0].get_ydata(), loss[:, 0])
    empty = CHGResult(result.theta_zero, result.theta_plus, result.theta_minus)
    assert "no loss curves" in plot.loss_curves(empty).axes[0].texts[0].get_text()
    # The loss_frame view holds the same numbers the panels draw.
    frame = result.loss_frame()
    mean_plus = frame[frame.stage == "plus"].groupby("step")["loss"].mean().to_numpy()
    assert np.allclose(fig.axes[1].lines[3].get_ydata(), mean_plus)


def test_functions_draw_into_the_axes_they_are_given():
    result = random_result(2, 3, 3)
    fig = Figure()
    axes = fig.subplots(2, 4).ravel()
    assert plot.heatmap(result, "irrelevant", ax=axes[0]) is fig
    assert plot.role_map(result, ax=axes[1]) is fig
    assert plot.seed_agreement(result, ax=axes[2]) is fig
    assert plot.gate_scatter(result, ax=axes[3]) is fig
    assert plot.role_shares(result, ax=axes[4]) is fig
    assert plot.loss_curves(result, axes=axes[5:8]) is fig
    assert all(len(ax.images) == 1 for ax in axes[:3])
    assert len(axes[3].collections) >= 4 and len(axes[4].patches) == 2 * 4
    assert all(ax.lines for ax in axes[5:8])


def test_bad_arguments_name_the_argument():
    result = random_result(2, 2, 2)
    with pytest.raises(ValueError, match="quantity must be one of"):
        plot.heatmap(result, "g_pluss")
    with pytest.raises(ValueError, match=r"seed must be None .* \[0, 2\), got 2"):
        plot.heatmap(result, seed=2)
    with pytest.raises(ValueError, match="seed must be"):
        plot.gate_scatter(result, seed=True)
    with pytest.raises(ValueError, match="threshold"):
        plot.role_map(result, threshold=1.5)
    with pytest.raises(ValueError, match="quantities must be a non-empty list"):
        plot.heatmaps(result, quantities="g_plus")
    with pytest.raises(ValueError, match="ax must be a matplotlib Axes"):
        plot.heatmap(result, ax="left")
    with pytest.raises(ValueError, match="axes must hold one Axes per stage"):
        plot.loss_curves(result, axes=[Figure().add_subplot()])


def test_save_all_writes_every_picture_as_png(tmp_path):
    result = random_result(3, 30, 9)
    paths = plot.save_all(result, tmp_path / "pictures")
    assert set(paths) == {"heatmaps", "role_map", "seed_agreement", "gate_scatter", "role_shares",
                          "loss_curves"}
    for name, path in paths.items():
        assert path == tmp_path / "pictures" / f"{name}.png"
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=float)
        assert min(pixels.shape[:2]) >= 200
        assert (pixels.min(axis=2) < 200).mean() > 0.02, f"{name}.png is almost blank"


def test_pictures_leave_no_pyplot_state():
    """Figures are plain objects: nothing accumulates in pyplot's registry, no window can open."""
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plot.figures(random_result(2, 3, 3))
    assert plt.get_fignums() == before


def test_role_trace_draws_each_seeds_roles_at_every_snapshot(recall):
    from chg_tlens import CHGConfig, fit_chg
    from chg_tlens.core.convergence import paired_roles

    result = fit_chg(recall.model, recall.data(64, 0), CHGConfig(n_seeds=2, steps=30, batch_size=16,
                                                                progress=False))
    fig = plot.role_trace(result)
    images = images_of(fig)
    assert len(images) == 2  # one panel per seed
    _, codes = paired_roles(result.trace["plus"], result.trace["minus"], 0.5)
    for seed, image in enumerate(images):
        assert np.array_equal(image.get_array(), codes[:, seed].flatten(1).T.numpy())
    assert "role_trace" in plot.figures(result) and "role_trace" not in plot.figures(random_result(2, 2, 2))


def outlined_heads(fig: Figure) -> dict[tuple[int, int], str]:
    """(layer, head) -> line style of every box ``gate_map`` drew."""
    from matplotlib.patches import Rectangle

    boxes = [patch for ax in fig.axes for patch in ax.patches if isinstance(patch, Rectangle)]
    return {(round(box.get_y() + 0.5), round(box.get_x() + 0.5)): box.get_linestyle() for box in boxes}


def test_gate_map_draws_the_mean_gate_and_boxes_the_closed_heads():
    result = contrastive_result()
    fig = plot.gate_map(result)
    (image,) = images_of(fig)
    assert np.allclose(image.get_array(), result.gates.mean(dim=0).numpy())
    assert outlined_heads(fig) == {(0, 1): "-", (1, 2): "--"}  # solid: every seed, dashed: some seeds
    assert "1 closed (< 0.5) in every seed" in fig.axes[0].get_title()
    assert outlined_heads(plot.gate_map(result, threshold=0.6)) == {(0, 1): "-", (1, 2): "--", (1, 0): "--"}
    with pytest.raises(ValueError, match="threshold"):
        plot.gate_map(result, threshold=1.5)
    with pytest.raises(ValueError, match="expected a chg_tlens.ContrastiveResult"):
        plot.gate_map(random_result(2, 2, 3))


def test_contrastive_figures_show_the_gate_map_and_the_one_loss_curve(tmp_path):
    result = contrastive_result()
    fig = plot.loss_curves(result)
    (ax,) = fig.axes
    assert len(ax.lines) == 2 + 2  # each seed, the mean loss, the mean NLL
    assert np.allclose(ax.lines[2].get_ydata(), result.losses["contrastive"]["loss"].mean(dim=1).numpy())
    assert "contrastive" in ax.get_title()
    assert set(plot.figures(result)) == set(plot.figures_contrastive(result)) == {"gate_map", "loss_curves"}
    with pytest.raises(ValueError, match="seed"):
        plot.figures(result, seed=0)
    paths = plot.save_all(result, tmp_path / "pictures")
    assert set(paths) == {"gate_map", "loss_curves"}
    for path in paths.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
