"""ACDC at head granularity: it keeps the planted heads, prunes the rest, sweeps thresholds into a ROC,
and its recorded changes are the distances it measured."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from chg_tlens.analysis import acdc as acdc_module
from chg_tlens.analysis.acdc import acdc
from chg_tlens.analysis.metrics import sweep_roc
from chg_tlens.core.checkpoint import CheckpointError
from chg_tlens.core.data import GateData
from chg_tlens.errors import InputError
from chg_tlens.testbeds.benchmark_models import induction_circuit, recall_benchmark

pytestmark = pytest.mark.tl39  # runs again on TransformerLens 3.9: make pytest-tl39


def test_acdc_keeps_the_heads_the_output_needs_and_prunes_heads_that_write_nowhere(recall_with_twin):
    circuit, data = recall_with_twin
    result = acdc(circuit.model, data, tau=0.01)
    kept = result.details["kept"]
    facilitating = circuit.heads_with_role("facilitating")[0]
    assert kept[facilitating] and kept[0, 1]  # the answer head; the interfering one moves the output
    assert not kept[0, 2] and not kept[0, 3]  # 0.2 and 0.3 write where nothing reads
    assert result.scores[0, 2:].abs().max() < 1e-6
    assert result.scores[facilitating] > result.scores[0, 1] > 0.01
    assert result.forward_passes == len(data) * (2 + 4)  # clean + corrupt reference, one pass per head
    assert result.details["distance"] < 0.01


def test_acdc_composition_keeps_both_heads_of_an_and_with_corrupt_and_with_zero_ablation():
    circuit = induction_circuit()
    data = circuit.data(24, 0)
    needed = circuit.true_roles() == "facilitating"
    for ablation in ("corrupt", "zero"):
        source = data if ablation == "corrupt" else GateData.from_tokens(data.tokens, data.target_mask,
                                                                          lengths=data.lengths)
        result = acdc(circuit.model, source, tau=0.05, ablation=ablation)
        assert np.array_equal(result.details["kept"], needed), ablation


def test_acdc_sweep_gives_nested_extremes_and_a_perfect_roc_on_the_planted_model(recall_with_twin):
    circuit, data = recall_with_twin
    result = acdc(circuit.model, data, tau=0.01, taus=[0.0, 1e-3, 0.1, 1e3])
    sweep = result.details["sweep"]
    assert [point["tau"] for point in sweep] == [0.0, 1e-3, 0.1, 1e3]
    assert sweep[-1]["n_kept"] == 0  # nothing moves the output by a thousand nats
    assert sweep[0]["n_kept"] >= 2
    kept = [result.details["kept"], *(point["kept"] for point in sweep)]
    positives = circuit.true_roles() != "irrelevant"  # what the output depends on
    fpr, tpr, auc = sweep_roc(kept, positives)
    assert auc == pytest.approx(1.0) and fpr[0] == 0 and tpr[-1] == 1


def test_sweep_runs_reuse_the_removed_sets_an_earlier_threshold_measured(recall_with_twin):
    """Equal thresholds are free, and a sweep costs less than one pass per head per threshold while
    keeping exactly what separate runs keep."""
    circuit, data = recall_with_twin
    references = 2 * len(data)
    repeated = acdc(circuit.model, data, tau=0.01, taus=[0.01, 0.01])
    assert repeated.forward_passes == references + 4 * len(data)
    sweep = acdc(circuit.model, data, tau=0.01, taus=[0.0, 1e-3, 0.1, 1e3])
    assert sweep.forward_passes < references + 5 * 4 * len(data)
    for point in sweep.details["sweep"]:
        alone = acdc(circuit.model, data, tau=point["tau"])
        assert np.array_equal(alone.details["kept"], np.asarray(point["kept"])), point["tau"]


def test_recorded_change_is_the_distance_acdc_measured():
    """With one head kept from the last layer, the change of the next head is KL of the output with both."""
    circuit, data = recall_benchmark(), None
    data = circuit.data(16, 1)
    result = acdc(circuit.model, data, tau=1e3, ablation="zero")  # everything goes: changes accumulate
    with torch.no_grad():
        full = circuit.model(data.tokens).log_softmax(-1)
        gated = circuit.model.run_with_hooks(
            data.tokens, fwd_hooks=[("blocks.0.attn.hook_z", lambda z, hook: z * 0)]).log_softmax(-1)
    example, position = torch.nonzero(data.target_mask[:, 1:], as_tuple=True)
    p, q = full[example, position], gated[example, position]
    total = float((p.exp() * (p - q)).sum(-1).mean())
    assert float(result.scores.sum()) == pytest.approx(total, rel=1e-4, abs=1e-6)  # changes telescope
    assert result.details["distance"] == pytest.approx(total, rel=1e-4, abs=1e-6)


def test_sweep_roc_by_hand():
    positives = np.array([[True, False, False, True]])
    fpr, tpr, auc = sweep_roc([np.array([[True, False, False, False]]),
                               np.array([[True, True, False, True]])], positives)
    assert list(fpr) == [0, 0, 0.5, 1] and list(tpr) == [0, 0.5, 1, 1]
    assert auc == pytest.approx(0.5 * (0.5 + 1) / 2 + 0.5 * 1)  # trapezoids over FPR 0-0.5 and 0.5-1
    with pytest.raises(InputError, match="positive"):
        sweep_roc([positives], np.zeros((1, 4), dtype=bool))


def test_acdc_refuses_bad_input(recall_with_twin):
    circuit, data = recall_with_twin
    with pytest.raises(InputError, match="tau"):
        acdc(circuit.model, data, tau=-1)
    with pytest.raises(InputError, match="taus"):
        acdc(circuit.model, data, taus=[float("nan")])
    with pytest.raises(InputError, match="ablation"):
        acdc(circuit.model, data, ablation="mean")
    with pytest.raises(InputError, match="distance"):
        acdc(circuit.model, data, distance="js")
    with pytest.raises(InputError, match="corrupt twin"):
        acdc(circuit.model, GateData.from_tokens(data.tokens, data.target_mask))


def _count_pruning_passes(monkeypatch, stop_after: int | None = None) -> list[int]:
    """Count the forwards made with a head removed; stop (KeyboardInterrupt) past ``stop_after`` of them."""
    calls: list[int] = []
    real = acdc_module._Pruner._output

    def counted(self, index, hooks):
        if hooks:
            calls.append(index)
            if stop_after is not None and len(calls) > stop_after:
                raise KeyboardInterrupt
        return real(self, index, hooks)

    monkeypatch.setattr(acdc_module._Pruner, "_output", counted)
    return calls


def test_a_stopped_sweep_continues_from_its_checkpoint_and_ends_as_an_unbroken_one(
        recall_with_twin, tmp_path, monkeypatch):
    circuit, data = recall_with_twin
    taus = [0.0, 1e-3, 0.1, 1e3]
    batches = 2  # 48 examples in batches of 32
    with monkeypatch.context() as patch:
        calls = _count_pruning_passes(patch)
        unbroken = acdc(circuit.model, data, tau=0.01, taus=taus)
    evaluations = len(calls) // batches
    assert evaluations > 3 and unbroken.forward_passes == (2 + evaluations) * len(data)
    path = tmp_path / "acdc.json"
    with monkeypatch.context() as patch:
        _count_pruning_passes(patch, stop_after=3 * batches)  # stopped inside the fourth removed set
        with pytest.raises(KeyboardInterrupt):
            acdc(circuit.model, data, tau=0.01, taus=taus, checkpoint=path)
    stopped = json.loads(path.read_text())
    assert len(stopped["measured"]) == 3 and stopped["seconds"] > 0  # each set written once measured
    with monkeypatch.context() as patch:
        calls = _count_pruning_passes(patch)
        resumed = acdc(circuit.model, data, tau=0.01, taus=taus, checkpoint=path)
    assert len(calls) == (evaluations - 3) * batches  # only what the stopped run had not measured
    assert torch.equal(resumed.scores, unbroken.scores)
    assert resumed.details["sweep"] == unbroken.details["sweep"]
    assert resumed.forward_passes == unbroken.forward_passes  # what an unbroken sweep costs
    assert resumed.seconds > stopped["seconds"]  # both runs' time
    with monkeypatch.context() as patch:
        calls = _count_pruning_passes(patch)
        again = acdc(circuit.model, data, tau=0.01, taus=taus, checkpoint=path)
    assert not calls and torch.equal(again.scores, unbroken.scores)


def test_a_checkpoint_of_other_settings_or_an_unreadable_one_is_refused_and_kept(recall_with_twin, tmp_path):
    circuit, data = recall_with_twin
    path = tmp_path / "acdc.json"
    acdc(circuit.model, data, tau=0.01, checkpoint=path)
    written = path.read_bytes()
    with pytest.raises(CheckpointError, match="ablation"):
        acdc(circuit.model, data, tau=0.01, ablation="zero", checkpoint=path)
    with pytest.raises(CheckpointError, match="data_fingerprint"):
        acdc(circuit.model, circuit.data(16, 3), tau=0.01, checkpoint=path)
    with pytest.raises(CheckpointError, match="batch_size"):
        acdc(circuit.model, data, tau=0.01, batch_size=8, checkpoint=path)
    other_model = induction_circuit()
    with pytest.raises(CheckpointError, match="heads"):
        acdc(other_model.model, other_model.data(16, 0), tau=0.01, ablation="zero", checkpoint=path)
    assert path.read_bytes() == written
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        acdc(circuit.model, data, tau=0.01, checkpoint=path)
    assert path.read_text() == "{not json"


def test_checkpoint_keys_round_trip_for_head_counts_that_are_not_whole_bytes(tmp_path):
    """SmolLM2 has 270 heads: packed keys carry padding bits that must not come back."""
    store = acdc_module._Store(tmp_path / "acdc.json", {"heads": [3, 3], "model_name": "m"})
    rng = np.random.default_rng(0)
    masks = {rng.random(9).__lt__(0.5).tobytes(): float(i) / 7 for i in range(20)}
    for key, distance in masks.items():
        store.add(key, distance, seconds=2.5)
    again = acdc_module._Store(tmp_path / "acdc.json", {"heads": [3, 3], "model_name": "m"})
    assert again.load() == masks and again.earlier_seconds == 2.5
