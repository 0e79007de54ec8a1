"""Faithfulness over k with the other heads mean- or corrupt-ablated (not zeroed), on planted models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chg_tlens.analysis import compare
from chg_tlens.analysis.ablation import evaluate_gates
from chg_tlens.core.data import GateData
from chg_tlens.errors import InputError
from chg_tlens.testbeds import surgery
from chg_tlens.testbeds.composite import composite_circuit
from chg_tlens.testbeds.planted import PlantedHead, _Subspaces, build_planted_model, recall_tokens

pytestmark = pytest.mark.tl39


@pytest.fixture(scope="module")
def composite():
    circuit = composite_circuit()
    return circuit, circuit.data(48, 1), circuit.true_roles()


@pytest.mark.parametrize("ablation", ["mean", "corrupt"])
def test_known_heads_carry_the_task_and_random_irrelevant_heads_carry_none(composite, ablation):
    circuit, data, roles = composite
    facilitating = torch.as_tensor(roles == "facilitating")
    k = int(facilitating.sum())
    curve = compare.ablated_faithfulness_curve(circuit.model, data, facilitating.float(),
                                               ks=[0, k, roles.size], ablation=ablation)
    assert curve["faithfulness"].tolist()[0] == pytest.approx(0.0, abs=1e-6)
    assert curve["faithfulness"].tolist()[2] == pytest.approx(1.0, abs=1e-6)
    assert curve["faithfulness"].iloc[1] == pytest.approx(1.0, abs=0.1)
    assert (curve["ablation"] == ablation).all() and (curve["metric_name"] == "logprob").all()
    irrelevant = torch.as_tensor(roles == "irrelevant")
    for seed in range(4):  # k random heads that are neither facilitating nor interfering
        scores = torch.rand(roles.shape, generator=torch.Generator().manual_seed(seed)) + 10 * irrelevant
        random = compare.ablated_faithfulness_curve(circuit.model, data, scores, ks=[k], ablation=ablation)
        assert abs(random["faithfulness"].iloc[0]) < 0.05


def test_logit_difference_metric_and_its_twin_requirement(composite):
    circuit, data, roles = composite
    facilitating = torch.as_tensor(roles == "facilitating").float()
    curve = compare.ablated_faithfulness_curve(circuit.model, data, facilitating, ks=[4], metric="logit_diff")
    assert curve["metric_all"].iloc[0] > curve["metric_none"].iloc[0]
    assert curve["faithfulness"].iloc[0] > 0.9
    no_twin = GateData.from_tokens(data.tokens, data.target_mask)
    for options in ({"ablation": "corrupt"}, {"metric": "logit_diff"}):
        with pytest.raises(InputError, match="corrupt"):
            compare.ablated_faithfulness_curve(circuit.model, no_twin, facilitating, ks=[4], **options)
    with pytest.raises(InputError, match="ablation must be"):
        compare.ablated_faithfulness_curve(circuit.model, data, facilitating, ablation="zero")


def test_the_complement_is_mean_ablated_not_zeroed():
    """Head 0.1 writes the same thing on every prompt (it reads the residual's constant dimension and
    raises the logit of token 0, never the answer): its mean is itself, so mean-ablating it changes
    nothing, while zeroing it helps the task. An implementation that zeroed the complement fails here."""
    heads = [PlantedHead(0, 0, ("fixed", 1), +1, 3.0), PlantedHead(0, 2, ("fixed", 1), 0, 3.0),
             PlantedHead(0, 3, ("offset", 0), 0, 3.0)]
    model = build_planted_model(1, 4, heads, vocab=10, n_ctx=16, name="planted-constant")
    spaces = _Subspaces(10, 16)
    w_q, w_k, w_v, w_o = (torch.zeros(spaces.d_model, model.cfg.d_head) for _ in range(4))
    w_v[spaces.constant, 0] = 1.0
    w_o = w_o.T.clone()
    w_o[0, spaces.answer.start] = 4.0
    surgery.write_head_weights(model, 0, 1, w_q, w_k, w_v, w_o)
    data = GateData.from_tokens(*recall_tokens(32, 8, 10, seed=0))
    helper_first = torch.tensor([[4.0, 3.0, 2.0, 1.0]])  # k=1 keeps 0.0; k=2 also keeps the constant head
    mean = compare.ablated_faithfulness_curve(model, data, helper_first, ks=[1, 2])
    assert mean["metric"].iloc[0] == pytest.approx(mean["metric"].iloc[1], abs=1e-5)
    zeroed = compare.faithfulness_curve(model, data, helper_first, ks=[1, 2])
    assert zeroed["logprob"].iloc[0] - zeroed["logprob"].iloc[1] > 0.5  # zeroing the constant head helps
    # and the all-ablated reference is the model with every head at its mean, not with every head off
    logprob_off, _ = evaluate_gates(model, data, torch.zeros(1, 1, 4))
    assert abs(mean["metric_none"].iloc[0] - float(logprob_off[0])) > 0.5


def test_a_reference_dataset_gives_the_means(composite):
    circuit, data, roles = composite
    scores = torch.as_tensor(np.where(roles == "facilitating", 1.0, 0.0))
    own = compare.ablated_faithfulness_curve(circuit.model, data, scores, ks=[4])
    other = compare.ablated_faithfulness_curve(circuit.model, data, scores, ks=[4],
                                               reference=circuit.data(48, 5))
    assert own["metric"].iloc[0] != other["metric"].iloc[0]
    assert other["faithfulness"].iloc[0] == pytest.approx(1.0, abs=0.15)
    short_mask = torch.zeros(len(data), 4, dtype=torch.bool)
    short_mask[:, -1] = True
    short = GateData.from_tokens(data.tokens[:, :4], short_mask)
    with pytest.raises(InputError, match="reference"):
        compare.ablated_faithfulness_curve(circuit.model, data, scores, reference=short)
