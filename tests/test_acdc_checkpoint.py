"""ACDC's checkpoint reader: a damaged file is refused naming the file and what is wrong with it, and
left as it is; a bug in the reader is not dressed up as a damaged file (which would invite deleting hours
of measured sets), it propagates as itself."""

from __future__ import annotations

import json

import pytest

from chg_tlens.analysis import acdc as acdc_module
from chg_tlens.analysis.acdc import acdc
from chg_tlens.core.checkpoint import CheckpointError

pytestmark = pytest.mark.tl39  # runs again on TransformerLens 3.9: make pytest-tl39


@pytest.fixture()
def checkpoint(recall_with_twin, tmp_path):
    """A whole checkpoint of an ACDC run on the recall circuit, and what it takes to run it again."""
    circuit, data = recall_with_twin
    path = tmp_path / "acdc.json"
    acdc(circuit.model, data, tau=0.01, checkpoint=path)
    return path, lambda: acdc(circuit.model, data, tau=0.01, checkpoint=path)


def test_a_truncated_checkpoint_is_refused_naming_the_file_and_kept(checkpoint):
    path, run = checkpoint
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # a copy cut short
    cut = path.read_bytes()
    with pytest.raises(CheckpointError) as refused:
        run()
    message = str(refused.value)
    assert str(path) in message and "not valid JSON" in message
    assert isinstance(refused.value.__cause__, json.JSONDecodeError)
    assert "move it away" not in message and "delete" not in message
    assert path.read_bytes() == cut


@pytest.mark.parametrize("edit, words", [
    (lambda saved: saved.pop("measured"), "'measured'"),
    (lambda saved: saved.update(seconds="soon"), "'seconds'"),
    (lambda saved: saved["measured"].update({next(iter(saved["measured"])): True}), "distances"),
    (lambda saved: saved.update(measured={"zz": 0.5}), "no removed set"),
    (lambda saved: saved.update(measured={"ff" * 40: 0.5}), "no removed set"),
    (lambda saved: saved.update(measured={"": 0.5}), "no removed set"),
])
def test_a_checkpoint_with_a_missing_or_wrong_field_says_which(checkpoint, edit, words):
    path, run = checkpoint
    saved = json.loads(path.read_text())
    edit(saved)
    path.write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match="unreadable") as refused:
        run()
    assert str(path) in str(refused.value) and words in str(refused.value)


@pytest.mark.parametrize("bug", [TypeError("unsupported operand"), AttributeError("no attribute 'hex'")])
def test_a_bug_in_the_reader_propagates_as_itself(checkpoint, monkeypatch, bug):
    path, run = checkpoint
    written = path.read_bytes()

    def broken(self, key):
        raise bug

    monkeypatch.setattr(acdc_module._Store, "_unpack", broken)
    with pytest.raises(type(bug)) as raised:
        run()
    assert raised.value is bug and not isinstance(raised.value, CheckpointError)
    assert path.read_bytes() == written
