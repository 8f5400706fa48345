"""LLaMA-Pro block expansion: a dense model with new decoder blocks that start as the identity.

The dense parameter-matched baseline of the comparison (Wu et al. 2024, LLaMA-Pro): new blocks
are inserted evenly among the original ones, each a copy of the original block before it with
its output projections (``self_attn.o_proj`` and ``mlp.down_proj``, biases included) zeroed, so
the attention and FFN add nothing to the residual stream and the expanded model computes exactly
what the dense model does. Only the new blocks train; their count is chosen so the parameters
they add match what the language MoE trains (new experts and routers).

The output is a standard transformers directory of the same family with more layers (per-layer
config lists such as ``layer_types`` expanded), streamed one layer at a time with the
checkpoint helpers the upcycler uses, plus ``expansion.json``: which original block each layer
copies and which layers are new, read by the training stage (what trains) and the graft (where
each layer's Δpost goes).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from components.cards import portable, write_card
from components.moe.checkpoint import (
    LAYER_KEY,
    SIDE_FILES,
    CheckpointError,
    LazyCheckpoint,
    ShardWriter,
    detect_layout,
    read_config,
    split_layers,
)
from components.moe.families import family_for

EXPANSION_FILE = "expansion.json"
ZEROED = (".self_attn.o_proj.", ".mlp.down_proj.")  # what a new block writes to the residual


class ExpansionError(ValueError):
    """A model or block count that cannot be expanded: the message names the file or option."""


@dataclass(frozen=True)
class ExpandedLayer:
    """One decoder layer of the expanded model: the original block it copies, and whether it
    is a new (identity-initialised, trainable) block or that original block itself."""

    source: int
    new: bool


@dataclass(frozen=True)
class ExpansionResult:
    out_dir: str
    layers: tuple[ExpandedLayer, ...]
    block_parameters: int  # one decoder block of the dense model
    added_parameters: int  # what the new blocks add (and train)
    matched_parameters: int | None  # the MoE's trainable parameters the count was matched to

    @property
    def new_layers(self) -> tuple[int, ...]:
        return tuple(i for i, layer in enumerate(self.layers) if layer.new)

    def summary(self) -> dict[str, Any]:
        return {"out_dir": self.out_dir, "num_layers": len(self.layers),
                "new_layers": list(self.new_layers), "block_parameters": self.block_parameters,
                "added_parameters": self.added_parameters,
                "matched_parameters": self.matched_parameters}


def plan_blocks(layers: int, new_blocks: int) -> tuple[ExpandedLayer, ...]:
    """``new_blocks`` spread evenly over ``layers`` original blocks: after original block ``i``
    come ``⌊(i+1)·P/L⌋ − ⌊i·P/L⌋`` new copies of it, which is LLaMA-Pro's one new block after
    every L/P original blocks when P divides L, and several per block when P > L."""
    if layers < 1:
        raise ExpansionError(f"the model has {layers} decoder layers")
    if new_blocks < 1:
        raise ExpansionError(f"new blocks: expected ≥ 1, got {new_blocks}")
    plan: list[ExpandedLayer] = []
    for i in range(layers):
        plan.append(ExpandedLayer(i, False))
        extra = (i + 1) * new_blocks // layers - i * new_blocks // layers
        plan += [ExpandedLayer(i, True)] * extra
    return tuple(plan)


def blocks_to_match(block_parameters: int, target: int) -> int:
    """The number of new blocks whose parameters come closest to ``target`` (at least one)."""
    return max(1, round(target / block_parameters))


def block_parameters(model_dir: str | Path) -> int:
    """Parameters of one decoder block of a dense model, from safetensors headers alone."""
    with LazyCheckpoint(model_dir) as ckpt:
        layer0 = next(keys for layer, keys in split_layers(ckpt.keys()) if layer == 0)
        return sum(_numel(ckpt.meta(k)[0]) for k in layer0)


def moe_trainable_parameters(moe_dir: str | Path, anchor_frozen: bool = True,
                             shared_frozen: bool = True) -> int:
    """What CPT of the upcycled MoE in ``moe_dir`` trains with these freeze settings: the
    training stage's own rules (:func:`components.moe.freeze.set_requires_grad` and
    :func:`~components.moe.freeze.parameter_counts`) on the model built on the meta device,
    so no weight is read and the figure is the one the CPT run reports."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    import components.moe.modeling  # noqa: F401  (registers the package's MoE class)
    from components.moe.freeze import parameter_counts, set_requires_grad

    config = AutoConfig.from_pretrained(moe_dir)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    set_requires_grad(model, anchor_frozen, shared_frozen)
    return parameter_counts(model, anchor_frozen)["trainable"]


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def expand_blocks(model_dir: str | Path, out_dir: str | Path, new_blocks: int, *,
                  matched_parameters: int | None = None,
                  max_shard_bytes: int = 2 * 1024**3) -> ExpansionResult:
    """Write the block-expanded model of the dense model in ``model_dir`` into ``out_dir`` (an
    empty folder the caller commits atomically), one source layer in memory at a time."""
    src, dst = Path(model_dir), Path(out_dir)
    try:
        config = read_config(src)
        family_for(str(config["model_type"]))  # a supported dense family, named if not
        ckpt = LazyCheckpoint(src)
    except CheckpointError as err:
        raise ExpansionError(str(err)) from None
    plan = plan_blocks(int(config["num_hidden_layers"]), new_blocks)
    writer = ShardWriter(dst, max_shard_bytes)
    try:
        if detect_layout(ckpt.keys()) is not None:
            raise ExpansionError(f"{ckpt.source}: holds MoE experts; block expansion takes a "
                                 "dense model")
        by_layer = dict(split_layers(ckpt.keys()))
        per_block = sum(_numel(ckpt.meta(k)[0]) for k in by_layer[0])
        for index, layer in enumerate(plan):
            keys = by_layer.get(layer.source, [])
            if layer.new and not all(any(z in k for k in keys) for z in ZEROED):
                raise ExpansionError(f"{ckpt.source}: layer {layer.source} lacks "
                                     f"{' or '.join(z.strip('.') for z in ZEROED)}")
            for key in keys:
                tensor = ckpt.get(key)
                if layer.new:
                    tensor = (torch.zeros_like(tensor) if any(z in key for z in ZEROED)
                              else tensor.clone())
                writer.add(LAYER_KEY.sub(f"model.layers.{index}.", key), tensor)
        for key in by_layer[None]:
            writer.add(key, ckpt.get(key))
        writer.close()
    except BaseException as err:
        writer.abort()
        if isinstance(err, CheckpointError):
            raise ExpansionError(str(err)) from None
        raise
    finally:
        ckpt.close()
    (dst / "config.json").write_text(json.dumps(expanded_config(config, plan), indent=2,
                                                sort_keys=True))
    for name in SIDE_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    result = ExpansionResult(str(dst), plan, per_block, per_block * new_blocks,
                             matched_parameters)
    (dst / EXPANSION_FILE).write_text(json.dumps(
        {"layers": [asdict(layer) for layer in plan],
         **{k: v for k, v in result.summary().items() if k != "out_dir"}}, indent=2))
    _model_card(dst, src, result)
    return result


def expanded_config(config: dict[str, Any], plan: tuple[ExpandedLayer, ...]) -> dict[str, Any]:
    """The dense config with ``num_hidden_layers`` grown and every per-layer list (a list as
    long as the original layer count, such as ``layer_types``) taking its source layer's entry."""
    layers = int(config["num_hidden_layers"])
    out = {k: ([v[layer.source] for layer in plan]
               if isinstance(v, list) and len(v) == layers and k != "architectures" else v)
           for k, v in config.items()}
    out["num_hidden_layers"] = len(plan)
    return out


def read_layers(model_dir: str | Path) -> tuple[ExpandedLayer, ...] | None:
    """The layer plan a block-expanded model records, or None for any other model."""
    path = Path(model_dir) / EXPANSION_FILE
    if not path.exists():
        return None
    try:
        rows = json.loads(path.read_text())["layers"]
        return tuple(ExpandedLayer(int(r["source"]), bool(r["new"])) for r in rows)
    except (ValueError, KeyError, TypeError) as err:
        raise ExpansionError(f"{path}: not a block-expansion record ({err})") from None


def new_layers(model_dir: str | Path) -> tuple[int, ...]:
    """The indices of the new (trainable) blocks of a block-expanded model."""
    layers = read_layers(model_dir)
    if layers is None:
        raise ExpansionError(f"{model_dir}: no {EXPANSION_FILE} (not a block-expanded model)")
    return tuple(i for i, layer in enumerate(layers) if layer.new)


def _model_card(dst: Path, src: Path, result: ExpansionResult) -> None:
    matched = (f" (matched to the MoE's {result.matched_parameters:,} trainable parameters)"
               if result.matched_parameters is not None else "")
    write_card(
        dst, f"{dst.name} (block-expanded)",
        f"Dense model `{src}` expanded LLaMA-Pro style: {len(result.new_layers)} new decoder "
        f"blocks at layers {list(result.new_layers)} of {len(result.layers)}, each a copy of "
        "the block before it with `o_proj` and `down_proj` zeroed (the identity at init). The "
        f"new blocks add {result.added_parameters:,} parameters{matched}.\n\n"
        f"```json\n{json.dumps(portable({'source_model': str(src), **result.summary()}), indent=2)}"
        "\n```\n",
        base_model=[str(src)], relation="finetune", inputs=[src], tags=["block-expansion"])
