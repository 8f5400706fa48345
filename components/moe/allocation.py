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
from typing import Any

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


@dataclass(frozen=True)
class RoutingPrior:
    """Allowed experts per language per layer, from an upcycled model's ``allocation.json``.

    A language resolves to its own entry, else to the entry of a group that lists it, else (an
    original language) to the anchor, else to every expert (no prior). Ids a layer does not have
    are dropped; if none is left the language may use every expert of that layer.
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

    def experts_for(self, tag: str, layer: int) -> list[int]:
        count = self.experts_per_layer[layer]
        ids = self.experts.get(tag)
        if ids is None:
            group = next((g for g, tags in self.groups.items() if tag in tags), None)
            ids = self.experts.get(group) if group else None
        if ids is None:
            ids = [0] if tag in self.original else list(range(count))
        kept = [i for i in ids if i < count]
        return kept or list(range(count))

    def table(self, layer: int) -> torch.Tensor:
        """[languages, experts] bool: row i allows language ``languages[i]``'s experts."""
        out = torch.zeros(len(self.languages), self.experts_per_layer[layer], dtype=torch.bool)
        for i, tag in enumerate(self.languages):
            out[i, self.experts_for(tag, layer)] = True
        return out

    def allowed(self, layers: Sequence[int], lang_index: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, a [tokens, experts] mask for tokens whose language index is given."""
        flat = lang_index.reshape(-1).cpu().long()
        return [self.table(layer)[flat] for layer in layers]

    def is_new(self, lang_index: torch.Tensor) -> torch.Tensor:
        """Classifier targets: 1 where the token's language is not an original one."""
        new = torch.tensor([tag not in self.original for tag in self.languages])
        return new[lang_index.reshape(-1).cpu().long()]


@torch.no_grad()
def layer_similarity(model: nn.Module, tokenizer: Any, texts: Mapping[str, Sequence[str]],
                     max_length: int = 128, batch_size: int = 8) -> list[float]:
    """Per decoder layer, the mean pairwise cosine between languages of FFN-input states.

    Each language's FFN input (the post-attention-norm hidden state that the router will see)
    is averaged over all its non-padding tokens into one centroid per layer; a layer's similarity
    is the mean cosine over all pairs of language centroids. Needs at least two languages.
    """
    if len(texts) < 2:
        raise ValueError(f"layer similarity needs text in ≥ 2 languages, got {sorted(texts)}")
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
    centroids = {lang: sums[lang] / counts[lang] for lang in sums}
    pairs = list(itertools.combinations(sorted(centroids), 2))
    sims = torch.stack([torch.cosine_similarity(centroids[a], centroids[b], dim=-1)
                        for a, b in pairs]).mean(dim=0)
    return [float(s) for s in sims]


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
