"""Checkpoints of a gate fit: enough state to continue it bit for bit after a crash.

A checkpoint holds the current gate logits, the Adam state, the stage and the next step, the finished
stages and the loss curves so far. Batches are a pure function of (seed, step) (see
``GateData.batch_indices``), so no data-loader state is needed. Files are written to a temporary name
and renamed, so a kill at any moment leaves either the previous checkpoint or the new one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from chg_tlens.errors import InputError

CHECKPOINT_FILE = "checkpoint.pt"
PROGRESS_FILE = "checkpoint.json"


class CheckpointError(InputError):
    """A checkpoint is missing, unreadable, or belongs to another fit."""


def atomic_write_bytes(target: Path, write: Any) -> None:
    """Call ``write(tmp_path)``, then rename over ``target``; never leaves a half-written file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(handle)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Write the full state, then a small human-readable progress note beside it."""
    atomic_write_bytes(run_dir / CHECKPOINT_FILE, lambda tmp: torch.save(state, tmp))
    note = {"kind": state["kind"], "stage": state["stage"], "step": state["step"],
            "finished": sorted(state["finished"])}
    atomic_write_bytes(run_dir / PROGRESS_FILE, lambda tmp: Path(tmp).write_text(json.dumps(note)))


def load_checkpoint(run_dir: Path, kind: str, config: dict[str, Any], fingerprint: str) -> dict[str, Any]:
    """Read a checkpoint and refuse it unless it is for the same kind of fit, config and data."""
    path = run_dir / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"cannot resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for damaged pickles
        raise CheckpointError(f"cannot resume: {path} is unreadable ({error})") from None
    if not isinstance(state, dict) or state.get("kind") != kind:
        raise CheckpointError(f"cannot resume: {path} is not a {kind} checkpoint.")
    if state.get("data_fingerprint") != fingerprint:
        raise CheckpointError(
            f"cannot resume: {path} was written for other data (fingerprint "
            f"{state.get('data_fingerprint')}, this data {fingerprint})."
        )
    changed = sorted(k for k in set(config) | set(state.get("config", {}))
                     if k not in _RESUME_MAY_CHANGE and config.get(k) != state["config"].get(k))
    if changed:
        raise CheckpointError(
            f"cannot resume: {path} was written with other settings: "
            + ", ".join(f"{k}={state['config'].get(k)!r} (now {config.get(k)!r})" for k in changed)
        )
    return state


# Settings that do not change the arithmetic of a fit.
_RESUME_MAY_CHANGE = {"progress", "device", "checkpoint_every"}
