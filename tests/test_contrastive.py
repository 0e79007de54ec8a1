"""Contrastive CHG on a planted model with one head per mode of posing the task."""

from __future__ import annotations

import pytest
import torch

from chg_tlens import (
    CHGResult,
    ContrastiveConfig,
    ContrastiveResult,
    GateData,
    ResultFileError,
    fit_contrastive_chg,
)
from chg_tlens.core.result_files import TENSORS_FILE
from chg_tlens.testbeds.planted import contrastive_circuit

pytestmark = pytest.mark.tl39  # runs again on TransformerLens 3.9: make pytest-tl39


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


def test_save_load_round_trip_and_each_kind_refuses_the_other(fitted, two_modes, tmp_path):
    folder = fitted.save(tmp_path / "contrastive")
    loaded = ContrastiveResult.load(folder)
    assert torch.equal(loaded.theta, fitted.theta)
    assert loaded.metrics.keys() == fitted.metrics.keys()
    for name, value in fitted.metrics.items():
        assert torch.equal(loaded.metrics[name], value.float())
    for stage, curves in fitted.losses.items():
        for name, values in curves.items():
            assert torch.equal(loaded.losses[stage][name], values.float())
    assert loaded.config == fitted.config and loaded.provenance == fitted.provenance
    assert loaded.closed_heads() == fitted.closed_heads() == [two_modes.extra["forget_head"]]
    assert loaded.table().equals(fitted.table())
    with pytest.raises(ResultFileError, match="a ContrastiveResult, not a CHGResult.*ContrastiveResult.load"):
        CHGResult.load(folder)
    chg = CHGResult(*(torch.zeros(1, 1, 4),) * 3).save(tmp_path / "chg")
    with pytest.raises(ResultFileError, match="holds a CHGResult, not a ContrastiveResult"):
        ContrastiveResult.load(chg)
    (folder / TENSORS_FILE).write_bytes((folder / TENSORS_FILE).read_bytes()[:-8])
    with pytest.raises(ResultFileError, match="checksum"):
        ContrastiveResult.load(folder)


def test_frame_has_one_row_per_head_with_every_seeds_gate(fitted, two_modes):
    frame = fitted.to_frame()
    n_seeds, n_layers, n_heads = fitted.theta.shape
    assert len(frame) == n_layers * n_heads
    assert list(frame.columns) == (["layer", "head"] + [f"gate_seed{s}" for s in range(n_seeds)]
                                   + ["closed_share", "closed_every_seed"])
    forget = frame.set_index(["layer", "head"]).loc[two_modes.extra["forget_head"]]
    assert forget["closed_every_seed"] and forget["closed_share"] == 1.0
    assert frame["closed_every_seed"].sum() == 1
    assert frame["gate_seed2"].tolist() == fitted.gates[2].flatten().tolist()


def test_a_contrastive_result_shows_itself_in_a_notebook(fitted):
    page = fitted._repr_html_()
    assert page.count("<td data-head=") == fitted.theta.shape[1] * fitted.theta.shape[2]
    assert "1 head(s) closed in every seed" in page and "retain" in page and "forget" in page
    assert 'title="layer 0 head 1: closed in every seed"' in page


def test_bad_contrastive_input_is_named(two_modes):
    data = two_modes.data(8, 0)
    retain, forget = data, data.forget
    with pytest.raises(ValueError, match="4 retain items but 8 forget items"):
        GateData.contrastive(retain.subset(range(4)), forget)
    other = GateData.from_tokens(forget.tokens.clone(), forget.target_mask.clone())
    other.tokens[3, -1] = (other.tokens[3, -1] % 9) + 1
    with pytest.raises(ValueError, match="item 3 has different answers"):
        GateData.contrastive(retain, other)
    # A side with zero items cannot exist, so GateData.contrastive never meets one: every way of
    # making one (a constructor, an empty subset, the dataclass itself) is refused where it is made.
    with pytest.raises(ValueError, match="the dataset is empty"):
        GateData.from_tokens(torch.ones(0, 3, dtype=torch.long), torch.ones(0, 3, dtype=torch.bool))
    for make_empty in (lambda: forget.subset([]),
                       lambda: GateData(retain.tokens[:0], retain.target_mask[:0], retain.lengths[:0])):
        with pytest.raises(ValueError, match="marks no target tokens; the loss would be empty"):
            make_empty()
    with pytest.raises(ValueError, match="matched retain/forget items"):
        fit_contrastive_chg(two_modes.model, retain.subset(range(4)).__class__.from_tokens(
            retain.tokens, retain.target_mask), ContrastiveConfig(progress=False))
    with pytest.raises(ValueError, match="logprob_clamp must be a positive number"):
        fit_contrastive_chg(two_modes.model, data, ContrastiveConfig(logprob_clamp=0, progress=False))
