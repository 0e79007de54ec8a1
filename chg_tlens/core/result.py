"""CHGResult: fitted gates turned into head roles, frames, and files with provenance.

Per head and seed (CHG_METHOD.md): facilitating = G-, interfering = 1 - G+, irrelevant = G+ (1 - G-).
A head takes the role whose score is highest among those >= threshold, or none ("unclassified").
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor

from chg_tlens.core.checkpoint import atomic_write_bytes
from chg_tlens.errors import InputError

ROLES = ("facilitating", "interfering", "irrelevant")
UNCLASSIFIED = "unclassified"
STAGES = ("zero", "plus", "minus")
TENSORS_FILE = "chg_gates.safetensors"
META_FILE = "chg_result.json"
FORMAT_VERSION = 1


class ResultFileError(InputError):
    """A results file is missing, truncated, edited or of another format."""


@dataclass
class CHGResult:
    """Gate logits of the three stages, ``[seed, layer, head]``, with loss curves and provenance."""

    theta_zero: Float[Tensor, "seed layer head"]
    theta_plus: Float[Tensor, "seed layer head"]
    theta_minus: Float[Tensor, "seed layer head"]
    losses: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------------- gates and scores
    @property
    def g_zero(self) -> Float[Tensor, "seed layer head"]:
        return torch.sigmoid(self.theta_zero)

    @property
    def g_plus(self) -> Float[Tensor, "seed layer head"]:
        """Gates of the fit that rewards open gates (retention, lambda > 0)."""
        return torch.sigmoid(self.theta_plus)

    @property
    def g_minus(self) -> Float[Tensor, "seed layer head"]:
        """Gates of the fit that rewards closed gates (removal, lambda < 0)."""
        return torch.sigmoid(self.theta_minus)

    @property
    def facilitating(self) -> Float[Tensor, "seed layer head"]:
        """Kept open even when closing is rewarded: the task needs it."""
        return self.g_minus

    @property
    def interfering(self) -> Float[Tensor, "seed layer head"]:
        """Closed even when opening is rewarded: the task is better without it."""
        return 1.0 - self.g_plus

    @property
    def irrelevant(self) -> Float[Tensor, "seed layer head"]:
        """Follows whichever way the regulariser pushes: the task does not care."""
        return self.g_plus * (1.0 - self.g_minus)

    def scores(self) -> Float[Tensor, "role seed layer head"]:
        """The three scores stacked in ``ROLES`` order."""
        return torch.stack([self.facilitating, self.interfering, self.irrelevant])

    @property
    def n_seeds(self) -> int:
        return self.theta_zero.shape[0]

    @property
    def n_layers(self) -> int:
        return self.theta_zero.shape[1]

    @property
    def n_heads(self) -> int:
        return self.theta_zero.shape[2]

    # ----------------------------------------------------------------- roles
    def role_labels(self, threshold: float = 0.5) -> np.ndarray:
        """``[seed, layer, head]`` array of role names (or "unclassified")."""
        _check_threshold(threshold)
        scores = self.scores()
        best = scores.argmax(dim=0)
        passes = scores.max(dim=0).values >= threshold
        names = np.array(ROLES + (UNCLASSIFIED,), dtype=object)
        codes = torch.where(passes, best, torch.full_like(best, len(ROLES)))
        return names[codes.numpy()]

    def roles(
        self, threshold: float = 0.5, seed: int | None = None
    ) -> dict[str, list[tuple[int, int]]]:
        """Role -> list of ``(layer, head)``: for one seed, or (``seed=None``) heads with that role in
        every seed. The lists feed path patching and ablations directly."""
        labels = self.role_labels(threshold)
        if seed is not None:
            if not -self.n_seeds <= seed < self.n_seeds:
                raise InputError(f"seed must be in [0, {self.n_seeds}), got {seed}.")
            labels = labels[seed : seed + 1] if seed >= 0 else labels[seed:][:1]
        out: dict[str, list[tuple[int, int]]] = {}
        for role in ROLES + (UNCLASSIFIED,):
            every = np.all(labels == role, axis=0)
            out[role] = [(int(layer), int(head)) for layer, head in zip(*np.nonzero(every), strict=True)]
        return out

    def summary(self, threshold: float = 0.5) -> pd.DataFrame:
        """Share of heads per role for each seed, plus the heads with the same role in every seed."""
        labels = self.role_labels(threshold)
        n = self.n_layers * self.n_heads
        rows = []
        for seed in range(self.n_seeds):
            row = {"seed": str(seed)}
            for role in ROLES + (UNCLASSIFIED,):
                row[role] = float((labels[seed] == role).sum()) / n
            rows.append(row)
        consensus = self.roles(threshold)
        rows.append({"seed": "every seed"} | {r: len(v) / n for r, v in consensus.items()})
        return pd.DataFrame(rows).set_index("seed")

    def to_frame(self, threshold: float = 0.5) -> pd.DataFrame:
        """One row per seed x layer x head with gates, scores and role."""
        seed, layer, head = np.meshgrid(
            np.arange(self.n_seeds), np.arange(self.n_layers), np.arange(self.n_heads), indexing="ij"
        )
        columns = {
            "seed": seed.ravel(),
            "layer": layer.ravel(),
            "head": head.ravel(),
            "g_zero": self.g_zero.numpy().ravel(),
            "g_plus": self.g_plus.numpy().ravel(),
            "g_minus": self.g_minus.numpy().ravel(),
            "facilitating": self.facilitating.numpy().ravel(),
            "interfering": self.interfering.numpy().ravel(),
            "irrelevant": self.irrelevant.numpy().ravel(),
            "role": self.role_labels(threshold).ravel(),
        }
        return pd.DataFrame(columns)

    def compare_roles(self, other: CHGResult, threshold: float = 0.5) -> pd.DataFrame:
        """Head by head, this result's consensus role and facilitation next to ``other``'s (e.g. two tasks,
        or two runs of one task). Results from different models cannot be compared head by head: that
        raises, naming both models. ``frame.attrs["same_data"]`` says whether the data fingerprints match.
        """
        require_same_model(self, other)
        frame = pd.DataFrame({
            "layer": np.repeat(np.arange(self.n_layers), self.n_heads),
            "head": np.tile(np.arange(self.n_heads), self.n_layers),
        })
        for name, result in (("a", self), ("b", other)):
            consensus = np.full((self.n_layers, self.n_heads), "mixed", dtype=object)
            for role, heads in result.roles(threshold).items():
                for layer, head in heads:
                    consensus[layer, head] = role
            frame[f"role_{name}"] = consensus.ravel()
            frame[f"facilitating_{name}"] = result.facilitating.max(dim=0).values.numpy().ravel()
        frame["same_role"] = frame["role_a"] == frame["role_b"]
        fingerprints = [r.provenance.get("data_fingerprint") for r in (self, other)]
        frame.attrs["same_data"] = fingerprints[0] is not None and fingerprints[0] == fingerprints[1]
        return frame

    def loss_frame(self) -> pd.DataFrame:
        """Loss curves, long format: stage, step, seed, loss, nll."""
        frames = []
        for stage, curves in self.losses.items():
            loss = curves["loss"].numpy()
            steps, seeds = loss.shape
            step, seed = np.meshgrid(np.arange(steps), np.arange(seeds), indexing="ij")
            frames.append(pd.DataFrame({
                "stage": stage, "step": step.ravel(), "seed": seed.ravel(),
                "loss": loss.ravel(), "nll": curves["nll"].numpy().ravel(),
            }))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    # ----------------------------------------------------------------- files
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``chg_gates.safetensors`` and ``chg_result.json`` into folder ``path``, atomically.

        The JSON records the tensors' SHA-256, so a truncated or edited file is caught on load.
        """
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            "theta_zero": self.theta_zero, "theta_plus": self.theta_plus,
            "theta_minus": self.theta_minus,
        }
        for stage, curves in self.losses.items():
            for name, values in curves.items():
                tensors[f"losses.{stage}.{name}"] = values
        tensors = {k: v.detach().cpu().float().contiguous() for k, v in tensors.items()}
        tensor_path = folder / TENSORS_FILE
        atomic_write_bytes(tensor_path, lambda tmp: save_file(tensors, str(tmp)))
        meta = {
            "format": "chg_tlens.CHGResult",
            "format_version": FORMAT_VERSION,
            "tensors_sha256": _sha256(tensor_path),
            "shape": [self.n_seeds, self.n_layers, self.n_heads],
            "config": self.config,
            "provenance": self.provenance,
        }
        text = json.dumps(meta, indent=2, sort_keys=True, default=str)
        atomic_write_bytes(folder / META_FILE, lambda tmp: Path(tmp).write_text(text))
        return folder

    @classmethod
    def load(cls, path: str | os.PathLike) -> CHGResult:
        """Read a folder written by :meth:`save`; anything inconsistent raises ResultFileError."""
        folder = Path(path)
        meta_path, tensor_path = folder / META_FILE, folder / TENSORS_FILE
        for required in (meta_path, tensor_path):
            if not required.is_file():
                raise ResultFileError(f"CHG result file missing: {required}")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ResultFileError(f"CHG result file {meta_path} is not valid JSON: {error}") from None
        if not isinstance(meta, dict) or meta.get("format") != "chg_tlens.CHGResult":
            raise ResultFileError(f"{meta_path} is not a chg_tlens CHGResult file.")
        if meta.get("tensors_sha256") != _sha256(tensor_path):
            raise ResultFileError(
                f"{tensor_path} does not match the checksum recorded in {meta_path}: the file was "
                "truncated, edited, or belongs to another run."
            )
        try:
            tensors = load_file(str(tensor_path))
        except Exception as error:  # safetensors raises its own error types
            raise ResultFileError(f"cannot read {tensor_path}: {error}") from None
        shape = list(meta.get("shape", []))
        for name in ("theta_zero", "theta_plus", "theta_minus"):
            if name not in tensors or list(tensors[name].shape) != shape:
                raise ResultFileError(f"{tensor_path}: tensor {name!r} missing or not of shape {shape}.")
        losses: dict[str, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("losses."):
                _, stage, name = key.split(".", 2)
                losses.setdefault(stage, {})[name] = value
        return cls(
            tensors["theta_zero"], tensors["theta_plus"], tensors["theta_minus"],
            losses=losses, config=meta.get("config", {}), provenance=meta.get("provenance", {}),
        )


def _check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise InputError(f"threshold must be within [0, 1], got {threshold}.")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ContrastiveResult:
    """Contrastive CHG gates ``[seed, layer, head]`` and task performance before/after applying them.

    ``metrics`` maps e.g. ``"retain_after_accuracy"`` to a per-seed tensor ("before" = all gates open,
    the same for every seed).
    """

    theta: Float[Tensor, "seed layer head"]
    losses: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    metrics: dict[str, Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def gates(self) -> Float[Tensor, "seed layer head"]:
        return torch.sigmoid(self.theta)

    def closed_heads(self, threshold: float | None = None, seed: int | None = None) -> list[tuple[int, int]]:
        """Heads whose gate ends below ``threshold``: in one seed, or (``seed=None``) in every seed."""
        threshold = self.config.get("threshold", 0.5) if threshold is None else threshold
        _check_threshold(threshold)
        closed = self.gates < threshold
        closed = closed[seed] if seed is not None else closed.all(dim=0)
        return [(int(a), int(b)) for a, b in torch.nonzero(closed).tolist()]

    def table(self) -> pd.DataFrame:
        """Accuracy and log-prob, retain/forget x before/after, mean and spread over seeds."""
        rows = []
        for side in ("retain", "forget"):
            for when in ("before", "after"):
                accuracy = self.metrics[f"{side}_{when}_accuracy"].float()
                logprob = self.metrics[f"{side}_{when}_logprob"].float()
                rows.append({"side": side, "when": when, "accuracy": float(accuracy.mean()),
                             "accuracy_min": float(accuracy.min()), "accuracy_max": float(accuracy.max()),
                             "logprob": float(logprob.mean())})
        return pd.DataFrame(rows)


def require_same_model(a: CHGResult, b: CHGResult) -> None:
    """Raise unless two results come from the same model (name, class, and head layout)."""
    if not isinstance(b, CHGResult):
        raise InputError(f"expected a CHGResult to compare with, got {type(b).__name__}.")
    for key in ("model_name", "model_class"):
        first, second = a.provenance.get(key), b.provenance.get(key)
        if first is not None and second is not None and first != second:
            raise InputError(
                f"provenance mismatch: these results come from different models ({key} {first!r} vs "
                f"{second!r}); head-by-head comparison only makes sense on one model."
            )
    if (a.n_layers, a.n_heads) != (b.n_layers, b.n_heads):
        raise InputError(
            f"provenance mismatch: {a.n_layers} x {a.n_heads} heads vs {b.n_layers} x {b.n_heads} heads."
        )
