"""The loop's speed plumbing: batch prefetch keeps order and errors, MFU counts active
parameters, the AdamW kernel follows the device (component tests, no Ray)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch
from common import tiny_dims
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from components.moe.modeling import DeltaMoeConfig, DeltaMoeForCausalLM
from components.train.data import Batch, Prefetcher, prefetched
from components.train.speed import adamw_kernel
from components.train.throughput import active_parameters, flops_per_token, mfu, peak_tflops

DIMS = tiny_dims(50, num_hidden_layers=3)


def _batches(count: int | None, fail_at: int | None = None) -> Iterator[Batch]:
    i = 0
    while count is None or i < count:
        if i == fail_at:
            raise ValueError(f"bad row group {i}")
        yield Batch(torch.full((2, 4), i), torch.full((2, 4), i), torch.zeros(2, dtype=torch.long),
                    torch.ones(2))
        i += 1


def test_prefetch_keeps_order_raises_in_place_and_stops() -> None:
    got = [int(b.input_ids[0, 0]) for b in Prefetcher(_batches(7), depth=2)]
    assert got == list(range(7))
    failing = Prefetcher(_batches(None, fail_at=3), depth=2)
    assert [int(next(failing).input_ids[0, 0]) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad row group 3"):
        next(failing)
    endless = Prefetcher(_batches(None), depth=3)
    assert int(next(endless).input_ids[0, 0]) == 0
    endless.close()
    assert not endless._thread.is_alive()
    assert not any(t.name == "batch-prefetch" and t.is_alive() for t in threading.enumerate())
    source = _batches(2)
    assert prefetched(source, 0) is source  # depth 0: no thread


def _sizes(model: torch.nn.Module, fragment: str) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if fragment in n)


def test_active_parameters_count_top_k_of_each_layers_experts() -> None:
    dense = LlamaForCausalLM(LlamaConfig(**DIMS))
    embed = dense.model.embed_tokens.weight.numel()
    total = sum(p.numel() for p in dense.parameters())
    assert active_parameters(dense) == total - embed  # the lookup computes nothing
    mixtral = MixtralForCausalLM(MixtralConfig(**DIMS, num_local_experts=4, num_experts_per_tok=2))
    experts = _sizes(mixtral, ".experts.")
    total = sum(p.numel() for p in mixtral.parameters())
    assert active_parameters(mixtral) == total - embed - experts // 2
    own = DeltaMoeForCausalLM(DeltaMoeConfig(base_model_type="llama", experts_per_layer=[0, 3, 4],
                                             num_experts_per_tok=2, **DIMS))
    one = _sizes(own, "layers.1.mlp.experts.0.")
    total = sum(p.numel() for p in own.parameters())
    # layer 1: 2 of 3 experts run, layer 2: 2 of 4; the dense layer 0 FFN runs whole
    assert active_parameters(own) == total - embed - one - 2 * one
    per_token = flops_per_token(own, seq_len=16)
    assert per_token == 6 * active_parameters(own) + 6 * 3 * 16 * DIMS["hidden_size"]


def test_mfu_and_kernels_follow_the_device() -> None:
    cpu = torch.device("cpu")
    assert peak_tflops(cpu) is None and mfu(1e3, 1e9, None, 1) is None  # no CPU peak
    assert peak_tflops(cpu, 2.0) == 2.0
    assert mfu(1e3, 1e9, 2.0, 2) == pytest.approx(1e12 / 4e12)
    assert adamw_kernel(cpu) == {"foreach": True}
    assert adamw_kernel(torch.device("cuda", 0)) == {"fused": True}
