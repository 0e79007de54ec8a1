"""The results file format: a safetensors file of every tensor plus a JSON file that names the result's
kind, the format version, the tensors' SHA-256, the shape, the config and the provenance.

In core (not the app) because a result must save and load wherever it is fitted; the result classes
say which tensors they hold, this module how they are written and checked on the way back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from chg_tlens.core.checkpoint import atomic_write_bytes
from chg_tlens.errors import InputError

TENSORS_FILE = "chg_gates.safetensors"
META_FILE = "chg_result.json"
FORMAT_VERSION = 1
RESULT_KINDS = ("CHGResult", "ContrastiveResult")
"""Kinds a file may hold, so a file of the other kind is named rather than called foreign."""


class ResultFileError(InputError):
    """A results file is missing, truncated, edited or of another format."""


def flatten(prefix: str, nested: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
    """``{stage: {name: t}}`` as ``{"prefix.stage.name": t}``: safetensors holds a flat dict."""
    return {f"{prefix}.{stage}.{name}": value for stage, curves in nested.items()
            for name, value in curves.items()}


def unflatten(prefix: str, tensors: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """The inverse of :func:`flatten` for the keys under ``prefix``."""
    nested: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            _, stage, name = key.split(".", 2)
            nested.setdefault(stage, {})[name] = value
    return nested


def write_result_files(folder: Path, kind: str, tensors: dict[str, Tensor], shape: list[int],
                       config: dict[str, Any], provenance: dict[str, Any]) -> Path:
    """The tensors + JSON pair every result is saved as; the JSON names the kind and the tensors' SHA-256."""
    folder.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share memory (one tensor given twice, chunks of one stage)
    tensors = {k: (v.float() if v.is_floating_point() else v).detach().cpu()
               .clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
    tensor_path = folder / TENSORS_FILE
    atomic_write_bytes(tensor_path, lambda tmp: save_file(tensors, str(tmp)))
    meta = {
        "format": f"chg_tlens.{kind}",
        "format_version": FORMAT_VERSION,
        "tensors_sha256": _sha256(tensor_path),
        "shape": shape,
        "config": config,
        "provenance": provenance,
    }
    text = json.dumps(meta, indent=2, sort_keys=True, default=str)
    atomic_write_bytes(folder / META_FILE, lambda tmp: Path(tmp).write_text(text))
    return folder


def read_result_files(folder: Path, kind: str,
                      gate_names: tuple[str, ...]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and JSON of a folder :func:`write_result_files` wrote for ``kind``, every check done."""
    meta_path, tensor_path = folder / META_FILE, folder / TENSORS_FILE
    for required in (meta_path, tensor_path):
        if not required.is_file():
            raise ResultFileError(f"CHG result file missing: {required}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ResultFileError(f"CHG result file {meta_path} is not valid JSON: {error}") from error
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != f"chg_tlens.{kind}":
        other = found.removeprefix("chg_tlens.") if isinstance(found, str) else None
        if other in RESULT_KINDS:
            raise ResultFileError(f"{meta_path} holds a {other}, not a {kind}: read it with {other}.load.")
        raise ResultFileError(f"{meta_path} is not a chg_tlens {kind} file.")
    _check_format_version(meta_path, meta.get("format_version"))
    if meta.get("tensors_sha256") != _sha256(tensor_path):
        raise ResultFileError(
            f"{tensor_path} does not match the checksum recorded in {meta_path}: the file was "
            "truncated, edited, or belongs to another run."
        )
    try:
        tensors = load_file(str(tensor_path))
    except SafetensorError as error:  # a file whose checksum matches yet is not safetensors
        raise ResultFileError(f"cannot read {tensor_path}: {error}") from error
    shape = list(meta.get("shape", []))
    for name in gate_names:
        if name not in tensors or list(tensors[name].shape) != shape:
            raise ResultFileError(f"{tensor_path}: tensor {name!r} missing or not of shape {shape}.")
    return tensors, meta


def _check_format_version(meta_path: Path, found: Any) -> None:
    """Refuse a file this version cannot read rather than misread it."""
    supported = f"this chg_tlens reads format_version 1 to {FORMAT_VERSION}"
    if found is None:
        raise ResultFileError(f"{meta_path} records no format_version; {supported}.")
    if isinstance(found, int) and not isinstance(found, bool) and found > FORMAT_VERSION:
        raise ResultFileError(
            f"{meta_path} has format_version {found}, newer than this chg_tlens reads ({supported}): "
            "upgrade chg_tlens to load it."
        )
    if isinstance(found, bool) or not isinstance(found, int) or found < 1:
        raise ResultFileError(f"{meta_path} has format_version {found!r}, which is not one; {supported}.")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
