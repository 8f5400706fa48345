"""The world's corpora on disk, in the layouts of the real datasets they stand in for.

FineWeb2 (``data/<tag>/train/*.parquet`` with its columns) and CulturaX (``<iso639-1>/*.parquet``)
as the data stage reads them from a hub, with deterministic ids, dates and URLs, and the junk
documents a quality filter must drop.
"""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from components.synthetic.grammar import LanguageSpec

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


def junk_document(rng: random.Random, spec: LanguageSpec, k: int) -> str:
    """Documents a quality filter must drop: digit soup, or one line repeated."""
    if k % 2 == 0:
        return " ".join(f"{rng.randrange(10**6):06d} ### {rng.randrange(999)}%" for _ in range(30))
    line = spec.filler(rng)
    return "\n".join([line] * 12)


def _uuid(seed: int, *parts: object) -> str:
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def write_corpora(root: Path, seed: int, spec: LanguageSpec, texts: list[str],
                  culturax: bool = True, kind: str = "cpt") -> list[str]:
    """One language in the FineWeb2 layout under ``root/fineweb2`` and (``culturax``) in the
    CulturaX layout under ``root/culturax``; returns document ids."""
    n = len(texts)
    ids = [f"<urn:uuid:{_uuid(seed, kind, spec.tag, i)}>" for i in range(n)]
    dates = [(_BASE_DATE + timedelta(minutes=7919 * i)).strftime("%Y-%m-%dT%H:%M:%SZ")
             for i in range(n)]
    urls = [f"https://{spec.iso639_1}.example.org/{kind}/{i:06d}" for i in range(n)]
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
    fw_dir = root / "fineweb2" / "data" / spec.tag / "train"
    fw_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(fineweb, fw_dir / "000_00000.parquet")
    if not culturax:
        return ids
    cx_table = pa.table({
        "text": texts, "timestamp": [d.replace("T", " ").rstrip("Z") for d in dates],
        "url": urls, "source": ["mC4" if i % 3 else "OSCAR-2301" for i in range(n)],
    }, schema=CULTURAX_SCHEMA)
    cx_dir = root / "culturax" / spec.iso639_1
    cx_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(cx_table, cx_dir / f"{spec.iso639_1}_part_00000.parquet")
    return ids
