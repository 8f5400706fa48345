"""Experts implementations: grouped GEMMs compute what the expert loop computes, for every MoE
class the package trains, and a frozen anchor stays bit-identical under either (component
tests, no Ray)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from common import tiny_dims
from pydantic import ValidationError
from torch import nn
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from components.config import TrainConfig
from components.moe.freeze import role, set_requires_grad
from components.moe.modeling import DeltaMoeConfig, DeltaMoeForCausalLM
from components.train.fsdp import AnchorGuard
from components.train.spec import TrainError
from components.train.speed import (
    apply_experts_implementation,
    compile_blocks,
    grouped_kernel_runs,
    resolve_experts_implementation,
)

VOCAB = 61
DIMS = tiny_dims(VOCAB, num_hidden_layers=3)
MOE = {"num_experts_per_tok": 2, "output_router_logits": False}
IDS = torch.randint(0, VOCAB, (3, 13), generator=torch.Generator().manual_seed(0))


def _mixtral() -> nn.Module:
    return MixtralForCausalLM(MixtralConfig(**DIMS, **MOE, num_local_experts=4))


def _qwen2_moe() -> nn.Module:
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(
        **DIMS, **MOE, num_experts=4, moe_intermediate_size=48,
        shared_expert_intermediate_size=48, mlp_only_layers=[1], decoder_sparse_step=1))


def _qwen3_moe() -> nn.Module:
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(
        **DIMS, **MOE, num_experts=4, moe_intermediate_size=48, head_dim=8, norm_topk_prob=True,
        mlp_only_layers=[], decoder_sparse_step=1))


def _own(base: str = "llama", classifier: bool = True, **extra: object) -> nn.Module:
    """The package's class with per-layer counts (a dense layer, 3 and 4 experts) and, with
    ``classifier``, a random classifier that sends some tokens to the anchor."""
    dims = {**DIMS, **({"head_dim": 8} if base == "qwen3" else {})}
    model = DeltaMoeForCausalLM(DeltaMoeConfig(
        base_model_type=base, experts_per_layer=[0, 3, 4], num_experts_per_tok=2,
        classifier_layers=[2] if classifier else [], **dims, **extra))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".classifier." in name:  # zero-initialised otherwise
                param.normal_(0.0, 0.5)
    if classifier:  # shift class 1's bias so that about half the tokens stay original
        head = model.model.layers[2].mlp.classifier
        seen: list[torch.Tensor] = []
        handle = head.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
        with torch.no_grad():
            model(input_ids=IDS)
            handle.remove()
            head.bias[1] += (seen[0][:, 0] - seen[0][:, 1]).median() + 1e-3
    return model


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe,
    "own_llama_classifier": _own, "own_qwen3": lambda: _own("qwen3", classifier=False),
    "own_llama_mlp_bias": lambda: _own(mlp_bias=True),  # h18a routes bias-carrying models here
}


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return BUILDERS[name]().float()


def _logits_and_grads(model: nn.Module, impl: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.set_experts_implementation(impl)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=IDS, labels=IDS, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_grouped_equals_eager(name: str) -> None:
    model = _build(name)
    eager_logits, eager_grads = _logits_and_grads(model, "eager")
    logits, grads = _logits_and_grads(model, "grouped_mm")
    assert model.config._experts_implementation == "grouped_mm"
    assert torch.allclose(logits, eager_logits, atol=1e-5, rtol=0)
    # the loop leaves an expert that got no token without a gradient; grouped GEMMs give it
    # zeros (as transformers' fused tensors do): the same gradient
    assert eager_grads.keys() <= grads.keys()
    experts = [n for n in grads if role(n) in ("expert", "anchor", "fused_experts")]
    assert experts  # the experts got gradients (the comparison below covers them)
    for key, grad in grads.items():
        expected = eager_grads.get(key, torch.zeros_like(grad))
        assert torch.allclose(grad, expected, atol=1e-5, rtol=0), key


def test_own_class_grouped_covers_bias_and_classifier() -> None:
    """Llama ``mlp_bias``: the grouped path adds each row's expert bias; the classifier sends
    some tokens (not all) to the anchor alone, in both paths."""
    model = _own(mlp_bias=True).float()
    seen: list[torch.Tensor] = []
    handle = model.model.layers[2].mlp.classifier.register_forward_hook(
        lambda _m, _i, out: seen.append(out.detach()))
    eager, _ = _logits_and_grads(model, "eager")
    handle.remove()
    original = seen[0].argmax(dim=-1) == 0
    assert 0 < int(original.sum()) < original.numel()
    grouped, _ = _logits_and_grads(model, "grouped_mm")
    assert torch.allclose(grouped, eager, atol=1e-5, rtol=0)
    model.set_experts_implementation("eager")
    with torch.no_grad():
        model.model.layers[1].mlp.experts[1].down_proj.bias.add_(1.0)  # bias is really used
        changed = model(input_ids=IDS).logits
    assert not torch.allclose(changed, eager, atol=1e-3)


def _anchors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The anchor expert's weights: expert 0's modules, or row 0 of fused expert tensors."""
    out = {}
    for name, param in model.named_parameters():
        kind = role(name)
        if kind == "anchor":
            out[name] = param.detach().clone()
        elif kind == "fused_experts":
            out[name] = param[0].detach().clone()
    return out


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "own_llama_classifier",
                                  "own_llama_mlp_bias"])
def test_frozen_anchor_bit_identical_after_grouped_steps(name: str) -> None:
    model = _build(name)
    model.set_experts_implementation("grouped_mm")
    set_requires_grad(model)
    guard = AnchorGuard(model, True)
    before = _anchors(model)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()
               if p.requires_grad and role(n) in ("expert", "fused_experts")}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                                  weight_decay=0.1)
    for _ in range(3):
        model(input_ids=IDS, labels=IDS, use_cache=False).loss.backward()
        guard.zero_grads()
        optimizer.step()
        guard.restore()
        optimizer.zero_grad(set_to_none=True)
    after = _anchors(model)
    assert before.keys() == after.keys() and before
    for key in before:
        assert torch.equal(before[key], after[key]), key
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[n].detach(), v) for n, v in trained.items())


def test_switch_in_schema_and_resolved_per_device() -> None:
    assert TrainConfig().experts_implementation == "auto"
    assert TrainConfig(experts_implementation="eager").experts_implementation == "eager"
    with pytest.raises(ValidationError, match="experts_implementation"):
        TrainConfig(experts_implementation="loop")
    cpu = torch.device("cpu")
    assert grouped_kernel_runs(cpu)  # torch 2.13 has a CPU grouped GEMM ...
    assert resolve_experts_implementation("auto", cpu) == "eager"  # ... that is not faster
    model = _build("own_qwen3")
    assert model.config._experts_implementation == "grouped_mm"  # the class's default
    assert apply_experts_implementation(model, "auto", cpu) == "eager"
    assert apply_experts_implementation(model, "grouped_mm", cpu) == "grouped_mm"
    with pytest.raises(TrainError, match=r"batched_mm.*implements grouped_mm, eager"):
        apply_experts_implementation(model, "batched_mm", cpu)
    mixtral = _build("mixtral")
    assert apply_experts_implementation(mixtral, "batched_mm", cpu) == "batched_mm"
    from transformers import LlamaConfig, LlamaForCausalLM

    assert apply_experts_implementation(LlamaForCausalLM(LlamaConfig(**DIMS)), "auto", cpu) is None


def test_compiled_blocks_compute_the_same() -> None:
    """Per-block compile keeps names and results (a cheap backend: the wiring is under test)."""
    torch._dynamo.reset()
    model = _build("own_llama_classifier")
    logits, grads = _logits_and_grads(model, "grouped_mm")
    names = [n for n, _ in model.named_parameters()]
    assert compile_blocks(list(model.model.layers), backend="aot_eager") == 3
    assert [n for n, _ in model.named_parameters()] == names
    compiled, compiled_grads = _logits_and_grads(model, "grouped_mm")
    assert torch.allclose(compiled, logits, atol=1e-5, rtol=0)
    for key, grad in grads.items():
        assert torch.allclose(compiled_grads[key], grad, atol=1e-5, rtol=0), key
