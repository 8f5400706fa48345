"""Generate the synthetic multilingual world, deterministically from a seed.

One set of invented people with five attributes each (city, job, favourite colour, pet, food) is
described in every language. The design makes the paper's two abilities separable:

- **knowledge and language** come from the corpora: every fact appears in every language's
  pre-training text, among generic sentences;
- **instruction following** comes from instruction data: question → bare answer word, rendered
  with the chat template, about the *SFT people* only.

Evaluation asks about the *eval people* (disjoint from SFT people, present in the corpora), so a
model answers an instruction in a new language only if it learnt that language's text (CPT) and
the answer format (post-training). Every random choice draws from ``random.Random`` streams
seeded from the world seed and a purpose name, and nothing reads the clock: the same seed gives
byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from components.synthetic.grammar import ATTRIBUTES, LANGUAGES, NUM_VALUES, LanguageSpec
from components.synthetic.hf import build_tiny_model, render_chat, train_tokenizer

GENERATOR_VERSION = 2
DEFAULT_ORIGINAL = ("eng_Latn", "deu_Latn")
DEFAULT_NEW = ("swh_Latn", "rus_Cyrl")
_SYLLABLES = ("ka", "mo", "ru", "be", "li", "ta", "no", "vi", "se", "du", "ra", "ki", "lo",
              "fe", "ma", "po", "zu", "ne", "si", "go")
_FACTS_PER_DOC = 3
_EVAL_SHARE = 0.2
_BASE_DATE = datetime(2024, 1, 1, tzinfo=UTC)

FINEWEB2_SCHEMA = pa.schema([
    ("text", pa.string()), ("id", pa.string()), ("dump", pa.string()), ("url", pa.string()),
    ("date", pa.string()), ("file_path", pa.string()), ("language", pa.string()),
    ("language_score", pa.float64()), ("language_script", pa.string()),
    ("minhash_cluster_size", pa.int64()), ("top_langs", pa.string()),
])
CULTURAX_SCHEMA = pa.schema([
    ("text", pa.string()), ("timestamp", pa.string()), ("url", pa.string()),
    ("source", pa.string()),
])


@dataclass(frozen=True)
class Person:
    name: str  # Latin spelling; each language writes it in its own script
    attributes: dict[str, int]  # attribute → value index


@dataclass
class WorldSummary:
    """What was written, with paths relative to the world folder (it is renamed into place)."""

    seed: int
    languages: list[str]
    people: int
    sft_people: int
    eval_people: int
    documents: dict[str, int]
    planted_duplicates: dict[str, int]
    planted_junk: dict[str, int]
    instructions: dict[str, int]
    model_parameters: int
    vocab_size: int
    paths: dict[str, str] = field(default_factory=dict)


def _rng(seed: int, purpose: str) -> random.Random:
    """An independent stream per purpose: adding documents never changes the people."""
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def make_people(seed: int, count: int) -> list[Person]:
    rng = _rng(seed, "people")
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
        if name not in seen:
            seen.add(name)
            names.append(name)
    return [Person(name, {a: rng.randrange(NUM_VALUES) for a in ATTRIBUTES}) for name in names]


def split_people(seed: int, people: list[Person]) -> tuple[list[int], list[int]]:
    """Disjoint SFT and eval people (indices), both non-empty."""
    order = list(range(len(people)))
    _rng(seed, "split").shuffle(order)
    n_eval = max(1, round(len(people) * _EVAL_SHARE))
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def _document(spec: LanguageSpec, rng: random.Random, facts: list[tuple[Person, str]]) -> str:
    sentences = [rng.choice(spec.facts[attr])(spec.name_of(p.name), p.attributes[attr])
                 for p, attr in facts]
    sentences += [spec.filler(rng) for _ in range(rng.randint(1, 3))]
    rng.shuffle(sentences)
    return " ".join(sentences)


def make_corpus(seed: int, spec: LanguageSpec, people: list[Person], docs: int,
                purpose: str = "corpus") -> list[str]:
    """``docs`` documents; facts are dealt in a shuffled cycle, so every fact appears once
    ``docs × 3 ≥ facts``."""
    rng = _rng(seed, f"{purpose}:{spec.tag}")
    facts = [(p, a) for p in people for a in ATTRIBUTES]
    rng.shuffle(facts)
    texts = []
    for i in range(docs):
        chunk = [facts[(i * _FACTS_PER_DOC + j) % len(facts)] for j in range(_FACTS_PER_DOC)]
        texts.append(_document(spec, rng, chunk))
    return texts


def _junk(rng: random.Random, spec: LanguageSpec, k: int) -> str:
    """Documents a quality filter must drop: digit soup, or one line repeated."""
    if k % 2 == 0:
        return " ".join(f"{rng.randrange(10**6):06d} ### {rng.randrange(999)}%" for _ in range(30))
    line = spec.filler(rng)
    return "\n".join([line] * 12)


def _uuid(seed: int, *parts: object) -> str:
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def write_corpora(root: Path, seed: int, spec: LanguageSpec, texts: list[str]) -> list[str]:
    """One language in the FineWeb2 layout and in the CulturaX layout; returns document ids."""
    n = len(texts)
    ids = [f"<urn:uuid:{_uuid(seed, spec.tag, i)}>" for i in range(n)]
    dates = [(_BASE_DATE + timedelta(minutes=7919 * i)).strftime("%Y-%m-%dT%H:%M:%SZ")
             for i in range(n)]
    urls = [f"https://{spec.iso639_1}.example.org/doc/{i:06d}" for i in range(n)]
    dump = "CC-MAIN-2024-10"
    fineweb = pa.table({
        "text": texts, "id": ids, "dump": [dump] * n, "url": urls, "date": dates,
        "file_path": [f"s3://commoncrawl/crawl-data/{dump}/segments/{i % 7}.warc.gz"
                      for i in range(n)],
        "language": [spec.tag.split("_")[0]] * n,
        "language_score": [round(0.9 + 0.1 * ((i * 37) % 100) / 100, 4) for i in range(n)],
        "language_script": [spec.script] * n,
        "minhash_cluster_size": [1] * n,
        "top_langs": [json.dumps({f"{spec.tag}_score": 0.99})] * n,
    }, schema=FINEWEB2_SCHEMA)
    fw_dir = root / "corpora" / "fineweb2" / "data" / spec.tag / "train"
    fw_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(fineweb, fw_dir / "000_00000.parquet")
    culturax = pa.table({
        "text": texts, "timestamp": [d.replace("T", " ").rstrip("Z") for d in dates],
        "url": urls, "source": ["mC4" if i % 3 else "OSCAR-2301" for i in range(n)],
    }, schema=CULTURAX_SCHEMA)
    cx_dir = root / "corpora" / "culturax" / spec.iso639_1
    cx_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(culturax, cx_dir / f"{spec.iso639_1}_part_00000.parquet")
    return ids


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def instruction_rows(spec: LanguageSpec, people: list[Person], rng: random.Random,
                     with_answer_turn: bool) -> list[dict[str, Any]]:
    """Question → bare answer word, every attribute and question form, per person; ``text`` is
    the conversation rendered with the chat template (a prompt ending in the assistant turn
    when there is no answer turn)."""
    rows = []
    for person in people:
        name = spec.name_of(person.name)
        for attr in ATTRIBUTES:
            answer = spec.values[attr][person.attributes[attr]]
            for question in spec.questions[attr]:
                messages = [{"role": "user", "content": question(name)}]
                if with_answer_turn:
                    messages.append({"role": "assistant", "content": answer})
                rows.append({"messages": messages, "answer": answer, "attribute": attr,
                             "person": person.name, "lang": spec.tag,
                             "text": render_chat(messages,
                                                 add_generation_prompt=not with_answer_turn)})
    rng.shuffle(rows)
    return rows


def mc_rows(spec: LanguageSpec, people: list[Person], rng: random.Random) -> list[dict[str, Any]]:
    """Cloze questions with four choices (chance 25%): one per person, attributes in turn."""
    rows = []
    for i, person in enumerate(people):
        attr = ATTRIBUTES[i % len(ATTRIBUTES)]
        gold_value = person.attributes[attr]
        others = [v for v in range(NUM_VALUES) if v != gold_value]
        values = [gold_value, *rng.sample(others, 3)]
        rng.shuffle(values)
        name = spec.name_of(person.name)
        query = spec.cloze[attr](name, gold_value)[0]
        rows.append({"query": query,
                     "choices": [spec.cloze[attr](name, v)[1] for v in values],
                     "gold": values.index(gold_value), "attribute": attr,
                     "person": person.name, "lang": spec.tag})
    return rows


def build_world(out_dir: str | Path, seed: int = 0, *, arch: str = "llama",
                num_people: int = 160, docs_per_language: int = 800, vocab_size: int = 4096,
                languages: list[str] | None = None) -> WorldSummary:
    """Write the whole world into ``out_dir`` (an empty folder the caller commits atomically)."""
    root = Path(out_dir)
    tags = languages or list(LANGUAGES)
    unknown = [t for t in tags if t not in LANGUAGES]
    if unknown:
        raise ValueError(f"the synthetic world has no language {unknown}; it has {list(LANGUAGES)}")
    specs = [LANGUAGES[t] for t in tags]
    people = make_people(seed, num_people)
    sft_idx, eval_idx = split_people(seed, people)
    sft_people = [people[i] for i in sft_idx]
    eval_people = [people[i] for i in eval_idx]
    summary = WorldSummary(seed=seed, languages=tags, people=len(people),
                           sft_people=len(sft_people), eval_people=len(eval_people),
                           documents={}, planted_duplicates={}, planted_junk={},
                           instructions={}, model_parameters=0, vocab_size=0)
    planted_ids: dict[str, dict[str, list[str]]] = {}
    tokenizer_texts: list[str] = []
    for spec in tqdm(specs, desc="world: languages", unit="lang"):
        rng = _rng(seed, f"plant:{spec.tag}")
        texts = make_corpus(seed, spec, people, docs_per_language)
        n_dupes, n_junk = max(1, docs_per_language // 50), max(1, docs_per_language // 100)
        dup_sources = rng.sample(range(len(texts)), n_dupes)
        texts += [texts[i] for i in dup_sources]
        texts += [_junk(rng, spec, k) for k in range(n_junk)]
        base = docs_per_language
        ids = write_corpora(root, seed, spec, texts)
        planted_ids[spec.tag] = {"duplicates": ids[base:base + n_dupes],
                                 "junk": ids[base + n_dupes:]}
        summary.documents[spec.tag] = len(texts)
        summary.planted_duplicates[spec.tag] = n_dupes
        summary.planted_junk[spec.tag] = n_junk
        tokenizer_texts += texts[:base]

        eval_dir = root / "eval" / spec.tag
        heldout = make_corpus(seed, spec, people, max(20, docs_per_language // 10),
                              purpose="heldout")
        _write_jsonl(eval_dir / "lm.jsonl", [{"text": t, "lang": spec.tag} for t in heldout])
        sft = instruction_rows(spec, sft_people, _rng(seed, f"sft:{spec.tag}"), True)
        _write_jsonl(root / "instructions" / spec.tag / "train.jsonl", sft)
        summary.instructions[spec.tag] = len(sft)
        _write_jsonl(eval_dir / "instruct.jsonl",
                     instruction_rows(spec, eval_people, _rng(seed, f"ins:{spec.tag}"), False))
        _write_jsonl(eval_dir / "mc.jsonl", mc_rows(spec, people, _rng(seed, f"mc:{spec.tag}")))

    tokenizer = train_tokenizer(tokenizer_texts, root / "tokenizer", vocab_size)
    summary.vocab_size = len(tokenizer)
    summary.model_parameters = build_tiny_model(tokenizer, root / "model", arch=arch, seed=seed)
    summary.paths = {
        "fineweb2": "corpora/fineweb2", "culturax": "corpora/culturax",
        "instructions": "instructions", "eval": "eval", "tokenizer": "tokenizer",
        "model": "model", "world": "world.json",
    }
    world = {
        "generator_version": GENERATOR_VERSION, "seed": seed, "arch": arch,
        "languages": [{"tag": s.tag, "iso639_1": s.iso639_1, "name": s.name, "script": s.script}
                      for s in specs],
        "default_split": {"original": list(DEFAULT_ORIGINAL), "new": list(DEFAULT_NEW)},
        "attributes": {a: {s.tag: list(s.values[a]) for s in specs} for a in ATTRIBUTES},
        "people": [{"name": p.name, "attributes": p.attributes} for p in people],
        "splits": {"sft": [people[i].name for i in sft_idx],
                   "eval": [people[i].name for i in eval_idx]},
        "planted": planted_ids,
        "summary": {k: v for k, v in vars(summary).items() if k != "paths"},
    }
    (root / "world.json").write_text(json.dumps(world, ensure_ascii=False, indent=1) + "\n",
                                     encoding="utf-8")
    return summary
