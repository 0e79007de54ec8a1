"""Contrastive CHG on a planted model with one head per mode of posing the task."""

from __future__ import annotations

import pytest
import torch

from chg_tlens import ContrastiveConfig, GateData, fit_contrastive_chg
from chg_tlens.testbeds.planted import contrastive_circuit


@pytest.fixture(scope="module")
def two_modes():
    return contrastive_circuit()


@pytest.fixture(scope="module")
def fitted(two_modes):
    config = ContrastiveConfig(n_seeds=3, steps=150, batch_size=32, progress=False)
    return fit_contrastive_chg(two_modes.model, two_modes.data(128, 0), config,
                               eval_data=two_modes.data(64, 99))


def test_the_forget_head_closes_and_the_retain_head_stays_in_every_seed(fitted, two_modes):
    retain_head, forget_head = two_modes.extra["retain_head"], two_modes.extra["forget_head"]
    gates = fitted.gates
    assert (gates[:, forget_head[0], forget_head[1]] < 0.1).all()
    assert (gates[:, retain_head[0], retain_head[1]] > 0.9).all()
    assert fitted.closed_heads() == [forget_head]
    for seed in range(3):
        assert fitted.closed_heads(seed=seed) == [forget_head]


def test_held_out_accuracy_kept_on_retain_and_lost_on_forget(fitted):
    m = fitted.metrics
    assert (m["retain_before_accuracy"] == 1).all() and (m["forget_before_accuracy"] == 1).all()
    assert (m["retain_after_accuracy"] == 1).all()
    assert (m["forget_after_accuracy"] < 0.3).all()
    assert (m["forget_after_logprob"] < m["forget_before_logprob"] - 1).all()
    table = fitted.table()
    assert list(table["side"]) == ["retain", "retain", "forget", "forget"]
    assert fitted.provenance["evaluated_on"] == "eval_data"


def test_bad_contrastive_input_is_named(two_modes):
    data = two_modes.data(8, 0)
    retain, forget = data, data.forget
    with pytest.raises(ValueError, match="4 retain items but 8 forget items"):
        GateData.contrastive(retain.subset(range(4)), forget)
    other = GateData.from_tokens(forget.tokens.clone(), forget.target_mask.clone())
    other.tokens[3, -1] = (other.tokens[3, -1] % 9) + 1
    with pytest.raises(ValueError, match="item 3 has different answers"):
        GateData.contrastive(retain, other)
    with pytest.raises(ValueError, match="the dataset is empty"):
        GateData.contrastive(retain, GateData.from_tokens(torch.ones(0, 3, dtype=torch.long),
                                                          torch.ones(0, 3, dtype=torch.bool)))
    with pytest.raises(ValueError, match="matched retain/forget items"):
        fit_contrastive_chg(two_modes.model, retain.subset(range(4)).__class__.from_tokens(
            retain.tokens, retain.target_mask), ContrastiveConfig(progress=False))
    with pytest.raises(ValueError, match="logprob_clamp must be a positive number"):
        fit_contrastive_chg(two_modes.model, data, ContrastiveConfig(logprob_clamp=0, progress=False))
