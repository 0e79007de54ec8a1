"""Data files as records (dicts of named fields): JSONL, JSON, CSV, or a ``datasets`` folder.

Kept apart from GateData, which turns records into tokens: this module knows file formats and names
the file and line of a bad one; it knows nothing of models or tokenizers.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from chg_tlens.errors import InputError


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a data file as dicts, with errors that name the file and the line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.is_dir():
        return _dataset_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise InputError(f"{path}, line {number}: not valid JSON ({error.msg}).") from error
    elif suffix == ".json":
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise InputError(f"{path}: not valid JSON ({error.msg}, line {error.lineno}).") from error
    elif suffix == ".csv":
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    else:
        raise InputError(
            f"{path}: unknown data format {suffix!r}; use .jsonl, .json, .csv or a datasets folder."
        )
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise InputError(f"{path}: expected a list of records (objects with named fields).")
    if not rows:
        raise InputError(f"{path}: the file holds no records (the dataset is empty).")
    return rows


def require_fields(columns: set[str], fields: list[str]) -> None:
    """Refuse records that lack a field the caller reads, listing the fields they have."""
    missing = [f for f in fields if f not in columns]
    if missing:
        raise InputError(
            f"dataset has no field(s) {missing}; its fields are {sorted(columns)}."
        )


def _dataset_folder(path: Path) -> list[dict[str, Any]]:
    """Rows of a folder written by ``datasets``' ``save_to_disk``. ``datasets`` says a folder is not one
    with FileNotFoundError and a damaged one with OSError or ValueError (pyarrow's and json's errors
    included); anything else is a bug and propagates."""
    from datasets import load_from_disk  # heavy: only for a folder

    try:
        return list(load_from_disk(str(path)))
    except (OSError, ValueError) as error:
        raise InputError(f"{path} is not a folder written by datasets' save_to_disk: {error}") from error
