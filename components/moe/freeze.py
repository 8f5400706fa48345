"""Which parameters of an upcycled MoE train: new experts and routers, not the anchor or the rest.

DeltaMoE keeps the dense model's FFN as expert 0 (the anchor) and the shared weights (attention,
norms, embeddings, head) as they are, so that Δpost grafts onto weights it was computed for.
Per-expert modules freeze by ``requires_grad = False``. The transformers 5 fused layout holds all
experts in one tensor, so the anchor is a slice: its gradient is zeroed by a hook, and
:meth:`Freezer.after_step` copies the saved slice back, which also undoes decoupled weight decay
(AdamW shrinks every element of a tensor, gradient or not). With both, the anchor stays
bit-identical however long training runs; a test checks it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

_ROUTER = re.compile(r"\.(?:mlp|block_sparse_moe)\.gate\.weight$")
_CLASSIFIER = re.compile(r"\.mlp\.classifier\.")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")
_FUSED = re.compile(r"\.experts\.(?:gate_up_proj|down_proj)$")


def role(name: str) -> str:
    """``router``, ``classifier``, ``anchor``, ``expert``, ``fused_experts`` or ``shared``."""
    if _ROUTER.search(name):
        return "router"
    if _CLASSIFIER.search(name):
        return "classifier"
    if match := _EXPERT.search(name):
        return "anchor" if match[1] == "0" else "expert"
    if _FUSED.search(name):
        return "fused_experts"
    return "shared"  # attention, norms, embeddings, head, a Qwen2-MoE zeroed shared expert


@dataclass
class Freezer:
    """The result of :func:`freeze`: what trains, and the guard that keeps fused anchors exact."""

    model: nn.Module
    fused_anchors: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)
    hooks: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.trainable())
        total = sum(p.numel() for p in self.model.parameters())
        anchors = sum(p[0].numel() for p, _ in self.fused_anchors)
        return {"trainable": trainable - anchors, "frozen": total - trainable + anchors}

    @torch.no_grad()
    def after_step(self) -> None:
        """Restore fused anchor slices; call after every ``optimizer.step()``."""
        for param, saved in self.fused_anchors:
            param[0].copy_(saved)

    def release(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()


def _zero_anchor_grad(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    grad[0] = 0
    return grad


def set_requires_grad(model: nn.Module, anchor_expert: bool = True, shared: bool = True) -> None:
    """``requires_grad`` by role: shared weights and per-expert anchors frozen as asked, every
    other parameter (routers, new experts, fused expert tensors) trains."""
    for name, param in model.named_parameters():
        kind = role(name)
        if kind == "shared":
            param.requires_grad_(not shared)
        elif kind == "anchor":
            param.requires_grad_(not anchor_expert)
        else:
            param.requires_grad_(True)


def freeze(model: nn.Module, anchor_expert: bool = True, shared: bool = True) -> Freezer:
    """Set ``requires_grad`` by role and guard fused anchors; routers always train."""
    freezer = Freezer(model)
    set_requires_grad(model, anchor_expert, shared)
    for name, param in model.named_parameters():
        if role(name) == "fused_experts" and anchor_expert:
            freezer.fused_anchors.append((param, param[0].detach().clone()))
            freezer.hooks.append(param.register_hook(_zero_anchor_grad))
    return freezer
