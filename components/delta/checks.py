"""What the graft checks before it writes a byte: architectures, tensor sets, shapes, options.

Everything here reads configs and safetensors headers only, so a bad input is refused in
seconds with one message naming the model, the tensor and the file, and the caller's stage
folder is never committed. The target must hold exactly the tensors the method expects (every
tensor of the dense pair, as itself or expanded into every expert of an MoE block, plus routers;
nothing else): a missing ``v_proj`` or one expert's ``w1`` would otherwise come out missing too,
and transformers would initialise it at random on load without a word.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, get_args

from components.block_expansion import EXPANSION_FILE, ExpandedLayer, ExpansionError, read_layers
from components.delta.expand import VOCAB_KEYS, Family, Source, source_for
from components.delta.methods import METHODS, Method
from components.moe.checkpoint import (
    LAYER_KEY,
    CheckpointError,
    LazyCheckpoint,
    read_config,
    split_layers,
)
from components.moe.families import UnsupportedArchitectureError, family_for, tensor_role

_FLOAT_HEADERS = {"F32", "F16", "BF16", "F64"}
FAMILY_NAMES: tuple[str, ...] = get_args(Family)  # what --family-scale accepts


class GraftError(ValueError):
    """Inputs that cannot be grafted: the message names the model, tensor or option."""


@dataclass(frozen=True)
class GraftInputs:
    base: str
    post: str
    target: str


def check_scales(scale: float, expert_scales: dict[int, float],
                 family_scales: dict[str, float]) -> None:
    """Scales are finite numbers, and family scales name a tensor family: a ``nan`` would fail
    late as an overflow, a ``foo=2`` would be ignored without a word."""
    named = [("scale", scale), *((f"expert scale {e}", v) for e, v in expert_scales.items()),
             *((f"family scale {f}", v) for f, v in family_scales.items())]
    for name, value in named:
        if isinstance(value, bool) or not isinstance(value, int | float) or \
                not math.isfinite(value):
            raise GraftError(f"{name}: expected a finite number, got {value!r}")
    for expert in expert_scales:
        if isinstance(expert, bool) or not isinstance(expert, int) or expert < 0:
            raise GraftError(f"expert scale {expert!r}: expected an expert index ≥ 0")
    unknown = sorted(set(family_scales) - set(FAMILY_NAMES))
    if unknown:
        raise GraftError(f"family scale {unknown[0]!r}: not a tensor family; valid families: "
                         f"{', '.join(FAMILY_NAMES)}")


def check_expert_scales(expert_scales: dict[int, float], experts: int, method: Method) -> None:
    """Every scaled expert exists in the target (``experts``: the widest MoE block's count)."""
    if not expert_scales:
        return
    if experts == 0:
        raise GraftError(f"expert scales {sorted(expert_scales)}: method {method.name} grafts a "
                         "dense target, which has no experts")
    bad = sorted(e for e in expert_scales if e >= experts)
    if bad:
        raise GraftError(f"expert scale {bad[0]}: no such expert; the target's MoE blocks have "
                         f"experts 0..{experts - 1}")


def parse_size(text: str) -> int:
    """``2GB`` / ``500MiB`` → bytes (decimal for KB/MB/GB, binary for KiB/MiB/GiB)."""
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() or "B" if match else ""
    if match is None or unit not in units:
        raise GraftError(f"size {text!r}: expected a number with B, KB, MB, GB, KiB, MiB or GiB")
    size = int(float(match.group(1)) * units[unit])
    if size < 1:
        raise GraftError(f"size {text!r}: expected at least 1 byte")
    return size


def model_config(path: str, role: str) -> dict[str, Any]:
    try:
        return read_config(path, role)
    except CheckpointError as err:
        raise GraftError(str(err)) from None


def _dense_type(config: dict[str, Any]) -> str:
    return str(config.get("base_model_type") or config.get("model_type"))


def check_architectures(inputs: GraftInputs, method: Method) -> None:
    """Base and post are the same dense architecture; the target is that architecture (dense
    methods) or its upcycled MoE (DeltaMoE)."""
    base, post, target = (model_config(p, r) for p, r in (
        (inputs.base, "base"), (inputs.post, "post"), (inputs.target, "target")))
    if base.get("model_type") != post.get("model_type"):
        raise GraftError(f"architecture mismatch: base is {base.get('model_type')!r}, post is "
                         f"{post.get('model_type')!r}")
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads"):
        if base.get(key) != post.get(key):
            raise GraftError(f"architecture mismatch: {key} is {base.get(key)} in base, "
                             f"{post.get(key)} in post")
    _check_expansion(inputs, method, base, target)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        if key == "num_hidden_layers" and method.expanded_target:
            continue  # checked against the expansion's plan
        if target.get(key) != base.get(key):
            raise GraftError(f"architecture mismatch: {key} is {base.get(key)} in base, "
                             f"{target.get(key)} in target")
    dense = str(base.get("model_type"))
    target_type = str(target.get("model_type"))
    if target_type == dense:
        if method.moe_target:
            dense_methods = ", ".join(m.name for m in METHODS.values() if not m.moe_target)
            raise GraftError(f"target {inputs.target} is the dense {dense!r}: method "
                             f"{method.name} grafts onto the CPT-trained MoE (for a dense "
                             f"target use {dense_methods})")
        return
    try:
        moe_types = {family_for(dense).moe_type, "deltamoe"} if method.moe_target else set()
    except UnsupportedArchitectureError as err:
        raise GraftError(f"base {inputs.base}: {err}") from None
    if target_type not in moe_types or _dense_type(target) not in (dense, target_type):
        expected = " or ".join(sorted({dense, *moe_types}))
        raise GraftError(f"target model_type {target_type!r} does not fit base {dense!r} for "
                         f"method {method.name} (expected {expected})")


def _check_expansion(inputs: GraftInputs, method: Method, base: dict[str, Any],
                     target: dict[str, Any]) -> None:
    """A block-expanded target (one with an expansion record) goes with ``block_expansion``
    only, and its plan keeps every original layer, in order, among the target's layers."""
    try:
        layers = read_layers(inputs.target)
    except ExpansionError as err:
        raise GraftError(str(err)) from None
    expanded = [m.name for m in METHODS.values() if m.expanded_target]
    if layers is None:
        if method.expanded_target:
            raise GraftError(f"target {inputs.target}: no {EXPANSION_FILE}; method "
                             f"{method.name} grafts onto a block-expanded model")
        return
    if not method.expanded_target:
        raise GraftError(f"target {inputs.target} is block-expanded ({EXPANSION_FILE}): its "
                         f"layers are shifted; use method {' or '.join(expanded)}")
    originals = [layer.source for layer in layers if not layer.new]
    if len(layers) != target.get("num_hidden_layers") or \
            originals != list(range(int(base["num_hidden_layers"]))):
        raise GraftError(f"target {inputs.target}: {EXPANSION_FILE} lists {len(layers)} layers "
                         f"with originals {originals}; config.json has "
                         f"{target.get('num_hidden_layers')} layers and base "
                         f"{base['num_hidden_layers']}")


def check_tensors(base: LazyCheckpoint, post: LazyCheckpoint, target: LazyCheckpoint,
                  method: Method, layers: Sequence[ExpandedLayer] | None = None) -> int:
    """Per-tensor shape/dtype compatibility from headers; returns the output vocabulary rows
    (``layers``: a block-expanded target's plan, so each layer is checked against its source)."""
    if set(base.keys()) != set(post.keys()):
        only = sorted(set(base.keys()) ^ set(post.keys()))[:3]
        raise GraftError(f"base and post hold different tensors (e.g. {', '.join(only)}): not "
                         "the same architecture")
    rows = {}
    for key in base.keys():
        (b_shape, b_dtype), (p_shape, p_dtype) = base.meta(key), post.meta(key)
        for name, dtype in (("base", b_dtype), ("post", p_dtype)):
            if dtype not in _FLOAT_HEADERS:
                raise GraftError(f"{name} tensor {key}: dtype {dtype} is not floating point")
        if b_dtype != p_dtype:
            raise GraftError(f"tensor {key}: dtype {b_dtype} in base, {p_dtype} in post")
        if key in VOCAB_KEYS:
            if b_shape[1:] != p_shape[1:] or p_shape[0] < b_shape[0]:
                raise GraftError(f"vocabulary mismatch in {key}: base {list(b_shape)}, post "
                                 f"{list(p_shape)} (post may only add rows)")
            rows[key] = (b_shape[0], p_shape[0])
        elif b_shape != p_shape:
            raise GraftError(f"shape mismatch in {key}: base {list(b_shape)}, post "
                             f"{list(p_shape)}")
    out_rows = 0
    for key in target.keys():
        source = source_for(key, layers)
        t_shape, t_dtype = target.meta(key)
        if t_dtype not in _FLOAT_HEADERS:
            raise GraftError(f"target tensor {key}: dtype {t_dtype} is not floating point")
        if source.kind == "none":
            continue
        if source.kind != "same" and not method.moe_target:
            raise GraftError(f"target tensor {key} is an MoE expert, but method {method.name} "
                             "grafts onto dense targets only")
        missing = [k for k in source.dense_keys if k not in base]
        if missing:
            raise GraftError(f"target tensor {key} needs {missing[0]}, which base and post lack")
        dense_shapes = [base.meta(k)[0] for k in source.dense_keys]
        if key in VOCAB_KEYS:
            nb, np_ = rows[key]
            if t_shape[1:] != dense_shapes[0][1:] or t_shape[0] < nb:
                raise GraftError(f"vocabulary mismatch in {key}: target {list(t_shape)}, base "
                                 f"{list(dense_shapes[0])}")
            if t_shape[0] > nb and np_ > nb:
                raise GraftError(f"{key}: both post ({np_} rows) and target ({t_shape[0]} rows) "
                                 f"extend the base vocabulary ({nb} rows); cannot merge the "
                                 "added rows")
            out_rows = max(out_rows, t_shape[0], np_)
            continue
        expected = _expected_shape(source, dense_shapes, t_shape)
        if tuple(t_shape) != expected:
            raise GraftError(f"shape mismatch in {key}: target {list(t_shape)}, expected "
                             f"{list(expected)} from {', '.join(source.dense_keys)}")
    return out_rows


def _expected_shape(source: Source, dense: list[tuple[int, ...]],
                    target: tuple[int, ...]) -> tuple[int, ...]:
    if source.kind == "fused_gate_up":
        return (target[0], dense[0][0] + dense[1][0], *dense[0][1:])
    if source.kind == "fused_down":
        return (target[0], *dense[0])
    return tuple(dense[0])


def check_target_keys(base: LazyCheckpoint, target: LazyCheckpoint, method: Method,
                      layers: Sequence[ExpandedLayer] | None = None) -> int:
    """The target holds exactly the tensors ``method`` expects; returns the widest MoE block's
    expert count (0 for a dense target).

    A dense target holds the base's tensors, no more, no fewer. An MoE target holds every
    tensor of the base as itself, except the FFN of its MoE layers, which every expert of the
    layer's block takes (per-expert: gate, up and down of experts 0..E-1; fused: ``gate_up_proj``
    and ``down_proj``), beside the block's router; a Qwen2-MoE shared expert is whole or absent.
    """
    where = target.source
    base_keys, target_keys = set(base.keys()), set(target.keys())
    if layers is not None:  # every layer holds what the base layer it copies holds
        by_layer = {layer: keys for layer, keys in split_layers(list(base_keys))}
        base_keys = {*by_layer[None], *(LAYER_KEY.sub(f"model.layers.{j}.", k)
                                        for j, layer in enumerate(layers)
                                        for k in by_layer.get(layer.source, []))}
    if not method.moe_target:
        missing, unexpected = sorted(base_keys - target_keys), sorted(target_keys - base_keys)
        if missing:
            raise GraftError(f"target {where}: tensor {missing[0]} is missing (method "
                             f"{method.name} needs every tensor of base; "
                             f"{len(missing)} missing)")
        if unexpected:
            raise GraftError(f"target {where}: unexpected tensor {unexpected[0]} (base has no "
                             f"such tensor; method {method.name} grafts the base's "
                             "architecture)")
        return 0
    covered: set[str] = set()
    experts: dict[str, dict[str, dict[int, str]]] = {}  # block → projection → expert → key
    parts: dict[str, dict[str, set[str]]] = {}  # block → router / fused / shared expert names
    for key in sorted(target_keys):
        role, source = tensor_role(key), source_for(key)
        covered.update(source.dense_keys)
        if role.kind == "expert":
            assert role.block is not None and role.proj is not None and role.expert is not None
            param = f"{role.proj} bias" if role.bias else role.proj
            experts.setdefault(role.block, {}).setdefault(param, {})[role.expert] = key
        elif role.kind != "shared":
            assert role.block is not None
            parts.setdefault(role.block, {}).setdefault(role.kind, set()).add(
                key[len(role.block) + 1:])
    moe_layers = {int(b.split(".")[2]) for b in {*experts, *parts}}
    for key in sorted(target_keys):
        role = tensor_role(key)
        if role.kind == "shared" and role.part == "mlp" and role.layer in moe_layers:
            raise GraftError(f"target {where}: unexpected tensor {key} (layer {role.layer} is an "
                             "MoE layer; its FFN lives in the experts)")
    missing = sorted(base_keys - covered)
    if missing:
        raise GraftError(f"target {where}: tensor {missing[0]} is missing (method "
                         f"{method.name} needs every tensor of base, as itself or in every "
                         f"expert of its layer; {len(missing)} missing)")
    widest = 0
    for block in sorted({*experts, *parts}):
        found = parts.get(block, {})
        count = _block_experts(where, block, experts.get(block, {}), found, target)
        if "gate.weight" not in found.get("router", set()):
            raise GraftError(f"target {where}: tensor {block}.gate.weight (the router) is "
                             "missing")
        rows = target.meta(f"{block}.gate.weight")[0][0]
        if rows != count:
            raise GraftError(f"target {where}: router {block}.gate.weight has {rows} rows for "
                             f"{count} experts")
        shared = found.get("shared_expert", set())
        whole = {f"shared_expert.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")} | \
            {"shared_expert_gate.weight"}
        if shared and shared != whole:
            raise GraftError(f"target {where}: tensor {block}.{sorted(whole - shared)[0]} is "
                             "missing (the shared expert is incomplete)")
        widest = max(widest, count)
    return widest


def _block_experts(where: object, block: str, projections: dict[str, dict[int, str]],
                   parts: dict[str, set[str]], target: LazyCheckpoint) -> int:
    """The expert count of one MoE block, refusing a block with a missing expert tensor."""
    fused = parts.get("fused_experts", set())
    if fused:
        if projections:
            raise GraftError(f"target {where}: {block} holds both fused and per-expert experts")
        for name in ("experts.gate_up_proj", "experts.down_proj"):
            if name not in fused:
                raise GraftError(f"target {where}: tensor {block}.{name} is missing")
        counts = {target.meta(f"{block}.{n}")[0][0] for n in fused}
        if len(counts) != 1:
            raise GraftError(f"target {where}: {block}.experts: gate_up_proj and down_proj hold "
                             "different expert counts")
        return counts.pop()
    if not projections:
        raise GraftError(f"target {where}: {block} has a router but no experts")
    count = 1 + max(e for by_expert in projections.values() for e in by_expert)
    biases = [p for p in ("gate bias", "up bias", "down bias") if p in projections]
    for proj in ("gate", "up", "down", *(["gate bias", "up bias", "down bias"] if biases else [])):
        by_expert = projections.get(proj, {})
        absent = [e for e in range(count) if e not in by_expert]
        if not absent:
            continue
        if by_expert:  # name the absent tensor after one of its siblings
            sibling_expert, sibling = next(iter(by_expert.items()))
            name = sibling.replace(f".experts.{sibling_expert}.", f".experts.{absent[0]}.")
        else:
            name = f"{block}.experts.{absent[0]} ({proj} projection)"
        raise GraftError(f"target {where}: tensor {name} is missing (expert {absent[0]} of "
                         f"{count} lacks its {proj} projection)")
    return count
