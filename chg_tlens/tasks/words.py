"""Word lists of the built-in tasks, and the check that a word is one token for a model's tokenizer.

Every word is stored with the leading space it has inside a sentence (" Mary"), because that is the
form a byte-pair tokenizer sees and the one the answer token must have. Lists are written for this
package; built-in lists are filtered to the words that are single tokens for the model at hand, while a
list the user passes is checked strictly (a word that splits is an error naming the word).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from chg_tlens.errors import InputError
from chg_tlens.models import adapter
from chg_tlens.models.protocol import TransformerLensModel


def _pairs(text: str) -> list[tuple[str, str]]:
    """``"a=b; c=d"`` as ``[(" a", " b"), (" c", " d")]``: word pairs, each word with its leading space
    (a word after a space is one token in BPE vocabularies), kept compact so the lists stay readable."""
    entries = " ".join(text.split()).split(";")
    return [tuple(" " + word.strip() for word in entry.split("=")) for entry in entries if entry.strip()]


NAMES = [
    " Mary", " John", " James", " Michael", " David", " Sarah", " Anna", " Emma", " Paul", " Mark",
    " Peter", " Tom", " Jack", " Kate", " Lisa", " Laura", " Daniel", " Robert", " William", " Thomas",
    " Chris", " Alex", " Sam", " Ben", " Max", " Adam", " Eric", " Jason", " Kevin", " Brian",
    " Steve", " Jane", " Alice", " Bob", " Carol", " Linda", " Susan", " Karen", " Nancy", " Helen",
    " George", " Frank", " Henry", " Jennifer", " Jessica", " Rachel", " Emily", " Amy", " Andrew", " Matt",
    " Ryan", " Joe", " Jim", " Bill", " Richard", " Charles", " Joseph", " Edward", " Martin", " Simon",
    " Victoria", " Julia", " Grace", " Rose", " Lucy", " Sophie", " Hannah", " Oliver", " Harry", " Jacob",
    " Luke", " Anthony", " Patrick", " Scott", " Nick", " Tim", " Elizabeth", " Maria", " Diana", " Ruth",
]

PLACES = [
    " store", " park", " school", " office", " hospital", " station", " restaurant", " library",
    " market", " beach", " garden", " house", " church", " museum", " airport", " bank", " hotel",
    " kitchen", " cafe", " gym",
]

OBJECTS = [
    " drink", " book", " ring", " gift", " letter", " ball", " cake", " bottle", " key", " phone",
    " bag", " hat", " flower", " card", " coin", " pen", " cup", " ticket", " map", " box",
]

# (singular, plural) nouns for subject-verb agreement and the plural function task.
NOUNS = _pairs("""
    key=keys; dog=dogs; cat=cats; book=books; car=cars; house=houses; tree=trees; bird=birds; boy=boys;
    girl=girls; student=students; teacher=teachers; door=doors; window=windows; table=tables;
    chair=chairs; friend=friends; doctor=doctors; player=players; letter=letters; picture=pictures;
    flower=flowers; bottle=bottles; farmer=farmers; worker=workers; officer=officers; author=authors;
    song=songs; road=roads; river=rivers; star=stars; plant=plants; computer=computers; phone=phones;
    bag=bags; box=boxes; church=churches; child=children; man=men; woman=women; mouse=mice; foot=feet;
    tooth=teeth; person=people; leaf=leaves; knife=knives; wife=wives; city=cities; country=countries;
    story=stories; baby=babies; lady=ladies; party=parties; family=families; company=companies;
    horse=horses; ship=ships; game=games; room=rooms; hand=hands; eye=eyes; boat=boats; cup=cups;
    apple=apples; shoe=shoes; ring=rings; egg=eggs; pen=pens; map=maps; rock=rocks; lake=lakes;
    hill=hills; king=kings; queen=queens; village=villages; garden=gardens; animal=animals; idea=ideas;
    word=words; school=schools; card=cards; coin=coins; farm=farms; wall=walls; bed=beds; shirt=shirts;
    hat=hats; boot=boots; cloud=clouds
""")

# Nouns an attractor can be (they follow a preposition inside the subject noun phrase).
ATTRACTORS = _pairs("""
    cabinet=cabinets; table=tables; door=doors; window=windows; house=houses; tree=trees; car=cars;
    box=boxes; building=buildings; garden=gardens; road=roads; river=rivers; wall=walls;
    church=churches; school=schools; office=offices; bridge=bridges; shop=shops; hill=hills; farm=farms
""")

PREPOSITIONS = [" near", " behind", " beside", " by", " to", " of", " above", " under", " on", " in"]

# (word, antonym) pairs for the antonym function task.
ANTONYMS = _pairs("""
    hot=cold; big=small; tall=short; fast=slow; happy=sad; good=bad; up=down; left=right; open=closed;
    old=young; rich=poor; hard=soft; light=dark; strong=weak; early=late; full=empty; high=low;
    long=short; thick=thin; wet=dry; clean=dirty; true=false; easy=difficult; alive=dead;
    inside=outside; first=last; win=lose; love=hate; buy=sell; push=pull; give=take; come=go; day=night;
    black=white; north=south; east=west; top=bottom; begin=end; above=below; before=after; always=never;
    more=less; friend=enemy; war=peace; loud=quiet; deep=shallow; wide=narrow; cheap=expensive;
    safe=dangerous; sweet=sour; near=far; male=female; positive=negative; start=finish; accept=reject;
    increase=decrease; maximum=minimum; question=answer; yes=no; front=back; in=out; on=off;
    arrive=leave; sharp=dull; brave=afraid; smooth=rough; beautiful=ugly; ancient=modern; common=rare;
    public=private; simple=complex; major=minor; inner=outer; upper=lower
""")

# (country, capital) pairs for the capital function task.
CAPITALS = _pairs("""
    France=Paris; Germany=Berlin; Italy=Rome; Spain=Madrid; Russia=Moscow; Japan=Tokyo; China=Beijing;
    England=London; Egypt=Cairo; Greece=Athens; Ireland=Dublin; Austria=Vienna; Portugal=Lisbon;
    Poland=Warsaw; Norway=Oslo; Sweden=Stockholm; Denmark=Copenhagen; Finland=Helsinki;
    Hungary=Budapest; Kenya=Nairobi; Peru=Lima; Cuba=Havana; Thailand=Bangkok; Iran=Tehran;
    Iraq=Baghdad; Syria=Damascus; Lebanon=Beirut; Turkey=Ankara; Canada=Ottawa; Australia=Canberra;
    India=New Delhi; Belgium=Brussels; Netherlands=Amsterdam; Switzerland=Bern; Argentina=Buenos Aires;
    Chile=Santiago; Colombia=Bogota; Venezuela=Caracas; Mexico=Mexico City; Philippines=Manila;
    Indonesia=Jakarta; Vietnam=Hanoi; South Korea=Seoul; Scotland=Edinburgh; Wales=Cardiff;
    Ukraine=Kyiv; Romania=Bucharest; Serbia=Belgrade; Czech Republic=Prague; Israel=Jerusalem;
    Pakistan=Islamabad; Afghanistan=Kabul; Nepal=Kathmandu; Ethiopia=Addis Ababa; Nigeria=Abuja;
    Ghana=Accra; Morocco=Rabat; Tunisia=Tunis; Algeria=Algiers; Senegal=Dakar; Uganda=Kampala;
    Jamaica=Kingston; Bulgaria=Sofia; Croatia=Zagreb; Iceland=Reykjavik; Latvia=Riga; Lithuania=Vilnius;
    Estonia=Tallinn; Qatar=Doha; Malaysia=Kuala Lumpur
""")

# Short concrete words for the abstract-pattern (ABA / ABB) task.
PATTERN_WORDS = [
    " dog", " cat", " sun", " map", " red", " box", " tree", " car", " cup", " hat", " pen", " bed",
    " fish", " bird", " book", " door", " ball", " star", " moon", " rain", " snow", " fire", " milk",
    " bread", " rice", " salt", " gold", " iron", " rock", " sand", " lake", " hill", " road", " ship",
    " boat", " train", " bike", " desk", " lamp", " shoe", " coat", " ring", " bell", " drum", " key",
    " egg", " apple", " lemon", " rose", " leaf", " wolf", " bear", " lion", " horse", " cow", " pig",
    " frog", " duck", " blue", " green", " king", " queen", " song", " game", " time", " room", " wall",
    " glass", " wood", " stone", " paper", " chair", " table", " house", " field", " river", " cloud",
    " wind", " storm", " light", " night", " day", " city", " town", " farm", " shop", " bank", " card",
]


def token_ids(model: TransformerLensModel, word: str) -> list[int]:
    """The model's token ids for ``word`` exactly as written (no BOS)."""
    return adapter.encode(model, word, prepend_bos=False)


def splits_or_unknown(model: TransformerLensModel, word: str) -> str | None:
    """Why ``word`` is not one known token for the model (None when it is)."""
    ids = token_ids(model, word)
    if len(ids) != 1:
        tokenizer = adapter.tokenizer_of(model, "Checking single-token words")
        pieces = tokenizer.convert_ids_to_tokens(ids)
        return f"{word!r} splits into {len(ids)} tokens {pieces}"
    unknown = getattr(adapter.tokenizer_of(model, "Checking single-token words"), "unk_token_id", None)
    if unknown is not None and ids[0] == unknown:
        return f"{word!r} is not in the vocabulary (it becomes the unknown token)"
    return None


def single_token_words(
    model: TransformerLensModel, words: Sequence[str], task: str, what: str, minimum: int, strict: bool
) -> list[str]:
    """The words of ``words`` that are one known token each for the model's tokenizer.

    ``strict`` (a list the user gave) makes any word that splits an error naming it; otherwise (a
    built-in list) such words are dropped, and fewer than ``minimum`` survivors is the error.
    """
    kept = _single_token_items(model, [(word,) for word in words], task, what, minimum, strict)
    return [word for (word,) in kept]


def single_token_pairs(
    model: TransformerLensModel, pairs: Sequence[tuple[str, str]], task: str, what: str, minimum: int,
    strict: bool
) -> list[tuple[str, str]]:
    """The pairs whose two words are each one known token (same rules as ``single_token_words``)."""
    return _single_token_items(model, pairs, task, what, minimum, strict)


def _single_token_items(
    model: TransformerLensModel, items: Sequence[tuple[str, ...]], task: str, what: str, minimum: int,
    strict: bool
) -> list[Any]:
    items = list(dict.fromkeys(tuple(item) for item in items))
    problems = {word: splits_or_unknown(model, word) for item in items for word in item}
    bad = [reason for reason in problems.values() if reason is not None]
    if strict and bad:
        raise InputError(
            f"{task}: each word of every {what} must be a single token for this model's tokenizer, but "
            f"{'; '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}."
        )
    kept = [item for item in items if all(problems[word] is None for word in item)]
    if len(kept) < minimum:
        raise InputError(
            f"{task}: needs at least {minimum} {what}s made of single tokens for this model's "
            f"tokenizer, found {len(kept)} of {len(items)}; for example {'; '.join(bad[:3])}. "
            f"Pass your own {what}s."
        )
    return kept
