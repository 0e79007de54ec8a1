"""Run folders: everything one fit produced, in files a person or a script can open.

    <run>/chg_gates.safetensors, chg_result.json   the result with provenance (CHGResult.save)
    <run>/roles.csv, summary.csv, losses.csv       tables
    <run>/certificate.csv                          the convergence certificate per stage and seed
    <run>/run.json                                 what was run (command, model, task, config)
    <run>/pictures/*.png, report.html              pictures and the self-contained report

A contrastive run (``write_contrastive_run_folder``) holds the saved ContrastiveResult (the same two
files), ``heads.csv`` (the gate of every head and seed), ``table.csv`` (before/after), run.json,
pictures and report.html.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import Tensor

from chg_tlens.analysis.error_bars import RoleErrorBars
from chg_tlens.app.report import (
    ERROR_BARS_FILE,
    PROMPT_RESAMPLES_DIR,
    ROLES_FILE,
    RUN_FILE,
    VALIDATION_FILE,
    write_report,
)
from chg_tlens.core.checkpoint import atomic_write_bytes
from chg_tlens.core.result import CHGResult, ContrastiveResult

HEADS_FILE = "heads.csv"
"""A contrastive run's gate per head and seed, and which heads close (ContrastiveResult.to_frame)."""
TABLE_FILE = "table.csv"
"""A contrastive run's accuracy and log-prob before/after gating (ContrastiveResult.table)."""


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
    prompt_resamples: CHGResult | None = None,
) -> Path:
    """Write the result, its tables, pictures and report into ``folder``; return the folder.

    ``prompt_resamples``: the gate sets fitted on bootstrap resamples of the prompts beside ``result``'s
    seeds (:func:`chg_tlens.error_bars`), saved in ``folder/prompt_resamples`` with ``error_bars.csv``
    (per head, the share of seeds and of resamples per role); the report then shows error bars by source."""
    tables = [(ROLES_FILE, result.to_frame(threshold), False),
              ("summary.csv", result.summary(threshold), True),
              ("losses.csv", result.loss_frame(), False)]
    if result.trace:
        tables.append(("certificate.csv", result.convergence(threshold), False))
    if prompt_resamples is not None:
        prompt_resamples.save(Path(folder) / PROMPT_RESAMPLES_DIR)
        bars = RoleErrorBars(result, prompt_resamples, threshold)
        tables.append((ERROR_BARS_FILE, bars.to_frame(), False))
    return _write_result_folder(result, Path(folder), tables, run_info, threshold, pictures, report)


def write_contrastive_run_folder(
    result: ContrastiveResult,
    folder: str | os.PathLike,
    run_info: dict[str, Any] | None = None,
    threshold: float | None = None,
    pictures: bool = True,
    report: bool = True,
) -> Path:
    """Write a contrastive result, its tables (``heads.csv``, ``table.csv``), pictures and report into
    ``folder``; return the folder. ``threshold`` (a head is closed below it) defaults to the fit's own."""
    threshold = result.config.get("threshold", 0.5) if threshold is None else threshold
    tables = [(HEADS_FILE, result.to_frame(threshold), False), (TABLE_FILE, result.table(), False)]
    return _write_result_folder(result, Path(folder), tables, run_info, threshold, pictures, report)


def _write_result_folder(result: CHGResult | ContrastiveResult, folder: Path,
                         tables: list[tuple[str, pd.DataFrame, bool]], run_info: dict[str, Any] | None,
                         threshold: float, pictures: bool, report: bool) -> Path:
    """What every run folder holds: the saved result, ``tables`` (file name, frame, keep the index),
    run.json with the threshold, the pictures and the report."""
    result.save(folder)
    for name, frame, index in tables:
        write_table(frame, folder / name, index=index)
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
