"""Which dense architecture becomes which standard transformers MoE, and how keys are renamed.

Upcycled models use the ecosystem's own MoE classes so that ``AutoModelForCausalLM`` loads them
without ``trust_remote_code``: Llama and Mistral become Mixtral, Qwen2 becomes Qwen2-MoE (its
shared expert zeroed so the output is unchanged), Qwen3 becomes Qwen3-MoE. What none of them can
express (dense layers in a Mixtral, per-layer expert counts, a router classifier) becomes the
package's own class, :mod:`components.moe.modeling`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DENSE_FFN = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    """One dense → MoE mapping."""

    dense_types: tuple[str, ...]
    moe_type: str
    architecture: str
    moe_prefix: str  # the MoE block inside a decoder layer
    expert_names: tuple[str, str, str]  # how gate, up, down are called inside an expert
    has_shared_expert: bool
    supports_dense_layers: bool  # a config switch keeps chosen layers dense (mlp_only_layers)

    def block(self, layer: int, fused: bool = False) -> str:
        """The MoE block's key prefix: on disk per-expert keys use the family's historical name
        (Mixtral: ``block_sparse_moe``); fused tensors use the in-memory name (``mlp``)."""
        return f"model.layers.{layer}.{'mlp' if fused else self.moe_prefix}"

    def moe_config(self, dense: dict[str, Any], num_experts: int, top_k: int,
                   moe_layers: list[int]) -> dict[str, Any]:
        """The MoE config.json from the dense one: same shapes, experts of the dense FFN size."""
        cfg = {k: v for k, v in dense.items() if k not in ("architectures", "model_type")}
        cfg["architectures"] = [self.architecture]
        cfg["model_type"] = self.moe_type
        layers = int(dense["num_hidden_layers"])
        if self.moe_type == "mixtral":
            cfg.update(num_local_experts=num_experts, num_experts_per_tok=top_k,
                       router_jitter_noise=0.0, output_router_logits=False)
            cfg.pop("mlp_bias", None)
        else:
            cfg.update(num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=True,
                       moe_intermediate_size=dense["intermediate_size"], decoder_sparse_step=1,
                       mlp_only_layers=[i for i in range(layers) if i not in moe_layers],
                       output_router_logits=False)
            if self.has_shared_expert:
                cfg["shared_expert_intermediate_size"] = dense["intermediate_size"]
        return cfg


FAMILIES: tuple[Family, ...] = (
    Family(("llama", "mistral"), "mixtral", "MixtralForCausalLM", "block_sparse_moe",
           ("w1", "w3", "w2"), has_shared_expert=False, supports_dense_layers=False),
    Family(("qwen2",), "qwen2_moe", "Qwen2MoeForCausalLM", "mlp",
           DENSE_FFN, has_shared_expert=True, supports_dense_layers=True),
    Family(("qwen3",), "qwen3_moe", "Qwen3MoeForCausalLM", "mlp",
           DENSE_FFN, has_shared_expert=False, supports_dense_layers=True),
)


class UnsupportedArchitectureError(ValueError):
    """The dense model is of a family the upcycler does not map."""


def family_for(model_type: str) -> Family:
    for family in FAMILIES:
        if model_type in family.dense_types:
            return family
    supported = ", ".join(f"{'/'.join(f.dense_types)} → {f.moe_type}" for f in FAMILIES)
    raise UnsupportedArchitectureError(
        f"cannot upcycle model_type {model_type!r}; supported: {supported}")
