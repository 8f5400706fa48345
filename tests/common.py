"""Helpers every model test shares: the tiny dense config and saving a model (with its
tokenizer) as a Hugging Face directory, so each test file does not redefine them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_DIMS: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def tiny_dims(vocab_size: int, **overrides: Any) -> dict[str, Any]:
    """Config keyword arguments of a tiny dense model (any family); each test picks its own
    vocabulary size, and ``overrides`` change the rest."""
    return {"vocab_size": vocab_size, **TINY_DIMS, **overrides}


def save_model(model: Any, path: Path, tokenizer: Any | None = None) -> Path:
    """``model`` (and ``tokenizer``) saved as a Hugging Face directory at ``path``."""
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
