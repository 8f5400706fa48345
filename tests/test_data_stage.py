"""The data stage on the synthetic world: lossless packing in both layouts, planted duplicates and
junk removed, the requested mix realized, LID agreement per backend (py3langid; a fastText model
trained here for the GlotLID path), bad input, and the stage + command around it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import ray.data
import yaml

from components.config import DataConfig
from components.data import DataError, prepare_data

ORIGINAL = ["eng_Latn", "deu_Latn"]
NEW = ["swh_Latn", "rus_Cyrl"]
LANGS = [*ORIGINAL, *NEW]
CX = {"eng_Latn": "en", "deu_Latn": "de", "swh_Latn": "sw", "rus_Cyrl": "ru"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from components.synthetic import build_world

    root = tmp_path_factory.mktemp("data") / "world"
    build_world(root, seed=0, num_people=24, docs_per_language=150, vocab_size=700,
                languages=LANGS)
    return root


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> object:
    # address="local": a new instance even when another local cluster is running
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             ignore_reinit_error=True)
    yield
    ray.shutdown()


def _cfg(fmt: str, world: Path, **extra: object) -> DataConfig:
    raw = {"sources": [{"name": "w", "format": fmt, "path": str(world / "corpora" / fmt)}],
           "seq_len": 64, "validation_fraction": 0.05, **extra}
    return DataConfig.model_validate(raw)


def _expected_streams(world: Path, eos: int) -> dict[str, list[int]]:
    """Each language's kept documents (planted duplicates and junk removed), tokenized with EOS
    after each, in corpus order: what packing must give back."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world / "model")
    planted = json.loads((world / "world.json").read_text())["planted"]
    out = {}
    for tag in LANGS:
        table = pq.read_table(world / "corpora/fineweb2/data" / tag / "train",
                              columns=["text", "id"])
        drop = set(planted[tag]["duplicates"]) | set(planted[tag]["junk"])
        texts = [t for t, i in zip(table.column("text").to_pylist(),
                                   table.column("id").to_pylist(), strict=True) if i not in drop]
        stream: list[int] = []
        for ids in tok(texts, add_special_tokens=False)["input_ids"]:
            stream += [*ids, eos]
        out[tag] = stream
    return out


def _rows(out: Path, split: str) -> dict[str, list[list[int]]]:
    rows: dict[str, list[list[int]]] = {}
    for path in sorted((out / split).glob("*.parquet")):
        table = pq.read_table(path)
        for ids, lang in zip(table.column("input_ids").to_pylist(),
                             table.column("lang").to_pylist(), strict=True):
            rows.setdefault(lang, []).append(ids)
    return rows


@pytest.mark.parametrize(("fmt", "block_bytes"), [("fineweb2", None), ("culturax", None),
                                                   ("fineweb2", 4096)])
def test_packing_is_lossless_and_planted_documents_are_removed(
        world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str,
        block_bytes: int | None) -> None:
    # every token pinned: all full sequences are written, so decoding must give back everything
    cfg = _cfg(fmt, world, mix={"tokens_per_language": {t: 10**9 for t in LANGS}},
               batch_size=16)
    if block_bytes:  # many small blocks through the actor pool: order must still hold
        import components.data.pipeline as pipeline

        monkeypatch.setattr(pipeline, "_BLOCK_BYTES", block_bytes)
    driver = ray.data.DataContext.get_current()
    before = (driver.execution_options.preserve_order, driver.target_max_block_size)
    out = tmp_path / "out"
    result = prepare_data(cfg, LANGS, ORIGINAL, world / "model", out, progress=False)
    # the stage's Ray Data settings are its own: the driver's context is as it was
    assert (driver.execution_options.preserve_order, driver.target_max_block_size) == before
    eos = json.loads((world / "model" / "config.json").read_text())["eos_token_id"]
    expected = _expected_streams(world, eos)
    train, validation = _rows(out, "train"), _rows(out, "validation")
    for tag in LANGS:
        packed = [t for row in train[tag] + validation[tag] for t in row]
        assert all(len(row) == 64 for row in train[tag] + validation[tag])
        full = len(expected[tag]) // 64 * 64
        assert packed == expected[tag][:full], tag  # in order, nothing lost but the tail
        assert result.partial_tokens_dropped[tag] == len(expected[tag]) - full
        assert result.dropped[tag]["exact_duplicate"] == 150 // 50
        assert sum(result.dropped[tag].values()) == 150 // 50 + 150 // 100
        assert len(validation[tag]) == max(1, round(len(packed) // 64 * 0.05))
    assert json.loads((out / "stats.json").read_text())["documents_out"] == result.documents_out


def test_mix_is_realized_and_py3langid_agrees(world: Path, tmp_path: Path) -> None:
    cfg = _cfg("culturax", world, mix={"ratios": {"swh_Latn": 0.7, "rus_Cyrl": 0.3},
                                       "replay_ratio": 0.2},
               lid={"backend": "py3langid", "mode": "tag"})
    result = prepare_data(cfg, LANGS, ORIGINAL, world / "model", tmp_path / "out",
                          progress=False)
    wanted = {"swh_Latn": 0.56, "rus_Cyrl": 0.24, "eng_Latn": 0.1, "deu_Latn": 0.1}
    for tag, share in wanted.items():
        assert result.share_requested[tag] == pytest.approx(share)
        assert abs(result.share_realized[tag] - share) <= 0.02, (tag, result.share_realized)
    for tag in ("eng_Latn", "deu_Latn", "swh_Latn"):  # Latin script: ≥ 95% agreement
        assert result.lid_agreement[tag] >= 0.95, result.lid_confusion[tag]
    # no language gets more than its share: every train row is one language, none mixed
    rows = _rows(tmp_path / "out", "train")
    total = sum(len(v) for v in rows.values())
    assert {t: round(len(v) / total, 2) for t, v in rows.items()} == pytest.approx(wanted,
                                                                                   abs=0.02)


def test_glotlid_fasttext_backend_filters_by_prediction(world: Path, tmp_path: Path) -> None:
    import fasttext

    lines = []
    for tag in LANGS:
        table = pq.read_table(world / "corpora/fineweb2/data" / tag / "train", columns=["text"])
        lines += [f"__label__{tag} {' '.join(t.split())}" for t in
                  table.column("text").to_pylist()[:60]]
    train_file = tmp_path / "lid.txt"
    train_file.write_text("\n".join(lines) + "\n")
    model = fasttext.train_supervised(str(train_file), epoch=10, lr=0.5, dim=16, minCount=1,
                                      thread=1, seed=0, verbose=0)
    model.save_model(str(tmp_path / "lid.bin"))
    # filter mode with an impossible threshold for Swahili: LID drops all of it → clear error
    lid_model = str(tmp_path / "lid.bin")
    cfg = _cfg("fineweb2", world, lid={"backend": "glotlid", "model_path": lid_model,
                                       "mode": "filter", "thresholds": {"swh_Latn": 1.0}})
    with pytest.raises(DataError, match=r"no documents left for swh_Latn.*lid_low_score"):
        prepare_data(cfg, LANGS, ORIGINAL, world / "model", tmp_path / "x", progress=False)
    cfg = _cfg("fineweb2", world, lid={"backend": "glotlid",
                                       "model_path": str(tmp_path / "lid.bin"), "mode": "filter"})
    result = prepare_data(cfg, LANGS, ORIGINAL, world / "model", tmp_path / "out",
                          progress=False)
    for tag in LANGS:
        assert result.lid_agreement[tag] >= 0.95, result.lid_confusion[tag]
        mismatched = result.dropped[tag].get("lid_mismatch", 0)
        assert mismatched == sum(n for p, n in result.lid_confusion[tag].items() if p != tag)
        # over the kept documents LID agrees fully (filter mode dropped the rest), and the
        # planted junk's quality-filter verdict stays visible beside the LID reason
        assert result.lid_agreement_kept[tag] == 1.0
        assert result.quality_flags[tag]["non_alpha"] >= 1


def test_non_utf8_is_replaced_and_counted(world: Path, tmp_path: Path) -> None:
    good = "habari ya asubuhi rafiki yangu, leo tunasoma kitabu kipya pamoja. " * 3
    corpus = tmp_path / "c.jsonl"
    with open(corpus, "wb") as f:
        for i in range(40):
            text = good.encode() if i % 4 else good.encode()[:30] + b"\xff\xfe" + good.encode()
            f.write(b'{"text": "' + text + b'"}\n')
    cfg = DataConfig.model_validate({
        "sources": [{"name": "raw", "format": "jsonl", "path": str(corpus),
                     "languages": ["swh_Latn"]}], "seq_len": 32,
        "dedup": {"exact": False}, "validation_fraction": 0.0})
    result = prepare_data(cfg, ["swh_Latn"], [], world / "model", tmp_path / "out",
                          progress=False)
    assert result.bad_utf8_documents == {"swh_Latn": 10}
    assert result.bad_utf8_replacements == {"swh_Latn": 20}  # two bad bytes each
    assert result.documents_out == {"swh_Latn": 40}


def test_plain_parquet_source_with_minhash_near_dedup(world: Path, tmp_path: Path) -> None:
    """A plain parquet corpus (own text and language columns): exact copies (case/spacing
    changed) and near copies (one word changed) go, each counted under its reason."""
    import random

    import pyarrow as pa

    rng = random.Random(0)
    words = pq.read_table(world / "corpora/fineweb2/data/swh_Latn/train",
                          columns=["text"]).column("text").to_pylist()
    vocab = sorted({w for t in words for w in t.split()})
    docs = [" ".join(rng.choice(vocab) for _ in range(200)) for _ in range(30)]
    exact = [d.upper().replace(" ", "  ") for d in docs[:2]]
    near = []
    for d in docs[2:7]:
        tokens = d.split()
        tokens[100] = "mabadiliko"  # Jaccard 191/201 of 5-gram shingles
        near.append(" ".join(tokens))
    texts = docs + exact + near
    pq.write_table(pa.table({"body": texts, "code": ["sw"] * len(texts)}), tmp_path / "c.parquet")
    cfg = DataConfig.model_validate({
        "sources": [{"name": "p", "format": "parquet", "path": str(tmp_path / "c.parquet"),
                     "text_column": "body", "language_column": "code"}],
        "seq_len": 32, "validation_fraction": 0.0, "filters": {"max_non_alpha_fraction": None},
        "dedup": {"minhash": True, "minhash_threshold": 0.8}})
    result = prepare_data(cfg, ["swh_Latn"], [], world / "model", tmp_path / "out",
                          progress=False)
    assert result.documents_in == {"swh_Latn": 37}
    assert result.dropped == {"swh_Latn": {"exact_duplicate": 2, "near_duplicate": 5}}
    assert result.documents_out == {"swh_Latn": 30}
    assert set(pq.read_table(tmp_path / "out" / "train").column("source").to_pylist()) == {"p"}


def test_a_units_own_repeats_are_dropped_before_tokenizer_and_shuffle(
        world: Path, tmp_path: Path) -> None:
    """The unit worker drops a repeat of one of its unit's earlier documents (normalised text,
    same language) itself and counts it; it reaches neither the token files nor the shuffle.
    The same text in another language is no repeat in the default per-language scope."""
    from dataclasses import asdict

    import pyarrow as pa

    from components.data.docops import UnitWorker
    from components.data.readers import resolve_source
    from components.data.tokenize import load_tokenizer

    texts = ["habari rafiki leo", "kitabu sana", "HABARI  rafiki\nleo", "maji shule",
             "kitabu sana"]
    pq.write_table(pa.table({"body": texts, "code": ["sw", "sw", "sw", "sw", "en"]}),
                   tmp_path / "c.parquet")
    cfg = DataConfig.model_validate({
        "sources": [{"name": "p", "format": "parquet", "path": str(tmp_path / "c.parquet"),
                     "text_column": "body", "language_column": "code"}],
        "filters": {"min_chars": None, "max_non_alpha_fraction": None}})
    langs = ["swh_Latn", "eng_Latn"]
    plans = [resolve_source(cfg.sources[0], langs, None)]
    work = tmp_path / "work"
    worker = UnitWorker(cfg, langs, plans, load_tokenizer(world / "model").json, str(work), {},
                        1, 0, 1)
    counts = worker(pa.Table.from_pylist([asdict(u) for u in plans[0].units(0, 2**30)]))
    drops = {(r["lang"], r["detail"]): r["n"] for r in counts.to_pylist() if r["kind"] == "drop"}
    assert drops == {("swh_Latn", "exact_duplicate"): 1}
    rows = {lang: (pq.read_table(work / "docs" / lang).column("key").to_numpy() & 0xFFFFFFFF)
            .tolist() for lang in langs}
    assert rows == {"swh_Latn": [0, 1, 3], "eng_Latn": [4]}
    shuffled = pq.read_table(work / "exact").column("key").to_numpy() & 0xFFFFFFFF
    assert sorted(shuffled.tolist()) == [0, 1, 3, 4]


def test_unit_counts_are_summed_by_a_running_tree_of_tasks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa

    import components.data.pipeline as pipeline
    from components.data.docops import COUNT_SCHEMA

    monkeypatch.setattr(pipeline, "_SUM_FAN_IN", 2)  # five blocks: three folds, then the last
    blocks = [pa.table({"kind": ["in", "drop"], "lang": ["a", "b"], "detail": ["", "x"],
                        "n": [i, 10 * i]}, schema=COUNT_SCHEMA) for i in range(1, 6)]
    rows = ray.get(pipeline._total(ray.put(b) for b in blocks))
    assert rows == [{"kind": "drop", "lang": "b", "detail": "x", "n": 150},
                    {"kind": "in", "lang": "a", "detail": "", "n": 15}]


@pytest.mark.parametrize(("case", "message"), [
    ("missing_path", r"source 'w': path .*nowhere does not exist"),
    ("missing_column", r"column 'body' not in .*parquet"),
    ("no_data_for_language", r"no fineweb2 folder for tur_Latn"),
    ("no_eos", r"has no EOS token"),
])
def test_bad_input_is_named(world: Path, tmp_path: Path, case: str, message: str) -> None:
    fmt, langs, tokenizer = "fineweb2", LANGS, world / "model"
    raw: dict = {"name": "w", "format": fmt, "path": str(world / "corpora" / fmt)}
    if case == "missing_path":
        raw["path"] = str(tmp_path / "nowhere")
    elif case == "missing_column":
        raw["text_column"] = "body"
    elif case == "no_data_for_language":
        raw["languages"] = ["tur_Latn"]
        langs = ["tur_Latn"]
        (tmp_path / "c").mkdir()
    elif case == "no_eos":
        tokenizer = tmp_path / "tok"
        tokenizer.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            data = json.loads((world / "model" / name).read_text())
            if name == "tokenizer_config.json":
                data.pop("eos_token", None)
            (tokenizer / name).write_text(json.dumps(data))
    cfg = DataConfig.model_validate({"sources": [raw], "seq_len": 64})
    with pytest.raises(DataError, match=message):
        prepare_data(cfg, langs, ORIGINAL, tokenizer, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "stats.json").exists()


def test_stage_command_builds_once_and_logs(world: Path, tmp_path: Path) -> None:
    """`deltamoe data CONFIG` in a fresh process: the stage folder with its manifest, statistics
    in MLflow, and a rerun that skips."""
    from mlflow import MlflowClient

    config = {"run_name": "d", "models": {"base": str(world / "model"),
                                          "post": str(world / "model")},
              "languages": {"original": ORIGINAL, "new": NEW},
              "data": {"sources": [{"name": "w", "format": "fineweb2",
                                    "path": str(world / "corpora/fineweb2")}], "seq_len": 64},
              "storage": {"root": str(tmp_path / "runs")},
              "tracking": {"uri": f"sqlite:///{tmp_path}/m.db"},
              "resources": {"ray_address": None}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    env_cmd = [sys.executable, "-m", "workflows.cli", "data", str(path)]
    first = subprocess.run(env_cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "swh_Latn: 154 → 150 documents" in first.stdout
    stage = tmp_path / "runs" / "d" / "data"
    assert (stage / "manifest.json").exists() and list((stage / "train").glob("*.parquet"))
    # a complete stage is answered before Ray starts: an unreachable cluster does not matter
    again = subprocess.run([*env_cmd, "--set", "resources.ray_address=127.0.0.1:9"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already complete, skipped" in again.stdout, again.stderr
    stats = json.loads((stage / "stats.json").read_text())
    assert stats["out_dir"] == str(stage)  # the final folder, not the build folder
    assert stats["files"] and all(f.startswith(f"{stage}/") for f in stats["files"])
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    run = client.search_runs([client.get_experiment_by_name("deltamoe").experiment_id],
                             filter_string="tags.`deltamoe.stage` = 'data'")[0]
    assert run.data.metrics["data/documents_out/swh_Latn"] == 150
    assert run.data.metrics["data/dropped/exact_duplicate/swh_Latn"] == 3
    # the default mix leaves most kept tokens unused here: a metric and a warning on the run
    assert run.data.metrics["data/tokens_unused_fraction"] > 0.1
    assert "data.mix.mode: all" in run.data.tags["data.warnings"]
    arrays = np.array(pq.read_table(stage / "train").column("input_ids").to_pylist())
    assert arrays.shape[1] == 64
