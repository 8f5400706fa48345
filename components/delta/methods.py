"""The registry of graft and merge methods, and the sparsifiers they use.

Every method computes, tensor by tensor, ``out = anchor + Σ scales · S(Δ_1 … Δ_n)`` with
``Δ_i = θ_i − θ_base`` in fp32:

==================  ==========  ========================  ==========
method              anchor      deltas                    sparsify
==================  ==========  ========================  ==========
``deltamoe``        target MoE  post                      optional
``param_delta``     target      post                      optional
``task_arithmetic`` base        target, post              none
``ties``            base        target, post              TIES
``dare``            base        target, post              DARE
==================  ==========  ========================  ==========

DeltaMoE and ParamΔ graft Δpost onto a CPT-trained model (MoE or dense); the merge baselines add
the CPT delta and Δpost onto the base. With scale 1, task arithmetic equals ParamΔ exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import torch

Sparsify = Literal["none", "ties", "dare"]


@dataclass(frozen=True)
class Method:
    name: str
    anchor: Literal["target", "base"]
    deltas: tuple[Literal["target", "post"], ...]
    sparsify: Sparsify
    moe_target: bool  # whether the target may be an MoE (Δ expanded into every expert)
    formula: str


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("deltamoe", "target", ("post",), "none", True,
           "θ_out = θ_CPT-MoE + λ · Expand(θ_post − θ_base)"),
    Method("param_delta", "target", ("post",), "none", False,
           "θ_out = θ_CPT-dense + λ · (θ_post − θ_base)"),
    Method("task_arithmetic", "base", ("target", "post"), "none", False,
           "θ_out = θ_base + λ · ((θ_CPT − θ_base) + (θ_post − θ_base))"),
    Method("ties", "base", ("target", "post"), "ties", False,
           "θ_out = θ_base + λ · TIES(θ_CPT − θ_base, θ_post − θ_base)"),
    Method("dare", "base", ("target", "post"), "dare", False,
           "θ_out = θ_base + λ · Σ DARE(θ_i − θ_base)"),
)}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown graft method {name!r}; known: {', '.join(METHODS)}") from None


def tensor_seed(seed: int, key: str, index: int) -> int:
    """A per-tensor seed that does not depend on which worker runs which layer, so a DARE
    graft is byte-identical however it is scheduled."""
    digest = hashlib.sha256(f"{seed}:{key}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` share of entries with the largest magnitude (TIES step 1)."""
    if density >= 1.0:
        return delta
    keep = max(1, round(density * delta.numel()))
    flat = delta.abs().flatten()
    threshold = torch.topk(flat, keep, sorted=False).values.min()
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def ties(deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): trim, elect a sign per entry by the summed trimmed
    deltas, average only the entries that agree with it (disjoint mean)."""
    trimmed = torch.stack([trim(d, density) for d in deltas])
    sign = torch.sign(trimmed.sum(dim=0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    total = (trimmed * agree).sum(dim=0)
    return total / agree.sum(dim=0).clamp_min(1)


def dare(delta: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """DARE (Yu et al. 2024): drop each entry with probability 1 − density, rescale the rest by
    1 / density so the expected delta is unchanged."""
    if density >= 1.0:
        return delta
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(delta.shape, generator=generator) < density
    return torch.where(keep, delta / density, torch.zeros_like(delta))


def combine(deltas: list[torch.Tensor], sparsify: Sparsify, density: float, seed: int,
            key: str) -> torch.Tensor:
    """The merged delta of one tensor (before scales)."""
    if sparsify == "ties":
        return ties(deltas, density)
    if sparsify == "dare":
        return torch.stack([dare(d, density, tensor_seed(seed, key, i))
                            for i, d in enumerate(deltas)]).sum(dim=0)
    total = deltas[0]
    for delta in deltas[1:]:
        total = total + delta
    return total
