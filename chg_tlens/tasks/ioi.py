"""Indirect object identification (IOI).

    "When Mary and John went to the store, John gave a drink to" -> " Mary"

Two names are introduced, one of them (the subject) is repeated, and the answer is the other one (the
indirect object). Both name orders (IO first, subject first) occur, so position alone never gives the
answer away.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

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
from chg_tlens.tasks.words import NAMES, OBJECTS, PLACES, single_token_words

TEMPLATES = (
    "When {first} and {second} went to the {place}, {subject} gave a {object} to",
    "After {first} and {second} went to the {place}, {subject} gave a {object} to",
    "While {first} and {second} were working at the {place}, {subject} gave a {object} to",
    "Then, {first} and {second} went to the {place}. {subject} gave a {object} to",
    "When {first} and {second} got a {object} at the {place}, {subject} decided to give it to",
    "Friends {first} and {second} found a {object} at the {place}. {subject} gave it to",
    "The {place} was busy when {first} and {second} arrived. {subject} handed a {object} to",
    "After lunch, {first} and {second} went to the {place}, and {subject} gave a {object} to",
)

CORRUPTIONS = ("swap_subject", "third_name")
"""``swap_subject``: the repeated name becomes the IO, so the answer is the old subject.
``third_name``: the IO is replaced by a name not in the prompt, so the answer is that name."""


def ioi(
    model: TransformerLensModel,
    n: int = 64,
    seed: int = 0,
    *,
    corrupt: str = "swap_subject",
    names: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
) -> GateData:
    """IOI prompts whose target is the indirect object's name (one token), with a counterfactual twin.

    ``names`` (with their leading space, e.g. " Mary") must each be one token; the built-in list is
    filtered to the names that are. ``templates`` use the fields {first} {second} {subject} {place}
    {object} and must end right before the answer. The data's ``groups`` are each prompt's template
    index (equal templates share one): mean ablation's reference.
    """
    task = "ioi"
    require_tokenizer(model, task)
    require_count(task, "n", n)
    require_count(task, "seed", seed, 0)
    require_choice(task, "corrupt", corrupt, CORRUPTIONS)
    pool = single_token_words(model, NAMES if names is None else names, task, "name",
                              minimum=3, strict=names is not None)
    templates = _checked_templates(templates)
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        io, subject, third = rng.sample(pool, 3)
        template = rng.choice(templates)
        place, thing = rng.choice(PLACES).strip(), rng.choice(OBJECTS).strip()
        io_first = rng.random() < 0.5
        scene = (template, io_first, place, thing)
        if corrupt == "swap_subject":
            corrupt_prompt, corrupt_answer = _prompt(scene, io, subject, repeated=io), subject
        else:
            corrupt_prompt, corrupt_answer = _prompt(scene, third, subject, repeated=subject), third
        examples.append(TextExample(_prompt(scene, io, subject, repeated=subject), io,
                                    corrupt_prompt, corrupt_answer, distractor=subject,
                                    group=templates.index(template)))
    options = {"corrupt": corrupt, "n_names": len(pool), "n_templates": len(templates)}
    return examples_to_data(model, task, examples, seed, options, corruption=corrupt)


def _prompt(scene: tuple[str, bool, str, str], io: str, subject: str, repeated: str) -> str:
    """Fill a template: the two names in the scene's order, then the repeated name."""
    template, io_first, place, thing = scene
    first, second = (io, subject) if io_first else (subject, io)
    return template.format(first=first.strip(), second=second.strip(), subject=repeated.strip(),
                           place=place, object=thing)


def _checked_templates(templates: Sequence[str] | None) -> tuple[str, ...]:
    if templates is None:
        return TEMPLATES
    templates = tuple(templates)
    fields = ("{first}", "{second}", "{subject}")
    for template in templates:
        missing = [f for f in fields if f not in template]
        if missing:
            raise InputError(f"ioi: templates must contain {list(fields)}; {template!r} lacks {missing}.")
    if not templates:
        raise InputError("ioi: templates is empty; give at least one template or leave it as None.")
    return templates
