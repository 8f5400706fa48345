"""SFT data: chat conversations → packed fixed-length rows with the loss on response tokens only.

A row without ``messages`` may instead be plain text (``{"text": ..., "lang": ...}``): pre-training
text replayed during post-training, with the loss on every token and an EOS after it, so the
post-trained model keeps the base's language modelling as real post-training does (a small
model fine-tuned on answers alone forgets it, and every grafted Δpost would carry that loss).

Each conversation is rendered with the tokenizer's chat template; the prompt (every turn before
the last assistant message, plus the assistant header) and the response are tokenized
separately and concatenated, so the label boundary is exact. ``labels`` are -100 on prompt
tokens and padding. Several short conversations are packed into one row (the synthetic world's
instructions are a few dozen tokens each) and none is split across rows. A conversation longer
than a row is left out and counted: cut at the row's end it would lose its response and
supervise nothing (an open-book question's context comes before its answer).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from components.train.data import IGNORE
from components.train.spec import TrainError

log = logging.getLogger(__name__)

SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                    ("lang", pa.string()), ("source", pa.string())])


def encode(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation ending in an assistant turn."""
    if not messages or messages[-1].get("role") != "assistant":
        raise TrainError("an SFT conversation must end with an assistant message")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False,
                                           add_generation_prompt=True)
    if not full.startswith(prompt):
        raise TrainError("the chat template does not render the prompt as a prefix of the "
                         "conversation; cannot place the response labels")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    return prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids


def encode_text(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """Token ids and labels of one replayed pre-training text: the loss on every token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids, list(ids)


def pack_rows(examples: Iterable[tuple[list[int], list[int], str]], seq_len: int,
              pad_id: int) -> dict[str, list[Any]]:
    """Greedy packing per language: conversations in order until the next would not fit."""
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "lang": [], "source": []}
    open_rows: dict[str, tuple[list[int], list[int]]] = {}

    def flush(lang: str) -> None:
        ids, labels = open_rows.pop(lang)
        pad = seq_len - len(ids)
        out["input_ids"].append(ids + [pad_id] * pad)
        out["labels"].append(labels + [IGNORE] * pad)
        out["lang"].append(lang)
        out["source"].append("sft")

    for ids, labels, lang in examples:
        if len(ids) > seq_len:
            raise TrainError(f"a conversation of {len(ids)} tokens does not fit a row of "
                             f"{seq_len}; leave it out before packing")
        current = open_rows.get(lang)
        if current is not None and len(current[0]) + len(ids) > seq_len:
            flush(lang)
            current = None
        if current is None:
            open_rows[lang] = (list(ids), list(labels))
        else:
            current[0].extend(ids)
            current[1].extend(labels)
    for lang in list(open_rows):
        flush(lang)
    return out


def build_sft_parquet(tokenizer: Any, files: Sequence[str | Path], out_dir: str | Path,
                      seq_len: int, validation_fraction: float = 0.05) -> dict[str, int]:
    """JSONL rows with ``lang`` and ``messages`` (or ``text``, replayed pre-training text) →
    ``out_dir/{train,validation}/part-0.parquet``;
    returns row counts per split (and ``<split>_too_long``, the conversations left out). The
    last ``validation_fraction`` of each file is held out."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    splits: dict[str, list[tuple[list[int], list[int], str]]] = {"train": [], "validation": []}
    for file in files:
        rows = [json.loads(line) for line in Path(file).read_text(encoding="utf-8").splitlines()
                if line.strip()]
        if not rows:
            raise TrainError(f"{file}: no instruction rows")
        held = max(1, int(len(rows) * validation_fraction))
        for i, row in enumerate(rows):
            if "lang" not in row or ("messages" not in row and "text" not in row):
                raise TrainError(f"{file}:{i + 1}: expected keys lang and messages (a "
                                 "conversation) or, without messages, text (replayed "
                                 "pre-training text)")
            ids, labels = (encode(tokenizer, row["messages"]) if "messages" in row
                           else encode_text(tokenizer, row["text"]))
            splits["validation" if i >= len(rows) - held else "train"].append(
                (ids, labels, row["lang"]))
    counts: dict[str, int] = {}
    for split, examples in list(splits.items()):
        kept = [e for e in examples if len(e[0]) <= seq_len]
        counts[f"{split}_too_long"] = len(examples) - len(kept)
        if not kept:
            raise TrainError(f"every {split} conversation is longer than data.seq_len "
                             f"{seq_len} tokens; raise it")
        if len(kept) < len(examples):
            log.warning("sft: %d of %d %s conversations are longer than data.seq_len %d and "
                        "are left out", len(examples) - len(kept), len(examples), split, seq_len)
        splits[split] = kept
    for split, examples in splits.items():
        table = pa.table(pack_rows(examples, seq_len, pad_id), schema=SCHEMA)
        (Path(out_dir) / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, Path(out_dir) / split / "part-0.parquet")
        counts[split] = table.num_rows
    return counts
