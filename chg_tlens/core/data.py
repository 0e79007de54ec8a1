"""GateData: token ids plus which positions count in the loss.

``target_mask[i, t]`` is True when token ``t`` of example ``i`` is a target, i.e. predicted from
position ``t - 1``. Prompt tokens, BOS and padding are never targets, so right padding is safe for
causal models: no target ever attends to a pad (bidirectional models are refused padded data).

Models that emit their answer at each position instead of predicting the next token (compiled RASP
programs) carry per-position labels in ``targets``: then ``target_mask[i, t]`` says that the logit at
position ``t`` is scored against ``targets[i, t]``. Every loss and metric reads both modes through
``core.objectives`` (``target_positions`` / ``target_labels``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from chg_tlens.core.objectives import target_labels
from chg_tlens.core.records import load_records, require_fields
from chg_tlens.errors import InputError
from chg_tlens.models import adapter
from chg_tlens.models.protocol import TransformerLensModel


@dataclass(frozen=True, eq=False)
class GateData:
    """A task as CHG sees it: right-padded tokens, a target mask, and optional matched twins.

    ``corrupt`` is a counterfactual twin for activation and path patching; ``forget`` is the matched
    forget version of each item for contrastive CHG. ``meta`` holds free-form facts (task name,
    answers) carried into provenance. Equality is identity (``eq=False``): field-wise ``==`` on
    tensors is ambiguous; compare :meth:`fingerprint` to ask whether two datasets hold the same data.

    ``targets`` switches to per-position labels (see the module docstring): ``None`` (the default)
    scores next tokens; a tensor of ids, shaped like ``tokens``, scores the logit at each marked
    position against ``targets`` there (values at unmarked positions are ignored). Twins use the
    same mode as the data they belong to.

    ``groups`` (optional) is one id per example saying which template built it, so an example's
    words sit at the positions of the other examples of its group: mean ablation averages a head over
    the example's own group (``baselines.ablation_scores``), as IOI and ACDC do, instead of mixing
    templates position by position. A twin needs no groups of its own: it shares its data's rows.
    """

    tokens: Int[Tensor, "example pos"]
    target_mask: Bool[Tensor, "example pos"]
    lengths: Int[Tensor, " example"]
    pad_token_id: int = 0
    corrupt: GateData | None = None
    forget: GateData | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    targets: Int[Tensor, "example pos"] | None = None
    groups: Int[Tensor, " example"] | None = None

    def __post_init__(self) -> None:
        _check_tokens_and_mask(self.tokens, self.target_mask, self.per_position)
        if self.targets is not None:
            _check_targets(self.targets, self.target_mask)
        if self.lengths.shape != (self.tokens.shape[0],):
            raise InputError(
                f"GateData: lengths must have shape [{self.tokens.shape[0]}], "
                f"got {list(self.lengths.shape)}."
            )
        if self.groups is not None and (self.groups.shape != (len(self),) or self.groups.dtype != torch.long):
            raise InputError(
                f"GateData: groups must be one long id per example, shape [{len(self)}], got "
                f"{self.groups.dtype} {list(self.groups.shape)} (GateData.with_groups converts them)."
            )
        positions = torch.arange(self.tokens.shape[1])[None, :]
        if (self.target_mask & (positions >= self.lengths[:, None])).any():
            raise InputError("GateData: target_mask marks padding (a position past an example's length).")
        for name, twin in (("corrupt", self.corrupt), ("forget", self.forget)):
            if twin is not None and len(twin) != len(self):
                raise InputError(
                    f"GateData: {name} twin has {len(twin)} examples, this data has {len(self)}."
                )
            if twin is not None and twin.per_position != self.per_position:
                raise InputError(
                    f"GateData: the {name} twin {'has' if twin.per_position else 'has no'} per-position "
                    f"targets but this data {'has' if self.per_position else 'has none'}; both must "
                    "score the same way."
                )

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_tokens(
        cls,
        tokens: Int[Tensor, "example pos"] | Sequence[Sequence[int]],
        target_mask: Bool[Tensor, "example pos"] | Sequence[Sequence[bool]],
        pad_token_id: int = 0,
        lengths: Int[Tensor, " example"] | None = None,
        meta: dict[str, Any] | None = None,
        targets: Int[Tensor, "example pos"] | Sequence[Sequence[int]] | None = None,
        groups: Int[Tensor, " example"] | Sequence[int] | None = None,
    ) -> GateData:
        """Wrap token ids and a target mask you built yourself; everything is checked.

        With ``targets`` (ids shaped like ``tokens``) the logit at each marked position is scored
        against ``targets`` there, for models that answer at every position rather than predicting the
        next token. ``groups``: one id per example, the template that built it (see the class).
        """
        tokens = _as_token_tensor(tokens)
        target_mask = _as_mask_tensor(target_mask, tokens.shape)
        if lengths is None:
            lengths = torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long)
        if targets is not None:
            targets = _as_targets_tensor(targets, tokens.shape)
        return cls(tokens, target_mask, torch.as_tensor(lengths, dtype=torch.long),
                   int(pad_token_id), meta=dict(meta or {}), targets=targets,
                   groups=None if groups is None else _as_groups_tensor(groups, tokens.shape[0]))

    @classmethod
    def from_sequences(
        cls,
        sequences: Sequence[Sequence[int]],
        target_masks: Sequence[Sequence[bool]],
        pad_token_id: int = 0,
        meta: dict[str, Any] | None = None,
    ) -> GateData:
        """Right-pad ragged token lists (and their masks) into one batch."""
        if len(sequences) == 0:
            raise InputError("GateData: no examples were given (the dataset is empty).")
        if len(sequences) != len(target_masks):
            raise InputError(
                f"GateData: {len(sequences)} sequences but {len(target_masks)} target masks."
            )
        width = max(len(s) for s in sequences)
        if width == 0:
            raise InputError("GateData: every sequence is empty.")
        tokens = torch.full((len(sequences), width), int(pad_token_id), dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.bool)
        for i, (seq, seq_mask) in enumerate(zip(sequences, target_masks, strict=True)):
            if len(seq) != len(seq_mask):
                raise InputError(
                    f"GateData: example {i} has {len(seq)} tokens but a target mask of "
                    f"{len(seq_mask)}."
                )
            if len(seq) == 0:
                raise InputError(f"GateData: example {i} is empty.")
            tokens[i, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[i, : len(seq)] = torch.as_tensor(list(seq_mask), dtype=torch.bool)
        lengths = torch.as_tensor([len(s) for s in sequences], dtype=torch.long)
        return cls.from_tokens(tokens, mask, pad_token_id, lengths, meta)

    @classmethod
    def from_pairs(
        cls,
        model: TransformerLensModel,
        prompts: Sequence[str],
        targets: Sequence[str],
        prepend_bos: bool | None = None,
        meta: dict[str, Any] | None = None,
    ) -> GateData:
        """Prompt/target text pairs: the loss counts the target tokens only.

        Prompt and target are tokenized separately (the target without BOS) and concatenated, so the
        target's tokens are exactly what the tokenizer makes of the target string.
        """
        if len(prompts) != len(targets):
            raise InputError(f"GateData.from_pairs: {len(prompts)} prompts but {len(targets)} targets.")
        if len(prompts) == 0:
            raise InputError("GateData.from_pairs: no examples were given (the dataset is empty).")
        bos = adapter.prepends_bos(model) if prepend_bos is None else prepend_bos
        encoded = []
        for i, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
            prompt_ids = adapter.encode(model, prompt, prepend_bos=bos)
            target_ids = adapter.encode(model, target, prepend_bos=False)
            if not target_ids:
                raise InputError(
                    f"GateData.from_pairs: target {i} ({target!r}) tokenizes to nothing."
                )
            if not prompt_ids:
                raise InputError(
                    f"GateData.from_pairs: prompt {i} ({prompt!r}) tokenizes to nothing and no BOS "
                    "is prepended, so the first target token has nothing to be predicted from."
                )
            encoded.append((prompt_ids + target_ids, [False] * len(prompt_ids) + [True] * len(target_ids)))
        return cls._from_encoded(model, encoded, "pairs", meta)

    @classmethod
    def from_text(
        cls,
        model: TransformerLensModel,
        texts: Sequence[str],
        prepend_bos: bool | None = None,
        meta: dict[str, Any] | None = None,
    ) -> GateData:
        """Plain text: every next-token prediction counts (all tokens after the first)."""
        if len(texts) == 0:
            raise InputError("GateData.from_text: no texts were given (the dataset is empty).")
        bos = adapter.prepends_bos(model) if prepend_bos is None else prepend_bos
        encoded = []
        for i, text in enumerate(texts):
            ids = adapter.encode(model, text, prepend_bos=bos)
            if len(ids) < 2:
                raise InputError(
                    f"GateData.from_text: text {i} ({text!r}) has fewer than two tokens, so it has "
                    "no next-token prediction to count."
                )
            encoded.append((ids, [False] + [True] * (len(ids) - 1)))
        return cls._from_encoded(model, encoded, "text", meta)

    @classmethod
    def _from_encoded(
        cls,
        model: TransformerLensModel,
        encoded: Sequence[tuple[list[int], list[bool]]],
        source: str,
        meta: dict[str, Any] | None,
    ) -> GateData:
        """(token ids, target mask) per example, as the model's tokenizer made them: right-padded with
        its pad id, ``source`` recorded in ``meta``, checked against the model."""
        data = cls.from_sequences([ids for ids, _ in encoded], [mask for _, mask in encoded],
                                  adapter.pad_token_id(model), {"source": source, **(meta or {})})
        return data.checked_for(model)

    @classmethod
    def from_hf(
        cls,
        model: TransformerLensModel,
        dataset: Any,
        prompt_field: str = "prompt",
        target_field: str | None = "target",
        text_field: str | None = None,
        prepend_bos: bool | None = None,
    ) -> GateData:
        """A ``datasets.Dataset`` (or any list of dicts) with prompt/target fields, or a text field."""
        rows = list(dataset)
        if not rows:
            raise InputError("GateData.from_hf: the dataset is empty.")
        columns = set(rows[0].keys())
        if text_field is not None:
            require_fields(columns, [text_field])
            return cls.from_text(model, [str(r[text_field]) for r in rows], prepend_bos,
                                 {"source": "hf", "text_field": text_field})
        if target_field is None:
            raise InputError("GateData.from_hf: give target_field, or text_field for plain text.")
        require_fields(columns, [prompt_field, target_field])
        return cls.from_pairs(
            model,
            [str(r[prompt_field]) for r in rows],
            [str(r[target_field]) for r in rows],
            prepend_bos,
            {"source": "hf", "prompt_field": prompt_field, "target_field": target_field},
        )

    @classmethod
    def contrastive(cls, retain: GateData, forget: GateData) -> GateData:
        """Matched items posed two ways (same answers): the retain side with the forget side attached.

        Contrastive CHG keeps performance on ``retain`` while destroying it on ``forget``.
        """
        for name, side in (("retain", retain), ("forget", forget)):
            if not isinstance(side, GateData):
                raise InputError(
                    f"GateData.contrastive: {name} must be a GateData, got {type(side).__name__}."
                )
        if len(retain) != len(forget):
            raise InputError(
                f"GateData.contrastive: {len(retain)} retain items but {len(forget)} forget items; "
                "each item needs both versions."
            )
        per_item = [side.labels().split(side.target_mask.sum(dim=1).tolist()) for side in (retain, forget)]
        for i, (a, b) in enumerate(zip(*per_item, strict=True)):
            if not torch.equal(a, b):
                raise InputError(
                    f"GateData.contrastive: item {i} has different answers on the two sides "
                    f"(retain targets {a.tolist()}, forget targets {b.tolist()}); the sides must differ "
                    "only in how the task is posed."
                )
        return replace(retain, forget=replace(forget, corrupt=None, forget=None))

    @classmethod
    def stack_padded(cls, parts: Sequence[GateData]) -> GateData:
        """Several datasets as one batch, right-padded to the widest (twins are dropped; groups are kept
        when every part has them, as ids of one numbering)."""
        width = max(p.tokens.shape[1] for p in parts)
        pad = parts[0].pad_token_id
        modes = {p.per_position for p in parts}
        if len(modes) > 1:
            raise InputError("GateData.stack_padded: some parts have per-position targets and some "
                             "do not; they would be scored differently.")

        def widen(x: Tensor, fill: int | bool) -> Tensor:
            return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=fill)

        return cls(
            tokens=torch.cat([widen(p.tokens, pad) for p in parts]),
            target_mask=torch.cat([widen(p.target_mask, False) for p in parts]),
            lengths=torch.cat([p.lengths for p in parts]),
            pad_token_id=pad,
            meta=dict(parts[0].meta),
            targets=torch.cat([widen(p.targets, pad) for p in parts]) if modes == {True} else None,
            groups=(torch.cat([p.groups for p in parts]) if all(p.groups is not None for p in parts)
                    else None),
        )

    @classmethod
    def from_file(
        cls,
        model: TransformerLensModel,
        path: str | Path,
        prompt_field: str = "prompt",
        target_field: str | None = "target",
        text_field: str | None = None,
    ) -> GateData:
        """A JSONL, JSON, or CSV file, or a folder saved with ``datasets.Dataset.save_to_disk``.

        Bad records (a missing field, a target that tokenizes to nothing, a text too long) raise an
        InputError that also names the file; any other error, the tokenizer's own included, is a bug
        and propagates as itself."""
        records = load_records(path)
        try:
            return cls.from_hf(model, records, prompt_field, target_field, text_field)
        except InputError as error:
            raise InputError(f"{path}: {error}") from error

    # ----------------------------------------------------------------- use
    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def n_targets(self) -> int:
        return int(self.target_mask.sum())

    @property
    def per_position(self) -> bool:
        """True when the logit at each marked position is scored against ``targets`` there."""
        return self.targets is not None

    def targets_to(self, device: torch.device | str) -> Int[Tensor, "example pos"] | None:
        """``targets`` on ``device`` (``None`` for next-token data): the last argument of every scoring
        function in ``core.objectives``."""
        return None if self.targets is None else self.targets.to(device)

    def labels(self) -> Int[Tensor, " target"]:
        """Every scored id, example by example: the answers, whichever way the data scores them."""
        return target_labels(self.tokens, self.target_mask, self.targets)

    def checked_for(self, model: TransformerLensModel, argument: str = "data") -> GateData:
        """Fail early if a sequence exceeds the model's context or a token is outside its vocabulary."""
        layout = adapter.require_model(model)
        longest = int(self.lengths.max())
        if longest > layout.n_ctx:
            worst = int(self.lengths.argmax())
            raise InputError(
                f"{argument}: example {worst} is {longest} tokens long, longer than the model's "
                f"context n_ctx={layout.n_ctx}."
            )
        biggest = int(self.tokens.max())
        if biggest >= layout.d_vocab or int(self.tokens.min()) < 0:
            raise InputError(
                f"{argument}: token ids must lie in [0, {layout.d_vocab}) for this model, "
                f"found {int(self.tokens.min())}..{biggest}."
            )
        if self.targets is not None and int(self.labels().max()) >= layout.d_vocab_out:
            raise InputError(
                f"{argument}: targets must lie in [0, {layout.d_vocab_out}) (the model's output "
                f"vocabulary), found {int(self.labels().max())}."
            )
        if not adapter.is_causal(model) and bool((self.lengths < self.tokens.shape[1]).any()):
            raise InputError(
                f"{argument}: the model attends in both directions, so right padding would change "
                f"what every position sees; give examples of one length (found lengths "
                f"{sorted(set(self.lengths.tolist()))})."
            )
        for name, twin in (("corrupt", self.corrupt), ("forget", self.forget)):
            if twin is not None:
                twin.checked_for(model, f"{argument}.{name}")
        return self

    def subset(self, index: Int[Tensor, " n"] | Bool[Tensor, " example"] | Sequence[int] | slice) -> GateData:
        """The examples at ``index`` (or where a ``[example]`` bool mask is true; twins and groups
        follow), trimmed to their longest length."""
        if isinstance(index, slice):
            index = torch.arange(len(self))[index]
        if isinstance(index, Tensor) and index.dtype == torch.bool:
            if tuple(index.shape) != (len(self),):
                raise InputError(f"subset: a bool mask needs one entry per example ({len(self)}), got shape "
                                 f"{list(index.shape)}.")
            index = torch.nonzero(index).flatten()
        index = torch.as_tensor(index, dtype=torch.long)
        width = int(self.lengths[index].max()) if len(index) else 1
        return replace(
            self,
            tokens=self.tokens[index, :width],
            target_mask=self.target_mask[index, :width],
            lengths=self.lengths[index],
            corrupt=None if self.corrupt is None else self.corrupt.subset(index),
            forget=None if self.forget is None else self.forget.subset(index),
            targets=None if self.targets is None else self.targets[index, :width],
            groups=None if self.groups is None else self.groups[index],
        )

    def with_corrupt(self, corrupt: GateData) -> GateData:
        """This data with a counterfactual twin attached (same number of examples)."""
        return replace(self, corrupt=corrupt)

    def with_groups(self, groups: Int[Tensor, " example"] | Sequence[int] | None) -> GateData:
        """This data with one group id per example (the template that built it; None removes them)."""
        return replace(self, groups=None if groups is None else _as_groups_tensor(groups, len(self)))

    def batch_indices(self, step: int, batch_size: int, seed: int = 0,
                      bucket_window: int = 1) -> Int[Tensor, " batch"]:
        """Example indices of update ``step``: a pure function of (seed, step), so a resumed fit sees
        exactly the batches an uninterrupted one would.

        Examples are drawn from an endless chain of seeded epoch permutations; batch ``t`` is items
        ``t*B .. (t+1)*B - 1`` of that chain (a batch larger than the data wraps into the next epoch).
        With ``bucket_window = W > 1`` the chain is cut into windows of ``W`` batches, each window is
        sorted by length, cut into batches and the batches shuffled: batches of similar length, so
        little compute goes to padding, and every example is still seen as often.
        """
        if batch_size <= 0:
            raise InputError(f"batch_size must be positive, got {batch_size}.")
        if isinstance(bucket_window, bool) or not isinstance(bucket_window, int) or bucket_window < 1:
            raise InputError(
                f"bucket_window must be an integer >= 1 (1 = no bucketing), got {bucket_window!r}.")
        if bucket_window > 1:
            window, slot = divmod(step, bucket_window)
            items = self.batch_indices(window, bucket_window * batch_size, seed)
            items = items[torch.argsort(self.lengths[items], stable=True)]
            order = torch.randperm(bucket_window,
                                   generator=torch.Generator().manual_seed(seed * 1_000_003 + window))
            return items.reshape(bucket_window, batch_size)[order[slot]]
        n = len(self)
        first, last = step * batch_size, (step + 1) * batch_size
        picked = []
        for epoch in range(first // n, (last - 1) // n + 1):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch)))
            lo, hi = max(first - epoch * n, 0), min(last - epoch * n, n)
            picked.append(order[lo:hi])
        return torch.cat(picked)

    def batches(self, batch_size: int, seed: int = 0) -> Iterator[GateData]:
        """Endless stream of batches in the order :meth:`batch_indices` defines."""
        step = 0
        while True:
            yield self.subset(self.batch_indices(step, batch_size, seed))
            step += 1

    def fingerprint(self) -> str:
        """A short hash of everything a fit reads: tokens, target mask, lengths, pad id, per-position
        targets (when set; next-token data hashes as it always did) and both twins.

        Recorded with every result and checked on resume, so a run cannot silently continue on other
        data (other forget items included). ``meta`` is left out: it is description, not data.
        ``groups`` are left out too: no fit reads them (they only pick mean ablation's reference), and
        hashing them would refuse every fit saved on a templated task before they existed.
        """
        return self._sha256()[:16]

    def _sha256(self) -> str:
        digest = hashlib.sha256(f"pad_token_id={self.pad_token_id};".encode())
        for name, tensor in (("tokens", self.tokens.long()), ("target_mask", self.target_mask.bool()),
                             ("lengths", self.lengths.long())):
            array = tensor.detach().cpu().contiguous().numpy()
            digest.update(f"{name}{list(array.shape)};".encode())  # shape: same bytes, other layout
            digest.update(array.tobytes())
        if self.targets is not None:
            array = self.targets.long().detach().cpu().contiguous().numpy()
            digest.update(f"targets{list(array.shape)};".encode())
            digest.update(array.tobytes())
        for name, twin in (("corrupt", self.corrupt), ("forget", self.forget)):
            digest.update(f"{name}={'none' if twin is None else twin._sha256()};".encode())
        return digest.hexdigest()


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_033 + epoch * 104_729 + 7) % (2**63 - 1)


def _as_token_tensor(tokens: Any) -> Tensor:
    tokens = torch.as_tensor(tokens)
    if tokens.is_floating_point() or tokens.dtype == torch.bool or tokens.is_complex():
        raise InputError(f"GateData: tokens must be integer ids, got dtype {tokens.dtype}.")
    if tokens.ndim != 2:
        raise InputError(
            f"GateData: tokens must be [example, pos], got shape {list(tokens.shape)}."
        )
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise InputError(
            f"GateData: tokens are empty (shape {list(tokens.shape)}); the dataset is empty."
        )
    return tokens.long().cpu()


def _as_mask_tensor(mask: Any, shape: torch.Size) -> Tensor:
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool:
        raise InputError(f"GateData: target_mask must be bool, got dtype {mask.dtype}.")
    if tuple(mask.shape) != tuple(shape):
        raise InputError(
            f"GateData: target_mask shape {list(mask.shape)} does not match tokens shape {list(shape)}."
        )
    return mask.cpu()


def _as_groups_tensor(groups: Any, n_examples: int) -> Tensor:
    groups = torch.as_tensor(groups)
    if groups.is_floating_point() or groups.dtype == torch.bool or groups.is_complex():
        raise InputError(f"GateData: groups must be integer ids, got dtype {groups.dtype}.")
    if tuple(groups.shape) != (n_examples,):
        raise InputError(
            f"GateData: groups must hold one id per example, shape [{n_examples}], got "
            f"{list(groups.shape)}."
        )
    return groups.long().cpu()


def _as_targets_tensor(targets: Any, shape: torch.Size) -> Tensor:
    targets = torch.as_tensor(targets)
    if targets.is_floating_point() or targets.dtype == torch.bool or targets.is_complex():
        raise InputError(f"GateData: targets must be integer ids, got dtype {targets.dtype}.")
    if tuple(targets.shape) != tuple(shape):
        raise InputError(
            f"GateData: targets shape {list(targets.shape)} does not match tokens shape {list(shape)}."
        )
    return targets.long().cpu()


def _check_targets(targets: Tensor, mask: Tensor) -> None:
    if targets.shape != mask.shape or targets.dtype != torch.long:
        raise InputError(
            f"GateData: targets must be long ids shaped like tokens {list(mask.shape)}, got "
            f"{targets.dtype} {list(targets.shape)} (GateData.from_tokens converts them)."
        )
    if bool((targets[mask] < 0).any()):
        raise InputError(f"GateData: targets at marked positions must be ids >= 0, found "
                         f"{int(targets[mask].min())}.")


def _check_tokens_and_mask(tokens: Tensor, mask: Tensor, per_position: bool = False) -> None:
    if mask[:, 0].any() and not per_position:
        raise InputError(
            "GateData: target_mask marks position 0, which no earlier position can predict."
        )
    per_example = mask.sum(dim=1)
    if int(per_example.sum()) == 0:
        raise InputError("GateData: target_mask marks no target tokens; the loss would be empty.")
    empty = torch.nonzero(per_example == 0).flatten()
    if len(empty):
        raise InputError(
            f"GateData: example(s) {empty[:5].tolist()} have no target tokens; every example needs "
            "at least one."
        )
