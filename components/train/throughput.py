"""How much of the hardware a run uses: active parameters, FLOPs per token, MFU, peak memory.

MFU counts what an MoE computes per token, not what it stores: every shared weight, the
routers, a Qwen2-MoE's shared expert, and ``top_k / E`` of each MoE layer's experts (the
embedding lookup computes nothing; a tied head counts once, as the head). FLOPs per token are
``6 · active`` (forward and backward GEMMs) plus 3 × the forward attention term of
:func:`components.moe.accounting.attention_flops_per_token` (``6 · layers · seq · d_attn``);
activation-checkpointing recompute is not counted (the MFU convention: useful work only). The
peak is the device's dense bf16 figure (``train.peak_tflops`` overrides; no peak is known for
CPUs, so none is logged there).
"""

from __future__ import annotations

import resource
import sys
from collections import defaultdict

import torch
from torch import nn

from components.moe.accounting import attention_flops_per_token
from components.moe.families import tensor_role

# dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment, most specific first
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H200", 989.0), ("H100", 989.0), ("H800", 989.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 125.0),
)


def active_parameters(model: nn.Module) -> int:
    """Parameters one token's forward multiplies by (global sizes, also under FSDP2)."""
    config = getattr(model, "config", None)
    top_k = int(getattr(config, "num_experts_per_tok", 0) or 0)
    total = 0
    per_expert: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for name, param in model.named_parameters():
        role = tensor_role(name)
        if role.kind == "shared" and role.part == "embed" and not _tied(model):
            continue
        if role.kind == "fused_experts":
            experts = param.shape[0]
            total += param.numel() * min(top_k, experts) // experts
        elif role.kind == "expert":
            assert role.layer is not None and role.expert is not None
            per_expert[role.layer][role.expert] += param.numel()
        else:
            total += param.numel()
    for experts in per_expert.values():
        size = sum(experts.values()) // len(experts)
        total += size * min(top_k, len(experts))
    return total


def _tied(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "tie_word_embeddings", False))


def flops_per_token(model: nn.Module, seq_len: int, active: int | None = None) -> float:
    """Training FLOPs per token: 6 · active parameters + causal attention."""
    config = model.config  # type: ignore[union-attr]
    active = active_parameters(model) if active is None else active
    # training = 3 × the forward pass, attention's term included (the upcycler's accounting)
    return 6.0 * active + 3.0 * attention_flops_per_token(config.to_dict(), seq_len)


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The per-device peak MFU is measured against (None: unknown, e.g. a CPU)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for fragment, peak in PEAK_TFLOPS if fragment in name), None)


def mfu(tokens_per_s: float, per_token: float, peak: float | None, devices: int) -> float | None:
    """Model FLOPs utilisation of ``devices`` devices of ``peak`` TFLOP/s each."""
    if peak is None or devices < 1:
        return None
    return tokens_per_s * per_token / (peak * 1e12 * devices)


def peak_memory_gib(device: torch.device) -> float:
    """This rank's peak memory: CUDA's allocator peak on a GPU, the process's peak RSS
    elsewhere (Linux reports KiB, macOS bytes)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)
