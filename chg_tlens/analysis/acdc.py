"""ACDC at head granularity (Conmy et al., 2023, "Towards Automated Circuit Discovery").

    scores = acdc(model, data)                          # one pruning pass at tau
    scores = acdc(model, data, taus=[1e-3, 1e-2, 0.1])  # plus the kept set at every tau (a ROC curve)

ACDC prunes a computational graph from the output backwards, keeping only what the output needs. Here
the nodes are attention heads: heads are visited from the last layer down (and from the last head
down within a layer); each head's ``hook_z`` is replaced by its value on the corrupt twin (or by zero),
earlier removals staying in place, and the head stays removed if the distance of the output to the
full model's output grows by less than ``tau``. The distance is the KL divergence of the full model's
output distribution from the pruned model's at the scored positions (the ACDC paper's metric), or
the squared L2 distance of the logit vectors for models whose outputs are one-hot codes (tracr).

Each head's recorded change (the distance added by removing it, at the moment it was visited) is its
score; with ``taus`` every threshold's kept set is kept too, so ``metrics.sweep_roc`` can draw the
ROC curve the ACDC paper reports. Corrupt values come from the corrupt run of the unpruned model, as
in the paper: a removed head's replacement does not depend on what else was removed.

A sweep on a real model is hours of forward passes on a CPU, so ``checkpoint=path`` keeps every
measured removed set in a small JSON file as it is measured: a run that was stopped replays what it had
measured for free and continues. It reports the passes an unbroken run would have made, and the seconds
of all its runs together.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from chg_tlens.analysis.baselines import HeadScores
from chg_tlens.core import checks, interventions
from chg_tlens.core.checkpoint import CheckpointError, atomic_write_bytes
from chg_tlens.core.data import GateData
from chg_tlens.core.forward import logits_at, on_device
from chg_tlens.core.objectives import target_positions
from chg_tlens.errors import InputError
from chg_tlens.models import adapter
from chg_tlens.models.protocol import TransformerLensModel

AcdcAblation = Literal["corrupt", "zero"]
AcdcDistance = Literal["kl", "l2"]

DEFAULT_TAU = 0.01
"""Default threshold, in the distance's units (nats of KL): removals that move the output by less go."""


def acdc(
    model: TransformerLensModel,
    data: GateData,
    tau: float = DEFAULT_TAU,
    taus: Sequence[float] | None = None,
    ablation: AcdcAblation = "corrupt",
    distance: AcdcDistance = "kl",
    batch_size: int = 32,
    checkpoint: str | Path | None = None,
) -> HeadScores:
    """ACDC's greedy pruning over heads; score = the distance each head's removal added when visited.

    ``details`` holds ``kept`` (``[layer, head]`` bools at ``tau``), the final distance, and with
    ``taus`` a ``sweep`` list of ``{"tau", "kept", "n_kept", "distance"}``. ``ablation="corrupt"``
    needs ``data.corrupt``; ``"zero"`` sets the head's output to 0 (the ACDC paper's tracr setting).
    Cost: one forward of every example per head visited, per threshold, plus the reference runs; a
    removed set that an earlier threshold's run already measured is not run again. ``checkpoint``: a
    JSON file of the removed sets measured so far, written as they are measured and read back first; one
    made on other data, model or settings is refused, not overwritten.
    """
    layout = adapter.require_model(model)
    data = checks.gate_data(data, model)
    if ablation not in ("corrupt", "zero"):
        raise InputError(f"acdc: ablation must be 'corrupt' or 'zero', got {ablation!r}.")
    if distance not in ("kl", "l2"):
        raise InputError(f"acdc: distance must be 'kl' or 'l2', got {distance!r}.")
    thresholds = [_threshold(tau, "tau")] + [_threshold(value, "taus") for value in (taus or [])]
    checks.positive_int(batch_size, "batch_size")
    if ablation == "corrupt":
        checks.corrupt_twin(data, "acdc (ablation='corrupt')")
    started = time.time()
    store = None if checkpoint is None else _Store(Path(checkpoint), {
        "model_name": adapter.model_name(model), "heads": [layout.n_layers, layout.n_heads],
        "dtype": str(next(model.parameters()).dtype), "batch_size": batch_size,
        "data_fingerprint": data.fingerprint(), "ablation": ablation, "distance": distance})
    measured = {} if store is None else store.load()  # a wrong file is refused before any forward pass
    with torch.no_grad(), adapter.frozen(model):
        pruner = _Pruner(model, data, layout, ablation, distance, batch_size, store, measured)
        runs = [pruner.prune(value) for value in thresholds]
    first = runs[0]
    sweep = [{"tau": value, "kept": run["kept"].tolist(), "n_kept": int(run["kept"].sum()),
              "distance": run["distance"]} for value, run in zip(thresholds[1:], runs[1:], strict=True)]
    reference_passes = len(data) * (2 if ablation == "corrupt" else 1)
    forward = reference_passes + pruner.evaluations * len(data)
    seconds = time.time() - started + (0.0 if store is None else store.earlier_seconds)
    return HeadScores(
        first["change"], "acdc", forward, 0, seconds, signed=False,
        details={"tau": thresholds[0], "kept": first["kept"], "distance": first["distance"],
                 "ablation": ablation, "metric": distance, "sweep": sweep},
    )


class _Pruner:
    """Holds the reference outputs and corrupt values once, then prunes at any threshold."""

    def __init__(self, model: TransformerLensModel, data: GateData, layout: adapter.HeadLayout,
                 ablation: AcdcAblation,
                 distance: AcdcDistance, batch_size: int, store: _Store | None = None,
                 measured: dict[bytes, float] | None = None) -> None:
        self.started = time.time()
        self.model, self.layout, self.ablation = model, layout, ablation
        self.row_distance = _kl_rows if distance == "kl" else _l2_rows
        device = adapter.model_device(model)
        self.batches = list(on_device(data, batch_size, device))
        self.rows = [target_positions(target_mask, batch.targets_to(device))
                     for batch, _, target_mask in self.batches]
        self.reference = [self._output(i, []) for i in range(len(self.batches))]
        self.replacement: list[dict[int, Tensor]] = []
        """Per batch, each layer's ``hook_z`` on the corrupt twin (none for zero ablation)."""
        for batch, _, _ in self.batches if ablation == "corrupt" else []:
            _, cache = model.run_with_cache(batch.corrupt.tokens.to(device), names_filter=adapter.is_hook_z)
            self.replacement.append({layer: cache[adapter.hook_z_name(layer)]
                                     for layer in range(layout.n_layers)})
        self.store = store
        self.measured: dict[bytes, float] = dict(measured or {})
        """Distance per removed set: runs at different thresholds share their first steps exactly (and a
        resumed run replays what the stopped one measured)."""
        self.used: set[bytes] = set()

    @property
    def evaluations(self) -> int:
        """Full passes over the data made while pruning (one per head visited per threshold, less the
        removed sets an earlier threshold's run already measured), a resumed run's included."""
        return len(self.used)

    def prune(self, tau: float) -> dict[str, Any]:
        removed = torch.zeros(self.layout.n_layers, self.layout.n_heads, dtype=torch.bool)
        change = torch.zeros(self.layout.n_layers, self.layout.n_heads)
        current = 0.0
        for layer in reversed(range(self.layout.n_layers)):
            for head in reversed(range(self.layout.n_heads)):
                removed[layer, head] = True
                trial = self._distance(removed)
                change[layer, head] = trial - current
                if trial - current < tau:
                    current = trial
                else:
                    removed[layer, head] = False
        return {"change": change, "kept": (~removed).numpy(), "distance": current}

    def _distance(self, removed: Bool[Tensor, "layer head"]) -> float:
        key = removed.numpy().tobytes()
        self.used.add(key)
        if key not in self.measured:
            total, count = 0.0, 0
            for index in range(len(self.batches)):
                output = self._output(index, self._hooks(index, removed))
                total += float(self.row_distance(self.reference[index], output).sum())
                count += output.shape[0]
            self.measured[key] = total / max(count, 1)
            if self.store is not None:
                self.store.add(key, self.measured[key], time.time() - self.started)
        return self.measured[key]

    def _output(self, index: int, hooks: list[interventions.Hook]) -> Float[Tensor, "row vocab"]:
        _, tokens, _ = self.batches[index]
        example, position = self.rows[index]
        return logits_at(self.model, tokens, example, position, hooks).float()

    def _hooks(self, index: int, removed: Bool[Tensor, "layer head"]) -> list[interventions.Hook]:
        """Each layer's removed heads set to their corrupt output, or zeroed."""
        layers = torch.nonzero(removed.any(dim=1)).flatten().tolist()
        if self.ablation == "zero":
            return [interventions.scale(layer, 0.0, heads=removed[layer].clone()) for layer in layers]
        return [interventions.replace(layer, self.replacement[index][layer], heads=removed[layer].clone())
                for layer in layers]


class _Store:
    """ACDC's measured removed sets on disk (JSON: each set as hex of its packed bits -> its distance),
    tied to the model, data and settings they were measured with."""

    def __init__(self, path: Path, signature: dict[str, Any]) -> None:
        self.path, self.signature = path, signature
        self.n_total = int(np.prod(signature["heads"]))
        self.earlier_seconds = 0.0
        self.saved: dict[str, float] = {}
        """Packed key -> distance, as on disk: each ``add`` packs one set, not all of them again."""

    def load(self) -> dict[bytes, float]:
        """What an earlier run measured (nothing when the file does not exist yet); a file made with
        other settings is refused with what differs, a damaged one with what is wrong; neither is touched.

        Only what means the file itself is bad is caught: it cannot be read (``OSError``), is not UTF-8
        (``UnicodeDecodeError``) or JSON (``json.JSONDecodeError``, e.g. a copy cut short), lacks a field or
        holds one of the wrong kind (checked explicitly), or holds a key that packs no removed set
        (``ValueError`` from ``_unpack``). Anything else is a bug here and propagates as it is, so hours of
        measured sets are never called unreadable, nor their file offered for removal, because of it.
        """
        if not self.path.exists():
            return {}
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise self._damaged(f"it is not UTF-8 text ({error.reason} at byte {error.start})") from error
        except OSError as error:
            raise CheckpointError(f"acdc: cannot read checkpoint {self.path} ({error.strerror or error}); "
                                  "it was left as it is.") from error
        try:
            saved = json.loads(text)
        except json.JSONDecodeError as error:
            raise self._damaged(f"it is not valid JSON ({error.msg} at line {error.lineno}, column "
                                f"{error.colno}; a copy cut short?)") from error
        signature, stored, seconds = self._fields(saved)
        differs = {k: signature.get(k) for k in self.signature if signature.get(k) != self.signature[k]}
        if differs:
            raise CheckpointError(f"acdc: checkpoint {self.path} was made with other {', '.join(differs)} "
                                  f"(there: {differs}); pass another path to keep it.")
        measured = {}
        for key in stored:
            try:
                measured[self._unpack(key)] = float(stored[key])
            except ValueError as error:
                raise self._damaged(f"its key {key[:16]!r} is no removed set of {self.n_total} heads "
                                    f"({error})") from error
        self.saved = {key: float(value) for key, value in stored.items()}
        self.earlier_seconds = seconds
        return measured

    def _fields(self, saved: Any) -> tuple[dict[str, Any], dict[str, float], float]:
        """The file's signature, measured sets and seconds, each checked for its kind (not by catching a
        TypeError later, which would hide this code's own bugs)."""
        if not isinstance(saved, dict):
            raise self._damaged(f"it holds a JSON {type(saved).__name__}, not an object")
        missing = [key for key in ("signature", "measured", "seconds") if key not in saved]
        if missing:
            raise self._damaged(f"it has no {', '.join(map(repr, missing))}")
        signature, stored, seconds = saved["signature"], saved["measured"], saved["seconds"]
        if not isinstance(signature, dict):
            raise self._damaged("its 'signature' is not an object")
        if not isinstance(stored, dict) or not all(_is_number(value) for value in stored.values()):
            raise self._damaged("its 'measured' does not map removed sets to distances")
        if not _is_number(seconds):
            raise self._damaged(f"its 'seconds' is {seconds!r}, not a number")
        return signature, stored, float(seconds)

    def _damaged(self, why: str) -> CheckpointError:
        return CheckpointError(f"acdc: checkpoint {self.path} is unreadable: {why}. It was left as it is; "
                               "pass another checkpoint path to start afresh.")

    def add(self, key: bytes, distance: float, seconds: float) -> None:
        """One more measured set, and the file rewritten with all of them atomically (a kill leaves the
        previous file whole); ``seconds``: this run's time so far."""
        self.saved[np.packbits(np.frombuffer(key, dtype=np.uint8)).tobytes().hex()] = distance
        state = {"signature": self.signature, "seconds": self.earlier_seconds + seconds,
                 "measured": self.saved}
        atomic_write_bytes(self.path, lambda tmp: Path(tmp).write_text(json.dumps(state)))

    def _unpack(self, key: str) -> bytes:
        """The removed set a saved key packs; ``ValueError`` for text that packs none (a damaged file)."""
        packed, size = bytes.fromhex(key), (self.n_total + 7) // 8
        if len(packed) != size:
            raise ValueError(f"{len(packed)} bytes, not the {size} of {self.n_total} heads")
        return np.unpackbits(np.frombuffer(packed, dtype=np.uint8))[: self.n_total].astype(bool).tobytes()


def _is_number(value: Any) -> bool:
    """A JSON number (``json`` reads ``true`` as a bool, which ``float`` would take as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kl_rows(reference: Float[Tensor, "row vocab"], output: Float[Tensor, "row vocab"]) -> Tensor:
    """KL(reference || output) per row, from logits."""
    log_p, log_q = reference.log_softmax(dim=-1), output.log_softmax(dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _l2_rows(reference: Float[Tensor, "row vocab"], output: Float[Tensor, "row vocab"]) -> Tensor:
    """Squared L2 distance of the logit vectors per row."""
    return ((reference - output) ** 2).sum(dim=-1)


def _threshold(value: Any, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not np.isfinite(value) \
            or value < 0:
        raise InputError(f"acdc: {argument} must hold finite numbers >= 0, got {value!r}.")
    return float(value)
