"""Function tasks (singular -> plural, antonym, country -> capital), posed two ways with one answer.

    in_context:   "cat -> cats\\ndog -> dogs\\nhouse ->"                      -> " houses"
    instruction:  "Give the plural of the word.\\nWord: house\\nPlural:"   -> " houses"

The instruction view names the function in its answer label too: with a bare "house ->" after the
instruction, SmolLM2-135M mostly copies the word (plural 3%, capital 0% top-1), with the label it
answers (50%, 83%).

``function_views`` returns both views of the same items in the same order, the matched pair that
contrastive CHG needs (retain one view, forget the other). Items are split into train and test by a
hash of the query word, so a held-out query never appears in another split, whatever the seed;
``contrastive_splits`` gives a fit's training data and its held-out data from the two splits.

``corrupt="shuffled_labels"`` attaches to the in-context view the twin that function-vector patching
(Todd et al., 2024) runs on: the same demonstrations and query, the demonstration labels permuted so no
input keeps its own label, and the same answer. Only the input -> label mapping is broken.

    clean:    "cat -> cats\ndog -> dogs\nhouse ->"   -> " houses"
    shuffled: "cat -> dogs\ndog -> cats\nhouse ->"   -> " houses"
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import NamedTuple

from chg_tlens.core.data import GateData
from chg_tlens.errors import InputError
from chg_tlens.models.protocol import TransformerLensModel
from chg_tlens.tasks.examples import (
    TextExample,
    examples_to_data,
    require_choice,
    require_count,
    require_tokenizer,
)
from chg_tlens.tasks.words import ANTONYMS, CAPITALS, NOUNS


@dataclass(frozen=True)
class FunctionSpec:
    """A function's items and how the instruction view poses it."""

    pairs: list[tuple[str, str]]
    """(input, output) pairs, words with their leading space."""
    instruction: str
    input_label: str
    output_label: str

    def instruction_prompt(self, word: str) -> str:
        """The instruction, then the query under its input label, ending at the answer label."""
        return f"{self.instruction}\n{self.input_label}: {word.strip()}\n{self.output_label}:"


FUNCTIONS: dict[str, FunctionSpec] = {
    "plural": FunctionSpec(NOUNS, "Give the plural of the word.", "Word", "Plural"),
    "antonym": FunctionSpec(ANTONYMS, "Give the opposite of the word.", "Word", "Opposite"),
    "capital": FunctionSpec(CAPITALS, "Give the capital city of the country.", "Country", "Capital"),
}

VIEWS = ("in_context", "instruction")
SPLITS = ("train", "test", "all")
CORRUPTIONS = ("shuffled_labels",)
"""Twins of the in-context view: ``shuffled_labels`` permutes the demonstration labels (a derangement)."""
SHUFFLE_TRIES = 1000
"""Permutations drawn per prompt before giving up on one that moves every label (labels may repeat)."""


class FunctionViews(NamedTuple):
    """The same items posed with in-context examples and with an instruction (same answers, same order)."""

    in_context: GateData
    instruction: GateData

    def contrastive(self, retain: str = "in_context") -> GateData:
        """The ``retain`` view with the other attached as its matched ``forget`` twin."""
        require_choice("FunctionViews.contrastive", "retain", retain, VIEWS)
        kept, dropped = (self.in_context, self.instruction) if retain == "in_context" \
            else (self.instruction, self.in_context)
        return GateData.contrastive(retain=kept, forget=dropped)


def function_views(model: TransformerLensModel, n: int = 64, seed: int = 0, *, function: str = "plural",
                   n_shots: int = 5,
                   split: str = "train", test_fraction: float = 0.3,
                   corrupt: str | None = None) -> FunctionViews:
    """Both views of ``n`` items of ``function``: matched pairs for contrastive CHG.

    Queries come from ``split`` (``train``/``test``: items whose query-word hash falls in or out of the
    held-out ``test_fraction``; ``all``: every item). In-context examples always come from the train
    items, never the query itself. ``corrupt="shuffled_labels"`` gives the in-context view its
    shuffled-label twin (``.corrupt``); the items themselves are the same with or without it.
    """
    task = "function"
    require_tokenizer(model, task)
    require_count(task, "n", n)
    require_count(task, "seed", seed, 0)
    require_count(task, "n_shots", n_shots, 1)
    require_choice(task, "function", function, list(FUNCTIONS))
    require_choice(task, "split", split, SPLITS)
    if corrupt is not None:
        require_choice(task, "corrupt", corrupt, CORRUPTIONS)
        if n_shots < 2:
            raise InputError(f"{task}: corrupt='shuffled_labels' needs n_shots >= 2 to permute labels, "
                             f"got n_shots={n_shots}.")
    if not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise InputError(f"{task}: test_fraction must lie strictly between 0 and 1, got {test_fraction!r}.")
    spec = FUNCTIONS[function]
    pairs = spec.pairs
    train = [p for p in pairs if not is_held_out(p[0], test_fraction)]
    queries = {"train": train, "test": [p for p in pairs if is_held_out(p[0], test_fraction)],
               "all": list(pairs)}[split]
    if len(train) < n_shots + 1:
        raise InputError(
            f"{task}: n_shots={n_shots} needs at least {n_shots + 1} train items, "
            f"'{function}' has {len(train)}."
        )
    rng = random.Random(seed)
    shuffle_rng = random.Random(f"shuffled_labels/{seed}")  # its own stream: the items do not change
    in_context, posed = [], []
    for _ in range(n):
        query, answer = rng.choice(queries)
        shots = rng.sample([p for p in train if p[0] != query], n_shots)
        twin = None
        if corrupt is not None:
            twin = in_context_prompt(shuffled_labels(shots, shuffle_rng), query)
        in_context.append(TextExample(in_context_prompt(shots, query), answer, twin,
                                      None if twin is None else answer))
        posed.append(TextExample(spec.instruction_prompt(query), answer))
    options = {"function": function, "n_shots": n_shots, "split": split, "test_fraction": test_fraction}
    return FunctionViews(
        in_context=examples_to_data(model, task, in_context, seed, {**options, "view": "in_context"},
                                    corruption=corrupt),
        instruction=examples_to_data(model, task, posed, seed, {**options, "view": "instruction"}),
    )


def contrastive_splits(model: TransformerLensModel, function: str = "plural", retain: str = "in_context",
                       n: int = 64,
                       n_eval: int = 32, seed: int = 0) -> tuple[GateData, GateData]:
    """Training and held-out contrastive data for ``function``: the ``retain`` view (``in_context`` or
    ``instruction``) with the other attached as its forget twin.

    The held-out items are drawn from the test split with ``seed + 1``, so accuracies after gating are
    read on queries the fit never saw.
    """
    train = function_views(model, n=n, seed=seed, function=function, split="train")
    held_out = function_views(model, n=n_eval, seed=seed + 1, function=function, split="test")
    return train.contrastive(retain), held_out.contrastive(retain)


def in_context_prompt(shots: list[tuple[str, str]], query: str) -> str:
    """One demonstration per line, ``input -> label``, then the query waiting for its label."""
    lines = [f"{x.strip()} ->{y}" for x, y in shots]
    return "\n".join([*lines, f"{query.strip()} ->"])


def shuffled_labels(shots: list[tuple[str, str]], rng: random.Random) -> list[tuple[str, str]]:
    """The same inputs with their labels permuted so that no input keeps a label equal to its own."""
    labels = [y for _, y in shots]
    for _ in range(SHUFFLE_TRIES):
        order = rng.sample(range(len(shots)), len(shots))
        if all(labels[j] != labels[i] for i, j in enumerate(order)):
            return [(x, labels[j]) for (x, _), j in zip(shots, order, strict=True)]
    raise InputError(
        f"function: no permutation of the labels {labels} moves every label off its input (too many "
        "repeated labels); use more shots (n_shots) or another function."
    )


def function(
    model: TransformerLensModel,
    n: int = 64,
    seed: int = 0,
    *,
    function: str = "plural",
    view: str = "in_context",
    n_shots: int = 5,
    split: str = "train",
    test_fraction: float = 0.3,
    corrupt: str | None = None,
) -> GateData:
    """One view (``in_context`` or ``instruction``) of a function task; see ``function_views``.

    ``corrupt="shuffled_labels"`` (in-context view only) attaches the shuffled-label twin that
    ``validate.function_vector_heads`` patches into.
    """
    require_choice("function", "view", view, VIEWS)
    if corrupt is not None and view != "in_context":
        raise InputError(f"function: corrupt={corrupt!r} shuffles demonstration labels, so it needs "
                         f"view='in_context'; the {view!r} view has no demonstrations.")
    views = function_views(model, n, seed, function=function, n_shots=n_shots, split=split,
                           test_fraction=test_fraction, corrupt=corrupt)
    return getattr(views, view)


def is_held_out(word: str, test_fraction: float) -> bool:
    """Whether ``word``'s item is in the test split: a stable hash, independent of seed and tokenizer."""
    return zlib.crc32(word.strip().lower().encode()) % 10_000 < test_fraction * 10_000
