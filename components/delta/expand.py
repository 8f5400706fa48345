"""Where each tensor of a (dense or MoE) target takes its delta from in the dense base/post pair.

Expand(Δpost) onto an upcycled MoE: shared tensors (attention, norms, embeddings, head) get the
delta of the same key once; every expert of an MoE layer gets the dense FFN delta of its layer
(a per-expert key, or its slot in a fused tensor); routers, classifiers and a Qwen2-MoE's zeroed
shared expert get nothing, because the dense pair has no counterpart for them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Kind = Literal["same", "expert", "fused_gate_up", "fused_down", "none"]
Family = Literal["attention", "mlp", "norm", "embed", "lm_head"]

_PER_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
                         r"(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_NEW = re.compile(r"\.(?:mlp|block_sparse_moe)\.(?:gate\.weight|classifier\.|shared_expert)")
_DENSE_NAME = {"gate_proj": "gate_proj", "w1": "gate_proj", "up_proj": "up_proj", "w3": "up_proj",
               "down_proj": "down_proj", "w2": "down_proj"}
VOCAB_KEYS = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class Source:
    kind: Kind
    dense_keys: tuple[str, ...] = ()
    expert: int | None = None


def _ffn(layer: str, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}.weight"


def source_for(key: str) -> Source:
    """The dense key(s) whose delta lands on target tensor ``key``."""
    if match := _PER_EXPERT.match(key):
        layer, expert, proj = match.groups()
        return Source("expert", (_ffn(layer, _DENSE_NAME[proj]),), int(expert))
    if match := _FUSED.match(key):
        layer, name = match.groups()
        if name == "gate_up_proj":
            return Source("fused_gate_up", (_ffn(layer, "gate_proj"), _ffn(layer, "up_proj")))
        return Source("fused_down", (_ffn(layer, "down_proj"),))
    if _NEW.search(key):
        return Source("none")
    return Source("same", (key,))


def family_of(key: str) -> Family:
    """The tensor family a per-family scale applies to."""
    if key == "model.embed_tokens.weight":
        return "embed"
    if key == "lm_head.weight":
        return "lm_head"
    if ".self_attn." in key:
        return "attention"
    if "norm" in key.rsplit(".", 2)[-2]:
        return "norm"
    return "mlp"
