"""The synthetic world: deterministic, both corpus layouts, consistent facts, separable
languages, real grammar differences, and a tokenizer + model that load offline."""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from components.languages import canonical_tag, culturax_code, to_iso639_1
from components.synthetic import LANGUAGES, build_world
from components.synthetic.build import (
    MAX_TOKENIZER_UPSAMPLING,
    make_people,
    openbook_rows,
    tokenizer_upsampling,
)
from components.synthetic.corpora import CULTURAX_SCHEMA, FINEWEB2_SCHEMA
from components.synthetic.grammar import ATTRIBUTES
from components.synthetic.texts import generic_sentence
from components.train.spec import TrainError

SMALL = {"num_people": 40, "docs_per_language": 120, "vocab_size": 1200, "eval_people": 10,
         "new_fact_people": 10, "background_people": 30, "bios_per_person": 6,
         "openbook_people": 10, "heldout_docs": 40}
ORIGINAL = ("eng_Latn", "deu_Latn")
NEW = ("swh_Latn", "tur_Latn", "rus_Cyrl")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("world")
    build_world(root, seed=7, **SMALL)
    return root


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _corpus(world: Path, tag: str) -> list[str]:
    path = world / "corpora/fineweb2/data" / tag / "train/000_00000.parquet"
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


def test_same_seed_same_bytes_other_seed_differs(world: Path, tmp_path: Path) -> None:
    build_world(tmp_path / "again", seed=7, **SMALL)
    assert _digests(tmp_path / "again") == _digests(world)
    build_world(tmp_path / "other", seed=8, **SMALL)
    other = _digests(tmp_path / "other")
    assert other["eval/eng_Latn/mc.jsonl"] != _digests(world)["eval/eng_Latn/mc.jsonl"]


def test_tags_are_canonical_and_map_to_culturax(world: Path) -> None:
    meta = json.loads((world / "world.json").read_text())
    assert [lang["tag"] for lang in meta["languages"]] == list(LANGUAGES)
    for lang in meta["languages"]:
        assert canonical_tag(lang["tag"]) == lang["tag"]
        assert to_iso639_1(lang["tag"]) == lang["iso639_1"] == culturax_code(lang["tag"])
    assert any(lang["script"] != "Latn" for lang in meta["languages"])


def test_both_layouts_with_their_columns(world: Path) -> None:
    for tag, spec in LANGUAGES.items():
        fineweb = pq.read_table(world / "corpora/fineweb2/data" / tag / "train/000_00000.parquet")
        assert fineweb.schema.equals(FINEWEB2_SCHEMA)
        assert set(fineweb.column("language").to_pylist()) == {tag.split("_")[0]}
        assert set(fineweb.column("language_script").to_pylist()) == {spec.script}
        culturax = pq.read_table(world / "corpora/culturax" / spec.iso639_1 /
                                 f"{spec.iso639_1}_part_00000.parquet")
        assert culturax.schema.equals(CULTURAX_SCHEMA)
        assert culturax.column("text").to_pylist() == fineweb.column("text").to_pylist()
        assert len(set(fineweb.column("id").to_pylist())) == fineweb.num_rows


def _base(world: Path, tag: str) -> list[str]:
    path = world / "corpora/base/fineweb2/data" / tag / "train/000_00000.parquet"
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


def test_each_fact_is_where_its_role_says_and_planted_documents(world: Path) -> None:
    meta = json.loads((world / "world.json").read_text())
    facts = {p["name"]: p["attributes"] for p in meta["people"]}
    splits = meta["splits"]
    known = splits["sft"] + splits["original_fact"]
    texts = {(kind, tag): "\n".join(read(world, tag)) for tag in LANGUAGES
             for kind, read in (("base", _base), ("cpt", _corpus))}
    for tag in ORIGINAL:  # the base text holds every fact of the original-language people
        spec = LANGUAGES[tag]
        for name in known:
            for attr in ATTRIBUTES:
                assert any(t(name, facts[name][attr]) in texts["base", tag]
                           for t in spec.facts[attr]), (tag, name, attr)
    for tag in NEW:
        spec = LANGUAGES[tag]
        for name in splits["new_fact"][tag]:  # only in its own language's CPT corpus
            assert all(spec.facts[a][0](spec.name_of(name), facts[name][a])[:-1] in
                       texts["cpt", tag] or any(t(spec.name_of(name), facts[name][a]) in
                                                texts["cpt", tag] for t in spec.facts[a])
                       for a in ATTRIBUTES), name
            for (kind, other), text in texts.items():
                if (kind, other) == ("base", tag):  # the name may pass by there, no fact of it
                    assert not any(t(spec.name_of(name), v) in text for a in ATTRIBUTES
                                   for t in spec.facts[a] for v in range(len(spec.values[a]))
                                   ), (name, tag)
                elif (kind, other) != ("cpt", tag):
                    assert f"{LANGUAGES[other].name_of(name)} " not in text, (name, kind, other)
        for name in splits["original_fact"]:  # never in a new language's text
            assert f"{spec.name_of(name)} " not in texts["base", tag] + texts["cpt", tag]
        for name in splits["openbook_eval"]:
            assert all(f"{LANGUAGES[t].name_of(name)} " not in text
                       for (_, t), text in texts.items())
    for tag in LANGUAGES:
        table = pq.read_table(world / "corpora/fineweb2/data" / tag / "train/000_00000.parquet")
        by_id = dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist(),
                         strict=True))
        counts = Counter(by_id.values())
        for doc_id in meta["planted"][tag]["duplicates"]:
            assert counts[by_id[doc_id]] >= 2
        assert sum(c - 1 for c in counts.values()) == len(meta["planted"][tag]["duplicates"])
        assert len(meta["planted"][tag]["junk"]) >= 1


def test_instructions_and_eval_items_answer_world_facts(world: Path) -> None:
    meta = json.loads((world / "world.json").read_text())
    facts = {p["name"]: p["attributes"] for p in meta["people"]}
    splits = meta["splits"]
    assert sorted((world / "instructions").iterdir()) == [world / "instructions" / t
                                                          for t in sorted(ORIGINAL)]
    for tag, spec in LANGUAGES.items():
        files = {f: _jsonl(world / "eval" / tag / f"{f}.jsonl")
                 for f in ("openbook", "closed_original", "mc")}
        people = {"openbook": set(splits["openbook_eval"]),
                  "closed_original": set(splits["original_fact"]),
                  "mc": set(splits["original_fact"] if tag in ORIGINAL
                            else splits["new_fact"][tag]) | set(splits["sft"])}
        if tag in NEW:
            files["closed_new"] = _jsonl(world / "eval" / tag / "closed_new.jsonl")
            people["closed_new"] = set(splits["new_fact"][tag])
        else:
            assert not (world / "eval" / tag / "closed_new.jsonl").exists()
            train = _jsonl(world / "instructions" / tag / "train.jsonl")
            assert {r["person"] for r in train} == set(splits["sft"]) | set(
                splits["openbook_train"])
            assert [m["role"] for m in train[0]["messages"]] == ["user", "assistant"]
            assert train[0]["messages"][1]["content"] == train[0]["answer"]
            files["train"] = train
        # closed-book questions take every question form of every attribute; open-book and
        # cloze one item per attribute
        forms = sum(len(spec.questions[a]) for a in ATTRIBUTES)
        for name, rows in files.items():
            if name != "train":
                assert {r["person"] for r in rows} == people[name], (tag, name)
                per_person = forms if name.startswith("closed") else 5
                assert len(rows) == per_person * len(people[name]), (tag, name)
            for row in rows:
                assert row["answer"] == spec.values[row["attribute"]][facts[row["person"]][
                    row["attribute"]]]
                assert row["lang"] == tag
                if row.get("kind") == "openbook":  # the answer is in the context
                    assert f"{row['answer']}" in row["messages"][0]["content"]
        assert [m["role"] for m in files["openbook"][0]["messages"]] == ["user"]


def test_a_copied_answer_is_the_token_sequence_of_the_context(world: Path) -> None:
    """The assistant's answer follows a space, so every answer word of every language is written
    with the tokens it has inside a sentence of the context (copying is token copying)."""
    tok = AutoTokenizer.from_pretrained(world / "tokenizer")
    for tag, spec in LANGUAGES.items():
        for attr in ATTRIBUTES:
            for word in spec.values[attr]:
                prompt = [{"role": "user", "content": f"x {word}."}]
                full = tok.apply_chat_template([*prompt, {"role": "assistant", "content": word}],
                                               tokenize=False)
                head = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
                ids, head_ids = tok(full)["input_ids"], tok(head)["input_ids"]
                assert ids[:len(head_ids)] == head_ids, (tag, word)  # the prompt is a prefix
                answer = ids[len(head_ids):-2]  # ... <|im_end|> "\n"
                assert answer == tok(f" {word}")["input_ids"], (tag, word)


def test_openbook_context_holds_the_asked_fact_and_its_distractors(world: Path) -> None:
    spec = LANGUAGES["eng_Latn"]
    for row in _jsonl(world / "eval" / "eng_Latn" / "openbook.jsonl"):
        context = row["messages"][0]["content"].split("\n")[0]
        kinds = [a for a in ATTRIBUTES if any(w in context.split(" ") or f"{w}." in
                                              context.split(" ") for w in spec.values[a])]
        assert row["attribute"] in kinds
        assert len(kinds) == 3  # openbook_context_facts' default: the asked fact and two others
    with pytest.raises(ValueError, match="context_facts"):
        openbook_rows(spec, make_people(0, 1), random.Random(0), False, context_facts=6)


def test_generic_questions_ask_about_passers_and_answer() -> None:
    rng = random.Random(0)
    for tag in ("eng_Latn", "swh_Latn", "rus_Cyrl"):
        spec = LANGUAGES[tag]
        name = spec.name_of("Kara")
        for _ in range(50):
            sentence = generic_sentence(spec, rng, ["Moli"], questions=1.0, asked=["Kara"])
            asked = [(a, q(name)) for a in ATTRIBUTES for q in spec.questions[a]
                     if sentence.startswith(q(name) + " ")]
            assert len(asked) == 1, sentence  # one of the language's question forms, on Kara
            attr, question = asked[0]
            answer = sentence[len(question) + 1:]
            assert any(answer == f(name, v) for f in spec.facts[attr]
                       for v in range(len(spec.values[attr]))), sentence
        # without questions, no generic sentence asks anything
        assert not any("?" in generic_sentence(spec, rng, ["Moli"]) for _ in range(50))


def test_answer_words_are_distinct_across_languages() -> None:
    seen: dict[str, str] = {}
    for tag, spec in LANGUAGES.items():
        for attr in ATTRIBUTES:
            assert len(set(spec.values[attr])) == len(spec.values[attr])
            for word in spec.values[attr]:
                assert seen.setdefault(word.casefold(), tag) == tag, (word, tag, seen[word])


def test_multiple_choice_gold_is_the_fact(world: Path) -> None:
    meta = json.loads((world / "world.json").read_text())
    facts = {p["name"]: p["attributes"] for p in meta["people"]}
    for tag, spec in LANGUAGES.items():
        rows = _jsonl(world / "eval" / tag / "mc.jsonl")
        golds = Counter()
        for row in rows:
            assert len(row["choices"]) == len(set(row["choices"])) == 4
            value = facts[row["person"]][row["attribute"]]
            name = spec.name_of(row["person"])
            assert row["choices"][row["gold"]] == spec.cloze[row["attribute"]](name, value)[1]
            golds[row["gold"]] += 1
        assert len(golds) >= 3  # the gold position is shuffled


def test_languages_differ_in_grammar(world: Path) -> None:
    """Word order and morphology, not just vocabulary."""
    tr = "\n".join(_corpus(world, "tur_Latn"))
    assert "'da yaşıyor." in tr or "'de yaşıyor." in tr  # SOV with a locative suffix
    assert "Akçayır'da" in tr and "Taşdere'de" in tr  # vowel harmony picks -da / -de
    de = "\n".join(_corpus(world, "deu_Latn"))
    assert "hat einen Hund." in de or "hat eine Katze." in de  # gendered accusative article
    ru = "\n".join(_corpus(world, "rus_Cyrl"))
    assert "живёт в городе" in ru
    assert not any("a" <= ch <= "z" for ch in ru)  # Cyrillic only
    sw = "\n".join(_corpus(world, "swh_Latn"))
    assert " wana" in sw or " wata" in sw or " wali" in sw  # class-2 verb agreement


def _ngrams(text: str, n: int = 3) -> Counter:
    padded = f"  {text.lower()}  "
    return Counter(padded[i:i + n] for i in range(len(padded) - n + 1))


def test_languages_are_separable_by_char_ngrams(world: Path) -> None:
    """A naive-Bayes character 3-gram classifier trained on the corpora labels held-out text."""
    models = {}
    for tag in LANGUAGES:
        counts = Counter()
        for text in _corpus(world, tag):
            counts.update(_ngrams(text))
        models[tag] = (counts, sum(counts.values()))
    vocab = len(set().union(*(c for c, _ in models.values())))
    correct = total = 0
    for tag in LANGUAGES:
        for row in _jsonl(world / "eval" / tag / "lm.jsonl"):
            grams = _ngrams(row["text"])
            scores = {t: sum(k * math.log((c[g] + 1) / (n + vocab)) for g, k in grams.items())
                      for t, (c, n) in models.items()}
            correct += max(scores, key=scores.get) == tag
            total += 1
    assert total >= 100
    assert correct / total >= 0.99


def test_tokenizer_and_model_load_offline(world: Path) -> None:
    tok = AutoTokenizer.from_pretrained(world / "model")
    model = AutoModelForCausalLM.from_pretrained(world / "model")
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == tok.eos_token
    rendered = tok.apply_chat_template([{"role": "user", "content": "Where does Kamo live?"}],
                                       tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nWhere does Kamo live?<|im_end|>\n<|im_start|>assistant\n"
    for tag in LANGUAGES:  # the rendered texts in the files are what the tokenizer renders
        if tag in ORIGINAL:
            sft = _jsonl(world / "instructions" / tag / "train.jsonl")[0]
            assert sft["text"] == tok.apply_chat_template(sft["messages"], tokenize=False)
        prompt = _jsonl(world / "eval" / tag / "closed_original.jsonl")[0]
        assert prompt["text"] == tok.apply_chat_template(prompt["messages"], tokenize=False,
                                                         add_generation_prompt=True)
    ids = tok("Тару живёт в городе Заречье.", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "Тару живёт в городе Заречье."
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert 500_000 < model.num_parameters() < 10_000_000
    assert model.config.model_type == "llama"


def test_every_dense_type_builds_and_bad_input(world: Path, tmp_path: Path) -> None:
    """Each dense type a family upcycles comes out of the one generic builder (the world's
    default size for Qwen2, small for the rest), loads, and keeps head_dim = hidden / heads."""
    from components.moe.families import DENSE_TYPES
    from components.synthetic.hf import build_tiny_model

    tok = AutoTokenizer.from_pretrained(world / "tokenizer")
    for arch in DENSE_TYPES:
        if arch == "llama":  # the world's own model, tested above
            continue
        size = {} if arch == "qwen2" else dict(hidden_size=32, num_layers=1, intermediate_size=48)
        count = build_tiny_model(tok, tmp_path / arch, arch=arch, seed=1, **size)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / arch)
        assert model.config.model_type == arch
        assert model.num_parameters() == count
        attention = model.model.layers[0].self_attn
        assert attention.head_dim == model.config.hidden_size // 4
    with pytest.raises(ValueError, match="no language"):
        build_world(tmp_path / "x", languages=["fra_Latn"])
    with pytest.raises(ValueError, match="unknown architecture"):
        build_tiny_model(tok, tmp_path / "y", arch="gpt2")


def test_tokenizer_upsampling_follows_share_to_the_alpha() -> None:
    """p ** alpha sampling relative to the largest language, rounded, at least 1 and capped (a
    repeated text needs fewer real occurrences for a merge; the coverage tests hold the rule)."""
    chars = {"eng": 475, "deu": 475, "swh": 25, "rus": 25, "none": 0}
    assert tokenizer_upsampling(chars, 1.0) == dict.fromkeys(chars, 1)
    # (0.475 / 0.025) ** 0.2 = 1.8 → 2; ** 0.7 = 7.9, capped
    assert tokenizer_upsampling(chars, 0.8) == {"eng": 1, "deu": 1, "swh": 2, "rus": 2,
                                                "none": 1}
    assert tokenizer_upsampling(chars, 0.3)["swh"] == MAX_TOKENIZER_UPSAMPLING
    with pytest.raises(ValueError, match="tokenizer_alpha"):
        tokenizer_upsampling(chars, 0.0)


def test_post_replay_mixes_base_text_into_post_training(tmp_path: Path) -> None:
    """post_replay of the instruction rows are base documents (plain text, no messages); the
    SFT builder puts the loss on every one of their tokens and an EOS after them."""
    from components.train.sft import build_sft_parquet

    root = tmp_path / "w"
    build_world(root, seed=7, post_replay=0.05, **SMALL)
    base = set(pq.read_table(root / "corpora/base/fineweb2/data/eng_Latn/train/000_00000.parquet",
                             columns=["text"]).column("text").to_pylist())
    rows = _jsonl(root / "instructions" / "eng_Latn" / "train.jsonl")
    replay = [r for r in rows if "messages" not in r]
    assert len(replay) == pytest.approx(0.05 * len(rows), abs=1)
    assert all(r["kind"] == "replay" and r["text"] in base for r in replay)
    assert len({r["text"] for r in replay}) == len(replay)  # distinct documents

    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    only = tmp_path / "replay.jsonl"
    only.write_text("".join(json.dumps(r) + "\n" for r in replay[:40]), encoding="utf-8")
    build_sft_parquet(tok, [only], tmp_path / "sft", seq_len=256)
    table = pq.read_table(tmp_path / "sft/train/part-0.parquet").to_pydict()
    ids, labels = table["input_ids"][0], table["labels"][0]
    expected = tok(replay[0]["text"])["input_ids"] + [tok.eos_token_id]
    assert ids[:len(expected)] == expected and labels[:len(expected)] == expected
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"lang": "eng_Latn", "answer": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(TrainError, match=r"bad.jsonl:1: expected keys lang and messages"):
        build_sft_parquet(tok, [bad], tmp_path / "sft2", seq_len=256)
