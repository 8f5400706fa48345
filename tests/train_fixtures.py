"""Shared inputs of the train tests: a small synthetic world, its text packed into the data
stage's parquet layout (written here, so these tests do not depend on the data stage), and an
upcycled MoE of the world's model."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SEQ_LEN = 64
ORIGINAL = ["eng_Latn", "deu_Latn"]
NEW = ["swh_Latn"]


def build_world(root: Path) -> Path:
    from components.synthetic import build_world as build

    world = root / "world"
    if not (world / "world.json").exists():
        build(world, seed=0, num_people=24, docs_per_language=60, vocab_size=600,
              languages=[*ORIGINAL, *NEW, "rus_Cyrl"])
    return world


def pack(world: Path, languages: list[str], out: Path, rows_per_lang: int,
         seq_len: int = SEQ_LEN, corpus: str = "fineweb2") -> Path:
    """Tokenize the world's ``corpora/<corpus>`` text (``fineweb2``: the CPT corpus;
    ``base/fineweb2``: the base's pre-training text) and the held-out text into fixed-length
    rows: ``out/train/part-0.parquet`` and ``out/validation/part-0.parquet``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world / "tokenizer")
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    splits: dict[str, dict[str, list]] = {s: {"input_ids": [], "lang": [], "source": []}
                                          for s in ("train", "validation")}
    for tag in languages:
        train_texts = [r for f in sorted((world / "corpora" / corpus).rglob("*.parquet"))
                       if tag in str(f) for r in pq.read_table(f, columns=["text"])
                       .column("text").to_pylist()]
        val_texts = [json.loads(line)["text"] for line in
                     (world / "eval" / tag / "lm.jsonl").read_text().splitlines() if line]
        for split, texts, limit in (("train", train_texts, rows_per_lang),
                                    ("validation", val_texts, 16)):
            stream: list[int] = []
            for text in texts:
                stream += tok(text)["input_ids"] + [eos]
            for i in range(min(limit, len(stream) // seq_len)):
                splits[split]["input_ids"].append(stream[i * seq_len:(i + 1) * seq_len])
                splits[split]["lang"].append(tag)
                splits[split]["source"].append("world")
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("lang", pa.string()),
                        ("source", pa.string())])
    for split, cols in splits.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols, schema=schema), out / split / "part-0.parquet")
    return out


def upcycle_world(world: Path, out: Path) -> Path:
    from components.moe.allocation import language_allocation
    from components.moe.upcycle import UpcycleOptions, upcycle

    if not (out / "config.json").exists():
        experts, groups = language_allocation(ORIGINAL, NEW, 4, {"original": [0],
                                                                  "swh_Latn": [1, 2, 3]},
                                              {"original": ORIGINAL})
        out.mkdir(parents=True, exist_ok=True)
        upcycle(world / "model", out, UpcycleOptions(
            num_experts=4, top_k=2, allocation=experts, groups=groups, seq_len=SEQ_LEN,
            original_languages=tuple(ORIGINAL)))
    return out
