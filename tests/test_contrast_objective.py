"""CHGConfig(objective="contrast"): gates fitted on the clean-vs-corrupt contrast instead of target NLL."""

import pytest
import torch

from chg_tlens import CHGConfig, InputError, fit_chg
from chg_tlens.core.data import GateData
from chg_tlens.core.objectives import answer_contrast
from chg_tlens.testbeds.composite import candidate_set_circuit


def test_answer_contrast_is_the_per_example_cross_entropy_of_the_two_answers():
    # Rejects: the sign flipped (softplus(answer - corrupt)), one mean over all targets instead of a mean
    # per example (example 0 has two targets, example 1 one), the corrupt label read from the clean one.
    tokens = torch.tensor([[0, 3, 4, 5], [0, 2, 1, 1]])
    mask = torch.tensor([[False, False, True, True], [False, False, False, True]])
    corrupt_labels = torch.tensor([1, 2, 3])  # one per target, in target order
    picked = torch.randn(2, 3, 6)
    got = answer_contrast(picked, tokens, mask, corrupt_labels)
    answers = torch.tensor([4, 5, 1])
    diff = picked[:, torch.arange(3), answers] - picked[:, torch.arange(3), corrupt_labels]
    per_target = -torch.nn.functional.logsigmoid(diff)
    expected = torch.stack([per_target[:, :2].mean(dim=1), per_target[:, 2]], dim=1)
    torch.testing.assert_close(got, expected)


@pytest.fixture(scope="module")
def candidate_set():
    circuit = candidate_set_circuit()
    return circuit, circuit.data(32, 0)


def test_contrast_singles_out_the_head_that_tells_the_answers_apart(candidate_set):
    # The candidate-set head raises the answer and the corrupt answer alike: target NLL needs it
    # (facilitating in every seed), the contrast does not (irrelevant in every seed); the mover is
    # facilitating under both. Rejects: a contrast objective that falls back to NLL (the candidate head
    # stays facilitating), one with the sign flipped (the mover comes out interfering), and a fit that
    # ignores the objective setting.
    circuit, data = candidate_set
    roles = {}
    for objective in ("nll", "contrast"):
        config = CHGConfig(objective=objective, optimizer="lbfgs", n_seeds=3, steps=200, progress=False)
        roles[objective] = fit_chg(circuit.model, data, config).role_labels()
    head, mover = circuit.diagnostics["candidate_set"], circuit.diagnostics["mover"]
    assert list(roles["nll"][:, head[0], head[1]]) == ["facilitating"] * 3
    assert list(roles["contrast"][:, head[0], head[1]]) == ["irrelevant"] * 3
    for objective in roles:
        assert list(roles[objective][:, mover[0], mover[1]]) == ["facilitating"] * 3
    expected = circuit.true_roles()
    assert (roles["contrast"] == expected[None]).all()
    assert (roles["nll"] == circuit.diagnostics["nll_roles"][None]).all()


def test_contrast_needs_a_twin_with_other_answers_at_the_same_targets(candidate_set):
    # Rejects: a fit that silently falls back to NLL without a twin, or reads a twin scored elsewhere.
    circuit, data = candidate_set
    config = CHGConfig(objective="contrast", optimizer="lbfgs", n_seeds=1, steps=2, progress=False)
    with pytest.raises(InputError, match="no corrupt twin"):
        fit_chg(circuit.model, GateData.from_tokens(data.tokens, data.target_mask), config)
    shifted = data.target_mask.roll(-1, dims=1)
    moved = data.with_corrupt(GateData.from_tokens(data.corrupt.tokens, shifted))
    with pytest.raises(InputError, match="same target positions"):
        fit_chg(circuit.model, moved, config)
    same = data.with_corrupt(GateData.from_tokens(data.tokens.clone(), data.target_mask.clone()))
    with pytest.raises(InputError, match="equals its clean answer"):
        fit_chg(circuit.model, same, config)
    with pytest.raises(InputError, match="objective must be 'nll' or 'contrast'"):
        CHGConfig(objective="logit_diff").validate()
