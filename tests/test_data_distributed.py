"""The data stage distributed on a simulated two-node cluster (``ray.cluster_utils.Cluster``):
exact and near duplicates planted in other files (other work units, read on other nodes) go,
the first by (source, file, row) survives; the shards are byte-identical at 1 and 3 actors
with different unit and shuffle-partition counts; a global dedup scope and FineWeb2
rehydration do what they say; and the driver receives counts, not tokens (the same bytes at N
and 4N documents)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.config import DataConfig
from components.data import prepare_data

LANGS = ["swh_Latn", "eng_Latn"]
WORDS = {"swh_Latn": "habari rafiki kitabu leo sana nyumba chakula maji shule mtoto".split(),
         "eng_Latn": "hello friend book today very house food water school child".split()}


@pytest.fixture(scope="module")
def cluster() -> Any:
    import ray
    from ray.cluster_utils import Cluster

    sim = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    sim.add_node(num_cpus=2)
    ray.init(address=sim.address, log_to_driver=False)
    yield sim
    ray.shutdown()
    sim.shutdown()


def _doc(rng: random.Random, lang: str, n: int = 200) -> str:
    return " ".join(rng.choice(WORDS[lang]) + str(rng.randrange(400)) for _ in range(n))


def _corpus(root: Path, copies: int = 1) -> dict[str, Any]:
    """Six parquet files of two row groups each, in stable-key order f0 … f5. Planted: exact
    copies (case/spacing changed) of f0 documents in f3 and f5, near copies (one word) of f1
    documents in f4, one text under both languages, cluster sizes for rehydration."""
    rng = random.Random(7)
    files: list[list[tuple[str, str, int]]] = [[] for _ in range(6)]
    for f in range(6):
        for _ in range(20 * copies):
            lang = LANGS[rng.randrange(2)]
            files[f].append((_doc(rng, lang), lang, 1))
    exact = [(t.upper().replace(" ", "  "), lang, 1) for t, lang, _ in files[0][:3]]
    files[3][5:5] = exact[:2]
    files[5].insert(0, exact[2])
    near = []
    for text, lang, _ in files[1][:4]:
        words = text.split()
        words[100] = "mabadiliko"  # Jaccard 191/201 of 5-gram shingles
        near.append((" ".join(words), lang, 1))
    files[4][2:2] = near
    shared = _doc(rng, "eng_Latn")
    files[2].insert(0, (shared, "eng_Latn", 1))
    files[4].insert(0, (shared, "swh_Latn", 1))  # the same text, later, in the other language
    files[2][3] = (files[2][3][0], files[2][3][1], 5)  # FineWeb2 cluster size 5
    files[5].append(("habari1 " * 13_000, "swh_Latn", 1))  # over max_chars' default
    root.mkdir(parents=True, exist_ok=True)
    for f, rows in enumerate(files):
        pq.write_table(pa.table({"text": [r[0] for r in rows], "lang": [r[1] for r in rows],
                                 "minhash_cluster_size": [r[2] for r in rows]}),
                       root / f"f{f}.parquet", row_group_size=max(1, len(rows) // 2))
    return {"files": files, "exact": 3, "near": 4, "long": (5, len(files[5]) - 1)}


def _tokenizer(root: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = [w + str(i) for ws in WORDS.values() for w in ws for i in range(0, 400, 7)]
    tok.train_from_iterator(words, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>",
         "unk_token": "<unk>"}))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("dist")
    return {"root": root, "tok": _tokenizer(root / "tok"), **_corpus(root / "c")}


def _cfg(path: Path, **extra: Any) -> DataConfig:
    return DataConfig.model_validate({
        "sources": [{"name": "p", "format": "parquet", "path": str(path),
                     "language_column": "lang"}],
        "seq_len": 32, "validation_fraction": 0.0, "mix": {"mode": "all"},
        "filters": {"max_non_alpha_fraction": None},
        "dedup": {"exact": True, "minhash": True, "minhash_threshold": 0.8}, **extra})


def _run(corpus: dict[str, Any], out: Path, monkeypatch: pytest.MonkeyPatch, *, actors: int,
         unit_bytes: int, partition_bytes: int, source: str = "c", **extra: Any) -> Any:
    """One stage run, cached by its output folder (tests share the 3-actor run)."""
    import ray.data

    import components.data.pipeline as pipeline

    if out in _RUNS:
        return _RUNS[out]
    # Ray Data hands units only to pool actors that have started, so on a loaded machine the
    # head's actors can take all twelve tiny units before the second node's actor is up (the
    # likely cause of one node in CI at stop 29; not reproduced here under load). Waiting for
    # the whole pool makes "read on both nodes" a property of SPREAD placement, not of
    # process start-up times.
    monkeypatch.setattr(ray.data.DataContext.get_current(), "wait_for_min_actors_s", 120)
    monkeypatch.setattr(pipeline, "_BLOCK_BYTES", unit_bytes)
    monkeypatch.setattr(pipeline, "_PARTITION_BYTES", partition_bytes)
    cfg = _cfg(corpus["root"] / source, actors=actors, **extra)
    _RUNS[out] = prepare_data(cfg, LANGS, [], corpus["tok"], out, progress=False)
    return _RUNS[out]


_RUNS: dict[Path, Any] = {}
_PARALLEL = {"actors": 3, "unit_bytes": 1, "partition_bytes": 2**16}  # every row group a unit


def _stream(corpus: dict[str, Any], lang: str, drop: set[tuple[int, int]],
            copies: bool = False) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(corpus["tok"])
    eos = tok.eos_token_id
    out: list[int] = []
    for f, rows in enumerate(corpus["files"]):
        for r, (text, label, size) in enumerate(rows):
            if label == lang and (f, r) not in drop:
                ids = [*tok(text, add_special_tokens=False)["input_ids"], eos]
                out += ids * (2 if copies and size >= 3 else 1)
    return out


def _planted(corpus: dict[str, Any]) -> set[tuple[int, int]]:
    """(file, row) of every planted copy: all after their originals in key order."""
    files = corpus["files"]
    return {(f, r) for f in (3, 4, 5) for r, row in enumerate(files[f])
            if any(row[0] != o[0] and (row[0].lower().split() == o[0].lower().split()
                                       or sum(a != b for a, b in zip(row[0].split(),
                                                                     o[0].split(),
                                                                     strict=False)) == 1)
                   for o in files[0][:3] + files[1][:4])}


def _shards(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.parquet"))}


def _packed(out: Path, lang: str) -> list[int]:
    table = pq.read_table(out / "train", filters=[("lang", "=", lang)])
    return [t for row in table.column("input_ids").to_pylist() for t in row]


def test_duplicates_across_units_and_nodes_go_and_output_is_parallelism_free(
        cluster: Any, corpus: dict[str, Any], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    one = _run(corpus, tmp_path / "one", monkeypatch, actors=1, unit_bytes=2**30,
               partition_bytes=2**30)
    three = _run(corpus, corpus["root"] / "three", monkeypatch, **_PARALLEL)
    assert three.worker_nodes == 2  # units were read on both nodes
    for result in (one, three):
        dropped = {r: sum(d.get(r, 0) for d in result.dropped.values())
                   for r in ("exact_duplicate", "near_duplicate")}
        assert dropped == {"exact_duplicate": corpus["exact"], "near_duplicate": corpus["near"]}
        assert result.dropped["swh_Latn"]["max_chars"] == 1  # dropped before LID, counted
    assert _shards(tmp_path / "one") == _shards(corpus["root"] / "three")
    skip = {"out_dir", "files", "driver_bytes_received", "worker_nodes"}
    assert {k: v for k, v in one.to_dict().items() if k not in skip} == \
        {k: v for k, v in three.to_dict().items() if k not in skip}
    # lossless: each language is its kept documents in (file, row) order, the originals kept
    planted = _planted(corpus)
    assert len(planted) == corpus["exact"] + corpus["near"]
    for lang in LANGS:
        expected = _stream(corpus, lang, planted | {corpus["long"]})
        full = len(expected) // 32 * 32
        assert _packed(corpus["root"] / "three", lang) == expected[:full], lang
        assert one.partial_tokens_dropped[lang] == len(expected) - full
        assert one.tokens_kept[lang] == len(expected)
    assert one.tokens_unused == sum(one.partial_tokens_dropped.values())  # mode: all
    stats = json.loads((tmp_path / "one" / "stats.json").read_text())
    assert stats["out_dir"] == str(tmp_path / "one") and stats["dedup_scope"] == "language"


def test_global_scope_drops_cross_language_copies_and_rehydration_repeats(
        cluster: Any, corpus: dict[str, Any], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    result = _run(corpus, tmp_path / "g", monkeypatch, actors=2, unit_bytes=1,
                  partition_bytes=2**16, dedup={"exact": True, "scope": "global"},
                  rehydrate={3: 2})
    # the shared text's later copy (f4, row 0, swh_Latn) is now an exact duplicate too
    exact = _exact_rows(corpus)
    swh = sum(corpus["files"][f][r][1] == "swh_Latn" for f, r in exact)
    assert result.dropped["swh_Latn"].get("exact_duplicate", 0) == swh + 1
    assert result.dropped["eng_Latn"].get("exact_duplicate", 0) == len(exact) - swh
    for lang in LANGS:
        expected = _stream(corpus, lang, exact | {(4, 0), corpus["long"]}, copies=True)
        assert result.tokens_kept[lang] == len(expected), lang
        assert _packed(tmp_path / "g", lang) == expected[:len(expected) // 32 * 32], lang


def _exact_rows(corpus: dict[str, Any]) -> set[tuple[int, int]]:
    files = corpus["files"]
    originals = [o[0].lower().split() for o in files[0][:3]]
    return {(f, r) for f in (3, 5) for r, row in enumerate(files[f])
            if row[0].lower().split() in originals and row[0] not in [o[0] for o in files[0]]}


def test_driver_receives_counts_not_tokens(cluster: Any, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           corpus: dict[str, Any]) -> None:
    """The bytes the driver gets back are the same at N and 4N documents (counts and shard
    names), far below the tokens the stage packed."""
    small = _run(corpus, corpus["root"] / "three", monkeypatch, **_PARALLEL)
    _corpus(corpus["root"] / "c4", copies=4)
    large = _run(corpus, tmp_path / "four", monkeypatch, source="c4", **_PARALLEL)
    assert sum(large.tokens_kept.values()) > 3.5 * sum(small.tokens_kept.values())
    assert large.driver_bytes_received <= 1.1 * small.driver_bytes_received
    assert large.driver_bytes_received < sum(large.tokens_kept.values())  # < 1 byte a token
