"""Fits and their certificate: traces, early stopping by the certificate, resume, micro-batches, L-BFGS.

The equality tests run on a random model with random tokens, where every example has its own loss: on
the planted circuits every example has the same loss, so a wrong batch order or a dropped micro-batch
would pass there unseen.
"""

from __future__ import annotations

import pytest
import torch
from models_for_tests import random_bridge

from chg_tlens import CHGConfig, CHGResult, GateData, fit_chg
from chg_tlens.core.forward import score_gates
from chg_tlens.core.gates import HeadGates, initial_theta
from chg_tlens.testbeds.planted import recall_circuit

pytestmark = pytest.mark.tl39  # runs again on TransformerLens 3.9: make pytest-tl39

QUICK = dict(n_seeds=2, batch_size=32, progress=False)


@pytest.fixture(scope="module")
def varied():
    """A random 2-layer model and 24 random sequences of mixed length: per-example losses differ."""
    model = random_bridge(seed=3)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, 20, (24, 7), generator=generator)
    mask = torch.zeros(24, 7, dtype=torch.bool)
    lengths = torch.randint(4, 8, (24,), generator=generator)
    for row, length in enumerate(lengths.tolist()):
        mask[row, length - 2 : length] = True
        tokens[row, length:] = 1
    return model, GateData.from_tokens(tokens, mask, pad_token_id=1, lengths=lengths)


def test_the_varied_data_has_per_example_losses(varied):
    model, data = varied
    logprob, _ = score_gates(model, data, HeadGates.fixed(torch.full((1, 2, 4), 0.5)))
    assert float(logprob.std()) > 0.1


@pytest.fixture(scope="module")
def lbfgs_fit(recall):
    return fit_chg(recall.model, recall.data(128, 0), CHGConfig(optimizer="lbfgs", steps=100, **QUICK))


def test_fused_regularised_stage_equals_two_separate_stages(varied):
    model, data = varied
    settings = dict(n_seeds=2, batch_size=8, steps=12, progress=False)
    init = initial_theta(2, 2, 4, seed=0)
    fused = fit_chg(model, data, CHGConfig(**settings), init_theta=init)
    separate = fit_chg(model, data, CHGConfig(fuse_regularised=False, **settings), init_theta=init)
    reordered = fit_chg(model, data, CHGConfig(seed=1, **settings), init_theta=init)  # other batches
    # The same initial gates and another batch order give other gates on this data.
    assert not torch.allclose(fused.theta_plus, reordered.theta_plus, atol=1e-3)
    for name in ("theta_zero", "theta_plus", "theta_minus"):
        assert torch.allclose(getattr(fused, name), getattr(separate, name), atol=1e-5, rtol=0), name
    for stage in ("plus", "minus"):
        assert torch.allclose(fused.losses[stage]["loss"], separate.losses[stage]["loss"], atol=1e-5)
        assert torch.allclose(fused.trace[stage]["gates"], separate.trace[stage]["gates"], atol=1e-5)


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_micro_batches_give_the_gates_of_one_big_batch(varied, optimizer):
    model, data = varied
    settings = dict(n_seeds=2, batch_size=24, steps=5, optimizer=optimizer, progress=False)
    whole = fit_chg(model, data, CHGConfig(**settings))
    micro = fit_chg(model, data, CHGConfig(micro_batch_size=5, **settings))  # 5 + 5 + 5 + 5 + 4
    for name in ("g_zero", "g_plus", "g_minus"):
        assert torch.allclose(getattr(whole, name), getattr(micro, name), atol=1e-5, rtol=0), name
    # The last micro-batch counts: dropping it (training on 20 of 24 examples) moves the gates. (Not
    # G+ alone: on this random model it may pin every gate at the clamp either way.)
    shorter = fit_chg(model, data.subset(slice(0, 20)), CHGConfig(**settings | {"batch_size": 20}))
    stages = ("theta_zero", "theta_plus", "theta_minus")
    assert not torch.allclose(torch.cat([getattr(whole, name) for name in stages]),
                              torch.cat([getattr(shorter, name) for name in stages]), atol=1e-4)


def test_trace_keeps_start_end_and_every_few_updates(recall):
    fit = fit_chg(recall.model, recall.data(64, 0), CHGConfig(steps=45, **QUICK))
    assert fit.trace["zero"]["steps"].tolist() == [0, 10, 20, 30, 40, 45]
    assert torch.allclose(fit.trace["plus"]["gates"][-1], fit.g_plus)
    assert torch.allclose(fit.trace["minus"]["gates"][0], fit.g_zero)
    assert fit.trace["zero"]["gates"].shape == (6, 2, 1, 4)
    assert fit.trace["plus"]["task_grad"].shape == (2, 1, 4)
    assert torch.equal(fit.trace["plus"]["lams"], torch.full((2,), 0.1))
    assert torch.equal(fit.trace["minus"]["lams"], torch.full((2,), -0.1))


def test_lbfgs_certifies_every_stage_and_finds_the_planted_roles(recall, lbfgs_fit):
    # Facilitating and irrelevant heads in every seed. The interfering head (0.1) is interfering in
    # seed 0 only: seed 1's stage 1 saturates it open (G0 = 0.998), where its gradient all but vanishes,
    # and G+ then holds it at the clamp, the reward for an open gate outweighing what it costs the task:
    # a second stationary point of the objective, which Adam's sign-like steps leave and L-BFGS does not.
    labels, truth = lbfgs_fit.role_labels(), recall.true_roles()
    assert (labels[0] == truth).all()
    assert (labels[:, truth != "interfering"] == truth[truth != "interfering"]).all()
    frame = lbfgs_fit.convergence()
    assert frame["certified"].all(), frame.to_string()
    assert (frame["gradient"] < 0.1).all() and (frame["flips"] == 0).all()
    assert frame["stopped_early"].all() and (frame["updates"] < 100).all()
    assert "certified in every seed" in lbfgs_fit.convergence_text()
    assert lbfgs_fit.summary()["certified"].all()


def test_lbfgs_searches_the_box_the_clamp_defines(lbfgs_fit):
    # Rejects an unbounded search: without a regulariser stage 1's optimum lies at infinity for heads
    # the task wants shut or open, and its logits run past the clamp into flat ground (seen on SmolLM2:
    # heads that never stop crossing 0.5). L-BFGS holds them on the boundary instead.
    clamp = lbfgs_fit.config["clamp"]
    for name in ("theta_zero", "theta_plus", "theta_minus"):
        assert getattr(lbfgs_fit, name).abs().max() <= clamp, name
    assert (lbfgs_fit.theta_zero.abs() == clamp).sum() >= 2


def test_an_lbfgs_mask_stops_moving_only_where_its_own_certificate_holds(recall, lbfgs_fit):
    # Rejects freezing a mask once its gradient is below the tolerance: the updates after it repeat one
    # state, and the window's no-flips, still and flat-loss checks then pass by construction. Every mask
    # here stopped by its certificate (not stuck), which, read up to there, holds on a full window in
    # which its gates still moved.
    frame = lbfgs_fit.convergence()
    assert frame["settled_at"].notna().all(), frame.to_string()
    assert (frame["updates"] == frame["settled_at"]).all() and frame["certified"].all()
    assert (frame["window"] >= lbfgs_fit.config["patience"]).all() and (frame["drift"] > 0).all()
    assert frame["settled_at"].nunique() > 1  # each mask on its own, not all at the stage's stop


def test_lbfgs_stops_a_mask_whose_objective_no_longer_falls_beyond_float_rounding(recall):
    # Rejects a stopping rule that can only end at a certificate: with a tolerance float32 cannot
    # resolve, G- would crawl to the ceiling on steps driven by rounding. It stops within a few dozen
    # updates, uncertified, and says why.
    fit = fit_chg(recall.model, recall.data(128, 0),
                  CHGConfig(optimizer="lbfgs", steps=300, grad_tolerance=1e-12, **QUICK))
    minus = fit.convergence().query("stage == 'minus'")
    assert (minus["updates"] < 100).all() and not minus["certified"].any(), minus.to_string()
    assert (minus["settled_at"] == minus["updates"]).all()
    assert minus["advice"].str.contains("float rounding").all()


def test_stage_one_stops_once_it_fits_the_data_to_the_objectives_lower_bound():
    # A recall circuit whose answer head writes 14 logits: stage 1 can fit every example to within
    # float rounding of NLL 0. Rejects early stopping that knows only stationary points (no stage may
    # certify by the window before `patience` updates; here it stops well before) and a bound read off
    # anything but the objective on all the data where the stage stopped.
    circuit = recall_circuit(alpha=14.0)
    data = circuit.data(64, 0)
    fit = fit_chg(circuit.model, data, CHGConfig(optimizer="lbfgs", steps=100, **QUICK))
    zero = fit.convergence().query("stage == 'zero'")
    patience = fit.config["patience"]
    assert zero["certified"].all() and (zero["certified_by"] == "lower bound").all(), zero.to_string()
    assert (zero["updates"] < patience).all() and zero["stopped_early"].all()
    logprob, _ = score_gates(circuit.model, data, HeadGates.fixed(torch.sigmoid(fit.theta_zero)))
    assert torch.allclose(torch.tensor(zero["gap"].tolist()), -logprob.mean(dim=1), rtol=1e-3, atol=1e-7)
    assert (zero["gap"] <= 0.1 * 0.1 / 4).all()  # a tenth of one gate's reward, lambda / n_heads
    # the regularised stages have no bound to stop at: they certify by their stationary point
    regularised = fit.convergence().query("stage != 'zero'")
    assert regularised["gap"].isna().all() and (regularised["certified_by"] != "lower bound").all()


def test_without_early_stopping_lbfgs_moves_every_mask_to_the_ceiling(varied):
    # Rejects an optimiser that stops a mask on its own once its gradient is below the tolerance: with
    # early stopping off, "3x the budget" must mean more updates for every mask, or agreement with it
    # is trivial. On this data stage 1 certifies at its tolerance, not at an exact optimum, and an
    # uninterrupted run moves its gates on.
    model, data = varied
    settings = dict(optimizer="lbfgs", steps=60, n_seeds=2, batch_size=24, progress=False)
    stopped = fit_chg(model, data, CHGConfig(**settings))
    full = fit_chg(model, data, CHGConfig(early_stop=False, **settings))
    assert int(stopped.trace["zero"]["stopped_at"]) < 60 and stopped.convergence()["certified"].all()
    frame = full.convergence()
    assert (frame["updates"] == 60).all() and frame["settled_at"].isna().all(), frame.to_string()
    assert (stopped.theta_zero - full.theta_zero).abs().max() > 1e-3


def test_a_certified_lbfgs_fit_is_the_same_at_three_times_the_ceiling(recall, lbfgs_fit):
    # Issue 24's "3x the budget gives the same roles": a certified fit stops where it is certified, so
    # a higher ceiling changes nothing. Rejects a stopping rule or window tied to the ceiling.
    longer = fit_chg(recall.model, recall.data(128, 0), CHGConfig(optimizer="lbfgs", steps=300, **QUICK))
    for name in ("theta_zero", "theta_plus", "theta_minus"):
        assert torch.equal(getattr(longer, name), getattr(lbfgs_fit, name)), name
    assert longer.convergence()["updates"].tolist() == lbfgs_fit.convergence()["updates"].tolist()


def test_a_three_update_fit_is_not_certified_and_says_why(recall):
    short = fit_chg(recall.model, recall.data(128, 0), CHGConfig(steps=3, trace_every=1, **QUICK))
    report = short.convergence()
    assert not report["certified"].any(), report.to_string()
    assert (report["failed"].str.contains("window")).all()
    assert "more steps" in " ".join(report["advice"]) and "not certified" in short.convergence_text()


def test_early_stop_is_the_certificate(recall):
    # Adam at the paper's rates on the planted model: a gradient tolerance Adam's last steps can reach.
    config = CHGConfig(steps=400, early_stop=True, patience=40, grad_tolerance=1.0, **QUICK)
    fit = fit_chg(recall.model, recall.data(128, 0), config)
    frame = fit.convergence()
    stopped = frame[frame["stopped_early"]]
    assert len(stopped) and stopped["certified"].all(), frame.to_string()  # one rule for both
    for stage in fit.trace:
        at = int(fit.trace[stage]["stopped_at"])
        assert at == -1 or fit.losses[stage]["loss"].shape[0] == at < 400
    assert (fit.role_labels() == recall.true_roles()).all()


def test_a_stage_that_reaches_its_ceiling_did_not_stop_early(recall, lbfgs_fit):
    fit = fit_chg(recall.model, recall.data(64, 0), CHGConfig(steps=30, early_stop=True, patience=10,
                                                              grad_tolerance=1e-9, **QUICK))
    frame = fit.convergence()
    assert not frame["stopped_early"].any() and (frame["updates"] == 30).all(), frame.to_string()
    # A stage certified exactly at its last update ran to its ceiling: certified, not stopped early
    # (a mask that settled before it is read up to its own settled update).
    last = int(lbfgs_fit.trace["zero"]["stopped_at"])
    exact = fit_chg(recall.model, recall.data(128, 0), CHGConfig(optimizer="lbfgs", steps=last, **QUICK))
    zero = exact.convergence().query("stage == 'zero'")
    assert zero["updates"].max() == last and zero["certified"].all() and not zero["stopped_early"].any()


def test_a_fit_that_learns_nothing_does_not_stop(recall):
    # With a tiny learning rate nothing flips and the loss is flat, but the regularised gates sit at
    # their initial draw: the old stopping rule stopped here after `patience` updates.
    config = CHGConfig(steps=60, early_stop=True, patience=20, lr_zero=(1e-6, 1e-6), lr_reg=(1e-6, 1e-6),
                       grad_tolerance=1e9, **QUICK)
    fit = fit_chg(recall.model, recall.data(64, 0), config)
    frame = fit.convergence()
    regularised = frame[frame["stage"] != "zero"]
    assert not regularised["stopped_early"].any() and not regularised["certified"].any()
    assert regularised["failed"].str.contains("decided").all()


def _forward_counter(model):
    calls = {"n": 0}

    def count(module, args):
        calls["n"] += 1

    return calls, model.register_forward_pre_hook(count)


@pytest.mark.parametrize(("optimizer", "early_stop"), [("adam", False), ("lbfgs", False), ("lbfgs", True)])
def test_resume_runs_only_the_remaining_updates_and_ends_where_an_uninterrupted_fit_does(
        varied, tmp_path, optimizer, early_stop):
    # With early stopping L-BFGS freezes masks one by one: the resumed fit must know which, and where.
    model, data = varied
    config = CHGConfig(n_seeds=2, batch_size=8, steps=20, optimizer=optimizer, checkpoint_every=5,
                       early_stop=early_stop, progress=False)
    calls, handle = _forward_counter(model)
    try:
        reference = fit_chg(model, data, config, run_dir=tmp_path / "reference")
        total = calls["n"]
        crash_at = total * 2 // 3

        def crash(module, args):
            if calls["n"] == crash_at:
                raise RuntimeError("simulated crash")

        crasher = model.register_forward_pre_hook(crash)
        calls["n"] = 0
        with pytest.raises(RuntimeError, match="simulated crash"):
            fit_chg(model, data, config, run_dir=tmp_path / "victim")
        crasher.remove()
        calls["n"] = 0
        resumed = fit_chg(model, data, config, run_dir=tmp_path / "victim", resume=True)
        resumed_calls = calls["n"]
    finally:
        handle.remove()
    for name in ("theta_zero", "theta_plus", "theta_minus"):
        assert torch.allclose(getattr(reference, name), getattr(resumed, name), atol=1e-6, rtol=0), name
    for stage in ("zero", "plus", "minus"):
        assert torch.equal(reference.trace[stage]["steps"], resumed.trace[stage]["steps"])
        if optimizer == "lbfgs":
            assert torch.equal(reference.trace[stage]["settled_at"], resumed.trace[stage]["settled_at"])
        assert torch.allclose(reference.losses[stage]["loss"], resumed.losses[stage]["loss"], atol=1e-6)
    # A silent restart would run about as many forwards as the whole fit; a resume runs the rest only
    # (at most one checkpoint interval again, plus the logit check).
    assert total >= 40 and resumed_calls < total - crash_at + total // 4, (resumed_calls, total, crash_at)


def test_trace_and_certificate_survive_save_and_load(lbfgs_fit, tmp_path):
    lbfgs_fit.save(tmp_path / "run")
    loaded = CHGResult.load(tmp_path / "run")
    for stage, record in lbfgs_fit.trace.items():
        for key, value in record.items():
            assert torch.equal(loaded.trace[stage][key], value), (stage, key)
    assert loaded.convergence().equals(lbfgs_fit.convergence())
    assert loaded.example_passes() == lbfgs_fit.example_passes()


def test_lbfgs_masks_trained_together_equal_masks_trained_alone(varied):
    # Each mask has its own history and line search: a seed's gates do not depend on its neighbours.
    model, data = varied
    settings = dict(batch_size=24, steps=8, optimizer="lbfgs", early_stop=False, progress=False)
    theta = HeadGates(2, 4, 3, seed=5).theta.detach()
    together = fit_chg(model, data, CHGConfig(n_seeds=3, **settings), init_theta=theta)
    alone = fit_chg(model, data, CHGConfig(n_seeds=1, **settings), init_theta=theta[1:2])
    for name in ("theta_zero", "theta_plus", "theta_minus"):
        assert torch.allclose(getattr(together, name)[1:2], getattr(alone, name), atol=1e-5), name


def test_example_passes_count_what_ran(recall, lbfgs_fit):
    adam = fit_chg(recall.model, recall.data(64, 0), CHGConfig(steps=10, **QUICK))
    # 10 updates x 32 examples x 2 seeds per stage, 4 masks in the fused stage, plus the certificate's
    # full-data gradient (64 examples) per mask at each stage's end.
    assert adam.example_passes() == 3 * (10 * 32 * 2 + 64 * 2)
    passes = sum(int(record["passes"].sum()) for record in lbfgs_fit.trace.values())
    assert lbfgs_fit.example_passes() == passes and passes % 128 == 0
