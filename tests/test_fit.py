"""fit_chg on planted circuits, where every head's role is known by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models_for_tests import random_bridge
from torch import nn

from chg_tlens import CHGConfig, ContrastiveConfig, GateData, fit_chg
from chg_tlens.core.gates import initial_theta
from chg_tlens.errors import InputError

pytestmark = pytest.mark.tl39  # runs again on TransformerLens 3.9: make pytest-tl39

SMALL = dict(n_seeds=3, steps=150, batch_size=32, progress=False)


@pytest.fixture(scope="module")
def recall_fit(recall):
    return fit_chg(recall.model, recall.data(128, 0), CHGConfig(**SMALL))


@pytest.fixture(scope="module")
def repeat_fit(repeat):
    return fit_chg(repeat.model, repeat.data(128, 0), CHGConfig(**SMALL))


@pytest.mark.parametrize("name", ["recall", "repeat"])
def test_planted_roles_are_found_in_every_seed(name, request):
    circuit = request.getfixturevalue(name)
    result = request.getfixturevalue(f"{name}_fit")
    labels = result.role_labels()
    truth = circuit.true_roles()
    for seed in range(result.n_seeds):
        assert (labels[seed] == truth).all(), f"seed {seed}: {labels[seed]} vs {truth}"
    consensus = result.roles()
    assert consensus["facilitating"] == circuit.heads_with_role("facilitating")
    assert consensus["interfering"] == circuit.heads_with_role("interfering")


def test_signs_and_score_definitions(recall_fit, recall):
    r = recall_fit
    irrelevant = torch.as_tensor(recall.true_roles() == "irrelevant")
    assert (r.g_plus[:, irrelevant] >= r.g_minus[:, irrelevant]).all()
    assert (r.g_plus[:, irrelevant] > 0.9).all() and (r.g_minus[:, irrelevant] < 0.1).all()
    assert torch.equal(r.facilitating, r.g_minus)
    assert torch.allclose(r.interfering, 1 - r.g_plus)
    assert torch.allclose(r.irrelevant, r.g_plus * (1 - r.g_minus))
    # Facilitating head 0.0: kept open even when closing is rewarded.
    assert (r.g_minus[:, 0, 0] > 0.5).all()
    # Interfering head 0.1: closed even when opening is rewarded.
    assert (r.g_plus[:, 0, 1] < 0.5).all()


def test_loss_curves_fall_and_are_recorded(recall_fit):
    curves = recall_fit.losses
    assert set(curves) == {"zero", "plus", "minus"}
    nll = curves["zero"]["nll"]
    assert nll.shape == (150, 3)
    assert nll[-10:].mean() < nll[:10].mean()


def test_same_seed_same_gates_and_other_seed_other_gates(recall):
    data = recall.data(64, 1)
    config = CHGConfig(n_seeds=2, steps=20, batch_size=16, progress=False)
    a = fit_chg(recall.model, data, config)
    b = fit_chg(recall.model, data, config)
    c = fit_chg(recall.model, data, CHGConfig(n_seeds=2, steps=20, batch_size=16, progress=False, seed=5))
    assert torch.equal(a.theta_plus, b.theta_plus) and torch.equal(a.theta_minus, b.theta_minus)
    assert not torch.allclose(a.theta_zero, c.theta_zero)


def _recall_of_varied_length(n: int, seed: int) -> GateData:
    """The recall task (last token = token at position 1) with lengths 4..16, so batches need padding."""
    rng = np.random.default_rng(seed)
    sequences, masks = [], []
    for length in rng.integers(4, 17, size=n):
        tokens = [0, *rng.integers(1, 10, size=length - 2).tolist()]
        sequences.append([*tokens, tokens[1]])
        masks.append([False] * (length - 1) + [True])
    return GateData.from_sequences(sequences, masks)


def test_length_bucketing_keeps_the_planted_roles_and_trims_padding(recall):
    data = _recall_of_varied_length(128, 0)
    padded_tokens = {}
    for window in (1, 4):
        batches = [data.batch_indices(step, 32, seed=5, bucket_window=window) for step in range(16)]
        padded_tokens[window] = sum(data.subset(index).tokens.numel() for index in batches)
    assert padded_tokens[4] < 0.8 * padded_tokens[1]
    result = fit_chg(recall.model, data, CHGConfig(**SMALL, bucket_window=4))
    for seed in range(result.n_seeds):
        assert (result.role_labels()[seed] == recall.true_roles()).all(), result.role_labels()[seed]


def test_masks_trained_together_equal_masks_trained_alone(repeat):
    data = repeat.data(64, 2)
    config = dict(steps=25, batch_size=16, progress=False)
    joint = fit_chg(repeat.model, data, CHGConfig(n_seeds=3, **config))
    start = initial_theta(3, 2, 4, seed=0)
    alone = fit_chg(repeat.model, data, CHGConfig(n_seeds=1, **config), init_theta=start[2:3])
    for stage in ("theta_zero", "theta_plus", "theta_minus"):
        assert torch.allclose(getattr(joint, stage)[2], getattr(alone, stage)[0], atol=1e-5), stage


def test_model_is_frozen_during_the_fit_and_restored_after(recall):
    model = recall.model
    params = list(model.parameters())
    params[0].requires_grad_(True)
    model.train()
    before = [p.detach().clone() for p in params]
    fit_chg(model, recall.data(32, 0), CHGConfig(n_seeds=1, steps=3, batch_size=8, progress=False))
    assert params[0].requires_grad and model.training
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, params, strict=True))
    assert all(p.grad is None for p in params)
    params[0].requires_grad_(False)
    model.eval()


def test_two_sided_clamp_freezes_a_closed_irrelevant_head_and_one_sided_does_not(recall):
    # Irrelevant head 0.2 starts firmly closed (logit -6). It has no task gradient, so stage 1 leaves it
    # there; the reference's two-sided clamp then gives G+ no pull and it reads as interfering.
    start = initial_theta(2, 1, 4, seed=0)
    start[:, 0, 2] = -6.0
    data = recall.data(128, 0)
    results = {}
    for mode in ("two_sided", "one_sided"):
        config = CHGConfig(n_seeds=2, steps=150, batch_size=32, progress=False, clamp_mode=mode)
        results[mode] = fit_chg(recall.model, data, config, init_theta=start.clone())
    assert (results["two_sided"].role_labels()[:, 0, 2] == "interfering").all()
    assert (results["one_sided"].role_labels()[:, 0, 2] == "irrelevant").all()
    assert (results["one_sided"].g_plus[:, 0, 2] > 0.9).all()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("steps", 0, "steps must be a positive integer"),
        ("steps", -3, "steps must be a positive integer"),
        ("batch_size", 0, "batch_size must be a positive integer"),
        ("n_seeds", 0, "n_seeds must be a positive integer"),
        ("lam", -0.1, "lam must be >= 0"),
        ("lr_reg", (0.5,), "two positive learning rates"),
        ("clamp_mode", "both", "clamp_mode must be"),
        ("grad_clip", 0.0, "grad_clip must be a positive number"),
        ("bucket_window", 0, "bucket_window must be a positive integer"),
    ],
)
def test_invalid_config_is_named(recall, field, value, message):
    config = CHGConfig(progress=False)
    setattr(config, field, value)
    with pytest.raises(ValueError, match=message):
        fit_chg(recall.model, recall.data(8, 0), config)


def test_models_without_heads_or_hooks_are_refused(recall):
    data = recall.data(8, 0)
    with pytest.raises(InputError, match="expected a TransformerLens model"):
        fit_chg(nn.Linear(4, 4), data, CHGConfig(progress=False))

    class NoHeads(nn.Module):
        def __init__(self, n_heads):
            super().__init__()
            self.cfg = type("Cfg", (), {"n_layers": 2, "n_heads": n_heads, "d_head": 4, "n_ctx": 8,
                                        "d_vocab": 10})()
            self.hook_dict = {"blocks.0.hook_resid_pre": None}

        def hooks(self, **_):
            raise AssertionError("never reached")

    with pytest.raises(ValueError, match="no attention heads"):
        fit_chg(NoHeads(0), data, CHGConfig(progress=False))
    with pytest.raises(ValueError, match="no per-head attention output hooks"):
        fit_chg(NoHeads(4), data, CHGConfig(progress=False))
    with pytest.raises(InputError, match="chg_tlens.GateData"):
        fit_chg(recall.model, {"tokens": []}, CHGConfig(progress=False))


def test_sequences_longer_than_the_context_fail_before_compute(recall):
    long = GateData.from_tokens(torch.ones(1, 40, dtype=torch.long), torch.tensor([[False] * 39 + [True]]))
    with pytest.raises(ValueError, match="longer than the model's context n_ctx=16"):
        fit_chg(recall.model, long, CHGConfig(progress=False))


def test_nan_loss_names_the_stage_and_step():
    model = random_bridge()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    data = GateData.from_tokens(torch.ones(4, 5, dtype=torch.long), torch.tensor([[False] * 4 + [True]] * 4))
    with pytest.raises(FloatingPointError, match="stage 'zero', step 0"):
        fit_chg(model, data, CHGConfig(n_seeds=1, steps=3, batch_size=2, progress=False))


def test_role_summary_shares(recall_fit):
    summary = recall_fit.summary()
    roles = ["facilitating", "interfering", "irrelevant", "unclassified"]
    assert np.allclose(summary[roles].sum(axis=1).iloc[:-1], 1.0)
    assert summary["certified"].dtype == bool and "stage zero" in summary.attrs["convergence"]
    assert summary.loc["every seed", "facilitating"] == 0.25
    assert len(recall_fit.to_frame()) == 3 * 1 * 4


@pytest.mark.parametrize("config, field", [
    (CHGConfig(fuse_regularised="False"), "CHGConfig.fuse_regularised"),
    (CHGConfig(progress="False"), "CHGConfig.progress"),
    (CHGConfig(progress=1), "CHGConfig.progress"),
    (CHGConfig(early_stop="True"), "CHGConfig.early_stop"),
    (ContrastiveConfig(progress=None), "ContrastiveConfig.progress"),
])
def test_every_bool_config_field_refuses_a_non_bool_by_name(config, field):
    with pytest.raises(InputError, match=f"{field} must be True or False, got "):
        config.validate()
