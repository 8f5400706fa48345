"""Where each tensor of a (dense or MoE) target takes its delta from in the dense base/post pair.

Expand(Δpost) onto an upcycled MoE: shared tensors (attention, norms, embeddings, head) get the
delta of the same key once; every expert of an MoE layer gets the dense FFN delta of its layer
(a per-expert key, or its slot in a fused tensor); routers, classifiers and a Qwen2-MoE's zeroed
shared expert get nothing, because the dense pair has no counterpart for them. Which tensor is
which comes from :func:`components.moe.families.tensor_role`, so a key no supported layout
explains is refused there instead of being grafted as if it were shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from components.moe.checkpoint import LAYER_KEY
from components.moe.families import PROJECTIONS, VOCAB_KEYS, dense_ffn_key, tensor_role

if TYPE_CHECKING:
    from components.block_expansion import ExpandedLayer

Kind = Literal["same", "expert", "fused_gate_up", "fused_down", "none"]
Family = Literal["attention", "mlp", "norm", "embed", "lm_head"]
__all__ = ["VOCAB_KEYS", "Family", "Kind", "Source", "family_of", "source_for"]


@dataclass(frozen=True)
class Source:
    kind: Kind
    dense_keys: tuple[str, ...] = ()
    expert: int | None = None


def source_for(key: str, layers: Sequence[ExpandedLayer] | None = None) -> Source:
    """The dense key(s) whose delta lands on target tensor ``key``. With ``layers`` (a
    block-expanded target's plan) an original layer takes the delta of its index in the dense
    pair and a new block none: Δpost was computed for the original blocks only."""
    if layers is not None and (match := LAYER_KEY.match(key)):
        index = int(match.group(1))
        if index >= len(layers):  # not in the plan: the key checks name it as unexpected
            return Source("none")
        layer = layers[index]
        if layer.new:
            return Source("none")
        return source_for(LAYER_KEY.sub(f"model.layers.{layer.source}.", key))
    role = tensor_role(key)
    if role.kind == "shared":
        return Source("same", (key,))
    if not role.is_expert:  # router, classifier, shared expert: new in the MoE
        return Source("none")
    assert role.layer is not None and role.proj is not None
    if role.kind == "expert":
        param = "bias" if role.bias else "weight"
        return Source("expert", (dense_ffn_key(role.layer, role.proj, param),), role.expert)
    if role.proj == "gate_up":
        return Source("fused_gate_up", tuple(dense_ffn_key(role.layer, p)
                                             for p in PROJECTIONS[:2]))
    return Source("fused_down", (dense_ffn_key(role.layer, "down"),))


def family_of(key: str) -> Family:
    """The tensor family a per-family scale applies to: a shared tensor's own part, ``mlp`` for
    experts and for what gets no delta."""
    role = tensor_role(key)
    return role.part if role.part is not None else "mlp"
