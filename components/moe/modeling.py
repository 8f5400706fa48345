"""The package's own MoE class, for what no standard transformers MoE can express.

Mixtral cannot keep some layers dense, and no standard class has per-layer expert counts or a
language classifier in front of the router (LayerMoE, arXiv 2505.22582). ``DeltaMoeForCausalLM``
is the dense family's own model (Llama, Mistral, Qwen2, Qwen3: attention, norms, rotary, cache,
generation all unchanged) with the FFN of chosen layers replaced by :class:`LanguageMoeBlock`.
Tensor names stay those of the dense model plus ``mlp.gate`` (router), ``mlp.experts.<e>.*``
(per-expert layout) and ``mlp.classifier``: the layout :data:`components.moe.families.OWN_CLASS`
declares, so the delta engine expands Δpost onto it exactly as onto Mixtral. Importing this
module registers it with the Auto classes, after which ``AutoModelForCausalLM.from_pretrained``
loads it with ``trust_remote_code`` off.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from components.moe.families import DENSE_TYPES, OWN_MOE_TYPE

MODEL_TYPE = OWN_MOE_TYPE


class DeltaMoeConfig(PretrainedConfig):
    """The dense family's config fields, flat, plus the MoE layout.

    ``experts_per_layer[l]`` is the number of experts of layer ``l`` (0 keeps the dense FFN);
    expert 0 of every MoE layer is the anchor (the dense FFN's copy). ``classifier_layers`` get a
    two-way language-group classifier that sends tokens it judges original-language to the anchor.
    """

    model_type = MODEL_TYPE

    def __init__(self, base_model_type: str = "llama", experts_per_layer: list[int] | None = None,
                 num_experts_per_tok: int = 2, classifier_layers: list[int] | None = None,
                 **kwargs: Any) -> None:
        if base_model_type not in DENSE_TYPES:
            raise ValueError(f"base_model_type {base_model_type!r}: expected one of "
                             f"{', '.join(DENSE_TYPES)}")
        self.base_model_type = base_model_type
        self.experts_per_layer = list(experts_per_layer or [])
        self.num_experts_per_tok = num_experts_per_tok
        self.classifier_layers = sorted(classifier_layers or [])
        # the dense family's defaults for every field the caller did not give
        own = ("model_type", "architectures", "transformers_version")
        given = {k: v for k, v in kwargs.items() if k not in own}
        base = AutoConfig.for_model(base_model_type, **given)
        fields = {k: v for k, v in base.to_dict().items() if k not in own}
        fields.update(kwargs)
        fields.pop("model_type", None)
        super().__init__(**fields)
        if self.experts_per_layer and len(self.experts_per_layer) != self.num_hidden_layers:
            raise ValueError(f"experts_per_layer has {len(self.experts_per_layer)} entries for "
                             f"{self.num_hidden_layers} layers")
        for layer in self.classifier_layers:
            if not 0 <= layer < self.num_hidden_layers or self.num_experts(layer) < 2:
                raise ValueError(f"classifier layer {layer} is not an MoE layer")

    def num_experts(self, layer: int) -> int:
        return self.experts_per_layer[layer] if self.experts_per_layer else 0

    def dense_class(self) -> type[PreTrainedModel]:
        """The dense family's ForCausalLM, whose modules and forward this model reuses."""
        base_config_class = type(AutoConfig.for_model(self.base_model_type))
        return MODEL_FOR_CAUSAL_LM_MAPPING[base_config_class]


class LanguageMoeBlock(nn.Module):
    """Top-k routed experts (each the family's own MLP class), optionally behind a classifier.

    Routing is Mixtral's: softmax over all experts in fp32, top-k, weights renormalised to sum to
    one — which makes an MoE of identical experts compute exactly the dense FFN. With a
    classifier, a token whose classifier logits favour class 0 (original language) goes to the
    anchor expert alone; zero-initialised logits tie, and ties go to class 0, so a freshly
    upcycled classifier layer is exact too. The classifier is trained with its own loss
    (:func:`components.moe.routing.classifier_loss`); its hard decision carries no gradient.
    """

    def __init__(self, config: DeltaMoeConfig, layer: int, mlp_class: type[nn.Module]) -> None:
        super().__init__()
        self.num_experts = config.num_experts(layer)
        self.top_k = min(config.num_experts_per_tok, self.num_experts)
        self.gate = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.experts = nn.ModuleList(mlp_class(config) for _ in range(self.num_experts))
        self.classifier = (nn.Linear(config.hidden_size, 2, bias=True)
                           if layer in config.classifier_layers else None)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        logits = self.gate(flat)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(flat.dtype)
        out = torch.zeros_like(flat)
        for expert in torch.unique(chosen).tolist():
            rows, slot = torch.where(chosen == expert)
            y = self.experts[expert](flat[rows]) * weights[rows, slot, None]
            out.index_add_(0, rows, y.to(out.dtype))
        if self.classifier is not None:
            original = self.classifier(flat).argmax(dim=-1) == 0
            if original.any():
                anchor = self.experts[0](flat[original])
                out = out.index_put((original.nonzero().squeeze(1),), anchor.to(out.dtype))
        return out.reshape(shape)


class DeltaMoeForCausalLM(PreTrainedModel, GenerationMixin):
    """The dense family's causal LM with :class:`LanguageMoeBlock` in its MoE layers."""

    config_class = DeltaMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeltaMoeConfig) -> None:
        super().__init__(config)
        dense_class = config.dense_class()
        self._no_split_modules = list(getattr(dense_class, "_no_split_modules", None) or [])
        dense = dense_class(config)
        self.model, self.lm_head = dense.model, dense.lm_head
        self._dense_forward = dense_class.forward
        self.vocab_size = config.vocab_size
        for index, layer in enumerate(self.model.layers):
            if config.num_experts(index) > 0:
                layer.mlp = LanguageMoeBlock(config, index, type(layer.mlp))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # the dense family's forward, run on this module's (shared-structure) attributes
        return self._dense_forward(self, *args, **kwargs)


def register() -> None:
    """Make the Auto classes load ``model_type: deltamoe`` (safe to call more than once)."""
    try:
        AutoConfig.register(MODEL_TYPE, DeltaMoeConfig)
    except ValueError:  # already registered
        pass
    try:
        AutoModelForCausalLM.register(DeltaMoeConfig, DeltaMoeForCausalLM)
    except ValueError:
        pass


register()  # importing this module is enough: loaders of upcycled models need nothing else
