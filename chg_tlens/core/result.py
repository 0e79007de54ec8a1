"""CHGResult: fitted gates turned into head roles, frames, and files with provenance.

Per head and seed (CHG_METHOD.md): facilitating = G-, interfering = 1 - G+, irrelevant = G+ (1 - G-).
A head takes the role whose score is highest among those >= threshold, or none ("unclassified").
The file format is :mod:`chg_tlens.core.result_files`, the notebook display :mod:`chg_tlens.core.result_html`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from chg_tlens.core import convergence, result_html, value_checks
from chg_tlens.core.convergence import ROLES, UNCLASSIFIED
from chg_tlens.core.result_files import flatten, read_result_files, unflatten, write_result_files
from chg_tlens.errors import InputError

STAGES = ("zero", "plus", "minus")

@dataclass
class CHGResult:
    """Gate logits of the three stages, ``[seed, layer, head]``, with loss curves and provenance."""

    theta_zero: Float[Tensor, "seed layer head"]
    theta_plus: Float[Tensor, "seed layer head"]
    theta_minus: Float[Tensor, "seed layer head"]
    losses: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    trace: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    """Per stage: ``steps [snapshot]`` (updates done), ``gates [snapshot, seed, layer, head]``,
    ``stopped_at`` (update of an early stop, -1 if none), per seed ``settled_at`` (the update where L-BFGS
    stopped moving the seed's gates, -1 if never: its certificate is read up to there), the full-data
    ``task_grad`` and ``theta`` where the stage ended, and ``passes``: what :meth:`convergence` reads."""

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

    n_seeds = property(lambda self: self.theta_zero.shape[0], doc="Independent fits (one draw each).")
    n_layers = property(lambda self: self.theta_zero.shape[1], doc="Layers of the fitted model.")
    n_heads = property(lambda self: self.theta_zero.shape[2], doc="Query heads per layer (GQA: all).")

    # ----------------------------------------------------------------- roles
    def role_labels(self, threshold: float = 0.5, min_confidence: float = 0.0,
                    confidence_source: str = "optimiser+seeds") -> np.ndarray:
        """``[seed, layer, head]`` array of role names (or "unclassified").

        ``min_confidence`` > 0 leaves heads whose :meth:`confidence` (from ``confidence_source``) is below
        it unclassified, so a role that still flipped late in the fit or that other seeds do not share is
        not read as a finding.
        """
        value_checks.unit_interval(threshold, "threshold")
        names = np.array(ROLES + (UNCLASSIFIED,), dtype=object)
        labels = names[convergence.role_codes(self.g_plus, self.g_minus, threshold).numpy()]
        if min_confidence > 0:
            value_checks.unit_interval(min_confidence, "min_confidence")
            confidence = self.confidence(threshold, confidence_source)
            labels[(confidence < min_confidence).numpy()] = UNCLASSIFIED
        return labels

    def roles(
        self, threshold: float = 0.5, seed: int | None = None, min_confidence: float = 0.0,
        confidence_source: str = "optimiser+seeds",
    ) -> dict[str, list[tuple[int, int]]]:
        """Role -> list of ``(layer, head)``: for one seed, or (``seed=None``) heads with that role in
        every seed. The lists feed path patching and ablations directly."""
        labels = self.role_labels(threshold, min_confidence, confidence_source)
        if seed is not None:
            if not -self.n_seeds <= seed < self.n_seeds:
                raise InputError(f"seed must be in [0, {self.n_seeds}), got {seed}.")
            labels = labels[seed : seed + 1] if seed >= 0 else labels[seed:][:1]
        out: dict[str, list[tuple[int, int]]] = {}
        for role in ROLES + (UNCLASSIFIED,):
            every = np.all(labels == role, axis=0)
            out[role] = [(int(layer), int(head)) for layer, head in zip(*np.nonzero(every), strict=True)]
        return out

    def summary(self, threshold: float = 0.5, min_confidence: float = 0.0) -> pd.DataFrame:
        """Share of heads per role for each seed, plus the heads with the same role in every seed.

        With a trace, a ``certified`` column says whether every stage of that seed carries the convergence
        certificate (:meth:`convergence`), and ``frame.attrs["convergence"]`` says it in words."""
        labels = self.role_labels(threshold, min_confidence)
        n = self.n_layers * self.n_heads
        rows = []
        for seed in range(self.n_seeds):
            row = {"seed": str(seed)}
            for role in ROLES + (UNCLASSIFIED,):
                row[role] = float((labels[seed] == role).sum()) / n
            rows.append(row)
        consensus = self.roles(threshold, min_confidence=min_confidence)
        rows.append({"seed": "every seed"} | {r: len(v) / n for r, v in consensus.items()})
        frame = pd.DataFrame(rows).set_index("seed")
        if self.trace:
            report = self.convergence(threshold)
            per_seed = report.groupby("seed")["certified"].all()
            frame["certified"] = [bool(per_seed[s]) for s in range(self.n_seeds)] + [bool(per_seed.all())]
            frame.attrs["convergence"] = convergence.in_words(report.to_dict("records"))
        return frame

    def example_passes(self) -> int:
        """Example forward+backward passes the fit cost, summed over its gate sets (each G+ and G- mask
        counts): counted as the fit ran (line searches and the certificate's full-data gradient
        included) or, for results saved before that count was kept, updates x batch size x seeds."""
        if self.trace and all("passes" in record for record in self.trace.values()):
            return int(sum(float(record["passes"].sum()) for record in self.trace.values()))
        updates = sum(int(curves["loss"].shape[0]) for curves in self.losses.values())
        return updates * int(self.config.get("batch_size", 0)) * self.n_seeds

    # ----------------------------------------------------------------- convergence
    def convergence(self, threshold: float | None = None) -> pd.DataFrame:
        """Per stage x seed: the convergence certificate (:mod:`chg_tlens.core.certificate`): the window
        read, role flips in it (open/closed flips in stage 1; ``borderline``: role changes of heads whose
        gate moved by under 0.05, stationary on the threshold), the gates' drift, the loss change against
        its noise, gates undecided at their initial draw, the largest stationarity residual in units of
        the regulariser's pull, ``certified``, the checks that ``failed`` and what to change. Roles are read
        at ``threshold`` (default: the fit's ``role_threshold``, the one its early stopping used)."""
        threshold = self.config.get("role_threshold", 0.5) if threshold is None else threshold
        return _convergence_frame(self.trace, self.losses, self.config, threshold)

    def convergence_text(self, threshold: float | None = None) -> str:
        """:meth:`convergence` in words, one line per stage."""
        return convergence.in_words(self.convergence(threshold).to_dict("records"))

    def confidence(self, threshold: float = 0.5, source: str = "optimiser+seeds"
                   ) -> Float[Tensor, "seed layer head"]:
        """Per seed and head, how far to trust its role, from ``source``: ``"optimiser"`` = the share of
        the certificate window's snapshots at which the head already had its final role; ``"seeds"`` = the
        share of seeds that end with the same role (seeds differ by their initial gates, and by their
        prompts when fitted with ``example_weights``, e.g. :func:`chg_tlens.error_bars`); the default
        multiplies the two (1 = settled and shared)."""
        if source not in convergence.CONFIDENCE_SOURCES:
            raise InputError(f"source must be one of {convergence.CONFIDENCE_SOURCES}, got {source!r}.")
        _require_trace(self.trace, ("plus", "minus"), "confidence")
        return convergence.head_confidence(self.trace, self.config, threshold, source)

    def select_seeds(self, seeds: list[int] | slice) -> CHGResult:
        """The result restricted to some seeds (gates, curves and trace), e.g. to split a joint fit."""
        index = torch.arange(self.n_seeds)[seeds]
        losses = {stage: {k: v[:, index] for k, v in curves.items()} for stage, curves in self.losses.items()}
        trace = {}
        for stage, record in self.trace.items():
            trace[stage] = {k: (v[:, index] if k == "gates" else v[index] if v.ndim and k != "steps" else v)
                            for k, v in record.items()}
        return CHGResult(self.theta_zero[index], self.theta_plus[index], self.theta_minus[index],
                         losses=losses, config=self.config, provenance=self.provenance, trace=trace)

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
            frame[f"role_{name}"] = result._consensus_roles(threshold).ravel()
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
        tensors = {"theta_zero": self.theta_zero, "theta_plus": self.theta_plus,
                   "theta_minus": self.theta_minus} | flatten("losses", self.losses) \
            | flatten("trace", self.trace)
        return write_result_files(Path(path), "CHGResult", tensors,
                                   [self.n_seeds, self.n_layers, self.n_heads], self.config, self.provenance)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CHGResult:
        """Read a folder written by :meth:`save`; anything inconsistent raises ResultFileError."""
        tensors, meta = read_result_files(Path(path), "CHGResult",
                                          ("theta_zero", "theta_plus", "theta_minus"))
        return cls(
            tensors["theta_zero"], tensors["theta_plus"], tensors["theta_minus"],
            losses=unflatten("losses", tensors), config=meta.get("config", {}),
            provenance=meta.get("provenance", {}), trace=unflatten("trace", tensors),
        )

    # ----------------------------------------------------------------- notebook display
    def _repr_html_(self) -> str:
        """Role shares and a layer x head role map, so a result shows itself in a notebook cell."""
        threshold = self.config.get("role_threshold", 0.5)
        return result_html.role_map_html(self.summary(threshold), self._consensus_roles(threshold),
                                         self.n_seeds, threshold)

    def _consensus_roles(self, threshold: float = 0.5) -> np.ndarray:
        """``[layer, head]`` role a head has in every seed, or "mixed"."""
        consensus = np.full((self.n_layers, self.n_heads), "mixed", dtype=object)
        for role, heads in self.roles(threshold).items():
            for layer, head in heads:
                consensus[layer, head] = role
        return consensus


def _require_trace(trace: dict[str, dict[str, Tensor]], stages: tuple[str, ...], what: str) -> None:
    """Refuse a missing or partial trace by name, before a StopIteration or KeyError deep in the reading."""
    if not trace:
        raise InputError(
            f"this result has no gate trace (fitted before traces were kept, or built by hand): {what} "
            "cannot be read; refit to get it."
        )
    missing = [stage for stage in stages if stage not in trace]
    if missing:
        raise InputError(
            f"this result has no trace of stage(s) {missing} (it was saved by an older chg_tlens or "
            "built by hand); refit to get convergence figures and confidences."
        )


def _convergence_frame(trace: dict[str, dict[str, Tensor]], losses: dict[str, dict[str, Tensor]],
                       config: dict[str, Any], threshold: float, open_threshold: float = 0.5) -> pd.DataFrame:
    """:func:`convergence.stage_report` as a frame; ``open_threshold`` is where a gate of a stage without
    roles counts as open (a contrastive fit's closing threshold)."""
    value_checks.unit_interval(threshold, "threshold")
    _require_trace(trace, tuple(losses), "convergence")
    unlogged = [stage for stage in trace if stage not in losses]
    if unlogged:
        raise InputError(f"this result has a gate trace but no loss curve of stage(s) {unlogged} (built by "
                         "hand?): convergence cannot be read.")
    rows = convergence.stage_report(trace, losses, config, threshold, open_threshold=open_threshold)
    return pd.DataFrame(rows)


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
    trace: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    """The gate trace of the one stage, as in :attr:`CHGResult.trace`."""

    def convergence(self, threshold: float | None = None) -> pd.DataFrame:
        """Per seed: the convergence certificate, as for CHGResult. A flip is
        a gate crossing ``threshold`` (default: the fit's own), the line :meth:`closed` draws."""
        threshold = self.config.get("threshold", 0.5) if threshold is None else threshold
        return _convergence_frame(self.trace, self.losses, self.config, threshold, open_threshold=threshold)

    def convergence_text(self, threshold: float | None = None) -> str:
        """:meth:`convergence` in words."""
        return convergence.in_words(self.convergence(threshold).to_dict("records"))

    @property
    def gates(self) -> Float[Tensor, "seed layer head"]:
        return torch.sigmoid(self.theta)

    def closed(self, threshold: float | None = None) -> Bool[Tensor, "seed layer head"]:
        """Which gates end below ``threshold`` (default: the fit's own)."""
        threshold = self.config.get("threshold", 0.5) if threshold is None else threshold
        value_checks.unit_interval(threshold, "threshold")
        return self.gates.detach().cpu() < threshold

    def closed_heads(self, threshold: float | None = None, seed: int | None = None) -> list[tuple[int, int]]:
        """Heads whose gate ends below ``threshold``: in one seed, or (``seed=None``) in every seed."""
        closed = self.closed(threshold)
        closed = closed[seed] if seed is not None else closed.all(dim=0)
        return [(int(a), int(b)) for a, b in torch.nonzero(closed).tolist()]

    def to_frame(self, threshold: float | None = None) -> pd.DataFrame:
        """One row per head: layer, head, the gate of each seed (``gate_seed0``...), the share of seeds
        that close it, and whether every seed does."""
        n_seeds, n_layers, n_heads = self.theta.shape
        layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
        gates, closed = self.gates.detach().cpu(), self.closed(threshold)
        columns: dict[str, Any] = {"layer": layer.ravel(), "head": head.ravel()}
        for seed in range(n_seeds):
            columns[f"gate_seed{seed}"] = gates[seed].numpy().ravel()
        columns["closed_share"] = closed.float().mean(dim=0).numpy().ravel()
        columns["closed_every_seed"] = closed.all(dim=0).numpy().ravel()
        return pd.DataFrame(columns)

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

    # ----------------------------------------------------------------- files
    def save(self, path: str | os.PathLike) -> Path:
        """Write theta, loss curves and metrics like :meth:`CHGResult.save` (same two files, checksummed)."""
        tensors = ({"theta": self.theta} | flatten("losses", self.losses) | flatten("trace", self.trace)
                   | {f"metrics.{name}": value for name, value in self.metrics.items()})
        return write_result_files(Path(path), "ContrastiveResult", tensors, list(self.theta.shape),
                                   self.config, self.provenance)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ContrastiveResult:
        """Read a folder written by :meth:`save`; anything inconsistent raises ResultFileError."""
        tensors, meta = read_result_files(Path(path), "ContrastiveResult", ("theta",))
        metrics = {key.removeprefix("metrics."): value for key, value in tensors.items()
                   if key.startswith("metrics.")}
        return cls(tensors["theta"], losses=unflatten("losses", tensors), metrics=metrics,
                   config=meta.get("config", {}), provenance=meta.get("provenance", {}),
                   trace=unflatten("trace", tensors))

    # ----------------------------------------------------------------- notebook display
    def _repr_html_(self) -> str:
        """Before/after table and a layer x head map of closed gates, so a result shows itself in a
        notebook cell."""
        mean_gates = self.gates.detach().cpu().mean(dim=0).numpy()
        return result_html.closed_map_html(self.closed().numpy(), mean_gates,
                                           self.table() if self.metrics else None)


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
