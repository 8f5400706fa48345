"""Dense → MoE upcycling, streamed one decoder layer at a time.

Every MoE layer gets experts that are exact copies of the dense FFN (expert 0 is the anchor the
training stage may freeze; the others may get noise) and a new router. With identical experts and
renormalised top-k weights the MoE computes exactly what the dense model computes, which the tests
check to 1e-5. Only one layer's tensors are in memory at a time (plus a bounded output shard), so
an 8B or 70B model upcycles on a machine with far less RAM than the model; tensors are read lazily
with ``safe_open``, never through pickle.

The output is a standard transformers MoE (Mixtral, Qwen2-MoE, Qwen3-MoE) in the declared layout
when one can express the plan and every feature of the dense config
(:mod:`components.moe.compat`: biases, windows, rotary parameters), otherwise the package's own
``deltamoe`` class (dense layers in a Mixtral, per-layer expert counts, router classifiers:
LayerMoE; a Llama with attention or FFN biases, whose experts then keep the FFN biases).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from components.cards import portable, write_card
from components.languages import UnknownLanguageError, canonical_tag
from components.moe.accounting import Accounting, account
from components.moe.checkpoint import (
    SIDE_FILES,
    CheckpointError,
    LazyCheckpoint,
    ShardWriter,
    all_finite,
    read_config,
    split_layers,
    write_experts,
)
from components.moe.compat import (
    IncompatibleConfigError,
    check_output_keys,
    standard_fields,
    standard_gaps,
)
from components.moe.families import (
    DENSE_FFN,
    DROPPED_CONFIG,
    VOCAB_KEYS,
    Family,
    family_for,
)
from components.moe.modeling import MODEL_TYPE as OWN_TYPE

ALLOCATION_FILE = "allocation.json"


class UpcycleError(ValueError):
    """Input that cannot be upcycled: the message names the file, key or option."""


@dataclass(frozen=True)
class UpcycleOptions:
    num_experts: int = 4
    top_k: int = 2
    layers: tuple[int, ...] | None = None  # None: every layer becomes MoE
    experts_per_layer: tuple[int, ...] | None = None  # LayerMoE: per-layer counts, 0 = dense
    classifier_layers: tuple[int, ...] = ()
    router_init: str = "xavier_normal"
    router_init_std: float = 0.02
    expert_noise_std: float = 0.0
    layout: str = "per_expert"
    allocation: dict[str, list[int]] = field(default_factory=dict)  # language/group → experts
    groups: dict[str, list[str]] = field(default_factory=dict)
    original_languages: tuple[str, ...] = ()  # recorded for the routing prior and classifier
    layer_similarity: tuple[float, ...] | None = None  # recorded in allocation.json and the card
    seed: int = 0
    seq_len: int = 2048  # context length for the FLOPs accounting
    max_shard_bytes: int = 2 * 1024**3


@dataclass(frozen=True)
class UpcycleResult:
    out_dir: str
    model_type: str
    layout: str
    experts_per_layer: list[int]
    accounting: Accounting
    allocation: dict[str, Any]  # what allocation.json holds

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, n in enumerate(self.experts_per_layer) if n > 0]

    def summary(self) -> dict[str, Any]:
        return {"out_dir": self.out_dir, "model_type": self.model_type, "layout": self.layout,
                "experts_per_layer": self.experts_per_layer, **self.accounting.as_dict()}


@dataclass(frozen=True)
class _Plan:
    family: Family
    counts: list[int]  # experts per layer, 0 = dense
    own_class: bool  # the package's deltamoe class instead of the family's standard MoE

    @property
    def model_type(self) -> str:
        return OWN_TYPE if self.own_class else self.family.moe_type


def plan_layers(dense_cfg: dict[str, Any], options: UpcycleOptions) -> _Plan:
    """Validate the options against the dense config and choose the output class."""
    family = family_for(str(dense_cfg.get("model_type")))
    n_layers = int(dense_cfg["num_hidden_layers"])
    if options.experts_per_layer is not None:
        counts = list(options.experts_per_layer)
        if len(counts) != n_layers:
            raise UpcycleError(f"experts_per_layer: {len(counts)} entries for {n_layers} layers")
        if any(c == 1 or c < 0 for c in counts):
            raise UpcycleError(f"experts_per_layer: {counts}: each entry is 0 (dense) or ≥ 2")
    else:
        if options.num_experts < 2:
            raise UpcycleError(f"num_experts: expected ≥ 2, got {options.num_experts}")
        chosen = set(range(n_layers) if options.layers is None else options.layers)
        bad = sorted(i for i in chosen if not 0 <= i < n_layers)
        if bad:
            raise UpcycleError(f"layers: {bad} out of range (the model has {n_layers} layers)")
        counts = [options.num_experts if i in chosen else 0 for i in range(n_layers)]
    if not any(counts):
        raise UpcycleError("no layer becomes MoE")
    widest = max(counts)
    if not 1 <= options.top_k <= widest:
        raise UpcycleError(f"top_k: expected 1 ≤ top_k ≤ num_experts ({widest}), "
                           f"got {options.top_k}")
    for layer in options.classifier_layers:
        if not 0 <= layer < n_layers or counts[layer] == 0:
            raise UpcycleError(f"classifier_layers: layer {layer} is not an MoE layer")
    if options.layout not in ("per_expert", "fused"):
        raise UpcycleError(f"layout {options.layout!r}: expected per_expert or fused")
    moe = [c for c in counts if c]
    gaps = standard_gaps(family, dense_cfg)
    standard = (len(set(moe)) == 1 and not options.classifier_layers and not gaps
                and (len(moe) == n_layers or family.supports_dense_layers))
    if not standard and options.layout == "fused":
        why = "; ".join(gaps) or f"experts per layer {counts}"
        raise UpcycleError(f"layout: fused is written for the standard MoE classes only; this "
                           f"plan ({why}) needs the deltamoe class, which is written per_expert")
    _check_allocation(options, widest)
    return _Plan(family, counts, own_class=not standard)


def _check_allocation(options: UpcycleOptions, widest: int) -> None:
    for name, ids in options.allocation.items():
        if name not in options.groups:
            try:
                canonical_tag(name)
            except UnknownLanguageError as err:
                raise UpcycleError(f"allocation.{name}: neither a group nor a language "
                                   f"({err})") from None
        bad = [i for i in ids if not 0 <= i < widest]
        if bad:
            raise UpcycleError(f"allocation.{name}: expert ids {bad} do not exist (MoE layers "
                               f"have at most {widest} experts)")
    for group, tags in options.groups.items():
        for tag in tags:
            try:
                canonical_tag(tag)
            except UnknownLanguageError as err:
                raise UpcycleError(f"groups.{group}: {err}") from None


def _router(options: UpcycleOptions, experts: int, hidden: int,
            generator: torch.Generator) -> torch.Tensor:
    weight = torch.empty(experts, hidden, dtype=torch.float32)
    if options.router_init == "zeros":
        weight.zero_()
    elif options.router_init == "normal":
        weight.normal_(0.0, options.router_init_std, generator=generator)
    elif options.router_init == "xavier_normal":
        weight.normal_(0.0, (2.0 / (hidden + experts)) ** 0.5, generator=generator)
    else:
        raise UpcycleError(f"router_init {options.router_init!r}: expected xavier_normal, "
                           "zeros or normal")
    return weight


def _moe_block(plan: _Plan, layer: int, ffn: dict[str, torch.Tensor],
               ffn_bias: dict[str, torch.Tensor], options: UpcycleOptions,
               generator: torch.Generator) -> dict[str, torch.Tensor]:
    """All tensors of one upcycled FFN: experts (anchor exact, others optionally noised; FFN
    biases copied exactly into every expert), the router, and the classifier or zeroed shared
    expert where the plan has them."""
    experts = plan.counts[layer]
    dtype = ffn["down_proj"].dtype
    copies: dict[str, list[torch.Tensor]] = {p: [] for p in DENSE_FFN}
    for expert in range(experts):
        for proj in DENSE_FFN:
            tensor = ffn[proj]
            if expert > 0 and options.expert_noise_std > 0:
                noise = torch.randn(tensor.shape, generator=generator) * options.expert_noise_std
                tensor = (tensor.float() + noise).to(dtype)
            copies[proj].append(tensor.clone() if expert else tensor)  # no shared storage
    if plan.own_class:
        block, names, fused = f"model.layers.{layer}.mlp", DENSE_FFN, False
    else:
        fused = options.layout == "fused"
        block, names = plan.family.block(layer, fused), plan.family.expert_names
    out = write_experts(block, copies["gate_proj"], copies["up_proj"], copies["down_proj"],
                        "fused" if fused else "per_expert", names)
    for expert in range(experts):  # only the own class gets here with biases (its experts are
        for proj, bias in ffn_bias.items():  # the dense family's MLP modules)
            out[f"{block}.experts.{expert}.{proj}.bias"] = bias.clone() if expert else bias
    hidden = ffn["down_proj"].shape[0]
    out[f"{block}.gate.weight"] = _router(options, experts, hidden, generator).to(dtype)
    if plan.own_class and layer in options.classifier_layers:
        # zero logits tie and ties go to class 0 (original → anchor): exact until trained
        out[f"{block}.classifier.weight"] = torch.zeros(2, hidden, dtype=dtype)
        out[f"{block}.classifier.bias"] = torch.zeros(2, dtype=dtype)
    if plan.family.has_shared_expert and not plan.own_class:  # zeroed: adds nothing until trained
        for proj in DENSE_FFN:
            out[f"{block}.shared_expert.{proj}.weight"] = torch.zeros_like(ffn[proj])
        out[f"{block}.shared_expert_gate.weight"] = torch.zeros(1, hidden, dtype=dtype)
    return out


def upcycle(model_dir: str | Path, out_dir: str | Path, options: UpcycleOptions) -> UpcycleResult:
    """Write the MoE HF directory for the dense model in ``model_dir`` into ``out_dir``
    (an empty folder the caller commits atomically)."""
    src, dst = Path(model_dir), Path(out_dir)
    try:
        dense_cfg = read_config(src)
        plan = plan_layers(dense_cfg, options)
        out_cfg = _output_config(dense_cfg, plan, options)
        ckpt = LazyCheckpoint(src)
    except (CheckpointError, IncompatibleConfigError) as err:
        raise UpcycleError(str(err)) from None
    try:
        _check_inputs(ckpt, dense_cfg, out_cfg)
    except BaseException:
        ckpt.close()
        raise
    generator = torch.Generator().manual_seed(options.seed)
    writer = ShardWriter(dst, options.max_shard_bytes)
    dense = total = active = embedding = 0
    try:
        for layer, keys in tqdm(split_layers(ckpt.keys()), desc="upcycle", unit="layer"):
            ffn: dict[str, torch.Tensor] = {}
            ffn_bias: dict[str, torch.Tensor] = {}  # mlp_bias: the own class's experts keep them
            for key in keys:
                tensor = ckpt.get(key)
                if not all_finite(tensor):
                    raise UpcycleError(f"tensor {key} holds NaN or Inf")
                dense += tensor.numel()
                if key == "model.embed_tokens.weight":
                    embedding = tensor.numel()
                proj = next((p for p in DENSE_FFN if key.endswith(f".mlp.{p}.weight")), None)
                bias = next((p for p in DENSE_FFN if key.endswith(f".mlp.{p}.bias")), None)
                if layer is None or not plan.counts[layer] or (proj or bias) is None:
                    writer.add(key, tensor)
                    total, active = total + tensor.numel(), active + tensor.numel()
                elif proj is not None:
                    ffn[proj] = tensor
                else:
                    ffn_bias[str(bias)] = tensor
            if ffn:
                if set(ffn) != set(DENSE_FFN) or (ffn_bias and set(ffn_bias) != set(DENSE_FFN)):
                    raise UpcycleError(f"layer {layer}: FFN tensors {sorted(ffn)}, biases "
                                       f"{sorted(ffn_bias)}; expected {', '.join(DENSE_FFN)}")
                if ffn_bias and not plan.own_class:
                    raise UpcycleError(f"layer {layer}: FFN biases although config.json does "
                                       "not set mlp_bias (they would be dropped)")
                ffn_size = sum(t.numel() for t in (*ffn.values(), *ffn_bias.values()))
                assert layer is not None
                experts, top_k = plan.counts[layer], min(options.top_k, plan.counts[layer])
                for key, tensor in _moe_block(plan, layer, ffn, ffn_bias, options,
                                              generator).items():
                    writer.add(key, tensor)
                    if ".experts." in key:
                        continue
                    total, active = total + tensor.numel(), active + tensor.numel()
                total += ffn_size * experts
                active += ffn_size * top_k
        writer.close()
    except BaseException as err:
        writer.abort()
        if isinstance(err, CheckpointError):
            raise UpcycleError(str(err)) from None
        raise
    finally:
        ckpt.close()
    (dst / "config.json").write_text(json.dumps(out_cfg, indent=2, sort_keys=True))
    for name in SIDE_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    accounting = account(dense_cfg, dense, total, active, embedding, options.seq_len)
    allocation = _allocation_record(plan, options)
    (dst / ALLOCATION_FILE).write_text(json.dumps(allocation, indent=2))
    result = UpcycleResult(out_dir=str(dst), model_type=plan.model_type,
                           layout="per_expert" if plan.own_class else options.layout,
                           experts_per_layer=plan.counts, accounting=accounting,
                           allocation=allocation)
    _model_card(dst, src, options, result)
    return result


def _output_config(dense_cfg: dict[str, Any], plan: _Plan,
                   options: UpcycleOptions) -> dict[str, Any]:
    """The MoE's config.json: the family's standard class with the fields that make it compute
    what the dense config does, or the own class over the dense config as it is."""
    moe_layers = [i for i, n in enumerate(plan.counts) if n]
    if plan.own_class:
        cfg = {k: v for k, v in dense_cfg.items() if k not in DROPPED_CONFIG}
        cfg.update(model_type=OWN_TYPE, architectures=["DeltaMoeForCausalLM"],
                   base_model_type=dense_cfg["model_type"], experts_per_layer=plan.counts,
                   num_experts_per_tok=options.top_k,
                   classifier_layers=sorted(options.classifier_layers))
        return cfg
    return plan.family.moe_config(dense_cfg, plan.counts[moe_layers[0]], options.top_k,
                                  moe_layers, standard_fields(plan.family, dense_cfg))


def _check_inputs(ckpt: LazyCheckpoint, dense_cfg: dict[str, Any],
                  out_cfg: dict[str, Any]) -> None:
    """From headers alone, before a tensor is written: the vocabulary rows agree with
    ``vocab_size``, and the output class holds exactly the dense model's shared tensors."""
    vocab = dense_cfg["vocab_size"]
    for key in VOCAB_KEYS:
        if key in ckpt:
            rows = ckpt.meta(key)[0][0]
            if rows != vocab:
                raise UpcycleError(f"{ckpt.source}: {key} has {rows} rows but config.json says "
                                   f"vocab_size {vocab}")
    try:
        check_output_keys(out_cfg, ckpt.keys())
    except IncompatibleConfigError as err:
        raise UpcycleError(str(err)) from None


def _allocation_record(plan: _Plan, options: UpcycleOptions) -> dict[str, Any]:
    """Which experts serve which language: read by the training stage's routing-prior loss."""
    return {"anchor_expert": 0, "experts_per_layer": plan.counts,
              "experts": options.allocation, "groups": options.groups,
              "original_languages": list(options.original_languages),
              "classifier_layers": sorted(options.classifier_layers),
              "layer_similarity": list(options.layer_similarity or [])}


def _model_card(dst: Path, src: Path, options: UpcycleOptions, result: UpcycleResult) -> None:
    acc = result.accounting
    lineage = portable({"source_model": str(src), "options": asdict(options), **result.summary()})
    languages = [*options.original_languages, *options.allocation,
                 *(lang for members in options.groups.values() for lang in members)]
    write_card(
        dst, f"{dst.name} (upcycled {result.model_type})",
        f"Dense model `{src}` upcycled by deltamoe: {len(result.moe_layers)} MoE layers with "
        f"{sorted(set(n for n in result.experts_per_layer if n))} experts, each an exact copy "
        f"of the dense FFN (expert 0 is the anchor), top-{options.top_k} routing, routers "
        f"initialised with `{options.router_init}`, `{result.layout}` expert layout.\n\n"
        f"| | parameters | forward FLOPs per token (n_ctx={acc.seq_len}) |\n|---|---|---|\n"
        f"| dense | {acc.dense_parameters:,} | {acc.dense_flops_per_token:,} |\n"
        f"| MoE total | {acc.moe_parameters:,} | |\n"
        f"| MoE active per token | {acc.active_parameters:,} | {acc.active_flops_per_token:,} |"
        f"\n\n```json\n{json.dumps(lineage, indent=2)}\n```\n",
        base_model=[str(src)], relation="finetune", languages=languages, inputs=[src],
        tags=["moe", "upcycled"])
