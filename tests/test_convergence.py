"""Convergence on planted circuits: traces, the converged verdict, early stopping, the fused G+/G- stage."""

from __future__ import annotations

import pytest
import torch

from chg_tlens import CHGConfig, CHGResult, fit_chg
from chg_tlens.core import convergence

QUICK = dict(n_seeds=2, batch_size=32, progress=False)


@pytest.fixture(scope="module")
def long_fit(recall):
    return fit_chg(recall.model, recall.data(128, 0), CHGConfig(steps=200, **QUICK))


@pytest.fixture(scope="module")
def early_fit(recall):
    config = CHGConfig(steps=400, early_stop=True, patience=40, trace_every=10, **QUICK)
    return fit_chg(recall.model, recall.data(128, 0), config)


def test_fused_regularised_stage_equals_two_separate_stages(recall):
    data = recall.data(64, 3)
    fused = fit_chg(recall.model, data, CHGConfig(steps=25, **QUICK))
    separate = fit_chg(recall.model, data, CHGConfig(steps=25, fuse_regularised=False, **QUICK))
    for name in ("theta_zero", "theta_plus", "theta_minus"):
        assert torch.allclose(getattr(fused, name), getattr(separate, name), atol=1e-5, rtol=0), name
    for stage in ("plus", "minus"):
        assert torch.allclose(fused.losses[stage]["loss"], separate.losses[stage]["loss"], atol=1e-5)
        assert torch.allclose(fused.trace[stage]["gates"], separate.trace[stage]["gates"], atol=1e-5)


def test_trace_keeps_start_end_and_every_few_updates(long_fit):
    trace = long_fit.trace
    assert set(trace) == {"zero", "plus", "minus"}
    assert trace["zero"]["steps"].tolist() == list(range(0, 201, 10))
    # The first snapshot is the initial draw; the last is the fitted gates.
    assert torch.allclose(trace["plus"]["gates"][-1], long_fit.g_plus)
    assert torch.allclose(trace["minus"]["gates"][0], long_fit.g_zero)
    assert trace["zero"]["gates"].shape == (21, 2, 1, 4)


def test_a_long_fit_reports_converged_and_a_three_update_fit_does_not(recall, long_fit):
    frame = long_fit.convergence()
    assert set(frame["stage"]) == {"zero", "plus", "minus"}
    assert frame["converged"].all(), frame.to_string()
    assert (frame["advice"] == "converged").all()
    short = fit_chg(recall.model, recall.data(128, 0), CHGConfig(steps=3, trace_every=1, **QUICK))
    report = short.convergence()
    regularised = report[report["stage"] != "zero"]
    assert not regularised["converged"].any(), report.to_string()
    assert "more steps" in " ".join(regularised["advice"])
    assert "not converged" in short.convergence_text() and "converged" in long_fit.convergence_text()


def test_confidence_is_high_for_a_converged_fit_and_gates_roles(recall, long_fit):
    assert torch.allclose(long_fit.confidence(), torch.ones(2, 1, 4))
    short = fit_chg(recall.model, recall.data(128, 0), CHGConfig(steps=3, trace_every=1, **QUICK))
    confidence = short.confidence()
    assert confidence.shape == (2, 1, 4) and confidence.min() < 1.0
    cautious = short.role_labels(min_confidence=1.0)
    unsure = (confidence < 1.0).numpy()
    assert (cautious[unsure] == "unclassified").all()
    assert (cautious[~unsure] == short.role_labels()[~unsure]).all()


def test_early_stop_ends_stages_before_the_ceiling_with_the_full_fits_roles(recall, early_fit, long_fit):
    trace = early_fit.trace
    assert 0 < int(trace["zero"]["stopped_at"]) < 400
    assert 0 < int(trace["plus"]["stopped_at"]) < 400
    assert early_fit.losses["zero"]["loss"].shape[0] == int(trace["zero"]["stopped_at"])
    assert (early_fit.role_labels() == recall.true_roles()).all()
    assert (early_fit.role_labels() == long_fit.role_labels()).all()
    frame = early_fit.convergence()
    assert frame["stopped_early"].all()


def test_resume_across_an_early_stop_gives_the_uninterrupted_gates(recall, tmp_path):
    data = recall.data(64, 0)
    config = CHGConfig(steps=400, early_stop=True, patience=40, checkpoint_every=10, **QUICK)
    reference = fit_chg(recall.model, data, config, run_dir=tmp_path / "reference")
    zero_updates = int(reference.trace["zero"]["stopped_at"])
    assert zero_updates < 400
    crash_at = 2 + zero_updates + 25  # the logit check's two forwards, stage 1, then 25 regularised updates
    calls = {"n": 0}

    def crash(module, args):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise RuntimeError("simulated crash")

    handle = recall.model.register_forward_pre_hook(crash)
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            fit_chg(recall.model, data, config, run_dir=tmp_path / "victim")
    finally:
        handle.remove()
    resumed = fit_chg(recall.model, data, config, run_dir=tmp_path / "victim", resume=True)
    for name in ("theta_zero", "theta_plus", "theta_minus"):
        assert torch.allclose(getattr(reference, name), getattr(resumed, name), atol=1e-6, rtol=0), name
    for stage in ("zero", "plus", "minus"):
        assert torch.equal(reference.trace[stage]["steps"], resumed.trace[stage]["steps"])
        assert int(reference.trace[stage]["stopped_at"]) == int(resumed.trace[stage]["stopped_at"])


def test_trace_and_convergence_survive_save_and_load(early_fit, tmp_path):
    early_fit.save(tmp_path / "run")
    loaded = CHGResult.load(tmp_path / "run")
    for stage, record in early_fit.trace.items():
        for key, value in record.items():
            assert torch.equal(loaded.trace[stage][key], value), (stage, key)
    assert loaded.convergence().equals(early_fit.convergence())


def test_stable_over_needs_the_whole_window_and_no_flips():
    steps = torch.tensor([0, 10, 20, 30])
    gates = torch.full((4, 1, 1, 2), 0.9)
    codes = convergence.open_codes(gates)
    assert convergence.stable_over(steps, gates, codes, patience=20, tolerance=0.01)
    assert not convergence.stable_over(steps, gates, codes, patience=40, tolerance=0.01)  # window too long
    flipped = gates.clone()
    flipped[2, 0, 0, 0] = 0.1
    assert not convergence.stable_over(steps, flipped, convergence.open_codes(flipped), 20, 0.01)
    drifting = gates.clone()
    drifting[-1] += 0.05
    assert not convergence.stable_over(steps, drifting, convergence.open_codes(drifting), 20, 0.01)


def test_role_codes_follow_the_papers_table():
    g_plus = torch.tensor([0.99, 0.01, 0.99, 0.6])
    g_minus = torch.tensor([0.99, 0.01, 0.01, 0.4])
    codes = convergence.role_codes(g_plus, g_minus, threshold=0.5)
    assert [convergence.ROLES[i] if i < 3 else "unclassified" for i in codes.tolist()] == [
        "facilitating", "interfering", "irrelevant", "unclassified"]
