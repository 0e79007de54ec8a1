"""From text examples to GateData: a prompt and its answer, and a counterfactual twin of the same length.

Every text task makes a list of ``TextExample`` and hands it to ``examples_to_data``, so tokenization,
the same-length check of the twins and the ``meta`` layout live in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chg_tlens.core.data import GateData
from chg_tlens.errors import InputError
from chg_tlens.models import adapter
from chg_tlens.models.protocol import TransformerLensModel


@dataclass(frozen=True)
class TextExample:
    """One item: the loss counts ``answer`` after ``prompt``.

    ``corrupt_prompt``/``corrupt_answer`` are the counterfactual: the same template with the token(s)
    that carry the answer changed, so the answer changes too. ``distractor`` is the wrong answer the
    task sets up (IOI's subject, the other verb number), kept in ``meta`` for logit-difference metrics.
    ``group`` is the template the prompt was built from (None: the task has no templates), kept as
    ``GateData.groups`` so mean ablation can average over prompts of the same template.
    """

    prompt: str
    answer: str
    corrupt_prompt: str | None = None
    corrupt_answer: str | None = None
    distractor: str | None = None
    group: int | None = None


def examples_to_data(
    model: TransformerLensModel, task: str, examples: Sequence[TextExample], seed: int, options: dict[str,
    Any],
    corruption: str | None = None, extra_meta: dict[str, Any] | None = None,
) -> GateData:
    """Tokenize the examples (prompt and answer separately) and attach the corrupt twin if there is one.

    The twin must match the clean data token for token in length, so activation patching can swap
    activations position by position; an example where it does not is an error naming it. The
    examples' groups become ``GateData.groups`` when they have them (all or none must).
    """
    meta = {**task_meta(task, seed, options, examples), **(extra_meta or {})}
    clean = GateData.from_pairs(model, [e.prompt for e in examples], [e.answer for e in examples],
                                meta=meta).with_groups(_groups(task, examples))
    if corruption is None or examples[0].corrupt_prompt is None:
        return clean
    corrupt = GateData.from_pairs(
        model,
        [str(e.corrupt_prompt) for e in examples],
        [str(e.corrupt_answer) for e in examples],
        meta={"task": task, "twin": "corrupt", "corruption": corruption,
              "prompts": [e.corrupt_prompt for e in examples],
              "answers": [e.corrupt_answer for e in examples]},
    )
    require_same_layout(task, clean, corrupt, examples)
    return clean.with_corrupt(corrupt)


def _groups(task: str, examples: Sequence[TextExample]) -> list[int] | None:
    """Each example's group, or None when the task has none; a task that groups some examples only is
    a bug in the task, named here."""
    groups = [e.group for e in examples]
    if all(group is None for group in groups):
        return None
    if any(group is None for group in groups):
        raise InputError(f"{task}: example {groups.index(None)} has no group but others do; every "
                         "example needs the template it was built from, or none does.")
    return [int(group) for group in groups if group is not None]


def task_meta(task: str, seed: int, options: dict[str, Any], examples: Sequence[TextExample]
              ) -> dict[str, Any]:
    """What a reader of a result needs about the data: task, seed, options, prompts and answers."""
    meta: dict[str, Any] = {
        "task": task,
        "seed": seed,
        "options": dict(options),
        "prompts": [e.prompt for e in examples],
        "answers": [e.answer for e in examples],
    }
    if any(e.distractor is not None for e in examples):
        meta["distractors"] = [e.distractor for e in examples]
    return meta


def require_same_layout(task: str, clean: GateData, corrupt: GateData, examples: Sequence[Any]) -> None:
    """The twin has the clean data's lengths and target positions, example by example."""
    differs = (clean.lengths != corrupt.lengths).nonzero().flatten().tolist()
    if not differs and clean.tokens.shape == corrupt.tokens.shape:
        differs = (clean.target_mask != corrupt.target_mask).any(dim=1).nonzero().flatten().tolist()
    if differs:
        i = differs[0]
        raise InputError(
            f"{task}: the corrupt twin of example {i} does not have the clean example's token layout "
            f"({int(clean.lengths[i])} vs {int(corrupt.lengths[i])} tokens) for this tokenizer: "
            f"{examples[i]!r}. Pass words that are single tokens for the model."
        )


def require_count(task: str, name: str, value: Any, minimum: int = 1) -> int:
    """An integer option of at least ``minimum``, or an error naming the option."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InputError(f"{task}: {name} must be an integer >= {minimum}, got {value!r}.")
    return value


def require_choice(task: str, name: str, value: Any, choices: Sequence[str]) -> str:
    """One of ``choices``, or an error listing them."""
    if value not in choices:
        raise InputError(f"{task}: {name} must be one of {list(choices)}, got {value!r}.")
    return value


def require_tokenizer(model: TransformerLensModel, task: str) -> None:
    """Text tasks need the model's tokenizer; say so before doing anything else."""
    adapter.require_model(model)
    adapter.tokenizer_of(model, f"The {task!r} task (it builds prompts from words)")
