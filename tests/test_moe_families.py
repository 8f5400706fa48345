"""The one tensor-name classifier: every key of every supported layout has a role, any other key
is refused by name (classifier, delta expansion, checkpoint readers and router capture alike)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from components.delta.expand import source_for
from components.moe.checkpoint import LazyCheckpoint, detect_layout, read_experts
from components.moe.families import (
    DENSE_TYPES,
    FAMILIES,
    PROJECTIONS,
    UnknownTensorError,
    dense_ffn_key,
    family_for,
    tensor_role,
)
from components.moe.modeling import DeltaMoeConfig

DIMS = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=False)
MOE = {"mixtral": dict(num_local_experts=3),
       "qwen2_moe": dict(num_experts=3, moe_intermediate_size=32, mlp_only_layers=[1],
                         shared_expert_intermediate_size=32),
       "qwen3_moe": dict(num_experts=3, moe_intermediate_size=32, mlp_only_layers=[1])}
BOGUS = ("model.layers.0.mlp.experts.0.w9.weight", "model.layers.0.foo.bar",
         "model.layers.0.block_sparse_moe.experts.0.gate_proj.weight",  # Qwen names, Mixtral block
         "model.layers.0.mlp.experts.0.w1.weight",  # Mixtral names under the in-memory block
         "model.layers.0.mlp.experts.gate_proj", "lm_head.bias", "layers.0.mlp.gate.weight")


def test_dense_types_are_every_family_dense_type_and_the_own_class_takes_each() -> None:
    assert DENSE_TYPES == ("llama", "mistral", "qwen2", "qwen3")
    assert all(family_for(t).moe_type for t in DENSE_TYPES)
    assert {t for f in FAMILIES for t in f.dense_types} == set(DENSE_TYPES)
    for dense_type in DENSE_TYPES:
        assert DeltaMoeConfig(base_model_type=dense_type).base_model_type == dense_type
    with pytest.raises(ValueError, match="expected one of llama, mistral, qwen2, qwen3"):
        DeltaMoeConfig(base_model_type="gpt2")


@pytest.mark.parametrize("moe_type", sorted(MOE))
def test_every_key_of_each_family_in_memory_and_on_disk_has_its_role(
        tmp_path: Path, moe_type: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(moe_type, **DIMS,
                                                                  **MOE[moe_type]))
    family = next(f for f in FAMILIES if f.moe_type == moe_type)
    moe_layers = 2 if moe_type == "mixtral" else 1
    memory = Counter(tensor_role(n).kind for n, _ in model.named_parameters())
    assert memory["router"] == moe_layers and memory["fused_experts"] == 2 * moe_layers
    assert memory["expert"] == 0 and memory["shared_expert"] == (4 if family.has_shared_expert
                                                                 else 0)
    assert detect_layout([n for n, _ in model.named_parameters()]) == "fused"
    model.save_pretrained(tmp_path)  # per-expert keys, the family's historical names
    with LazyCheckpoint(tmp_path) as ckpt:
        roles = {k: tensor_role(k) for k in ckpt.keys()}
        assert detect_layout(ckpt.keys()) == "per_expert"
        experts = read_experts(ckpt, [k for k in ckpt.keys() if k.startswith("model.layers.0.")])
    assert Counter(r.kind for r in roles.values())["expert"] == moe_layers * 3 * 3
    assert set(experts) == {family.block(0)}
    assert [len(tensors) for tensors in experts[family.block(0)]] == [3, 3, 3]
    names = dict(zip(PROJECTIONS, family.expert_names, strict=True))
    for key, role in roles.items():
        if role.kind in ("expert", "router"):
            assert role.layer is not None and role.block == family.block(role.layer), key
        if role.kind == "expert":
            assert role.proj is not None and key.split(".")[-2] == names[role.proj]
    if moe_type != "mixtral":  # layer 1 stayed dense: its FFN is shared, fed by the same key
        dense = "model.layers.1.mlp.down_proj.weight"
        assert roles[dense].kind == "shared" and roles[dense].part == "mlp"
        assert source_for(dense).dense_keys == (dense,)


def test_roles_of_the_own_class_and_the_dense_families() -> None:
    expert = tensor_role("model.layers.3.mlp.experts.2.up_proj.weight")
    assert (expert.kind, expert.layer, expert.expert, expert.proj, expert.block) == \
        ("expert", 3, 2, "up", "model.layers.3.mlp")
    assert tensor_role("model.layers.0.mlp.classifier.bias").kind == "classifier"
    assert tensor_role("model.layers.0.mlp.gate.weight").kind == "router"
    fused = tensor_role("model.layers.5.mlp.experts.gate_up_proj")
    assert (fused.kind, fused.layer, fused.proj) == ("fused_experts", 5, "gate_up")
    parts = {"model.embed_tokens.weight": "embed", "lm_head.weight": "lm_head",
             "model.norm.weight": "norm", "model.layers.1.input_layernorm.weight": "norm",
             "model.layers.1.self_attn.q_proj.bias": "attention",  # Qwen2
             "model.layers.1.self_attn.k_norm.weight": "attention",  # Qwen3
             "model.layers.1.mlp.gate_proj.weight": "mlp"}
    for key, part in parts.items():
        role = tensor_role(key)
        assert (role.kind, role.part) == ("shared", part), key
    assert dense_ffn_key(4, "gate") == "model.layers.4.mlp.gate_proj.weight"
    mixtral = source_for("model.layers.4.block_sparse_moe.experts.1.w2.weight")
    assert (mixtral.kind, mixtral.dense_keys, mixtral.expert) == \
        ("expert", ("model.layers.4.mlp.down_proj.weight",), 1)


@pytest.mark.parametrize("key", BOGUS)
def test_a_key_no_layout_explains_is_refused_by_name(key: str) -> None:
    for ask in (tensor_role, source_for, lambda k: detect_layout([k])):
        with pytest.raises(UnknownTensorError, match="matches no role") as err:
            ask(key)
        assert repr(key) in str(err.value)
