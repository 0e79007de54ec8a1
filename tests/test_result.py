"""CHGResult files: a round trip is exact, and a damaged file is refused by name."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from chg_tlens import CHGConfig, CHGResult, ResultFileError, fit_chg
from chg_tlens.core.result import FORMAT_VERSION, META_FILE, TENSORS_FILE


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
