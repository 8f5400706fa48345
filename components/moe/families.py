"""Which dense architecture becomes which MoE, and what every tensor of either is called.

Upcycled models use the ecosystem's own MoE classes so that ``AutoModelForCausalLM`` loads them
without ``trust_remote_code``: Llama and Mistral become Mixtral, Qwen2 becomes Qwen2-MoE (its
shared expert zeroed so the output is unchanged), Qwen3 becomes Qwen3-MoE. What none of them can
express (dense layers in a Mixtral, per-layer expert counts, a router classifier) becomes the
package's own class, :mod:`components.moe.modeling`.

Tensor names are known here too. :func:`tensor_role` classifies every key of a dense model or
of an MoE in any supported layout (per-expert on disk, transformers 5's fused tensors, the
package's own class), with patterns built from :data:`FAMILIES` and :data:`OWN_CLASS`; the delta
engine's expansion, freezing, router capture and the checkpoint layout readers all ask it, so a
new family is one entry here. A key no layout explains raises :class:`UnknownTensorError`:
guessing "shared" would graft or freeze it wrongly without a word.

No torch or transformers import: configuration and CLI code read :data:`DENSE_TYPES` cheaply.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

DENSE_FFN = ("gate_proj", "up_proj", "down_proj")
DENSE_PREFIX = "mlp"  # the FFN module of a dense decoder layer (every dense family)
FUSED_PREFIX = "mlp"  # where transformers 5 keeps an MoE block in memory, and its fused keys
FUSED_EXPERTS = ("gate_up_proj", "down_proj")  # [E, 2I, H] (gate rows, then up) and [E, H, I]
OWN_MOE_TYPE = "deltamoe"  # the package's own MoE class (components.moe.modeling)
# dense config fields an upcycled config never copies: the class it names, and ``auto_map``,
# whose remote code would describe the dense model, not the MoE
DROPPED_CONFIG = ("architectures", "model_type", "auto_map")
LEGACY_ROPE = ("rope_scaling", "rope_theta")  # transformers 4 rotary fields
LAYER_PREFIX = "model.layers."
VOCAB_KEYS = ("model.embed_tokens.weight", "lm_head.weight")  # rows = vocabulary size

Projection = Literal["gate", "up", "down", "gate_up"]
PROJECTIONS: tuple[Projection, Projection, Projection] = ("gate", "up", "down")


@dataclass(frozen=True)
class BlockNaming:
    """How the tensors of one MoE block are named in one layout.

    ``expert_names`` are the per-expert gate, up and down names (``experts.<e>.<name>.weight``);
    ``None`` means the fused layout (``experts.gate_up_proj`` / ``experts.down_proj``).
    """

    prefix: str
    expert_names: tuple[str, str, str] | None
    shared_expert: bool = False  # Qwen2-MoE: shared_expert.* and shared_expert_gate
    classifier: bool = False  # the package's LayerMoE classifier
    expert_bias: bool = False  # experts.<e>.<name>.bias (the own class over a Llama mlp_bias)


@dataclass(frozen=True)
class Family:
    """One dense → MoE mapping."""

    dense_types: tuple[str, ...]
    moe_type: str
    architecture: str
    moe_prefix: str  # the MoE block inside a decoder layer, per-expert keys on disk
    expert_names: tuple[str, str, str]  # how gate, up, down are called inside an expert
    has_shared_expert: bool
    supports_dense_layers: bool  # a config switch keeps chosen layers dense (mlp_only_layers)

    def block(self, layer: int, fused: bool = False) -> str:
        """The MoE block's key prefix: on disk per-expert keys use the family's historical name
        (Mixtral: ``block_sparse_moe``); fused tensors use the in-memory name (``mlp``)."""
        return f"{LAYER_PREFIX}{layer}.{FUSED_PREFIX if fused else self.moe_prefix}"

    def namings(self) -> tuple[BlockNaming, BlockNaming]:
        """The family's two layouts: per-expert (what ``save_pretrained`` writes) and fused
        (what transformers 5 holds in memory and also loads from disk)."""
        return (BlockNaming(self.moe_prefix, self.expert_names, self.has_shared_expert),
                BlockNaming(FUSED_PREFIX, None, self.has_shared_expert))

    def moe_config(self, dense: dict[str, Any], num_experts: int, top_k: int,
                   moe_layers: list[int], fields: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
        """The MoE config.json from the dense one: same shapes, experts of the dense FFN size.

        ``fields`` (:func:`components.moe.compat.standard_fields`) override what the MoE class
        would read differently (windows, biases, rotary parameters); legacy rope fields are
        dropped with them, because a ``rope_scaling`` would win over ``rope_parameters``.
        """
        cfg = {k: v for k, v in dense.items() if k not in DROPPED_CONFIG}
        if fields:
            for key in LEGACY_ROPE:
                cfg.pop(key, None)
            cfg.update(fields)
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
# every dense model type some family upcycles (the synthetic world can build each of them)
DENSE_TYPES: tuple[str, ...] = tuple(t for family in FAMILIES for t in family.dense_types)
# the package's own class: the dense family's MLP class as experts under ``mlp``, per-expert in
# memory and on disk, a router and an optional classifier beside them
OWN_CLASS = BlockNaming(DENSE_PREFIX, DENSE_FFN, classifier=True, expert_bias=True)


class UnsupportedArchitectureError(ValueError):
    """The dense model is of a family the upcycler does not map."""


def family_for(model_type: str) -> Family:
    for family in FAMILIES:
        if model_type in family.dense_types:
            return family
    supported = ", ".join(f"{'/'.join(f.dense_types)} → {f.moe_type}" for f in FAMILIES)
    raise UnsupportedArchitectureError(
        f"cannot upcycle model_type {model_type!r}; supported: {supported}")


# --- tensor roles -----------------------------------------------------------------------------

RoleKind = Literal["shared", "router", "classifier", "shared_expert", "expert", "fused_experts"]
SharedPart = Literal["embed", "lm_head", "norm", "attention", "mlp"]


class UnknownTensorError(ValueError):
    """A tensor name no supported layout explains: the message names the key."""


@dataclass(frozen=True)
class TensorRole:
    """What one tensor of a dense or MoE model is.

    ``shared``: attention, norms, embeddings, head and dense-layer FFNs (``part`` says which, the
    groups per-family graft scales use). ``router``, ``classifier`` and ``shared_expert`` (a
    Qwen2-MoE's shared expert and its gate) exist only in the MoE. ``expert``: one projection
    (``proj`` gate/up/down) of expert ``expert``, its weight or (``bias``) its bias;
    ``fused_experts``: all experts' ``gate_up`` or ``down`` in one tensor. MoE roles carry
    ``block``, the MoE block's key prefix (``model.layers.3.block_sparse_moe``).
    """

    kind: RoleKind
    layer: int | None = None
    block: str | None = None
    expert: int | None = None
    proj: Projection | None = None
    part: SharedPart | None = None
    bias: bool = False

    @property
    def is_expert(self) -> bool:
        """Expert weights in either layout (what Δpost's dense FFN delta lands on)."""
        return self.kind in ("expert", "fused_experts")


def dense_ffn_key(layer: int, proj: Projection, param: str = "weight") -> str:
    """The dense model's FFN weight (or ``param="bias"``) of ``layer`` for projection gate, up
    or down."""
    return f"{LAYER_PREFIX}{layer}.{DENSE_PREFIX}.{DENSE_FFN[PROJECTIONS.index(proj)]}.{param}"


def namings() -> tuple[BlockNaming, ...]:
    """Every MoE block layout a checkpoint or a model in memory may use, without repeats."""
    return tuple(dict.fromkeys([n for f in FAMILIES for n in f.namings()] + [OWN_CLASS]))


def _alternatives(names: Iterable[str]) -> str:
    """A regex alternation of ``names`` (escaped, repeats dropped)."""
    return "|".join(re.escape(n) for n in dict.fromkeys(names))


@dataclass(frozen=True)
class _Rule:
    """One anchored pattern and the role its matches have; named groups fill the details."""

    pattern: re.Pattern[str]
    kind: RoleKind
    proj: dict[str, Projection] | None = None  # group ``name`` → projection
    part: SharedPart | None = None

    def role(self, match: re.Match[str]) -> TensorRole:
        groups = match.groupdict()
        layer, expert = groups.get("layer"), groups.get("expert")
        return TensorRole(self.kind, None if layer is None else int(layer),
                          match.string[:match.end("block")] if "block" in groups else None,
                          None if expert is None else int(expert),
                          self.proj[groups["name"]] if self.proj else None, self.part,
                          groups.get("param") == "bias")


@cache
def _rules() -> tuple[_Rule, ...]:
    """The patterns of every role in every layout of :func:`namings` (compiled once)."""
    layer = rf"^{re.escape(LAYER_PREFIX)}(?P<layer>\d+)\."
    every = namings()

    def block(which: Iterable[BlockNaming]) -> str:
        return rf"{layer}(?P<block>{_alternatives(n.prefix for n in which)})\."

    rules = []
    per_expert: dict[tuple[str, tuple[str, str, str] | None], list[BlockNaming]] = {}
    for naming in every:
        if naming.expert_names is not None:
            per_expert.setdefault((naming.prefix, naming.expert_names), []).append(naming)
    for same in per_expert.values():
        names = dict(zip(same[0].expert_names or (), PROJECTIONS, strict=True))
        param = "weight|bias" if any(n.expert_bias for n in same) else "weight"
        rules.append(_Rule(re.compile(rf"{block(same[:1])}experts\.(?P<expert>\d+)\."
                                      rf"(?P<name>{_alternatives(names)})\.(?P<param>{param})$"),
                           "expert", names))
    fused = [n for n in every if n.expert_names is None]
    rules.append(_Rule(re.compile(rf"{block(fused)}experts\.(?P<name>"
                                  rf"{_alternatives(FUSED_EXPERTS)})$"),
                       "fused_experts", dict(zip(FUSED_EXPERTS, ("gate_up", "down"),
                                                 strict=True))))
    rules.append(_Rule(re.compile(rf"{block(every)}gate\.weight$"), "router"))
    rules.append(_Rule(re.compile(rf"{block(n for n in every if n.classifier)}classifier\."
                                  r"(?:weight|bias)$"), "classifier"))
    rules.append(_Rule(re.compile(rf"{block(n for n in every if n.shared_expert)}(?:"
                                  rf"shared_expert\.(?:{_alternatives(DENSE_FFN)})\.weight|"
                                  r"shared_expert_gate\.weight)$"), "shared_expert"))
    # shared tensors of every dense family (Qwen2's attention biases, Qwen3's q/k norms, the
    # rotary buffer older Llama checkpoints saved), and the FFN of a layer that stayed dense
    shared: list[tuple[str, SharedPart]] = [
        (r"^model\.embed_tokens\.weight$", "embed"),
        (r"^lm_head\.weight$", "lm_head"),
        (r"^model\.norm\.weight$", "norm"),
        (rf"{layer}self_attn\.(?:[qkvo]_proj\.(?:weight|bias)|[qk]_norm\.weight|"
         r"rotary_emb\.inv_freq)$", "attention"),
        (rf"{layer}(?:input_layernorm|post_attention_layernorm)\.weight$", "norm"),
        (rf"{layer}{re.escape(DENSE_PREFIX)}\.(?:{_alternatives(DENSE_FFN)})\.(?:weight|bias)$",
         "mlp"),
    ]
    rules += [_Rule(re.compile(pattern), "shared", part=part) for pattern, part in shared]
    return tuple(rules)


def tensor_role(key: str) -> TensorRole:
    """The role of tensor ``key`` (a checkpoint key or an in-memory parameter name) in any
    supported dense or MoE layout; raises :class:`UnknownTensorError` for any other name."""
    for rule in _rules():
        if match := rule.pattern.match(key):
            return rule.role(match)
    layouts = ", ".join(sorted({f"{n.prefix}.experts.<e>.{'/'.join(n.expert_names)}"
                                for n in namings() if n.expert_names}
                               | {f"{FUSED_PREFIX}.experts.{'/'.join(FUSED_EXPERTS)}"}))
    raise UnknownTensorError(
        f"tensor {key!r} matches no role of a supported layout (shared: embeddings, lm_head, "
        f"norms, self_attn, {DENSE_PREFIX}.{'/'.join(DENSE_FFN)}; MoE: <block>.gate router, "
        f"experts {layouts}, classifier, shared_expert); model types: "
        f"{', '.join([*DENSE_TYPES, *(f.moe_type for f in FAMILIES), OWN_MOE_TYPE])}")
