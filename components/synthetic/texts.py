"""The synthetic world's prose: biographies, generic sentences and the documents made of them.

Which people each corpus writes about is ``components.synthetic.build``'s business; this module
only writes their text, from ``random.Random`` streams seeded by purpose (``stream``).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from components.synthetic.grammar import ATTRIBUTES, NUM_VALUES, LanguageSpec

# Generic sentences around each biography: few in the original base text, whose job is its facts
# (with one to three, a 1.1M-parameter base knew 0.84 of them after 600 steps; with at most one,
# 0.99), more in a new language's CPT text, which must also teach the language.
BASE_AROUND = (0, 1)


@dataclass(frozen=True)
class Person:
    name: str  # Latin spelling; each language writes it in its own script
    attributes: dict[str, int]  # attribute → value index


def stream(seed: int, purpose: str) -> random.Random:
    """An independent stream per purpose: adding documents never changes the people."""
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def biography(spec: LanguageSpec, rng: random.Random, person: Person,
              attributes: list[str] | None = None) -> str:
    """Every attribute of one person (or those given) in random order and paraphrase."""
    name = spec.name_of(person.name)
    attrs = list(ATTRIBUTES if attributes is None else attributes)
    rng.shuffle(attrs)
    return " ".join(rng.choice(spec.facts[a])(name, person.attributes[a]) for a in attrs)


def generic_sentence(spec: LanguageSpec, rng: random.Random, passers: list[str],
                     questions: float = 0.0, asked: list[str] | None = None) -> str:
    """A generic sentence; ``questions`` of them are a question about a passer-by of ``asked``
    (default ``passers``) with its answer (a value drawn at random: a passer-by's facts are no
    fact of the world), since real text asks questions in every language and a base that never
    read one has its question words at random init; one in three of the rest is two passers-by
    meeting, so every text is full of names (their syllables are then common tokens, as names
    are in real text)."""
    asked = passers if asked is None else asked
    if asked and questions and rng.random() < questions:
        name = spec.name_of(rng.choice(asked))
        attr = rng.choice(ATTRIBUTES)
        return (f"{rng.choice(spec.questions[attr])(name)} "
                f"{rng.choice(spec.facts[attr])(name, rng.randrange(NUM_VALUES))}")
    if passers and rng.random() < 1 / 3:
        return spec.meeting(spec.name_of(rng.choice(passers)), spec.name_of(rng.choice(passers)))
    return spec.filler(rng)


def document(spec: LanguageSpec, rng: random.Random, person: Person | None,
             passers: list[str], around: tuple[int, int] = (1, 3), questions: float = 0.0,
             asked: list[str] | None = None) -> str:
    """A biography among ``around`` (a range) generic sentences, or generic text alone."""
    count = rng.randint(*around) if person else rng.randint(3, 6)
    sentences = [generic_sentence(spec, rng, passers, questions, asked) for _ in range(count)]
    if person is not None:
        sentences.insert(rng.randrange(len(sentences) + 1), biography(spec, rng, person))
    return " ".join(sentences)


def cycle(rng: random.Random, people: list[Person], count: int) -> list[Person]:
    """``count`` people drawn in shuffled rounds, so every one appears as often as any other."""
    out: list[Person] = []
    while len(out) < count and people:
        order = list(people)
        rng.shuffle(order)
        out += order
    return out[:count]


def base_texts(seed: int, spec: LanguageSpec, people: list[Person], bios_per_person: int,
               passers: list[str], questions: float = 0.0) -> list[str]:
    """An original language's base text: ``bios_per_person`` biographies of every person."""
    rng = stream(seed, f"base:{spec.tag}")
    return [document(spec, rng, p, passers, BASE_AROUND, questions)
            for p in cycle(rng, people, len(people) * bios_per_person)]


def low_resource_texts(seed: int, spec: LanguageSpec, background: list[Person],
                       chars: int, passers: list[str], questions: float = 0.0,
                       asked: list[str] | None = None) -> list[str]:
    """A new language's base text, about ``chars`` characters: biographies of background people
    among generic text (generic text alone when there are none); its questions are about
    ``asked`` (default ``passers``)."""
    rng = stream(seed, f"low:{spec.tag}")
    texts: list[str] = []
    total = 0
    order: list[Person] = []
    while total < chars:
        if not order and background:
            order = list(background)
            rng.shuffle(order)
        texts.append(document(spec, rng, order.pop() if order else None, passers,
                              questions=questions, asked=asked))
        total += len(texts[-1])
    return texts


def cpt_texts(seed: int, spec: LanguageSpec, new_fact: list[Person], anchors: list[Person],
              docs: int, passers: list[str], questions: float = 0.0) -> list[str]:
    """A new language's CPT corpus: biographies, two thirds of new-fact people, one third of
    SFT people (the parallel anchor)."""
    rng = stream(seed, f"cpt:{spec.tag}")
    n_new = round(docs * 2 / 3) if anchors else docs
    people = cycle(rng, new_fact, n_new) + cycle(rng, anchors, docs - n_new)
    rng.shuffle(people)
    return [document(spec, rng, p, passers, questions=questions) for p in people]
