"""One reader per source format: each resolves a tiny corpus of its own layout and reads it,
work unit by work unit as the stage's workers do, into the exact document rows and labels it
must give; the
registry names the formats the config accepts, and an unknown format names the known ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.config import DataSource
from components.data import DataError
from components.data.readers import (
    DOC_SCHEMA,
    READERS,
    CulturaXReader,
    FineWeb2Reader,
    JsonlReader,
    ParquetReader,
    reader_for,
    resolve_source,
)

RUN = ["swh_Latn", "eng_Latn", "tur_Latn"]  # tur_Latn: no corpus here has it


def _read(plan: Any, batch_size: int) -> pa.Table:
    """Every unit's documents in corpus order; rows numbered from 0 within each file."""
    tables = []
    for unit in plan.units(0, 2**30):
        expected_row = 0
        for row, table in plan.documents(unit, batch_size):
            assert row == expected_row and table.num_rows <= batch_size
            expected_row += table.num_rows
            tables.append(table)
    return pa.concat_tables(tables)


def _parquet(path: Path, **columns: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def _fineweb2(root: Path) -> dict[str, Any]:
    """Per-document labels: one the dataset does not know, one missing, one stray byte."""
    _parquet(root / "data/swh_Latn/train/000.parquet",
             text=pa.array([b"habari yako", b"caf\xe9", b"hello there"], pa.binary()),
             language=["swh", "xx", None], language_script=["Latn", "Fake", "Latn"])
    _parquet(root / "data/eng_Latn/train/000.parquet", text=["good morning"],
             language=["eng"], language_script=["Latn"])
    return {"format": "fineweb2", "path": str(root)}


def _culturax(root: Path) -> dict[str, Any]:
    """The folder is the label, whatever columns the files have."""
    _parquet(root / "sw/sw_part_00000.parquet", text=["habari", "asante"], url=["a", "b"])
    _parquet(root / "en/en_part_00000.parquet", text=["thanks"], url=["c"])
    return {"format": "culturax", "path": str(root)}


def _jsonl(root: Path) -> dict[str, Any]:
    """A language column, a broken line and a line without text."""
    root.mkdir()
    lines = [json.dumps({"text": "habari", "lang": "sw"}), "{not json",
             json.dumps({"body": "no text"}), json.dumps({"text": "hello", "lang": "en"})]
    (root / "a.jsonl").write_text("\n".join(lines) + "\n")
    (root / "b.json").write_text(json.dumps({"text": "merci", "lang": "fr"}) + "\n")
    return {"format": "jsonl", "path": str(root), "language_column": "lang"}


def _plain_parquet(root: Path) -> dict[str, Any]:
    """No language column: the one language the source lists labels every document."""
    _parquet(root / "b/part.parquet", body=["mbili"])
    _parquet(root / "a.parquet", body=["moja", "tatu"])
    return {"format": "parquet", "path": str(root), "text_column": "body",
            "languages": ["swh_Latn"]}


# format → (corpus builder, languages resolved, rows as (text, label, bad_utf8, drop))
CASES = {
    "fineweb2": (_fineweb2, ["swh_Latn", "eng_Latn"], [  # files in the run's language order
        ("habari yako", "swh_Latn", 0, ""), ("caf\ufffd", "?xx_Fake", 1, "unknown_language"),
        ("hello there", "", 0, ""), ("good morning", "eng_Latn", 0, "")]),
    "culturax": (_culturax, ["swh_Latn", "eng_Latn"], [
        ("habari", "swh_Latn", 0, ""), ("asante", "swh_Latn", 0, ""),
        ("thanks", "eng_Latn", 0, "")]),
    "jsonl": (_jsonl, RUN, [
        ("habari", "swh_Latn", 0, ""), ("", "", 0, "bad_json"), ("", "", 0, "no_text"),
        ("hello", "eng_Latn", 0, ""), ("merci", "fra_Latn", 0, "")]),
    "parquet": (_plain_parquet, ["swh_Latn"], [
        ("moja", "swh_Latn", 0, ""), ("tatu", "swh_Latn", 0, ""),
        ("mbili", "swh_Latn", 0, "")]),
}


def test_registry_names_each_format_once() -> None:
    assert READERS == {"fineweb2": FineWeb2Reader, "culturax": CulturaXReader,
                       "jsonl": JsonlReader, "parquet": ParquetReader}
    assert all(reader_for(name).name == name for name in READERS)
    assert set(CASES) == set(READERS)


@pytest.mark.parametrize("fmt", sorted(READERS))
def test_each_reader_resolves_and_reads_its_layout(fmt: str, tmp_path: Path) -> None:
    build, languages, expected = CASES[fmt]
    source = DataSource.model_validate({"name": f"s-{fmt}", **build(tmp_path / fmt)})
    plan = resolve_source(source, RUN)
    assert isinstance(plan.reader, READERS[fmt]) and plan.source is source
    assert plan.languages == languages
    # only a layout says which languages a source holds; flat files claim all the run's
    assert plan.reader.finds_languages is (fmt in ("fineweb2", "culturax"))
    table = _read(plan, 2)
    assert table.schema == DOC_SCHEMA
    rows = list(zip(*(table.column(c).to_pylist() for c in ("text", "label", "bad_utf8",
                                                             "drop")), strict=True))
    assert rows == expected
    assert set(table.column("source").to_pylist()) == {f"s-{fmt}"}


def test_fineweb2_without_language_columns_is_labelled_by_its_folder(tmp_path: Path) -> None:
    _parquet(tmp_path / "data/swh_Latn/train/0.parquet", text=["habari"])
    _parquet(tmp_path / "data/eng_Latn/train/0.parquet", text=["hello", "hi"])
    source = DataSource(name="f", format="fineweb2", path=str(tmp_path))
    plan = resolve_source(source, RUN)
    assert plan.columns == ["text"]
    table = _read(plan, 8)
    assert table.column("label").to_pylist() == ["swh_Latn", "eng_Latn", "eng_Latn"]


@pytest.mark.parametrize(("fmt", "message"), [
    ("fineweb2", r"source 's': no fineweb2 folder for tur_Latn: .*data/tur_Latn/train does "
                 "not exist"),
    ("culturax", r"source 's': no culturax folder for tur_Latn: .*/tr does not exist"),
])
def test_a_listed_language_missing_from_the_layout_is_named(fmt: str, message: str,
                                                           tmp_path: Path) -> None:
    raw = CASES[fmt][0](tmp_path / fmt)
    source = DataSource.model_validate({"name": "s", **raw, "languages": ["tur_Latn"]})
    with pytest.raises(DataError, match=message):
        resolve_source(source, RUN)


def test_unknown_format_names_the_known_ones() -> None:
    with pytest.raises(DataError, match="unknown source format 'csv'; known formats: "
                                        "fineweb2, culturax, jsonl, parquet"):
        reader_for("csv")


def test_fineweb2_mandarin_is_read_from_its_own_folder_and_listed_when_missing(
        tmp_path: Path) -> None:
    """`zh` is zho_Hans, but FineWeb2 files Mandarin under cmn_Hani: the reader looks there and
    its documents are the run's zho_Hans; a missing folder lists the tags the source has."""
    _parquet(tmp_path / "data/cmn_Hani/train/0.parquet", text=["你好", "谢谢"],
             language=["cmn", "cmn"], language_script=["Hani", "Hani"])
    _parquet(tmp_path / "data/eng_Latn/train/0.parquet", text=["hi"])
    source = DataSource.model_validate({"name": "f", "format": "fineweb2", "path": str(tmp_path),
                                        "languages": ["zh"]})
    plan = resolve_source(source, ["zho_Hans"])
    assert plan.languages == ["zho_Hans"] and plan.aliases == {"cmn_Hani": "zho_Hans"}
    assert _read(plan, 8).column("label").to_pylist() == ["zho_Hans", "zho_Hans"]
    other = DataSource.model_validate({"name": "f", "format": "fineweb2", "path": str(tmp_path),
                                       "languages": ["swh_Latn"]})
    with pytest.raises(DataError, match=r"no fineweb2 folder for swh_Latn: .* \(it has: "
                                        r"cmn_Hani, eng_Latn\)"):
        resolve_source(other, ["swh_Latn"])


def test_a_large_parquet_file_is_split_into_row_group_units(tmp_path: Path) -> None:
    texts = [f"document number {i}" for i in range(50)]
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=10)
    source = DataSource(name="p", format="parquet", path=str(path), languages=["swh_Latn"])
    plan = resolve_source(source, RUN)
    units = plan.units(3, unit_bytes=1)  # every row group its own unit
    assert [(u.source, u.first_row, u.first_group, u.end_group) for u in units] == [
        (3, 10 * g, g, g + 1) for g in range(5)]
    got = [(row, t.column("text").to_pylist()) for u in units
           for row, t in plan.documents(u, batch_size=4)]
    assert [t for _, batch in got for t in batch] == texts
    assert [row for row, _ in got][:4] == [0, 4, 8, 10]  # batches never cross a unit


def test_config_validation_checks_every_language_has_a_folder(tmp_path: Path) -> None:
    """What `config validate` adds to the schema: a local layout source without a run
    language's folder is named with what it looked for and the tags it has; data made by an
    earlier stage ({run_dir}) and remote sources are left to the stage."""
    from components.config import DataConfig
    from components.data.validate import source_issues

    _parquet(tmp_path / "fw/data/eng_Latn/train/0.parquet", text=["hello"])
    _parquet(tmp_path / "fw/data/cmn_Hani/train/0.parquet", text=["你好"])
    data = DataConfig.model_validate({"sources": [
        {"name": "w", "format": "fineweb2", "path": str(tmp_path / "fw")}]})
    assert source_issues(data, ["eng_Latn", "zho_Hans"]) == []  # zh lives in cmn_Hani
    assert source_issues(data, ["eng_Latn", "swh_Latn"]) == [(
        "data.sources", "no source has data for swh_Latn (looked for swh_Latn; 'w' has "
                        "cmn_Hani, eng_Latn)")]
    lazy = DataConfig.model_validate({"sources": [
        {"name": "r", "format": "fineweb2", "path": "s3://bucket/fineweb2"},
        {"name": "l", "format": "jsonl", "path": "{run_dir}/world/corpus.jsonl"}]})
    assert source_issues(lazy, ["swh_Latn"]) == []
    missing = DataConfig.model_validate({"sources": [
        {"name": "m", "format": "parquet", "path": str(tmp_path / "nowhere")}]})
    [(where, message)] = source_issues(missing, ["swh_Latn"])
    assert where == "data.sources.0" and "does not exist" in message
