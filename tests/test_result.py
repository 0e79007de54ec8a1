"""CHGResult files: a round trip is exact, and a damaged file is refused by name."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import chg_tlens
from chg_tlens import CHGConfig, CHGResult, ContrastiveResult, InputError, ResultFileError, fit_chg
from chg_tlens.core.result_files import FORMAT_VERSION, META_FILE, TENSORS_FILE

pytestmark = pytest.mark.tl39  # runs again on TransformerLens 3.9: make pytest-tl39


@pytest.fixture(scope="module")
def result(recall):
    return fit_chg(recall.model, recall.data(64, 0),
                   CHGConfig(n_seeds=2, steps=30, batch_size=16, progress=False))


def test_save_load_round_trip_keeps_gates_curves_and_provenance(result, tmp_path):
    result.save(tmp_path / "run")
    loaded = CHGResult.load(tmp_path / "run")
    for name in ("theta_zero", "theta_plus", "theta_minus"):
        assert torch.equal(getattr(loaded, name), getattr(result, name))
    assert torch.equal(loaded.losses["plus"]["nll"], result.losses["plus"]["nll"])
    assert loaded.config == result.config and loaded.config["clamp_mode"] == "one_sided"
    assert loaded.provenance["model_name"] == "planted-recall"
    assert loaded.provenance["data_fingerprint"] == result.provenance["data_fingerprint"]
    assert loaded.provenance["versions"]["torch"] == torch.__version__
    assert loaded.provenance["versions"]["chg_tlens"] == chg_tlens.__version__
    assert (loaded.role_labels() == result.role_labels()).all()


def test_truncated_tensor_file_is_refused_by_name(result, tmp_path):
    folder = result.save(tmp_path / "run")
    tensors = folder / TENSORS_FILE
    tensors.write_bytes(tensors.read_bytes()[:-40])
    with pytest.raises(ResultFileError, match=TENSORS_FILE):
        CHGResult.load(folder)


def test_edited_or_broken_json_is_refused(result, tmp_path):
    folder = result.save(tmp_path / "run")
    meta_path = folder / META_FILE
    meta = json.loads(meta_path.read_text())
    meta["tensors_sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ResultFileError, match="checksum"):
        CHGResult.load(folder)
    meta_path.write_text("{ not json")
    with pytest.raises(ResultFileError, match="not valid JSON"):
        CHGResult.load(folder)
    (folder / META_FILE).unlink()
    with pytest.raises(ResultFileError, match="missing"):
        CHGResult.load(folder)


@pytest.mark.parametrize("version, message", [
    (None, "records no format_version"),
    (FORMAT_VERSION + 1, f"format_version {FORMAT_VERSION + 1}, newer .*reads format_version 1 to "
                         f"{FORMAT_VERSION}.*upgrade"),
    ("1", "format_version '1', which is not one"),
])
def test_a_file_of_a_missing_or_newer_format_version_is_refused(result, tmp_path, version, message):
    folder = result.save(tmp_path / "run")
    meta_path = folder / META_FILE
    meta = json.loads(meta_path.read_text())
    meta.pop("format_version")
    if version is not None:
        meta["format_version"] = version
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ResultFileError, match=message) as caught:
        CHGResult.load(folder)
    assert str(meta_path) in str(caught.value)


def test_a_result_shows_its_role_shares_and_a_cell_per_head_in_a_notebook(result):
    page = result._repr_html_()
    summary = result.summary()
    for role in ("facilitating", "interfering", "irrelevant", "unclassified"):
        assert role in page
        assert f"{summary.loc['0', role]:.1%}" in page
    assert page.count("<td data-head=") == result.n_layers * result.n_heads
    for layer, head in result.roles()["facilitating"]:
        assert f'title="layer {layer} head {head}: facilitating"' in page


def test_saving_again_replaces_files_whole(result, tmp_path):
    folder = result.save(tmp_path / "run")
    result.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([TENSORS_FILE, META_FILE])
    CHGResult.load(folder)


def test_roles_for_one_seed_and_thresholds(result):
    per_seed = result.roles(seed=0)
    assert (0, 0) in per_seed["facilitating"]
    assert sum(len(v) for v in per_seed.values()) == 4
    with pytest.raises(ValueError, match="threshold must be within"):
        result.roles(threshold=1.5)
    with pytest.raises(ValueError, match="seed must be in"):
        result.roles(seed=9)
    everything = result.role_labels(threshold=1.0)
    assert (everything == "unclassified").mean() > 0.5


def test_compare_roles_lines_up_two_runs_of_one_model(result, recall):
    again = fit_chg(recall.model, recall.data(64, 1), CHGConfig(n_seeds=2, steps=30, batch_size=16,
                                                                 progress=False))
    frame = result.compare_roles(again)
    assert len(frame) == result.n_layers * result.n_heads
    assert frame.attrs["same_data"] is False  # another draw of the data
    for head in recall.heads:
        row = frame[(frame["layer"] == head.layer) & (frame["head"] == head.head)].iloc[0]
        assert row["role_a"] == row["role_b"] == head.role
    assert result.compare_roles(result).attrs["same_data"] is True


def test_compare_roles_refuses_results_of_another_model(result):
    other = dataclasses.replace(result, provenance={**result.provenance, "model_name": "gpt2"})
    with pytest.raises(ValueError, match="provenance mismatch.*'gpt2'"):
        result.compare_roles(other)


def _contrastive_hovering(config: dict) -> ContrastiveResult:
    """One seed, two heads, 100 updates traced every 10: head 0 sits at 0.3 and rises to 0.45 over the
    last two snapshots (crossing 0.4, not 0.5); head 1 stays open at 0.9."""
    gate = torch.tensor([0.3] * 9 + [0.45] * 2)
    gates = torch.stack([gate, torch.full_like(gate, 0.9)], dim=-1).reshape(11, 1, 1, 2)
    trace = {"contrastive": {"steps": torch.arange(0, 101, 10), "gates": gates,
                             "stopped_at": torch.tensor(-1)}}
    losses = {"contrastive": {"loss": torch.ones(100, 1), "nll": torch.ones(100, 1)}}
    return ContrastiveResult(torch.logit(gates[-1]), losses=losses, config=config, trace=trace)


def test_contrastive_convergence_reads_flips_at_the_closing_threshold():
    result = _contrastive_hovering({"threshold": 0.5})
    assert result.convergence(0.4)["flips"].tolist() == [1]  # head 0 crossed 0.4 in the last quarter
    assert result.convergence(0.5)["flips"].tolist() == [0]  # ...but never 0.5
    assert result.convergence()["flips"].tolist() == [0]  # default: the fit's own threshold
    assert _contrastive_hovering({"threshold": 0.4}).convergence()["flips"].tolist() == [1]


def _bare_result(**parts) -> CHGResult:
    theta = torch.zeros(2, 1, 3)
    return CHGResult(theta, theta.clone(), theta.clone(), **parts)


@pytest.mark.parametrize("read", [lambda r: r.convergence(), lambda r: r.convergence_text(),
                                  lambda r: r.confidence(), lambda r: r.role_labels(min_confidence=0.5)])
def test_a_result_without_a_trace_says_so_when_asked_for_convergence(read):
    with pytest.raises(InputError, match="no gate trace .*cannot be read"):
        read(_bare_result())


def test_a_trace_without_loss_curves_is_refused_by_name():
    traced = _contrastive_hovering({})
    bare = _bare_result(trace={"zero": traced.trace["contrastive"]})
    with pytest.raises(InputError, match=r"no loss curve of stage\(s\) \['zero'\]"):
        bare.convergence()


def test_a_contrastive_result_without_a_trace_says_so_when_asked_for_convergence():
    result = ContrastiveResult(torch.zeros(2, 1, 3))
    for read in (result.convergence, result.convergence_text):
        with pytest.raises(InputError, match="no gate trace .*convergence cannot be read"):
            read()


def test_summary_without_a_trace_leaves_out_the_convergence_column():
    summary = _bare_result().summary()
    assert "certified" not in summary.columns and "convergence" not in summary.attrs
    assert list(summary.columns) == ["facilitating", "interfering", "irrelevant", "unclassified"]
