"""Routing analysis of an MoE variant: which experts each language's tokens reach, per layer.

Expert load is measured on evaluation text with :class:`components.moe.routing.RouterCapture`
and :class:`~components.moe.routing.RouterStats` (the share of a language's top-k assignments
that go to each expert). Comparing two variants' loads — CPT-MoE before the graft and DeltaMoE
after it — gives the routing drift the graft causes: the total-variation distance between the
two load rows of each layer and language (0 = identical routing, 1 = disjoint experts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from components.moe.routing import RouterCapture, RouterStats

__all__ = ["Load", "routing_drift", "routing_load", "routing_rows"]

Load = dict[int, dict[str, list[float]]]  # layer → lang → share per expert


@torch.no_grad()
def routing_load(model: Any, tokenizer: Any, texts: Mapping[str, Sequence[str]], *,
                 max_docs: int = 32, max_length: int = 256, batch_size: int = 8) -> Load | None:
    """Expert load per layer per language on ``texts``; None for a dense model (no router)."""
    try:
        capture = RouterCapture(model)
    except ValueError:
        return None
    languages = [lang for lang, docs in texts.items() if docs]
    stats = RouterStats(languages)
    device = next(model.parameters()).device
    with capture:
        for index, lang in enumerate(languages):
            docs = list(texts[lang])[:max_docs]
            for start in range(0, len(docs), batch_size):
                batch = tokenizer(docs[start:start + batch_size], return_tensors="pt",
                                  padding=True, truncation=True, max_length=max_length)
                batch = {k: v.to(device) for k, v in batch.items()
                         if k in ("input_ids", "attention_mask")}
                capture.clear()
                model(**batch)
                mask = batch["attention_mask"]
                stats.update(capture.logits, capture.top_k(),
                             torch.full_like(mask, index), mask)
    return stats.load()


def routing_drift(before: Load, after: Load) -> dict[int, dict[str, float]]:
    """Total-variation distance between two loads, per layer and language both measured."""
    drift: dict[int, dict[str, float]] = {}
    for layer in sorted(set(before) & set(after)):
        for lang in sorted(set(before[layer]) & set(after[layer])):
            a, b = before[layer][lang], after[layer][lang]
            if len(a) != len(b):
                raise ValueError(f"layer {layer}: {len(a)} experts before, {len(b)} after")
            drift.setdefault(layer, {})[lang] = 0.5 * sum(abs(x - y)
                                                           for x, y in zip(a, b, strict=True))
    return drift


def routing_rows(load: Load, variant: str) -> list[dict[str, Any]]:
    """The load as table rows ``{variant, layer, lang, expert, share}``."""
    return [{"variant": variant, "layer": layer, "lang": lang, "expert": expert, "share": share}
            for layer, by_lang in sorted(load.items()) for lang, row in by_lang.items()
            for expert, share in enumerate(row)]
