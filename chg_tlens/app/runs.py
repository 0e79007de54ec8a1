"""Run folders: everything one fit produced, in files a person or a script can open.

    <run>/chg_gates.safetensors, chg_result.json   the result with provenance (CHGResult.save)
    <run>/roles.csv, summary.csv, losses.csv       tables
    <run>/run.json                                 what was run (command, model, task, config)
    <run>/pictures/*.png, report.html              pictures and the self-contained report
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import Tensor

from chg_tlens.app.report import ROLES_FILE, RUN_FILE, VALIDATION_FILE, write_report
from chg_tlens.core.checkpoint import atomic_write_bytes
from chg_tlens.core.result import CHGResult


def write_table(frame: pd.DataFrame, path: Path, index: bool = False) -> None:
    """A CSV written whole or not at all."""
    atomic_write_bytes(path, lambda tmp: frame.to_csv(tmp, index=index))


def write_json(value: Any, path: Path) -> None:
    """A JSON file written whole or not at all."""
    text = json.dumps(value, indent=2, sort_keys=True, default=str)
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(text))


def write_run_folder(
    result: CHGResult,
    folder: str | os.PathLike,
    run_info: dict[str, Any] | None = None,
    threshold: float = 0.5,
    pictures: bool = True,
    report: bool = True,
) -> Path:
    """Write the result, its tables, pictures and report into ``folder``; return the folder."""
    folder = Path(folder)
    result.save(folder)
    write_table(result.to_frame(threshold), folder / ROLES_FILE)
    write_table(result.summary(threshold), folder / "summary.csv", index=True)
    write_table(result.loss_frame(), folder / "losses.csv")
    write_json({**(run_info or {}), "threshold": threshold}, folder / RUN_FILE)
    if pictures:
        from chg_tlens.app.plot import save_all

        save_all(result, folder / "pictures", threshold=threshold)
    if report:
        write_report(folder, threshold=threshold)
    return folder


def add_validation(folder: str | os.PathLike, name: str, values: Any) -> Path:
    """Merge one named block of validation numbers into ``validation.json`` (the report shows them)."""
    path = Path(folder) / VALIDATION_FILE
    current = json.loads(path.read_text()) if path.is_file() else {}
    current[name] = values
    write_json(current, path)
    return path


def jsonable(value: Any) -> Any:
    """Tensors and arrays as lists, anything unknown as its string: for results files."""
    if isinstance(value, (Tensor, np.ndarray)):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return str(value)
