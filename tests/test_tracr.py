"""Compiled RASP programs (tracr): a ground truth no one here wrote, scored per position."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from chg_tlens import CHGConfig, fit_chg
from chg_tlens.core.forward import score_gates
from chg_tlens.core.gates import HeadGates
from chg_tlens.errors import MissingDependencyError
from chg_tlens.models import adapter
from chg_tlens.testbeds import tracr_models  # make test installs the tracr extra: no skip without it

pytestmark = pytest.mark.tl39  # runs again on TransformerLens 3.9: make pytest-tl39

SMALL = dict(n_seeds=3, steps=100, batch_size=16, progress=False)


@pytest.fixture(scope="module", params=sorted(tracr_models.RECIPES))
def program(request):
    return tracr_models.load_program(request.param)


@pytest.fixture(scope="module")
def reverse():
    return tracr_models.load_program("reverse")


@pytest.fixture(scope="module")
def frac_prevs():
    return tracr_models.load_program("frac_prevs")


def one_head_off(program) -> torch.Tensor:
    """All gates open, then each head closed alone: ``[1 + layer * head, layer, head]``."""
    n_layers, n_heads = program.compiled_heads.shape
    settings = torch.ones(1 + n_layers * n_heads, n_layers, n_heads)
    for index in range(n_layers * n_heads):
        settings[1 + index].view(-1)[index] = 0.0
    return settings


def test_loaded_model_answers_as_the_rasp_program_and_as_tracrs_own_model(program):
    for length in (program.length, program.max_seq_len):
        inputs = program.sample_inputs(24, seed=3, length=length)
        program.check_outputs(inputs)  # raises on any mismatch with the RASP evaluator
        for x, predicted in zip(inputs[:3], program.predict(inputs[:3]), strict=True):
            compiled = program.assembled.apply([tracr_models.BOS, *x]).decoded[1:]
            assert np.allclose(np.asarray(compiled, dtype=float), np.asarray(predicted, dtype=float),
                               atol=1e-4), (x, compiled, predicted)


def test_ground_truth_is_read_off_the_compiled_weights_and_survives_loading(program):
    truth = program.true_roles()
    compiled = program.compiled_heads
    assert compiled.any(), "a program with no attention head"
    if program.name != "hist":  # hist compiles to one layer with one head: every head is the program's
        assert not compiled.all()
    assert set(truth.flatten()) <= {"facilitating", "irrelevant"}
    assert ((truth == "facilitating") == compiled).all()
    for layer, head in np.ndindex(*compiled.shape):  # the loaded model has the same heads, on either TL
        weights = adapter.head_weights(program.model, layer, head)
        writes = bool((weights["W_V"] @ weights["W_O"]).abs().max() > 0)
        assert writes == compiled[layer, head], (layer, head)


def test_every_compiled_head_is_needed_on_the_data_and_padding_changes_nothing(program):
    data = program.data(64, seed=0)
    logprob, accuracy = score_gates(program.model, data, HeadGates.fixed(one_head_off(program)))
    logprob, accuracy = logprob.mean(dim=1), accuracy.mean(dim=1)
    assert float(accuracy[0]) == 1.0
    for index, compiled in enumerate(program.compiled_heads.flatten()):
        if compiled:
            assert accuracy[1 + index] < 0.9, (index, accuracy[1 + index])
        else:
            assert torch.allclose(logprob[1 + index], logprob[0], atol=1e-6)


def test_data_scores_the_programs_answer_at_each_position(reverse):
    data = reverse.data(4, seed=0)
    assert data.per_position and not data.target_mask[:, 0].any() and data.target_mask[:, 1:].all()
    first = reverse.sample_inputs(4, seed=0)[0]  # data(n, seed) draws its clean inputs with seed * 2
    assert [reverse.output_values[i] for i in data.targets[0, 1:].tolist()] == first[::-1]
    assert data.corrupt is not None and data.corrupt.per_position
    assert not torch.equal(data.tokens, data.corrupt.tokens)


def test_numerical_readout_is_a_gaussian_likelihood_over_the_values(frac_prevs):
    labels = list(frac_prevs.assembled.residual_labels)
    output, one = labels.index(frac_prevs.program.label), labels.index("one")
    w_u = adapter.embedding_weights(frac_prevs.model)["W_U"].detach()  # [d_model, value]
    values = torch.tensor(frac_prevs.output_values, dtype=torch.float32)
    sigma = frac_prevs.readout_sigma
    for y in (0.0, 0.31, 0.5, 0.97):
        resid = torch.zeros(len(labels))
        resid[output], resid[one] = y, 1.0
        gaussian = -((y - values) ** 2) / (2 * sigma**2)
        assert torch.allclose((resid @ w_u).log_softmax(-1), gaussian.log_softmax(-1), atol=1e-3)


def test_chg_finds_the_compiled_head_in_every_seed_on_frac_prevs(frac_prevs):
    result = fit_chg(frac_prevs.model, frac_prevs.data(64, seed=0), CHGConfig(**SMALL))
    labels = result.role_labels()
    for seed in range(result.n_seeds):
        assert (labels[seed] == frac_prevs.true_roles()).all(), f"seed {seed}: {labels[seed]}"


def test_a_selector_width_heads_loss_is_a_step_in_its_gate(reverse):
    """Why gradient fits struggle on reverse: its length head feeds tracr's near-exact step MLP, so the
    loss does not move with the gate until about 0.85, then jumps (no gradient on either side)."""
    data = reverse.data(64, seed=0)
    gate = torch.linspace(0.0, 1.0, 21)
    settings = torch.ones(len(gate), *reverse.compiled_heads.shape)
    settings[:, 0, 0] = gate  # head 0.0: SelectorWidth(all tokens), the length
    logprob = score_gates(reverse.model, data, HeadGates.fixed(settings))[0].mean(dim=1)
    below = logprob[gate <= 0.8]
    assert torch.allclose(below, below[0].expand_as(below), atol=1e-4)
    assert logprob[-1] > below[0] + 0.5


@pytest.mark.xfail(strict=True, reason="measured: with gates drawn in [0, 1] (the paper's start) the "
                   "length head's gate sits on the flat side of its step and never opens, so CHG calls both "
                   "compiled heads of reverse irrelevant (0 of 3 seeds right)")
def test_chg_finds_the_compiled_heads_in_every_seed_on_reverse(reverse):
    result = fit_chg(reverse.model, reverse.data(64, seed=0), CHGConfig(**SMALL))
    labels = result.role_labels()
    for seed in range(result.n_seeds):
        assert (labels[seed] == reverse.true_roles()).all(), f"seed {seed}: {labels[seed]}"


def test_a_missing_tracr_is_named_with_the_pip_line(monkeypatch):
    for name in ("tracr", "tracr.compiler", "tracr.rasp"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependencyError, match=r"pip install .*tracr"):
        tracr_models.load_program("reverse")
    with pytest.raises(ImportError):  # still an ImportError for code that catches those
        tracr_models.load_program("frac_prevs")


def test_an_unknown_program_is_named():
    with pytest.raises(ValueError, match="expected one of"):
        tracr_models.load_program("quicksort")


@pytest.mark.parametrize("distance", ["l2", "kl"])
def test_acdc_with_zero_ablation_finds_the_compiled_heads(reverse, frac_prevs, distance):
    """The ACDC paper's tracr setting (zero ablation; L2 on the one-hot outputs, or KL): the heads it
    keeps are exactly the heads the compiler wrote, and its sweep's ROC is perfect."""
    from chg_tlens.analysis.acdc import acdc
    from chg_tlens.analysis.metrics import sweep_roc

    for program in (reverse, frac_prevs):
        data = program.data(32, seed=0)
        result = acdc(program.model, data, tau=0.01, taus=[1e-4, 0.1, 1.0], ablation="zero",
                      distance=distance)
        truth = program.true_roles() == "facilitating"
        assert np.array_equal(result.details["kept"], truth), (program.name, result.details["kept"])
        kept = [result.details["kept"], *(point["kept"] for point in result.details["sweep"])]
        assert sweep_roc(kept, truth)[2] == pytest.approx(1.0)
