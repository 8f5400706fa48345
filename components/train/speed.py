"""The training build's speed switches: experts implementation, per-block compile, AdamW kernel.

Each is a choice that changes how fast a step runs, never what it computes (within float
rounding): ``train.experts_implementation`` picks transformers' experts kernel for its MoE
classes and the matching path of the package's own :class:`~components.moe.modeling.
LanguageMoeBlock`; ``train.compile`` compiles each decoder block's forward; fused AdamW runs on
CUDA. ``auto`` resolves per device: grouped GEMMs on a GPU whose native grouped kernel runs
(sm80+; the loop there syncs the host per layer and launches small kernels, which
``benchmarks/train_gpu.py`` compares), the expert loop on a CPU — where a grouped GEMM is
itself a loop of GEMMs and
``benchmarks/train_gpu.py --cpu`` measured grouped steps at 1.03x (Mixtral) and 1.16x (own
class, whose grouped backward also computes the frozen anchor's weight gradient) the loop's
time at the demo's size. ``train.experts_implementation: grouped_mm`` runs it on CPU anyway.
"""

from __future__ import annotations

from functools import cache
from typing import Any, get_args

import torch
import torch.nn.functional as F
from torch import nn

from components.config import TrainConfig
from components.train.spec import TrainError

# the schema's Literal is the one place for these names
EXPERTS_CHOICES: tuple[str, ...] = get_args(
    TrainConfig.model_fields["experts_implementation"].annotation)


@cache
def grouped_kernel_runs(device: torch.device) -> bool:
    """Whether a native grouped GEMM runs on ``device`` and agrees with a plain loop of GEMMs
    (probed once on tiny tensors: a kernel that raises or disagrees means no)."""
    grouped = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if grouped is None:
        return False
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return False
    if device.type not in ("cuda", "cpu"):
        return False
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(24, 16, generator=generator).to(device, dtype)
    weight = torch.randn(3, 16, 32, generator=generator).to(device, dtype)
    offsets = torch.tensor([8, 8, 24], dtype=torch.int32, device=device)
    try:
        out = grouped(rows, weight, offs=offsets)
    except (RuntimeError, NotImplementedError):
        return False
    expected = torch.cat([rows[:8] @ weight[0], rows[8:] @ weight[2]])
    return bool(torch.allclose(out.float(), expected.float(), atol=1e-2, rtol=1e-2))


def resolve_experts_implementation(requested: str, device: torch.device) -> str:
    """The implementation ``requested`` means on ``device`` (``auto``: the faster there)."""
    if requested not in EXPERTS_CHOICES:
        raise TrainError(f"train.experts_implementation {requested!r}: expected one of "
                         f"{', '.join(EXPERTS_CHOICES)}")
    if requested != "auto":
        return requested
    return "grouped_mm" if device.type == "cuda" and grouped_kernel_runs(device) else "eager"


def apply_experts_implementation(model: nn.Module, requested: str,
                                 device: torch.device) -> str | None:
    """Set the experts implementation of an MoE ``model`` (None for a dense one: nothing to
    set); returns the one in effect. A choice the class lacks is a :class:`TrainError`."""
    if not getattr(model, "_can_set_experts_implementation", lambda: False)():
        return None
    if not any(_is_moe_block(m) for m in model.modules()):
        return None
    chosen = resolve_experts_implementation(requested, device)
    try:
        model.set_experts_implementation(chosen)  # type: ignore[operator]
    except (ValueError, KeyError) as err:
        raise TrainError(f"train.experts_implementation {chosen!r}: {err}") from None
    return str(model.config._experts_implementation)  # type: ignore[union-attr]


def _is_moe_block(module: nn.Module) -> bool:
    experts = getattr(module, "experts", None)
    return experts is not None and hasattr(module, "gate")


def compile_blocks(layers: list[nn.Module], **options: Any) -> int:
    """``torch.compile`` each decoder block's forward in place (``options`` go to
    ``torch.compile``; a test passes a cheap backend). The block's own ``__call__`` — FSDP2's
    all-gather hooks, activation checkpointing — stays eager, and parameter names keep no
    ``_orig_mod.`` prefix, so freezing, checkpoints and exports see the same model."""
    for layer in layers:
        layer.forward = torch.compile(layer.forward, **options)  # type: ignore[method-assign]
    return len(layers)


def adamw_kernel(device: torch.device) -> dict[str, bool]:
    """AdamW's implementation switch: the fused kernel on CUDA (one launch per parameter
    group), the multi-tensor ``foreach`` one elsewhere (what the CPU path always ran)."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}
