"""Tokenization with the base model's fast tokenizer, batched inside Ray Data.

The driver loads the tokenizer once with ``AutoTokenizer`` (so a model directory, a tokenizer
directory or a hub snapshot all work, and its EOS token is checked before any worker starts) and
ships the Rust tokenizer as its JSON string; each actor rebuilds it with ``tokenizers`` and
encodes whole batches with ``encode_batch_fast`` (Rust threads, no offsets). Documents get no
special tokens here: the packer puts EOS between documents.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from components.data.errors import DataError

__all__ = ["TokenizeBatch", "TokenizerSpec", "load_tokenizer", "token_lists"]


@dataclass(frozen=True)
class TokenizerSpec:
    """What workers need: the serialised fast tokenizer and its EOS id."""

    json: str
    eos_id: int
    eos_token: str
    vocab_size: int
    source: str


def load_tokenizer(tokenizer_dir: str | Path) -> TokenizerSpec:
    """Load and check the tokenizer: it must exist, be a fast tokenizer and have an EOS."""
    from transformers import AutoTokenizer

    where = str(tokenizer_dir)
    try:
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as err:
        raise DataError(f"cannot load a tokenizer from {where}: {str(err).splitlines()[0]}") \
            from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"the tokenizer in {where} is not a fast (Rust) tokenizer; the data "
                        "stage needs tokenizer.json")
    if tok.eos_token_id is None:
        raise DataError(f"the tokenizer in {where} has no EOS token, which the packer puts "
                        "between documents; set eos_token in its tokenizer_config.json")
    return TokenizerSpec(json=backend.to_str(), eos_id=int(tok.eos_token_id),
                         eos_token=str(tok.eos_token), vocab_size=len(tok), source=where)


def token_lists(ids: list[list[int]]) -> pa.Array:
    """``list<int32>`` Arrow column from Python id lists, built from one flat numpy array."""
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32,
                       count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int32()))


class TokenizeBatch:
    """Ray Data class UDF: encodes the kept documents of a batch; drops the text column.

    The Rust BPE model caches the merges of the words it has seen, but its cache stops taking
    words once full (10,000 by default) and never evicts: an actor that tokenized one language
    first keeps that language's words and encodes every later language uncached (35–40 % more
    CPU per file than a fresh tokenizer, measured on the data_scale corpus). :meth:`__call__`
    is told the batch's language and empties the cache when it changes, so each language fills
    it with its own frequent words.
    The cache changes speed only, never the ids.
    """

    def __init__(self, tokenizer_json: str, threads: int | None = None) -> None:
        from tokenizers import Tokenizer

        # Threads of the Rust encoder in this (actor) process; None: one per core. Set before
        # the first encode, when the encoder's thread pool is built.
        if threads == 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        elif threads:
            os.environ["RAYON_NUM_THREADS"] = str(threads)
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.cached_language: str | None = None

    def _use_cache_for(self, language: str) -> None:
        if language == self.cached_language:
            return
        # a private method of every model type since tokenizers 0.20: looked up, not assumed
        clear = getattr(self.tokenizer.model, "_clear_cache", None)
        if clear is not None:
            clear()
        self.cached_language = language

    def __call__(self, batch: pa.Table, language: str | None = None) -> pa.Table:
        """``language``: the batch's (main) language, when the caller knows it."""
        if language is not None:
            self._use_cache_for(language)
        texts = batch.column("text").to_pylist()
        drops = batch.column("drop").to_pylist()
        keep = [i for i, d in enumerate(drops) if not d]
        ids: list[list[int]] = [[] for _ in texts]
        if keep:
            encoded = self.tokenizer.encode_batch_fast([texts[i] for i in keep],
                                                       add_special_tokens=False)
            for i, enc in zip(keep, encoded, strict=True):
                ids[i] = enc.ids
        column = token_lists(ids)
        out = batch.drop_columns(["text"])
        return out.append_column("input_ids", column)
