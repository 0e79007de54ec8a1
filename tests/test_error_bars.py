"""Error bars by source: per-seed example weights, bootstrap resamples, and the joint seeds/prompts fit."""

from __future__ import annotations

import pytest
import torch
from models_for_tests import random_bridge

from chg_tlens import CHGConfig, GateData, InputError, error_bars, fit_chg
from chg_tlens.core.fit import bootstrap_weights
from chg_tlens.core.gates import initial_theta

pytestmark = pytest.mark.tl39  # runs again on TransformerLens 3.9: make pytest-tl39


@pytest.fixture(scope="module")
def varied():
    """A random model and 12 random sequences: every example has its own loss."""
    model = random_bridge(seed=4)
    tokens = torch.randint(2, 20, (12, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(12, 6, dtype=torch.bool)
    mask[:, 4:] = True
    return model, GateData.from_tokens(tokens, mask)


def test_bootstrap_weights_count_draws_with_replacement():
    weights = bootstrap_weights(10, 3, seed=2)
    assert weights.shape == (3, 10) and torch.equal(weights.sum(dim=1), torch.full((3,), 10.0))
    assert (weights == 0).any() and (weights > 1).any()  # some prompts left out, some drawn twice
    assert torch.equal(weights, bootstrap_weights(10, 3, seed=2))
    assert not torch.equal(weights, bootstrap_weights(10, 3, seed=3))


def test_example_weights_are_a_resample(varied):
    # A weight of k counts an example k times: each seed's fit equals one on its own resampled data (full
    # batch, so the batch order cannot matter). The weights are halved, so a weighted mean divided by the
    # example count instead of the weight total would be off; each seed has its own resample, so weights
    # applied to the wrong seed (or not repeated for its G- mask) would be too.
    model, data = varied
    weights = bootstrap_weights(len(data), 2, seed=0)
    settings = dict(steps=8, progress=False)
    init = initial_theta(2, 2, 4, seed=0)
    weighted = fit_chg(model, data, CHGConfig(n_seeds=2, batch_size=len(data), **settings), init_theta=init,
                       example_weights=0.5 * weights)
    for seed in range(2):
        drawn = torch.repeat_interleave(torch.arange(len(data)), weights[seed].long())
        config = CHGConfig(n_seeds=1, batch_size=len(drawn), **settings)
        resampled = fit_chg(model, data.subset(drawn), config, init_theta=init[seed : seed + 1])
        for name in ("g_zero", "g_plus", "g_minus"):
            assert torch.allclose(getattr(weighted, name)[seed], getattr(resampled, name)[0], atol=1e-5), name
    plain = fit_chg(model, data, CHGConfig(n_seeds=2, batch_size=len(data), **settings), init_theta=init)
    assert not torch.allclose(plain.g_plus, weighted.g_plus, atol=1e-4)


@pytest.mark.parametrize("weights, message", [
    (torch.ones(2, 12), "shape"), (-torch.ones(1, 12), ">= 0"), (torch.zeros(1, 12), "sums to 0")])
def test_bad_example_weights_are_refused_by_name(varied, weights, message):
    model, data = varied
    with pytest.raises(InputError, match=message):
        fit_chg(model, data, CHGConfig(n_seeds=1, steps=2, batch_size=4, progress=False),
                example_weights=weights)


def test_error_bars_separate_initial_gates_from_prompts(recall):
    # On the planted circuit every example has the same loss, so a resample changes nothing: every
    # resample must end where seed 0 ends (rejects resamples that draw their own initial gates), and the
    # seeds, each from its own draw, find the planted roles.
    bars = error_bars(recall.model, recall.data(64, 0), CHGConfig(n_seeds=2, steps=120, batch_size=32,
                                                                     progress=False), n_resamples=2)
    assert bars.seeds.n_seeds == 2 and bars.prompts.n_seeds == 2
    assert (bars.seeds.role_labels() == recall.true_roles()).all()
    for resample in range(2):
        assert torch.allclose(bars.prompts.g_plus[resample], bars.seeds.g_plus[0], atol=1e-4)
    frame = bars.to_frame()
    assert len(frame) == 4 and (frame["prompts_agree"] == 1.0).all() and (frame["seeds_agree"] == 1.0).all()
    summary = bars.summary()
    assert list(summary.index) == ["optimiser", "seeds", "prompts"]
    assert summary.loc["prompts", "gate_sets"] == 2
