"""Deterministic synthetic demo data: a small world of fictional people and towns.

The world exists so the pipeline can be exercised end to end without downloading
anything.  Each person has five facts (town, job, pet, favourite colour, birth
year).  The facts are rendered

* as varied English prose (``corpus/train.txt``) for pretraining a tiny causal LM,
* as held-out prose (``corpus/valid.txt``): one new paragraph per person, drawn from
  its own random stream, so its paragraphs never appear in the training text. It
  uses the training templates on purpose: a model this small, trained on this
  little text, cannot generalise to unseen phrasings (held-out templates gave a
  perplexity in the tens of thousands for every model, which ranks nothing), while
  new compositions of known facts measure what compression takes away,
* as question/answer pairs (``qa/train.jsonl``) for finetuning, and
* as held-out questions (``qa/test.jsonl``) scored by exact match: each asks about
  a fact the model saw only in prose, using a question form it was finetuned on
  for other people.

The output must be the same bytes on every machine and Python version for a given
seed.  The standard ``random`` module does not promise that (``choice``,
``shuffle`` and ``randrange`` changed algorithms between releases), and ``hash()``
and set iteration order vary between processes, so the module carries its own tiny
PRNG written in pure integer arithmetic and never iterates over a set.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from unbottle.core.contract.errors import DataError, shorten_path

__all__ = [
    "ATTRIBUTES",
    "DEMO_FILES",
    "DemoDataConfig",
    "Person",
    "Pronoun",
    "SplitMix64",
    "Town",
    "World",
    "build_world",
    "generate_demo_data",
    "missing_data_hint",
    "write_demo_data",
]

T = TypeVar("T")

_MASK64 = 0xFFFFFFFFFFFFFFFF
_TWO64 = 1 << 64


class SplitMix64:
    """SplitMix64 generator (Steele, Lea & Flood, "Fast Splittable Pseudorandom
    Number Generators", OOPSLA 2014), as in the public-domain reference
    ``splitmix64.c`` by Sebastiano Vigna.

    Chosen because it is a few lines of integer arithmetic whose output is fixed
    by the algorithm, not by the Python version running it.
    """

    def __init__(self, seed: int) -> None:
        self._state = seed & _MASK64

    @classmethod
    def for_stream(cls, seed: int, label: str) -> SplitMix64:
        """Independent generator for one part of the data.

        Separate streams keep parts decoupled: changing ``renderings`` must not
        change who the people are or which facts are held out.
        """
        digest = hashlib.sha256(f"unbottle.data/{seed}/{label}".encode()).digest()
        return cls(int.from_bytes(digest[:8], "big"))

    def next_u64(self) -> int:
        self._state = (self._state + 0x9E3779B97F4A7C15) & _MASK64
        z = self._state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def randbelow(self, n: int) -> int:
        """Uniform integer in ``[0, n)``."""
        if not 1 <= n <= _TWO64:
            raise ValueError(f"randbelow: n must be in [1, 2**64], got {n}")
        # Rejecting the top partial block of 2**64 removes modulo bias.
        limit = _TWO64 - (_TWO64 % n)
        while True:
            x = self.next_u64()
            if x < limit:
                return x % n

    def choice(self, seq: Sequence[T]) -> T:
        if not seq:
            raise IndexError("choice from an empty sequence")
        return seq[self.randbelow(len(seq))]

    def shuffle(self, items: list[T]) -> None:
        """Shuffle ``items`` in place (Fisher-Yates)."""
        for i in range(len(items) - 1, 0, -1):
            j = self.randbelow(i + 1)
            items[i], items[j] = items[j], items[i]

    def sample(self, seq: Sequence[T], k: int) -> list[T]:
        """``k`` distinct elements of ``seq`` in random order."""
        pool = list(seq)
        if not 0 <= k <= len(pool):
            raise ValueError(f"sample: k must be in [0, {len(pool)}], got {k}")
        for i in range(k):
            j = i + self.randbelow(len(pool) - i)
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:k]


# --------------------------------------------------------------------------
# Configuration

_MIN_PEOPLE = 4
_MAX_PEOPLE = 5000


@dataclass(frozen=True)
class DemoDataConfig:
    seed: int = 0
    people: int = 48
    renderings: int = 3
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        # Validating here means an invalid config can never reach the generator.
        _require_int("seed", self.seed)
        _require_int("people", self.people)
        if not _MIN_PEOPLE <= self.people <= _MAX_PEOPLE:
            raise ValueError(
                f"data.demo.people: {self.people!r} is out of range [{_MIN_PEOPLE}, {_MAX_PEOPLE}]"
            )
        _require_int("renderings", self.renderings)
        if self.renderings < 1:
            raise ValueError(f"data.demo.renderings: {self.renderings!r} must be >= 1")
        fraction = self.test_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise ValueError(f"data.demo.test_fraction: {fraction!r} must be a number in (0, 1)")
        if not 0 < fraction < 1:  # also rejects NaN
            raise ValueError(f"data.demo.test_fraction: {fraction!r} is out of range (0, 1)")


def _require_int(field: str, value: object) -> None:
    # bool is an int subclass, but `people: true` in a config is a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"data.demo.{field}: {value!r} must be an integer")


# --------------------------------------------------------------------------
# Vocabulary.  Tuples, never sets, so that iteration order is fixed.

_FIRST_START = (
    "Al", "Bel", "Cor", "Dar", "El", "Fen", "Gil", "Hal", "Is", "Jor", "Kel", "Lor",
    "Mar", "Nel", "Or", "Per", "Ril", "Sel", "Tam", "Ul", "Vel", "Wen", "Yor", "Zan",
)  # fmt: skip
_FIRST_MIDDLE = ("a", "e", "i", "o", "an", "en", "ir", "ol")
_FIRST_END = (
    "a", "ia", "en", "on", "is", "el", "ric", "wyn", "dra", "mir", "ith", "as",
)  # fmt: skip
_FAMILY_START = (
    "Vant", "Brom", "Cask", "Dorr", "Ferr", "Gald", "Hask", "Kern",
    "Lend", "Mort", "Pell", "Quor", "Rask", "Stov", "Thrall", "Wend",
)  # fmt: skip
_FAMILY_MIDDLE = ("a", "e", "i", "o", "er", "el")
_FAMILY_END = ("or", "ik", "en", "ley", "mond", "ard", "ock", "ett", "ane", "ul")

_TOWN_PREFIX = (
    "Brim", "Ash", "Cold", "Dun", "Elder", "Fallow", "Gorse", "Hazel",
    "Ivy", "Kettle", "Lark", "Moss", "Nettle", "Oak", "Pine", "Rush",
)  # fmt: skip
_TOWN_SUFFIX = ("holt", "ford", "mere", "stead", "combe", "thorpe", "bury", "dale")
_TOWN_COUNT = 12

_RIVERS = (
    "Osk", "Tamber", "Vell", "Orin", "Sallow", "Brae",
    "Kest", "Mirren", "Ulle", "Yarrow", "Fenn", "Dovey",
)  # fmt: skip
_PRODUCTS = (
    "cheese", "wool", "glass", "honey", "rope", "cider",
    "salt", "lace", "pottery", "timber", "tin", "apples",
)  # fmt: skip
_LANDMARKS = (
    "clock tower", "stone bridge", "windmill", "market hall", "old abbey",
    "watermill", "town well", "chapel", "castle ruin", "bell tower",
    "covered market", "village green",
)  # fmt: skip

_JOBS = (
    "potter", "baker", "weaver", "blacksmith", "carpenter",
    "fisher", "miller", "tailor", "shepherd", "glassblower",
)  # fmt: skip
_PETS = ("cat", "dog", "goat", "parrot", "tortoise", "rabbit", "ferret", "owl")
_COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "grey", "white")
_FIRST_YEAR = 1900
_YEAR_SPAN = 100

ATTRIBUTES: tuple[str, ...] = ("town", "job", "pet", "color", "year")

_QUESTIONS = {
    "town": "Where does {name} live?",
    "job": "What does {name} do for a living?",
    "pet": "What pet does {name} have?",
    "color": "What is {name}'s favourite colour?",
    "year": "In what year was {name} born?",
}

# Template mini-language, filled by _render:
#   {subj} {obj} {possn}  the person as subject / object / possessive: either the
#                         full name ("Ilo Vantor", "Ilo Vantor's") or a pronoun
#   {poss} {pron}         always the pronoun ("her", "she"), for back-references
#   [lives|live]          verb form for a singular | plural ("they") subject
#   {town} {job} {a_job} {pet} {a_pet} {color} {year}   the person's facts
#   {river} {product} {landmark} {a_landmark}           facts about their town
# The first character of a rendered sentence is upper-cased.
_TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "town": (
        "{subj} [lives|live] in {town}.",
        "{subj} [makes|make] {poss} home in {town}.",
        "{possn} house stands in {town}.",
        "{subj} [has|have] lived in {town} for many years.",
        "{subj} [is|are] a resident of {town}.",
    ),
    "job": (
        "{subj} [works|work] as {a_job}.",
        "By trade, {subj} [is|are] {a_job}.",
        "{subj} [earns|earn] {poss} living as {a_job}.",
        "{possn} trade is that of {a_job}.",
        "{subj} [is|are] {a_job} by profession.",
    ),
    "pet": (
        "{subj} [keeps|keep] {a_pet} as a pet.",
        "{subj} [has|have] a pet {pet}.",
        "{possn} pet is {a_pet}.",
        "{subj} [owns|own] {a_pet}.",
        "At home, {subj} [looks|look] after {a_pet}.",
    ),
    "color": (
        "{possn} favourite colour is {color}.",
        "{subj} [likes|like] {color} more than any other colour.",
        "{subj} [loves|love] the colour {color}.",
        "Of all colours, {subj} [prefers|prefer] {color}.",
        "{subj} [wears|wear] {color} whenever {pron} can.",
    ),
    "year": (
        "{subj} [was|were] born in {year}.",
        "{possn} birth year is {year}.",
        "{subj} came into the world in {year}.",
        "In {year}, {subj} [was|were] born.",
        "{subj} [was|were] born in the year {year}.",
    ),
}
_TRAIN_FILLERS = (
    "{town} lies on the river {river}.",
    "{town} is known for its {product}.",
    "There is {a_landmark} in {town}.",
    "Visitors to {town} often admire the {landmark}.",
)
# Everyday sentences tying the person to their town.  They follow from the facts
# (so never contradict across renderings) but are not asked about.
_TRAIN_LOCAL = (
    "{subj} often [walks|walk] past the {landmark}.",
    "On Sundays, {subj} [strolls|stroll] along the river {river}.",
    "{subj} [buys|buy] {product} at the market in {town}.",
    "Most mornings, {subj} [crosses|cross] {town} on foot.",
)
_VERB_FORMS = re.compile(r"\[([^|\]]+)\|([^\]]+)\]")

# A full name is mentioned at least once per paragraph; later sentences use it
# with this probability (out of 3) and a pronoun otherwise.  Mostly names keeps
# the facts learnable for a tiny model; some pronouns keep the prose natural.
_NAME_MENTION_IN_3 = 2


# --------------------------------------------------------------------------
# World


@dataclass(frozen=True)
class Pronoun:
    subj: str
    obj: str
    poss: str
    plural: bool


_PRONOUNS = (
    Pronoun("they", "them", "their", plural=True),
    Pronoun("he", "him", "his", plural=False),
    Pronoun("she", "her", "her", plural=False),
)


@dataclass(frozen=True)
class Town:
    name: str
    river: str
    product: str
    landmark: str


@dataclass(frozen=True)
class Person:
    name: str
    pronoun: Pronoun
    town: str
    job: str
    pet: str
    color: str
    year: int

    def answer(self, attribute: str) -> str:
        """The fact as it is written in prose and expected from the model."""
        return str(getattr(self, attribute))


@dataclass(frozen=True)
class World:
    towns: tuple[Town, ...]
    people: tuple[Person, ...]


def build_world(config: DemoDataConfig) -> World:
    """The towns and people for ``config``.

    People are drawn one at a time from a single stream, so the first ``n`` people
    are the same for every ``config.people >= n`` with the same seed.
    """
    towns = _build_towns(SplitMix64.for_stream(config.seed, "towns"))
    reserved = {t.name.lower() for t in towns} | {r.lower() for r in _RIVERS}
    for words in (_PRODUCTS, _JOBS, _PETS, _COLORS):
        reserved.update(words)

    rng = SplitMix64.for_stream(config.seed, "people")
    taken: set[str] = set()  # membership tests only; never iterated
    people: list[Person] = []
    for _ in range(config.people):
        name = _draw_unique_name(rng, taken, reserved)
        taken.add(name)
        people.append(
            Person(
                name=name,
                pronoun=rng.choice(_PRONOUNS),
                town=rng.choice(towns).name,
                job=rng.choice(_JOBS),
                pet=rng.choice(_PETS),
                color=rng.choice(_COLORS),
                year=_FIRST_YEAR + rng.randbelow(_YEAR_SPAN),
            )
        )
    return World(towns=towns, people=tuple(people))


def _build_towns(rng: SplitMix64) -> tuple[Town, ...]:
    names = [p + s for p in _TOWN_PREFIX for s in _TOWN_SUFFIX]
    names = rng.sample(names, _TOWN_COUNT)
    rivers = rng.sample(_RIVERS, _TOWN_COUNT)
    products = rng.sample(_PRODUCTS, _TOWN_COUNT)
    landmarks = rng.sample(_LANDMARKS, _TOWN_COUNT)
    return tuple(
        Town(name, river, product, landmark)
        for name, river, product, landmark in zip(names, rivers, products, landmarks, strict=True)
    )


def _syllable_word(
    rng: SplitMix64,
    starts: Sequence[str],
    middles: Sequence[str],
    ends: Sequence[str],
) -> str:
    middle = rng.choice(middles) if rng.randbelow(2) else ""
    return rng.choice(starts) + middle + rng.choice(ends)


def _draw_unique_name(rng: SplitMix64, taken: set[str], reserved: set[str]) -> str:
    # About 2.9 million first/family combinations exist, so even at 5000 people a
    # redraw is rare; the cap only turns a vocabulary mistake into an error.
    for _ in range(10_000):
        first = _syllable_word(rng, _FIRST_START, _FIRST_MIDDLE, _FIRST_END)
        family = _syllable_word(rng, _FAMILY_START, _FAMILY_MIDDLE, _FAMILY_END)
        name = f"{first} {family}"
        if name in taken or first.lower() in reserved or family.lower() in reserved:
            continue
        return name
    raise RuntimeError("could not draw a unique person name; vocabulary too small")


# --------------------------------------------------------------------------
# Rendering


def _article(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def _capitalize_first(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def _render(template: str, person: Person, town: Town, by_name: bool) -> str:
    pronoun = person.pronoun
    plural = not by_name and pronoun.plural
    text = _VERB_FORMS.sub(lambda m: m.group(2 if plural else 1), template)
    text = text.format_map(
        {
            "subj": person.name if by_name else pronoun.subj,
            "obj": person.name if by_name else pronoun.obj,
            "possn": f"{person.name}'s" if by_name else pronoun.poss,
            "poss": pronoun.poss,
            "pron": pronoun.subj,
            "town": person.town,
            "job": person.job,
            "a_job": _article(person.job),
            "pet": person.pet,
            "a_pet": _article(person.pet),
            "color": person.color,
            "year": str(person.year),
            "river": town.river,
            "product": town.product,
            "landmark": town.landmark,
            "a_landmark": _article(town.landmark),
        }
    )
    return _capitalize_first(text)


@dataclass(frozen=True)
class _Style:
    """The template set one corpus is rendered from."""

    facts: dict[str, tuple[str, ...]]
    local: tuple[str, ...]
    fillers: tuple[str, ...]


_TRAIN_STYLE = _Style(_TRAIN_TEMPLATES, _TRAIN_LOCAL, _TRAIN_FILLERS)


def _paragraph(rng: SplitMix64, person: Person, town: Town, style: _Style) -> str:
    # (template, mentions_person).  Town fillers give variety but no fact.
    parts = [(rng.choice(style.facts[a]), True) for a in ATTRIBUTES]
    parts.append((rng.choice(style.local), True))
    parts.extend((t, False) for t in rng.sample(style.fillers, 1 + rng.randbelow(2)))
    rng.shuffle(parts)

    sentences: list[str] = []
    named = False
    for template, mentions_person in parts:
        by_name = False
        if mentions_person:
            # The first mention must be the name, or a pronoun would dangle.
            by_name = not named or rng.randbelow(3) < _NAME_MENTION_IN_3
            named = True
        sentences.append(_render(template, person, town, by_name))
    return " ".join(sentences)


def _join_paragraphs(paragraphs: list[str]) -> str:
    return "\n\n".join(paragraphs) + "\n"


def _train_corpus(world: World, config: DemoDataConfig) -> str:
    rng = SplitMix64.for_stream(config.seed, "corpus/train")
    towns = {t.name: t for t in world.towns}
    paragraphs = [
        _paragraph(rng, p, towns[p.town], _TRAIN_STYLE)
        for _ in range(config.renderings)
        for p in world.people
    ]
    rng.shuffle(paragraphs)
    return _join_paragraphs(paragraphs)


def _valid_corpus(world: World, config: DemoDataConfig) -> str:
    rng = SplitMix64.for_stream(config.seed, "corpus/valid")
    towns = {t.name: t for t in world.towns}
    paragraphs = [_paragraph(rng, p, towns[p.town], _TRAIN_STYLE) for p in world.people]
    rng.shuffle(paragraphs)
    return _join_paragraphs(paragraphs)


# --------------------------------------------------------------------------
# Question answering


def _held_out_count(test_fraction: float) -> int:
    # Round half up (not banker's rounding) and keep at least one fact on each
    # side, so both files are non-empty for every allowed fraction.
    count = math.floor(test_fraction * len(ATTRIBUTES) + 0.5)
    return min(max(count, 1), len(ATTRIBUTES) - 1)


def _split_facts(
    world: World, config: DemoDataConfig
) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(train, test) lists of (person index, attribute)."""
    rng = SplitMix64.for_stream(config.seed, "qa/split")
    k = _held_out_count(config.test_fraction)
    n_attr = len(ATTRIBUTES)
    order = list(ATTRIBUTES)
    rng.shuffle(order)
    people = list(range(len(world.people)))
    rng.shuffle(people)

    # Person i (in shuffled order) holds out k consecutive attributes starting at
    # i*k.  As gcd(k, 5) == 1 the held-out attributes are balanced across people,
    # and with at least 4 people and k <= 3 every attribute stays in train.
    held_out: dict[int, list[str]] = {}
    for i, person in enumerate(people):
        held_out[person] = [order[(i * k + j) % n_attr] for j in range(k)]

    # Only k == 4 with fewer than 5 people can leave an attribute without any
    # train question; give one such fact back to train so the question form is
    # always learnable.
    for attribute in ATTRIBUTES:
        if any(attribute not in held_out[p] for p in people):
            continue
        holders = [p for p in people if attribute in held_out[p]]
        held_out[rng.choice(holders)].remove(attribute)

    train: list[tuple[int, str]] = []
    test: list[tuple[int, str]] = []
    for person in range(len(world.people)):
        for attribute in ATTRIBUTES:
            bucket = test if attribute in held_out[person] else train
            bucket.append((person, attribute))
    # Finetuning data is shuffled; the test set stays in a readable fixed order.
    rng.shuffle(train)
    return train, test


def _jsonl(world: World, facts: list[tuple[int, str]]) -> str:
    lines = []
    for index, attribute in facts:
        person = world.people[index]
        record = {
            "question": _QUESTIONS[attribute].format(name=person.name),
            "answer": person.answer(attribute),
            "person": person.name,
            "attribute": attribute,
        }
        lines.append(json.dumps(record, ensure_ascii=True, sort_keys=True))
    return "".join(line + "\n" for line in lines)


# --------------------------------------------------------------------------
# Public entry points


#: The files the demo writes, relative to its folder.
DEMO_FILES = ("corpus/train.txt", "corpus/valid.txt", "qa/train.jsonl", "qa/test.jsonl")


def generate_demo_data(config: DemoDataConfig) -> dict[str, str]:
    """Return {relative_path: text} for: 'corpus/train.txt', 'corpus/valid.txt',
    'qa/train.jsonl', 'qa/test.jsonl'. Pure function, no I/O."""
    world = build_world(config)
    qa_train, qa_test = _split_facts(world, config)
    return {
        "corpus/train.txt": _train_corpus(world, config),
        "corpus/valid.txt": _valid_corpus(world, config),
        "qa/train.jsonl": _jsonl(world, qa_train),
        "qa/test.jsonl": _jsonl(world, qa_test),
    }


def write_demo_data(out_dir: Path, config: DemoDataConfig) -> dict[str, str]:
    """Write the files under out_dir atomically and return {relative_path: sha256
    hex} of each file.

    Everything is built in a temporary sibling directory which then replaces
    ``out_dir``, so readers never see a half-written data set.  Text files are
    UTF-8 with '\\n' newlines and end with a newline.  A folder holding anything but the
    demo's own files is refused: replacing it would delete a user's data.
    """
    out_dir = Path(out_dir)
    _refuse_a_users_folder(out_dir)
    files = generate_demo_data(config)
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    tmp_dir = parent / f".{out_dir.name}.tmp-{pid}"
    old_dir = parent / f".{out_dir.name}.old-{pid}"
    # Leftovers can only come from an earlier crashed run that had our pid.
    _remove(tmp_dir)
    _remove(old_dir)

    hashes: dict[str, str] = {}
    try:
        for relative, text in files.items():
            data = text.encode("utf-8")
            path = tmp_dir / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            # Binary mode: no platform newline translation.
            with open(path, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            hashes[relative] = hashlib.sha256(data).hexdigest()

        had_old = out_dir.exists() or out_dir.is_symlink()
        if had_old:
            out_dir.rename(old_dir)
        try:
            tmp_dir.rename(out_dir)
        except BaseException:
            if had_old:
                old_dir.rename(out_dir)
            raise
    except BaseException:
        _remove(tmp_dir)
        raise
    _remove(old_dir)
    return hashes


def _refuse_a_users_folder(out_dir: Path) -> None:
    if out_dir.is_file():
        raise DataError(
            f"{shorten_path(out_dir)} is a file, not a folder; write the demo into a folder"
        )
    if not out_dir.is_dir():
        return
    theirs = sorted(
        path.relative_to(out_dir).as_posix()
        for path in out_dir.rglob("*")
        if not path.is_dir() and path.relative_to(out_dir).as_posix() not in DEMO_FILES
    )
    if theirs:
        named = ", ".join(theirs[:3]) + (f" and {len(theirs) - 3} more" if len(theirs) > 3 else "")
        raise DataError(
            f"{shorten_path(out_dir)} holds files the demo does not write ({named}); the demo "
            "replaces the whole folder: move them, or write the demo into another folder"
        )


def missing_data_hint(path: Path) -> str:
    """What the line saying a data file does not exist adds: the demo command where the
    path is one the demo writes; otherwise the name beside it the user may have meant."""
    path = Path(path)
    if any(f"/{path.as_posix()}".endswith(f"/{name}") for name in DEMO_FILES):
        return " (run `unbottle data demo` or fix params)"
    try:
        beside = [entry.name for entry in path.parent.iterdir()]
    except OSError:  # the folder is missing too, or unreadable: nothing to suggest
        return ""
    close = difflib.get_close_matches(path.name, beside, n=1, cutoff=0.8)
    return f" (did you mean {close[0]}?)" if close else ""


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
