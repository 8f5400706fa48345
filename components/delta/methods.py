"""The registry of graft and merge methods, and the one table of sparsifiers they combine with.

Every method computes, tensor by tensor, ``out = anchor + Σ scales · S(Δ_1 … Δ_n)`` with
``Δ_i = θ_i − θ_base`` in fp32:

==================  ==========  ========================  ==========
method              anchor      deltas                    sparsify
==================  ==========  ========================  ==========
``deltamoe``        target MoE  post                      none
``param_delta``     target      post                      none
``block_expansion`` target      post (layers shifted)     none
``task_arithmetic`` base        target, post              none
``ties``            base        target, post              TIES
``dare``            base        target, post              DARE
==================  ==========  ========================  ==========

DeltaMoE and ParamΔ graft Δpost onto a CPT-trained model (MoE or dense); the merge baselines add
the CPT delta and Δpost onto the base. With scale 1, task arithmetic equals ParamΔ exactly. A
graft may swap a method's sparsifier for another in :data:`SPARSIFIERS` (``sparsify`` option).

The run config and the CLI import :data:`METHODS` to validate names and offer choices, so this
module stays light: torch is imported inside the functions that compute, never at import.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    import torch

Anchor = Literal["target", "base"]
Role = Literal["target", "post"]


class Combine(Protocol):
    """The merged delta of one tensor (before scales), from its deltas in the method's order.

    ``key`` is the dense tensor's name: DARE draws its mask from ``(seed, key, index)``.
    """

    def __call__(self, deltas: Sequence[torch.Tensor], density: float, seed: int,
                 key: str) -> torch.Tensor: ...


def tensor_seed(seed: int, key: str, index: int) -> int:
    """A per-tensor seed that does not depend on which worker runs which layer, so a DARE
    graft is byte-identical however it is scheduled."""
    digest = hashlib.sha256(f"{seed}:{key}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` share of entries with the largest magnitude (TIES step 1)."""
    import torch

    if density >= 1.0:
        return delta
    keep = max(1, round(density * delta.numel()))
    flat = delta.abs().flatten()
    threshold = torch.topk(flat, keep, sorted=False).values.min()
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def ties(deltas: Sequence[torch.Tensor], density: float) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): trim, elect a sign per entry by the summed trimmed
    deltas, average only the entries that agree with it (disjoint mean)."""
    import torch

    trimmed = torch.stack([trim(d, density) for d in deltas])
    sign = torch.sign(trimmed.sum(dim=0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    total = (trimmed * agree).sum(dim=0)
    return total / agree.sum(dim=0).clamp_min(1)


def dare(delta: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """DARE (Yu et al. 2024): drop each entry with probability 1 − density, rescale the rest by
    1 / density so the expected delta is unchanged."""
    import torch

    if density >= 1.0:
        return delta
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(delta.shape, generator=generator) < density
    return torch.where(keep, delta / density, torch.zeros_like(delta))


def _plain_sum(deltas: Sequence[torch.Tensor], density: float, seed: int,
               key: str) -> torch.Tensor:
    total = deltas[0]
    for delta in deltas[1:]:
        total = total + delta
    return total


def _ties_merge(deltas: Sequence[torch.Tensor], density: float, seed: int,
                key: str) -> torch.Tensor:
    return ties(deltas, density)


def _dare_sum(deltas: Sequence[torch.Tensor], density: float, seed: int,
              key: str) -> torch.Tensor:
    import torch

    return torch.stack([dare(d, density, tensor_seed(seed, key, i))
                        for i, d in enumerate(deltas)]).sum(dim=0)


SPARSIFIERS: dict[str, Combine] = {
    "none": _plain_sum,  # elementwise: the graft streams it in row blocks
    "ties": _ties_merge,
    "dare": _dare_sum,
}


@dataclass(frozen=True)
class Method:
    """One graft or merge method: what it adds to which anchor, and how its deltas combine."""

    name: str
    anchor: Anchor  # the model the merged delta lands on
    deltas: tuple[Role, ...]  # Δ_i = θ_i − θ_base, in the order the combine sees them
    sparsify: str  # the method's own sparsifier, a key of SPARSIFIERS
    moe_target: bool  # the target is the upcycled MoE (Δ expanded into every expert); dense
    #                   targets are refused, and methods without it refuse MoE targets
    formula: str
    help: str  # one line, for the CLI
    expanded_target: bool = False  # the target is a block-expanded dense model: each original
    #                                layer takes its Δ at its shifted index, new blocks none

    def combine(self, deltas: Sequence[torch.Tensor], density: float, seed: int,
                key: str) -> torch.Tensor:
        """The merged delta of one tensor (before scales) with this method's sparsifier."""
        return SPARSIFIERS[self.sparsify](deltas, density, seed, key)

    @property
    def elementwise(self) -> bool:
        """Whether the combine is the plain sum, so a graft may compute it in row blocks
        (TIES and DARE need whole tensors: a magnitude threshold, a mask drawn per tensor)."""
        return SPARSIFIERS[self.sparsify] is _plain_sum

    def with_sparsify(self, sparsify: str) -> Method:
        """This method with its sparsifier swapped (``auto`` keeps its own)."""
        if sparsify == "auto":
            return self
        if sparsify not in SPARSIFIERS:
            raise ValueError(f"sparsify {sparsify!r}: expected auto, {', '.join(SPARSIFIERS)}")
        return replace(self, sparsify=sparsify)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("deltamoe", "target", ("post",), "none", True,
           "θ_out = θ_CPT-MoE + λ · Expand(θ_post − θ_base)",
           "Δpost onto the CPT-trained MoE: every expert gets its layer's FFN delta."),
    Method("param_delta", "target", ("post",), "none", False,
           "θ_out = θ_CPT-dense + λ · (θ_post − θ_base)",
           "Δpost onto the CPT-trained dense model (ParamΔ baseline)."),
    Method("block_expansion", "target", ("post",), "none", False,
           "θ_out = θ_CPT-expanded + λ · Shift(θ_post − θ_base)",
           "Δpost onto the CPT-trained block-expanded model (LLaMA-Pro): each original layer's "
           "delta at its shifted index, new blocks none.", expanded_target=True),
    Method("task_arithmetic", "base", ("target", "post"), "none", False,
           "θ_out = θ_base + λ · ((θ_CPT − θ_base) + (θ_post − θ_base))",
           "The CPT delta plus Δpost onto the base (task-arithmetic baseline)."),
    Method("ties", "base", ("target", "post"), "ties", False,
           "θ_out = θ_base + λ · TIES(θ_CPT − θ_base, θ_post − θ_base)",
           "TIES-merged CPT delta and Δpost onto the base (trim, elect sign, disjoint mean)."),
    Method("dare", "base", ("target", "post"), "dare", False,
           "θ_out = θ_base + λ · Σ DARE(θ_i − θ_base)",
           "DARE-sparsified CPT delta plus Δpost onto the base (drop, rescale, sum)."),
)}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown graft method {name!r}; known: {', '.join(METHODS)}") from None
