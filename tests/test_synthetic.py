"""The synthetic world: deterministic, both corpus layouts, consistent facts, separable
languages, real grammar differences, and a tokenizer + model that load offline."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from components.languages import canonical_tag, culturax_code, to_iso639_1
from components.synthetic import LANGUAGES, build_world
from components.synthetic.build import CULTURAX_SCHEMA, FINEWEB2_SCHEMA
from components.synthetic.grammar import ATTRIBUTES

SMALL = {"num_people": 40, "docs_per_language": 120, "vocab_size": 1200}


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


def test_every_fact_in_every_corpus_and_planted_documents(world: Path) -> None:
    meta = json.loads((world / "world.json").read_text())
    for tag, spec in LANGUAGES.items():
        text = "\n".join(_corpus(world, tag))
        for person in meta["people"]:
            name = spec.name_of(person["name"])
            for attr in ATTRIBUTES:
                value = person["attributes"][attr]
                assert any(t(name, value) in text for t in spec.facts[attr]), (tag, name, attr)
        table = pq.read_table(world / "corpora/fineweb2/data" / tag / "train/000_00000.parquet")
        by_id = dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist(),
                         strict=True))
        counts = Counter(by_id.values())
        for doc_id in meta["planted"][tag]["duplicates"]:
            assert counts[by_id[doc_id]] >= 2
        assert sum(c - 1 for c in counts.values()) == len(meta["planted"][tag]["duplicates"])
        assert len(meta["planted"][tag]["junk"]) >= 1


def test_instructions_answer_world_facts_and_splits_are_disjoint(world: Path) -> None:
    meta = json.loads((world / "world.json").read_text())
    facts = {p["name"]: p["attributes"] for p in meta["people"]}
    sft, held = set(meta["splits"]["sft"]), set(meta["splits"]["eval"])
    assert sft and held and not sft & held and sft | held == set(facts)
    for tag, spec in LANGUAGES.items():
        train = _jsonl(world / "instructions" / tag / "train.jsonl")
        evals = _jsonl(world / "eval" / tag / "instruct.jsonl")
        assert {r["person"] for r in train} == sft and {r["person"] for r in evals} == held
        for row in train + evals:
            assert row["answer"] == spec.values[row["attribute"]][facts[row["person"]][
                row["attribute"]]]
        assert [m["role"] for m in train[0]["messages"]] == ["user", "assistant"]
        assert train[0]["messages"][1]["content"] == train[0]["answer"]
        assert [m["role"] for m in evals[0]["messages"]] == ["user"]


def test_multiple_choice_gold_is_the_fact(world: Path) -> None:
    meta = json.loads((world / "world.json").read_text())
    facts = {p["name"]: p["attributes"] for p in meta["people"]}
    for tag, spec in LANGUAGES.items():
        rows = _jsonl(world / "eval" / tag / "mc.jsonl")
        assert len(rows) == SMALL["num_people"]
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
    assert "Tesalo'da" in tr and "Doransi'de" in tr  # vowel harmony picks -da / -de
    de = "\n".join(_corpus(world, "deu_Latn"))
    assert "hat einen Hund." in de or "hat eine Katze." in de  # gendered accusative article
    ru = "\n".join(_corpus(world, "rus_Cyrl"))
    assert "работает учителем" in ru or "работает врачом" in ru  # instrumental case
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
        sft = _jsonl(world / "instructions" / tag / "train.jsonl")[0]
        assert sft["text"] == tok.apply_chat_template(sft["messages"], tokenize=False)
        prompt = _jsonl(world / "eval" / tag / "instruct.jsonl")[0]
        assert prompt["text"] == tok.apply_chat_template(prompt["messages"], tokenize=False,
                                                         add_generation_prompt=True)
    ids = tok("Тару живёт в городе Микело.", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "Тару живёт в городе Микело."
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert 1_000_000 < model.num_parameters() < 10_000_000
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
