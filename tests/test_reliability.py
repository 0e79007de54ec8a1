"""Long fits survive interruption: checkpoints, SIGKILL + resume, NaN stops with the last good state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from chg_tlens import CHGConfig, CHGResult, GateData, fit_chg
from chg_tlens.core.checkpoint import CHECKPOINT_FILE, PROGRESS_FILE, CheckpointError
from chg_tlens.testbeds.surgery import write_weights

pytestmark = pytest.mark.tl39  # runs again on TransformerLens 3.9: make pytest-tl39

FIT_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from chg_tlens import CHGConfig, fit_chg
from chg_tlens.testbeds.planted import repeat_circuit
circuit = repeat_circuit()
config = CHGConfig(n_seeds=2, steps=400, batch_size=16, checkpoint_every=10, progress=False)
result = fit_chg(circuit.model, circuit.data(64, 0), config, run_dir=sys.argv[1], resume=sys.argv[2] == "1")
result.save(sys.argv[1] + "/result")
"""


def _run(run_dir: Path, resume: bool) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", FIT_SCRIPT, str(run_dir), "1" if resume else "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _progress(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / PROGRESS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def test_sigkill_in_stage_two_then_resume_gives_the_uninterrupted_gates(tmp_path):
    reference = _run(tmp_path / "reference", resume=False)
    victim_dir = tmp_path / "victim"
    victim = _run(victim_dir, resume=False)
    deadline = time.time() + 300
    while time.time() < deadline:
        note = _progress(victim_dir)
        if note.get("stage") == "regularised" and note.get("step", 0) >= 40:
            victim.send_signal(signal.SIGKILL)
            break
        assert victim.poll() is None, "the fit ended before it could be killed in stage 2"
        time.sleep(0.005)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    killed_at = _progress(victim_dir)
    assert killed_at["stage"] == "regularised" and killed_at["finished"] == ["zero"]
    assert not (victim_dir / "result").exists()

    resumed = _run(victim_dir, resume=True)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()
    a, b = CHGResult.load(tmp_path / "reference" / "result"), CHGResult.load(victim_dir / "result")
    for name in ("theta_zero", "theta_plus", "theta_minus"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-6, rtol=0), name
    assert torch.allclose(a.losses["plus"]["loss"], b.losses["plus"]["loss"], atol=1e-6)
    assert b.losses["plus"]["loss"].shape == (400, 2)


def test_resume_refuses_other_data_or_settings(recall, tmp_path):
    data = recall.data(32, 0)
    config = CHGConfig(n_seeds=1, steps=12, batch_size=8, checkpoint_every=5, progress=False)
    fit_chg(recall.model, data, config, run_dir=tmp_path)
    assert (tmp_path / CHECKPOINT_FILE).is_file()
    with pytest.raises(CheckpointError, match="other data"):
        fit_chg(recall.model, recall.data(32, 1), config, run_dir=tmp_path, resume=True)
    other = CHGConfig(n_seeds=1, steps=12, batch_size=8, checkpoint_every=5, progress=False, lam=0.2)
    with pytest.raises(CheckpointError, match="lam=0.1 \\(now 0.2\\)"):
        fit_chg(recall.model, data, other, run_dir=tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        fit_chg(recall.model, data, config, run_dir=tmp_path / "empty", resume=True)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        fit_chg(recall.model, data, config, run_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="needs the run_dir"):
        fit_chg(recall.model, data, config, resume=True)


def test_resuming_a_finished_fit_returns_the_same_result(recall, tmp_path):
    data = recall.data(32, 0)
    config = CHGConfig(n_seeds=2, steps=15, batch_size=8, checkpoint_every=5, progress=False)
    first = fit_chg(recall.model, data, config, run_dir=tmp_path)
    again = fit_chg(recall.model, data, config, run_dir=tmp_path, resume=True)
    assert torch.equal(first.theta_minus, again.theta_minus)


def test_nan_stops_with_stage_step_and_batch_after_saving_the_last_good_state(recall, tmp_path):
    model = recall.model
    tokens = recall.data(16, 0).tokens.clone()
    tokens[tokens == 9] = 8
    tokens[5, 2] = 9  # example 5 alone carries token 9, whose embedding is poisoned below
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, -1] = True
    data = GateData.from_tokens(tokens, mask)
    saved = model.W_E.detach().clone()
    poisoned = saved.clone()
    poisoned[9] = float("nan")
    config = CHGConfig(n_seeds=1, steps=30, batch_size=4, checkpoint_every=100, progress=False)
    try:
        write_weights(model, embed=poisoned)
        expected = "stage 'zero', step \\d+:.*example indices \\[.*5.*\\]"
        with pytest.raises(FloatingPointError, match=expected) as err:
            fit_chg(model, data, config, run_dir=tmp_path)
    finally:
        write_weights(model, embed=saved)
    assert str(tmp_path) in str(err.value)
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=False)
    assert state["stage"] == "zero" and torch.isfinite(state["theta"]).all()
    step = int(str(err.value).split("step ")[1].split(":")[0])
    assert state["step"] == step and len(state["logs"]["zero"]["loss"]) == step


def test_checkpoint_files_are_replaced_whole(recall, tmp_path):
    config = CHGConfig(n_seeds=1, steps=12, batch_size=8, checkpoint_every=3, progress=False)
    fit_chg(recall.model, recall.data(16, 0), config, run_dir=tmp_path)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert os.path.getsize(tmp_path / CHECKPOINT_FILE) > 0
