"""Which experts serve which language, and LayerMoE's per-layer expert counts.

Two allocations feed the upcycler:

* **Language** (DeltaMoE, MoE-LPR): the original languages keep the anchor expert 0; each new
  language (or named group) gets its own experts. The map is written next to the model as
  ``allocation.json`` and read back by :class:`RoutingPrior`, which turns a batch's language ids
  into the allowed-expert masks of the routing-prior loss.
* **LayerMoE** (arXiv 2505.22582): layers where the languages' hidden states are already alike
  need fewer new experts. :func:`layer_similarity` measures that per layer on held-out text,
  :func:`layermoe_counts` spends a budget of new experts accordingly, and the most similar layers
  get a classifier that sends original-language tokens to the anchor.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm import tqdm

ORIGINAL_GROUP = "original"


def language_allocation(original: Sequence[str], new: Sequence[str], num_experts: int,
                        experts: Mapping[str, Sequence[int]] | None = None,
                        groups: Mapping[str, Sequence[str]] | None = None,
                        ) -> tuple[dict[str, list[int]], dict[str, list[str]]]:
    """The configured map, or the default one when the config leaves it empty.

    Default: group ``original`` (every original language) → [0]; the new languages share experts
    1..N-1 round-robin, so with N-1 ≥ len(new) each gets its own disjoint set.
    """
    groups = {k: list(v) for k, v in (groups or {}).items()}
    if experts:
        return {k: list(v) for k, v in experts.items()}, groups
    groups.setdefault(ORIGINAL_GROUP, list(original))
    chosen: dict[str, list[int]] = {ORIGINAL_GROUP: [0]}
    slots = list(range(1, num_experts))
    for i, tag in enumerate(new):
        own = slots[i::len(new)] if len(slots) >= len(new) else [slots[i % len(slots)]]
        chosen[tag] = own
    return chosen, groups


PriorMode = Literal["allocation", "anchor"]
SimilarityMeasure = Literal["new_pairs", "all_pairs"]


@dataclass(frozen=True)
class RoutingPrior:
    """Allowed experts per language per layer, from an upcycled model's ``allocation.json``.

    A language resolves to its own entry, else to the entry of a group that lists it, else (an
    original language) to the anchor; a language none of these reaches is *unallocated*.
    :meth:`experts_for` (what the allocated-share metric reads) gives an unallocated language,
    or one whose ids a layer lacks, every expert of the layer; :meth:`allowed` (the LPR loss's
    masks) leaves such tokens free instead — an all-False row, so they are out of the loss's
    mean rather than counted as zero-loss tokens that dilute it.
    """

    languages: tuple[str, ...]
    original: frozenset[str]
    experts_per_layer: tuple[int, ...]
    experts: Mapping[str, Sequence[int]]
    groups: Mapping[str, Sequence[str]]

    @classmethod
    def from_model(cls, model_dir: str | Path, languages: Sequence[str]) -> RoutingPrior:
        record = json.loads((Path(model_dir) / "allocation.json").read_text())
        return cls(tuple(languages), frozenset(record.get("original_languages", [])),
                   tuple(record["experts_per_layer"]), record.get("experts", {}),
                   record.get("groups", {}))

    def allocated(self, tag: str, layer: int) -> list[int]:
        """The experts of ``layer`` the allocation gives ``tag``; empty when it gives none."""
        ids = self.experts.get(tag)
        if ids is None:
            group = next((g for g, tags in self.groups.items() if tag in tags), None)
            ids = self.experts.get(group) if group else None
        if ids is None:
            ids = [0] if tag in self.original else []
        return [i for i in ids if i < self.experts_per_layer[layer]]

    def experts_for(self, tag: str, layer: int) -> list[int]:
        return self.allocated(tag, layer) or list(range(self.experts_per_layer[layer]))

    def table(self, layer: int, prior: PriorMode = "allocation") -> torch.Tensor:
        """[languages, experts] bool, the LPR targets of ``layer``: under ``allocation`` row i
        allows language ``languages[i]``'s allocated experts; under ``anchor`` (MoE-LPR's
        review) original languages get the anchor alone and every other language is free.
        Free rows (unallocated languages too) are all False."""
        out = torch.zeros(len(self.languages), self.experts_per_layer[layer], dtype=torch.bool)
        for i, tag in enumerate(self.languages):
            if prior == "anchor":
                out[i, 0] = tag in self.original
            else:
                out[i, self.allocated(tag, layer)] = True
        return out

    def allowed(self, layers: Sequence[int], lang_index: torch.Tensor,
                prior: PriorMode = "allocation") -> list[torch.Tensor]:
        """Per layer, a [tokens, experts] mask for tokens whose language index is given."""
        flat = lang_index.reshape(-1).cpu().long()
        return [self.table(layer, prior)[flat] for layer in layers]

    def is_new(self, lang_index: torch.Tensor) -> torch.Tensor:
        """Classifier targets: 1 where the token's language is not an original one."""
        new = torch.tensor([tag not in self.original for tag in self.languages])
        return new[lang_index.reshape(-1).cpu().long()]


@torch.no_grad()
def language_centroids(model: nn.Module, tokenizer: Any, texts: Mapping[str, Sequence[str]],
                       max_length: int = 128, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Per language, the [layers, hidden] mean FFN input over all its non-padding tokens.

    The FFN input is the post-attention-norm hidden state that the router will see.
    """
    layers = model.model.layers
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    current: dict[str, Any] = {}

    def hook(index: int) -> Any:
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            mask = current["mask"]
            current["states"][index] = (args[0].float() * mask[..., None]).sum(dim=(0, 1))
        return record

    handles = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        model.eval()
        for lang, docs in tqdm(texts.items(), desc="layer similarity", unit="language"):
            if not docs:
                raise ValueError(f"no held-out text for {lang}")
            total = torch.zeros(len(layers), model.config.hidden_size)
            for start in range(0, len(docs), batch_size):
                batch = tokenizer(list(docs[start:start + batch_size]), return_tensors="pt",
                                  padding=True, truncation=True, max_length=max_length)
                batch = {k: v.to(device) for k, v in batch.items()}
                current.update(mask=batch["attention_mask"].float(), states={})
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                total += torch.stack([current["states"][i].cpu() for i in range(len(layers))])
                counts[lang] = counts.get(lang, 0) + int(batch["attention_mask"].sum())
            sums[lang] = total
    finally:
        for handle in handles:
            handle.remove()
    return {lang: sums[lang] / counts[lang] for lang in sums}


def centroid_similarity(centroids: Mapping[str, torch.Tensor], new_languages: Sequence[str],
                        measure: SimilarityMeasure = "new_pairs") -> list[float]:
    """Per layer, the mean cosine between language centroids ([layers, hidden] each).

    ``new_pairs`` (the LayerMoE authors' measure): over the pairs with at least one new
    language — the new languages' similarity to each other and to the original ones; how alike
    the original languages are among themselves says nothing about where new ones need experts.
    ``all_pairs``: over every pair, original–original included.
    """
    if len(centroids) < 2:
        raise ValueError(f"layer similarity needs text in ≥ 2 languages, got {sorted(centroids)}")
    new = set(new_languages)
    pairs = [(a, b) for a, b in itertools.combinations(sorted(centroids), 2)
             if measure == "all_pairs" or a in new or b in new]
    if not pairs:
        raise ValueError(f"similarity {measure!r}: no language pair involves a new language "
                         f"({sorted(new)}) among {sorted(centroids)}")
    sims = torch.stack([torch.cosine_similarity(centroids[a], centroids[b], dim=-1)
                        for a, b in pairs]).mean(dim=0)
    return [float(s) for s in sims]


def layer_similarity(model: nn.Module, tokenizer: Any, texts: Mapping[str, Sequence[str]],
                     new_languages: Sequence[str], measure: SimilarityMeasure = "new_pairs",
                     max_length: int = 128, batch_size: int = 8) -> list[float]:
    """Per decoder layer, LayerMoE's cross-lingual similarity of FFN inputs on ``texts``
    (:func:`language_centroids`, then :func:`centroid_similarity`)."""
    if len(texts) < 2:
        raise ValueError(f"layer similarity needs text in ≥ 2 languages, got {sorted(texts)}")
    centroids = language_centroids(model, tokenizer, texts, max_length, batch_size)
    return centroid_similarity(centroids, new_languages, measure)


def layermoe_budget(num_experts: int, layers: int, fraction: float,
                    total_new_experts: int | None = None) -> int:
    """LayerMoE's total of new experts: ``total_new_experts`` when given, else ``fraction`` of
    what DeltaMoE adds (``num_experts − 1`` per MoE layer), rounded down — LayerMoE's point is
    fewer experts than a uniform layout — and never below one new expert per layer."""
    if total_new_experts is not None:
        return total_new_experts
    return max(layers, math.floor(fraction * (num_experts - 1) * layers + 1e-9))


def layermoe_counts(similarity: Sequence[float], total_new_experts: int,
                    min_new: int = 1) -> list[int]:
    """New experts per layer within a total budget: fewer where languages are already alike.

    Every layer gets ``min_new``; the rest of the budget is split in proportion to the layer's
    dissimilarity ``d_l = max(0, 1 − s_l)`` by the largest-remainder method (ties to the earlier
    layer), so the counts sum exactly to ``total_new_experts``. If every layer is identical
    (all d_l = 0) the rest is split evenly.
    """
    layers = len(similarity)
    spare = total_new_experts - min_new * layers
    if spare < 0:
        raise ValueError(f"total_new_experts {total_new_experts} is below {min_new} per layer "
                         f"× {layers} layers")
    weights = [max(0.0, 1.0 - s) for s in similarity]
    if sum(weights) <= 0:
        weights = [1.0] * layers
    quotas = [spare * w / sum(weights) for w in weights]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(layers), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[:spare - sum(counts)]:
        counts[i] += 1
    return [min_new + c for c in counts]


def most_similar_layers(similarity: Sequence[float], k: int) -> list[int]:
    """The ``k`` layers with the highest similarity (ties to the earlier layer), sorted."""
    ranked = sorted(range(len(similarity)), key=lambda i: (-similarity[i], i))
    return sorted(ranked[:k])
