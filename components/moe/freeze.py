"""Which parameters of an upcycled MoE train: new experts and routers, not the anchor or the rest.

DeltaMoE keeps the dense model's FFN as expert 0 (the anchor) and the shared weights (attention,
norms, embeddings, head) as they are, so that Δpost grafts onto weights it was computed for.
Per-expert modules freeze by ``requires_grad = False`` (:func:`set_requires_grad`). The
transformers 5 fused layout holds all experts in one tensor, so there the anchor is a slice that
:class:`components.train.fsdp.AnchorGuard` keeps bit-identical (gradient rows zeroed, saved rows
restored after each step); :func:`parameter_counts` counts such a slice as frozen.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from components.moe.families import tensor_role

TrainRole = Literal["router", "classifier", "anchor", "expert", "fused_experts", "shared_expert",
                    "shared"]


def role(name: str) -> TrainRole:
    """What parameter ``name`` is to training: :func:`~components.moe.families.tensor_role`'s
    kind, with a per-expert anchor (expert 0) told apart from the new experts."""
    found = tensor_role(name)
    if found.kind == "expert":
        return "anchor" if found.expert == 0 else "expert"
    return found.kind


def set_requires_grad(model: nn.Module, anchor_expert: bool = True, shared: bool = True) -> None:
    """``requires_grad`` by role: shared weights and per-expert anchors frozen as asked, every
    other parameter (routers, classifiers, new experts, fused expert tensors) trains.

    A Qwen2-MoE's shared expert (upcycled as zeros; Δpost has nothing for it) goes with the
    shared weights: frozen with them, it stays zero.
    """
    for name, param in model.named_parameters():
        kind = role(name)
        if kind in ("shared", "shared_expert"):
            param.requires_grad_(not shared)
        elif kind == "anchor":
            param.requires_grad_(not anchor_expert)
        else:
            param.requires_grad_(True)


def parameter_counts(model: nn.Module, fused_anchor_frozen: bool) -> dict[str, int]:
    """Trainable and frozen parameter counts after :func:`set_requires_grad`.

    With ``fused_anchor_frozen`` (an :class:`~components.train.fsdp.AnchorGuard` keeps them) the
    anchor slice of each trainable fused expert tensor counts as frozen: it has a gradient, but
    never changes. Global sizes, also for FSDP2-sharded parameters.
    """
    trainable = total = anchors = 0
    for name, param in model.named_parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
            if fused_anchor_frozen and role(name) == "fused_experts":
                anchors += param.numel() // param.shape[0]
    return {"trainable": trainable - anchors, "frozen": total - trainable + anchors}
