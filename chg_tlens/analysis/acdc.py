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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from chg_tlens.analysis.baselines import HeadScores
from chg_tlens.core import checks
from chg_tlens.core.checkpoint import CheckpointError, atomic_write_bytes
from chg_tlens.core.data import GateData
from chg_tlens.core.forward import logits_at, on_device
from chg_tlens.core.objectives import target_positions
from chg_tlens.errors import InputError
from chg_tlens.models import adapter

AcdcAblation = Literal["corrupt", "zero"]
AcdcDistance = Literal["kl", "l2"]

DEFAULT_TAU = 0.01
"""Default threshold, in the distance's units (nats of KL): removals that move the output by less go."""


def acdc(
    model: Any,
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

    def __init__(self, model: Any, data: GateData, layout: adapter.HeadLayout, ablation: AcdcAblation,
                 distance: AcdcDistance, batch_size: int, store: _Store | None = None,
                 measured: dict[bytes, float] | None = None) -> None:
        self.started = time.time()
        self.model, self.layout, self.ablation = model, layout, ablation
        self.row_distance = _kl_rows if distance == "kl" else _l2_rows
        device = adapter.model_device(model)
        self.batches = list(on_device(data, batch_size, device))
        self.rows = [target_positions(target_mask, batch.targets_to(device))
                     for batch, _, target_mask in self.batches]
        self.reference = [self._output(i, {}) for i in range(len(self.batches))]
        self.replacement: list[dict[int, Tensor]] = []
        for batch, _, _ in self.batches:
            if ablation == "zero":
                self.replacement.append({})
                continue
            _, cache = model.run_with_cache(batch.corrupt.tokens.to(device),
                                            names_filter=adapter.is_hook_z)
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

    def _output(self, index: int, hooks: dict[int, Callable[..., Tensor]]) -> Float[Tensor, "row vocab"]:
        _, tokens, _ = self.batches[index]
        example, position = self.rows[index]
        fwd_hooks = [(adapter.hook_z_name(layer), hook) for layer, hook in hooks.items()]
        return logits_at(self.model, tokens, example, position, fwd_hooks).float()

    def _hooks(self, index: int, removed: Bool[Tensor, "layer head"]) -> dict[int, Callable[..., Tensor]]:
        hooks = {}
        for layer in torch.nonzero(removed.any(dim=1)).flatten().tolist():
            heads = removed[layer]
            value = self.replacement[index].get(layer)
            hooks[layer] = _ablate_heads_hook(heads, value)
        return hooks


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
        other settings is refused with what differs, an unreadable one as such; neither is touched."""
        if not self.path.exists():
            return {}
        try:
            saved = json.loads(self.path.read_text())
            signature = saved["signature"]
            differs = {k: signature.get(k) for k in self.signature if signature.get(k) != self.signature[k]}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise self._unreadable(error) from error
        if differs:
            raise CheckpointError(f"acdc: checkpoint {self.path} was made with other {', '.join(differs)} "
                                  f"(there: {differs}); pass another path to keep it.")
        try:
            self.saved = {str(key): float(value) for key, value in saved["measured"].items()}
            measured = {self._unpack(key): value for key, value in self.saved.items()}
            self.earlier_seconds = float(saved["seconds"])
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise self._unreadable(error) from error
        return measured

    def _unreadable(self, error: Exception) -> CheckpointError:
        return CheckpointError(f"acdc: checkpoint {self.path} is unreadable ({error!r}); move it away to "
                               "start afresh.")

    def add(self, key: bytes, distance: float, seconds: float) -> None:
        """One more measured set, and the file rewritten with all of them atomically (a kill leaves the
        previous file whole); ``seconds``: this run's time so far."""
        self.saved[np.packbits(np.frombuffer(key, dtype=np.uint8)).tobytes().hex()] = distance
        state = {"signature": self.signature, "seconds": self.earlier_seconds + seconds,
                 "measured": self.saved}
        atomic_write_bytes(self.path, lambda tmp: Path(tmp).write_text(json.dumps(state)))

    def _unpack(self, key: str) -> bytes:
        bits = np.unpackbits(np.frombuffer(bytes.fromhex(key), dtype=np.uint8))[: self.n_total]
        if bits.size != self.n_total:
            raise ValueError(f"a removed set of {bits.size} heads, not {self.n_total}")
        return bits.astype(bool).tobytes()


def _ablate_heads_hook(heads: Bool[Tensor, " head"], value: Tensor | None) -> Callable[..., Tensor]:
    """``hook_z`` with the chosen heads set to ``value`` (their corrupt output) or to zero."""
    chosen = heads.clone()

    def ablate(z: Tensor, hook: Any = None, **kwargs: Any) -> Tensor:
        keep = (~chosen).to(device=z.device, dtype=z.dtype)[None, None, :, None]
        replaced = z * keep
        if value is not None:
            replaced = replaced + value.to(z.dtype) * (1 - keep)
        return replaced

    return ablate


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
