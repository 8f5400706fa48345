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

The experts stay per-expert modules in memory too, although transformers' conversion mapping
(``register_checkpoint_conversion_mapping``, what turns Mixtral's ``experts.<e>.w1`` into a
fused ``gate_up_proj`` on load) accepts a custom class: fused parameters would make the anchor a
slice (frozen only by a guard, with optimizer state of its own), need fused bias tensors no
layout declares, and change every in-memory name that freezing, router capture and the
checkpoint readers look up. The grouped path gets the fused operands by stacking the experts'
weights at compute time instead (one read of the expert weights per forward, kept for the
backward unless activation checkpointing recomputes it).
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
from transformers.integrations.moe import _grouped_mm
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from components.moe.families import DENSE_TYPES, OWN_MOE_TYPE

MODEL_TYPE = OWN_MOE_TYPE
# the experts implementations LanguageMoeBlock has (transformers' names); grouped_mm is the default
EXPERTS_IMPLEMENTATIONS = ("grouped_mm", "eager")
GATED_MLP = ("gate_proj", "up_proj", "down_proj", "act_fn")


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
    (:func:`components.moe.routing.classifier_loss`); its hard decision carries no gradient, and
    it reads a detached copy of the FFN input, so that loss trains the classifier alone instead
    of reshaping the earlier layers' experts to make the languages easier to tell apart.

    The experts run as the model config's ``_experts_implementation`` says (transformers'
    switch, :meth:`DeltaMoeForCausalLM.set_experts_implementation`): ``grouped_mm`` (the
    default) sorts the token-expert pairs by expert and runs each projection as one grouped GEMM
    over the experts' weights stacked at compute time, with no host sync; ``eager`` loops over
    the experts that received tokens (a device sync per layer: the reference). The parameters
    stay per expert (``experts.<e>.gate_proj`` ...), so the anchor freezes by ``requires_grad``
    and the on-disk layout is unchanged; MLP biases (Llama ``mlp_bias``) are gathered per row.
    An expert no token reached gets a zero gradient from the grouped path (none from the loop),
    so AdamW's momentum and weight decay still move it, as with transformers' fused tensors.
    """

    def __init__(self, config: DeltaMoeConfig, layer: int, mlp_class: type[nn.Module]) -> None:
        super().__init__()
        self.config = config  # read at each forward: the experts implementation can change
        self.num_experts = config.num_experts(layer)
        self.top_k = min(config.num_experts_per_tok, self.num_experts)
        self.gate = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.experts = nn.ModuleList(mlp_class(config) for _ in range(self.num_experts))
        self.classifier = (nn.Linear(config.hidden_size, 2, bias=True)
                           if layer in config.classifier_layers else None)
        # the grouped path needs the gated MLP of every dense family: gate/up/down and act_fn
        self.groupable = all(hasattr(self.experts[0], name) for name in GATED_MLP)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        logits = self.gate(flat)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(flat.dtype)
        if self.config._experts_implementation == "grouped_mm" and self.groupable:
            return self._grouped(flat, chosen, weights).reshape(shape)
        return self._eager(flat, chosen, weights).reshape(shape)

    def _eager(self, flat: torch.Tensor, chosen: torch.Tensor,
               weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(flat)
        for expert in torch.unique(chosen).tolist():
            rows, slot = torch.where(chosen == expert)
            y = self.experts[expert](flat[rows]) * weights[rows, slot, None]
            out.index_add_(0, rows, y.to(out.dtype))
        if self.classifier is not None:
            original = self.classifier(flat.detach()).argmax(dim=-1) == 0
            if original.any():
                anchor = self.experts[0](flat[original])
                out = out.index_put((original.nonzero().squeeze(1),), anchor.to(out.dtype))
        return out

    def _grouped(self, flat: torch.Tensor, chosen: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        tokens, top_k = chosen.shape
        if self.classifier is not None:
            # original-language tokens: every slot on the anchor, all weight on the first one
            # (y·1 + y·0 is y exactly), so the same sorted GEMMs serve them without a sync
            original = (self.classifier(flat.detach()).argmax(dim=-1) == 0)[:, None]
            chosen = torch.where(original, torch.zeros_like(chosen), chosen)
            first = torch.zeros_like(weights)
            first[:, 0] = 1.0
            weights = torch.where(original, first, weights)
        ids, order = torch.sort(chosen.reshape(-1), stable=True)
        rows = flat[order // top_k]
        # histc, not bincount: bincount's output size depends on the data (a host sync)
        counts = torch.histc(ids.float() if flat.device.type in ("cpu", "mps") else ids.int(),
                             bins=self.num_experts, min=0, max=self.num_experts - 1)
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        act = self.experts[0].act_fn
        hidden = (act(self._grouped_projection("gate_proj", offsets, rows, ids))
                  * self._grouped_projection("up_proj", offsets, rows, ids))
        y = self._grouped_projection("down_proj", offsets, hidden, ids)
        y = y * weights.reshape(-1)[order, None].to(y.dtype)
        unsorted = torch.zeros_like(y).index_copy(0, order, y)
        return unsorted.view(tokens, top_k, -1).sum(dim=1).to(flat.dtype)

    def _grouped_projection(self, name: str, offsets: torch.Tensor, rows: torch.Tensor,
                            ids: torch.Tensor) -> torch.Tensor:
        """Projection ``name`` of every expert as one grouped GEMM: ``rows`` sorted by expert,
        ``offsets`` the cumulative row counts. The weights are stacked as contiguous
        [E, in, out], the grouped kernel's own layout (one copy; concatenating gate and up into
        one GEMM cost a second copy and measured ~20 % slower on CPU)."""
        layers = [getattr(expert, name) for expert in self.experts]
        weight = torch.stack([layer.weight.t() for layer in layers])
        out = _grouped_mm(rows, weight, offs=offsets)
        if layers[0].bias is not None:
            out = out + torch.stack([layer.bias for layer in layers])[ids].to(out.dtype)
        return out


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
        # the dense class cannot switch experts implementations: it must not see ours
        experts, config._experts_implementation_internal = (
            config._experts_implementation_internal, None)
        dense = dense_class(config)
        config._experts_implementation_internal = experts
        self.model, self.lm_head = dense.model, dense.lm_head
        self._dense_forward = dense_class.forward
        self.vocab_size = config.vocab_size
        for index, layer in enumerate(self.model.layers):
            if config.num_experts(index) > 0:
                layer.mlp = LanguageMoeBlock(config, index, type(layer.mlp))
        self.post_init()

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True  # LanguageMoeBlock reads config._experts_implementation at each forward

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """transformers' check, for what :class:`LanguageMoeBlock` implements."""
        found = "grouped_mm" if requested_experts is None else requested_experts
        if found not in EXPERTS_IMPLEMENTATIONS:
            raise ValueError(f"experts_implementation {found!r}: {type(self).__name__} "
                             f"implements {', '.join(EXPERTS_IMPLEMENTATIONS)}")
        return found

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
