"""GGUF files as Hugging Face folders: converted once, cached, reused while the file is unchanged.

Parsing a GGUF file (dequantising every tensor) takes tens of seconds, so ``load_model`` never boots
from one directly: ``gguf_hf_folder`` turns it into a plain folder (safetensors, config, tokenizer) in
chg_tlens's cache, and every later load boots that folder like any other.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chg_tlens.errors import InputError, MissingDependencyError

CACHE_ENV = "CHG_TLENS_CACHE"
"""Environment variable that moves the cache of converted GGUF models."""

_CACHE_FORMAT = 1  # bump when the layout of a cache entry changes, so old entries are not reused
_SOURCE_RECORD = "chg_tlens_source.json"
_GGUF_MAGIC = b"GGUF"


def cache_dir() -> Path:
    """Root of chg_tlens's cache: ``$CHG_TLENS_CACHE``, else the user's cache folder."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "chg_tlens"


def gguf_hf_folder(path: str | os.PathLike[str]) -> Path:
    """The cached Hugging Face folder (safetensors, config, tokenizer) of a GGUF file.

    Converts on first use and reuses the result while the file keeps its size and mtime. The entry
    appears by one atomic rename, so an interrupted or failed conversion never leaves a half cache.
    """
    gguf_path = Path(path).expanduser().resolve()
    _check_gguf_header(gguf_path)
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}:{_CACHE_FORMAT}".encode()).hexdigest()
    stem = re.sub(r"[^\w.-]", "_", gguf_path.stem)
    entry = cache_dir() / "gguf" / f"{stem}-{key[:16]}"
    if (entry / "config.json").is_file():
        return entry
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(
            f"Reading {gguf_path} needs the 'gguf' package, which is not installed: "
            "pip install gguf"
        )
    hf_model, tokenizer = _parse_gguf(gguf_path)
    source = {
        "gguf_file": str(gguf_path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "cache_format": _CACHE_FORMAT,
    }
    _write_entry(entry, hf_model, tokenizer, source)
    return entry


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars, including the GGUF reader's raw tqdm on stderr.

    Shared by the GGUF conversion here and by booting a folder in ``load``: both go through transformers.
    """
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _unreadable_gguf_errors() -> tuple[type[Exception], ...]:
    """What transformers' GGUF reader raises for a file it cannot read (measured on cut, mutated and
    foreign files): ``struct.error`` or ``ValueError`` (truncated, bad version, tensor shapes, unsupported
    architecture or tokenizer), ``KeyError`` (a metadata key missing), ``OSError`` (the file itself), and
    huggingface_hub's ``StrictDataclassError`` (metadata the model config rejects). Anything else is a bug.
    """
    errors: tuple[type[Exception], ...] = (struct.error, ValueError, KeyError, OSError)
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # an older huggingface_hub, with a transformers that validates no config this way
        return errors
    return (*errors, StrictDataclassError)


def _parse_gguf(path: Path) -> tuple[Any, Any]:
    """transformers' own GGUF reader: dequantised fp32 model and tokenizer (the slow step)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except _unreadable_gguf_errors() as exc:
        raise InputError(
            f"{path}: could not read this GGUF file ({type(exc).__name__}: {exc}). It may be "
            "truncated or corrupt, or hold an architecture transformers cannot convert; "
            "download it again or pass another model."
        ) from exc
    return model, tokenizer


def _check_gguf_header(path: Path) -> None:
    """Reject a non-GGUF file at once instead of after seconds of parsing."""
    with path.open("rb") as handle:
        head = handle.read(len(_GGUF_MAGIC))
    if head != _GGUF_MAGIC:
        raise InputError(
            f"{path}: not a GGUF file (it starts with {head!r}, a GGUF file starts with "
            f"{_GGUF_MAGIC!r}). Download it again or pass another model."
        )


def _write_entry(entry: Path, hf_model: Any, tokenizer: Any, source: dict[str, Any]) -> None:
    """Save a converted model as a plain HF folder, appearing at ``entry`` all at once or never."""
    from safetensors.torch import save_model

    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".partial", dir=entry.parent))
    try:
        config = copy.deepcopy(hf_model.config)
        # The weights are already dequantised; the GGUF marker only stops transformers saving them.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(staging)
        # save_model, unlike save_file, copes with the tied embedding / unembedding.
        save_model(hf_model, str(staging / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(staging)
        (staging / _SOURCE_RECORD).write_text(json.dumps(source, indent=2))
        try:
            os.replace(staging, entry)
        except OSError:
            if not (entry / "config.json").is_file():  # another process finishing first is fine
                raise
    except OSError as exc:
        raise InputError(
            f"Could not write the converted model to the cache at {entry} ({exc}). "
            f"Set {CACHE_ENV} to a writable folder."
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
