"""Generate the synthetic multilingual world, deterministically from a seed.

Invented people with five attributes each (city, job, favourite colour, pet, food) are described
in short biographies (one person, every attribute, paraphrased templates, a little generic text).
Who is written about where is what makes the paper's abilities separable:

- **SFT people**: in every original language's base text (and, as a parallel anchor, in the new
  languages' CPT text); post-training asks about them (closed book) in the original languages;
- **original-fact people**: only in the original languages' base text; ``synthetic_closed_original``
  asks about them in *every* language (knowledge reached through a new language);
- **new-fact people**, per new language: only in that language's CPT corpus;
  ``synthetic_closed_new`` asks about them there (needs CPT knowledge and the answer format);
- **background people**, per new language: in that language's small share of the base text
  (``new_language_share``, with generic text), never evaluated — so the base has seen the new
  languages a little, as real bases have, without knowing any evaluated fact (the names of the
  people its CPT text is about pass by there too, without their facts);
- **open-book people**: in no corpus; their biography is the question's context
  (``synthetic_openbook``: knowledge-free instruction following, copy the answer).

Corpora: ``corpora/base/fineweb2`` is the base's pre-training text (every language);
``corpora/fineweb2`` and ``corpora/culturax`` are the CPT corpora (new languages: their CPT
text; original languages: a replay slice of their base text), with planted duplicates and junk
for the data stage's filters. The tokenizer is trained on the base text only, as a real base's
tokenizer is, with the languages re-weighted as multilingual tokenizers are (``tokenizer_alpha``),
so every language's answer words are single tokens. Post-training's rows replay some of the
base text (``post_replay``), so the post-trained model keeps the base's language modelling.
Generic text in every language asks questions about passers-by and answers them
(``question_share``), so no language's question words are unseen ids.
Every random choice draws from ``random.Random`` streams seeded from the world seed and a purpose
name, and nothing reads the clock: the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from components.synthetic.corpora import junk_document, write_corpora
from components.synthetic.coverage import id_counts, seen_coverage
from components.synthetic.grammar import ATTRIBUTES, LANGUAGES, NUM_VALUES, LanguageSpec
from components.synthetic.hf import build_tiny_model, render_chat, train_tokenizer
from components.synthetic.texts import (
    Person,
    base_texts,
    biography,
    cpt_texts,
    document,
    low_resource_texts,
    stream,
)

GENERATOR_VERSION = 6
DEFAULT_ORIGINAL = ("eng_Latn", "deu_Latn")
DEFAULT_NEW = ("swh_Latn", "rus_Cyrl")
_SYLLABLES = ("ka", "mo", "ru", "be", "li", "ta", "no", "vi", "se", "du", "ra", "ki", "lo",
              "fe", "ma", "po", "zu", "ne", "si", "go")
_SHARE_MARGIN = 1.3  # new-language base text drafted beyond its share, then cut to it in tokens
COVERAGE_MIN_COUNT = 10
_PASSERS = 2000
NAMED_WEIGHT = 30  # how much likelier a CPT person's name is than a passer-by's in base text
TOKENIZER_MIN_FREQUENCY = 10 * COVERAGE_MIN_COUNT  # see train_tokenizer
# A text repeated k times in the tokenizer's training stream needs only 100 / k real occurrences
# for a merge, and a merged token can lose most of its occurrences to later merges. With names
# out of the repeats and the CPT text's names in the base text, 3 kept the coverage rule on seeds
# 0-2 of the reproduction's world (4, before those two, broke it for Russian on two of them) and
# already makes every answer word of every language one token.
MAX_TOKENIZER_UPSAMPLING = 3


@dataclass(frozen=True)
class Cast:
    """Who the world writes about, and where (see the module docstring)."""

    sft: list[Person]
    original_fact: list[Person]
    new_fact: dict[str, list[Person]]  # new language → its people
    background: dict[str, list[Person]]  # new language → people of its base text
    openbook_train: list[Person]
    openbook_eval: list[Person]
    passers: list[str]  # names of generic text only: never a person with a fact


@dataclass
class WorldSummary:
    """What was written, with paths relative to the world folder (it is renamed into place)."""

    seed: int
    languages: list[str]
    original: list[str]
    people: int
    sft_people: int
    eval_people: int
    new_fact_people: int
    documents: dict[str, int]
    base_documents: dict[str, int]
    base_tokens: dict[str, int]
    coverage: dict[str, float]
    planted_duplicates: dict[str, int]
    planted_junk: dict[str, int]
    instructions: dict[str, int]
    eval_items: dict[str, dict[str, int]]
    model_parameters: int
    vocab_size: int
    paths: dict[str, str] = field(default_factory=dict)


def make_people(seed: int, count: int) -> list[Person]:
    """``count`` people with distinct names (two to four syllables) and random attributes."""
    rng = stream(seed, "people")
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3, 3, 4))))
        name = name.capitalize()
        if name not in seen:
            seen.add(name)
            names.append(name)
    return [Person(name, {a: rng.randrange(NUM_VALUES) for a in ATTRIBUTES}) for name in names]


def make_cast(seed: int, new: list[str], *, num_people: int, eval_people: int,
              new_fact_people: int, background_people: int, openbook_people: int,
              openbook_train_people: int | None = None) -> Cast:
    """Disjoint groups from one pool of distinct names. ``num_people`` are the people of the
    original base text: ``eval_people`` of them (at most half) are original-fact people, the rest
    SFT people."""
    n_eval = max(1, min(eval_people, num_people // 2))
    n_train = openbook_people if openbook_train_people is None else openbook_train_people
    sizes = [num_people, new_fact_people * len(new), background_people * len(new),
             n_train, openbook_people, _PASSERS]
    pool = make_people(seed, sum(sizes))
    stream(seed, "split").shuffle(pool)
    core, pool = pool[:num_people], pool[num_people:]
    new_fact: dict[str, list[Person]] = {}
    background: dict[str, list[Person]] = {}
    for tag in new:
        new_fact[tag], pool = pool[:new_fact_people], pool[new_fact_people:]
    for tag in new:
        background[tag], pool = pool[:background_people], pool[background_people:]
    return Cast(sft=core[n_eval:], original_fact=core[:n_eval], new_fact=new_fact,
                background=background, openbook_train=pool[:n_train],
                openbook_eval=pool[n_train:n_train + openbook_people],
                passers=[p.name for p in pool[n_train + openbook_people:]])


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def _answer_row(spec: LanguageSpec, person: Person, attr: str, prompt: str,
                with_answer_turn: bool, kind: str) -> dict[str, Any]:
    answer = spec.values[attr][person.attributes[attr]]
    messages = [{"role": "user", "content": prompt}]
    if with_answer_turn:
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages, "answer": answer, "attribute": attr, "person": person.name,
            "lang": spec.tag, "kind": kind, "answer_words": list(spec.values[attr]),
            "text": render_chat(messages, add_generation_prompt=not with_answer_turn)}


def closed_rows(spec: LanguageSpec, people: list[Person], rng: random.Random,
                with_answer_turn: bool, all_forms: bool = False) -> list[dict[str, Any]]:
    """Closed-book question → bare answer word, per person and attribute (every question form
    with ``all_forms``, else one drawn at random)."""
    rows = []
    for person in people:
        name = spec.name_of(person.name)
        for attr in ATTRIBUTES:
            forms = spec.questions[attr] if all_forms else (rng.choice(spec.questions[attr]),)
            rows += [_answer_row(spec, person, attr, q(name), with_answer_turn, "closed")
                     for q in forms]
    rng.shuffle(rows)
    return rows


def openbook_rows(spec: LanguageSpec, people: list[Person], rng: random.Random,
                  with_answer_turn: bool, context_facts: int = len(ATTRIBUTES)
                  ) -> list[dict[str, Any]]:
    """A short biography as context, then a question on one attribute: the answer is in the
    context (every attribute of every person; knowledge-free). The context holds the asked fact
    and ``context_facts - 1`` of the person's other facts as distractors."""
    if not 1 <= context_facts <= len(ATTRIBUTES):
        raise ValueError(f"context_facts must be in [1, {len(ATTRIBUTES)}], got {context_facts}")
    rows = []
    for person in people:
        name = spec.name_of(person.name)
        for attr in ATTRIBUTES:
            others = rng.sample([a for a in ATTRIBUTES if a != attr], context_facts - 1)
            context = biography(spec, rng, person, [attr, *others])
            question = rng.choice(spec.questions[attr])(name)
            rows.append(_answer_row(spec, person, attr, f"{context}\n{question}",
                                    with_answer_turn, "openbook"))
    rng.shuffle(rows)
    return rows


def mc_rows(spec: LanguageSpec, people: list[Person], rng: random.Random) -> list[dict[str, Any]]:
    """Cloze questions with four choices (chance 25%): every attribute of every person."""
    rows = []
    for person in people:
        name = spec.name_of(person.name)
        for attr in ATTRIBUTES:
            gold_value = person.attributes[attr]
            others = [v for v in range(NUM_VALUES) if v != gold_value]
            values = [gold_value, *rng.sample(others, 3)]
            rng.shuffle(values)
            rows.append({"query": spec.cloze[attr](name, gold_value)[0],
                         "choices": [spec.cloze[attr](name, v)[1] for v in values],
                         "gold": values.index(gold_value), "attribute": attr,
                         "answer": spec.values[attr][gold_value], "person": person.name,
                         "lang": spec.tag})
    rng.shuffle(rows)
    return rows


def tokenizer_upsampling(chars: dict[str, int], alpha: float) -> dict[str, int]:
    """How often each language's text is repeated in the tokenizer's training stream.

    Multilingual tokenizers are trained on a language mix sampled with probabilities
    proportional to ``share ** alpha`` (XLM-R and mT5 use alpha = 0.3), so that a low-resource
    language's common words become tokens of their own, as they are in the base models this
    project expands; alpha = 1 trains on the text as it is. Repetition is relative to the
    largest language, rounded and capped at :data:`MAX_TOKENIZER_UPSAMPLING`.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"tokenizer_alpha must be in (0, 1], got {alpha}")
    total = sum(chars.values())
    shares = {t: c / total for t, c in chars.items() if c > 0}
    top = max(shares.values())
    return {t: min(MAX_TOKENIZER_UPSAMPLING, max(1, round((top / shares[t]) ** (1.0 - alpha))))
            if t in shares else 1 for t in chars}


def _tokenizer_stream(base: dict[str, list[str]], repeat: dict[str, int],
                      names: set[str]) -> Iterable[str]:
    """Every base text once, then the repeats :func:`tokenizer_upsampling` asks for with the
    names taken out: names are language-neutral in this world (one name, written in each
    language's script), so re-weighting a language gives its words tokens of their own, not its
    spellings of names, which its base text holds too rarely to train (and which the names its
    CPT text is full of would be spelt with)."""
    for texts in base.values():
        yield from texts
    for tag, texts in base.items():
        if repeat[tag] > 1:
            spec = LANGUAGES[tag]
            spelt = sorted({spec.name_of(n) for n in names}, key=len, reverse=True)
            pattern = re.compile(r"\b(?:" + "|".join(map(re.escape, spelt)) + r")\b")
            stripped = [pattern.sub("", x) for x in texts] if spelt else texts
            for _ in range(repeat[tag] - 1):
                yield from stripped


def _cut_to_tokens(texts: list[str], tokenizer: Any, tokens: int) -> tuple[list[str], int]:
    """The first texts whose token count reaches ``tokens`` (at least one)."""
    total = 0
    for i, text in enumerate(texts):
        total += len(tokenizer(text)["input_ids"]) + 1  # + EOS, as the packer adds
        if total >= tokens:
            return texts[:i + 1], total
    return texts, total


def build_world(out_dir: str | Path, seed: int = 0, *, arch: str = "llama",
                num_people: int = 160, docs_per_language: int = 800, vocab_size: int = 4096,
                languages: list[str] | None = None,
                original: list[str] | tuple[str, ...] = DEFAULT_ORIGINAL,
                eval_people: int = 60, new_fact_people: int = 60,
                background_people: int = 200, bios_per_person: int = 30,
                new_language_share: float = 0.05, tokenizer_alpha: float = 0.3,
                question_share: float = 0.0,
                openbook_people: int = 60, post_replay: float = 0.0,
                openbook_train_people: int = 600, openbook_context_facts: int = 3,
                heldout_docs: int = 300,
                model_hidden_size: int = 192, model_layers: int = 4,
                model_intermediate_size: int = 512) -> WorldSummary:
    """Write the whole world into ``out_dir`` (an empty folder the caller commits atomically).

    ``original`` are the languages the base knows; every other language of ``languages`` is a
    new one, with ``new_language_share`` of the base text's tokens split evenly among them.
    """
    root = Path(out_dir)
    tags = languages or list(LANGUAGES)
    unknown = [t for t in [*tags, *original] if t not in LANGUAGES]
    if unknown:
        raise ValueError(f"the synthetic world has no language {unknown}; it has {list(LANGUAGES)}")
    missing = [t for t in original if t not in tags]
    if missing or not original:
        raise ValueError(f"original languages {list(original)} must be some of {tags}")
    if not 0.0 <= post_replay < 1.0:
        raise ValueError(f"post_replay must be in [0, 1), got {post_replay}")
    if not 0.0 <= question_share <= 1.0:
        raise ValueError(f"question_share must be in [0, 1], got {question_share}")
    if not 0.0 <= new_language_share < 1.0:
        raise ValueError(f"new_language_share must be in [0, 1), got {new_language_share}")
    specs = [LANGUAGES[t] for t in tags]
    new = [t for t in tags if t not in original]
    cast = make_cast(seed, new, num_people=num_people, eval_people=eval_people,
                     new_fact_people=new_fact_people, background_people=background_people,
                     openbook_people=openbook_people,
                     openbook_train_people=openbook_train_people)
    known = cast.sft + cast.original_fact
    summary = WorldSummary(
        seed=seed, languages=tags, original=list(original), people=len(known),
        sft_people=len(cast.sft), eval_people=len(cast.original_fact),
        new_fact_people=new_fact_people, documents={}, base_documents={}, base_tokens={},
        coverage={}, planted_duplicates={}, planted_junk={}, instructions={}, eval_items={},
        model_parameters=0, vocab_size=0)

    base = {t: base_texts(seed, LANGUAGES[t], known, bios_per_person, cast.passers,
                          question_share) for t in original}
    original_chars = sum(len(x) for texts in base.values() for x in texts)
    share_each = new_language_share / len(new) if new else 0.0
    for tag in new:
        chars = original_chars * share_each / (1.0 - new_language_share) * _SHARE_MARGIN
        # the names its CPT text writes about (not their facts) are among its passers-by, as
        # a real base has read most names in every script it knows
        named = cast.passers + [p.name for p in [*cast.new_fact[tag], *cast.sft]
                                for _ in range(NAMED_WEIGHT)]
        base[tag] = low_resource_texts(seed, LANGUAGES[tag], cast.background[tag], int(chars),
                                       named, question_share, cast.passers
                                       ) if chars > 0 else []
    repeat = tokenizer_upsampling({t: sum(len(x) for x in base[t]) for t in tags},
                                  tokenizer_alpha)
    names = set(cast.passers) | {
        p.name for group in (cast.sft, cast.original_fact, *cast.new_fact.values(),
                             *cast.background.values()) for p in group}
    tokenizer = train_tokenizer(_tokenizer_stream(base, repeat, names), root / "tokenizer",
                                vocab_size, min_frequency=TOKENIZER_MIN_FREQUENCY)
    original_tokens = sum(len(tokenizer(x)["input_ids"]) + 1 for t in original for x in base[t])
    for tag in new:
        target = int(original_tokens * share_each / (1.0 - new_language_share))
        base[tag], _ = _cut_to_tokens(base[tag], tokenizer, target) if target else ([], 0)
    base_counts = id_counts(tokenizer(x)["input_ids"] for t in tags for x in base[t])

    planted_ids: dict[str, dict[str, list[str]]] = {}
    for spec in tqdm(specs, desc="world: languages", unit="lang"):
        tag = spec.tag
        write_corpora(root / "corpora" / "base", seed, spec, base[tag], culturax=False,
                      kind="base")
        summary.base_documents[tag] = len(base[tag])
        summary.base_tokens[tag] = sum(len(tokenizer(x)["input_ids"]) + 1 for x in base[tag])
        if tag in original:  # the CPT corpus replays a slice of the base text
            texts = base[tag][:docs_per_language]
        else:
            texts = cpt_texts(seed, spec, cast.new_fact[tag], cast.sft, docs_per_language,
                              cast.passers, question_share)
            summary.coverage[tag] = round(seen_coverage(
                base_counts, (tokenizer(x)["input_ids"] for x in texts),
                COVERAGE_MIN_COUNT), 5)
        rng = stream(seed, f"plant:{tag}")
        n_docs = len(texts)
        n_dupes, n_junk = max(1, n_docs // 50), max(1, n_docs // 100)
        texts = texts + [texts[i] for i in rng.sample(range(n_docs), n_dupes)]
        texts += [junk_document(rng, spec, k) for k in range(n_junk)]
        ids = write_corpora(root / "corpora", seed, spec, texts)
        planted_ids[tag] = {"duplicates": ids[n_docs:n_docs + n_dupes],
                            "junk": ids[n_docs + n_dupes:]}
        summary.documents[tag] = len(texts)
        summary.planted_duplicates[tag] = n_dupes
        summary.planted_junk[tag] = n_junk

        eval_dir = root / "eval" / tag
        held = stream(seed, f"heldout:{tag}")
        _write_jsonl(eval_dir / "lm.jsonl", [{"text": document(spec, held, None, cast.passers,
                                                                     questions=question_share),
                                              "lang": tag}
                                             for _ in range(heldout_docs)])
        files = {
            "openbook": openbook_rows(spec, cast.openbook_eval, stream(seed, f"ob:{tag}"), False,
                                      openbook_context_facts),
            "closed_original": closed_rows(spec, cast.original_fact, stream(seed, f"co:{tag}"),
                                           False, all_forms=True),
            # cloze on the facts this language's own text holds: the original-fact and SFT
            # people in an original language's base text, the new-fact and SFT (anchor) people
            # in a new language's CPT text
            "mc": mc_rows(spec, (cast.original_fact if tag in original else cast.new_fact[tag])
                          + cast.sft, stream(seed, f"mc:{tag}")),
        }
        if tag not in original:
            files["closed_new"] = closed_rows(spec, cast.new_fact[tag], stream(seed, f"cn:{tag}"),
                                              False, all_forms=True)
        for name, rows in files.items():
            _write_jsonl(eval_dir / f"{name}.jsonl", rows)
        summary.eval_items[tag] = {"lm": heldout_docs, **{k: len(v) for k, v in files.items()}}
        if tag in original:
            sft_rng = stream(seed, f"sft:{tag}")
            sft = closed_rows(spec, cast.sft, sft_rng, True, all_forms=True) \
                + openbook_rows(spec, cast.openbook_train, sft_rng, True, openbook_context_facts)
            # replayed base text, post_replay of the rows (see components.train.sft)
            n_replay = round(len(sft) * post_replay / (1.0 - post_replay))
            sft += [{"text": text, "lang": tag, "kind": "replay"}
                    for text in sft_rng.sample(base[tag], min(n_replay, len(base[tag])))]
            sft_rng.shuffle(sft)
            _write_jsonl(root / "instructions" / tag / "train.jsonl", sft)
            summary.instructions[tag] = len(sft)

    summary.vocab_size = len(tokenizer)
    summary.model_parameters = build_tiny_model(tokenizer, root / "model", arch=arch, seed=seed,
                                                hidden_size=model_hidden_size,
                                                num_layers=model_layers,
                                                intermediate_size=model_intermediate_size)
    summary.paths = {
        "fineweb2": "corpora/fineweb2", "culturax": "corpora/culturax",
        "base_fineweb2": "corpora/base/fineweb2", "instructions": "instructions",
        "eval": "eval", "tokenizer": "tokenizer", "model": "model", "world": "world.json",
    }
    world = {
        "generator_version": GENERATOR_VERSION, "seed": seed, "arch": arch,
        "languages": [{"tag": s.tag, "iso639_1": s.iso639_1, "name": s.name, "script": s.script}
                      for s in specs],
        "default_split": {"original": list(DEFAULT_ORIGINAL), "new": list(DEFAULT_NEW)},
        "split": {"original": list(original), "new": new},
        "attributes": {a: {s.tag: list(s.values[a]) for s in specs} for a in ATTRIBUTES},
        "people": [{"name": p.name, "attributes": p.attributes} for p in
                   [*known, *(p for ps in cast.new_fact.values() for p in ps),
                    *(p for ps in cast.background.values() for p in ps),
                    *cast.openbook_train, *cast.openbook_eval]],
        "splits": {"sft": [p.name for p in cast.sft],
                   "original_fact": [p.name for p in cast.original_fact],
                   "new_fact": {t: [p.name for p in ps] for t, ps in cast.new_fact.items()},
                   "background": {t: [p.name for p in ps] for t, ps in cast.background.items()},
                   "openbook_train": [p.name for p in cast.openbook_train],
                   "openbook_eval": [p.name for p in cast.openbook_eval]},
        "planted": planted_ids,
        "summary": {k: v for k, v in vars(summary).items() if k != "paths"},
    }
    (root / "world.json").write_text(json.dumps(world, ensure_ascii=False, indent=1) + "\n",
                                     encoding="utf-8")
    return summary
