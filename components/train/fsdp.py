"""Sharding and precision: FSDP2 on every path; what differs between GPU and CPU lives here.

Each decoder layer is ``fully_shard``-ed, then the root, over a 1-D device mesh. On GPU the
policy is bf16 parameters for compute with fp32 gradient reduction (fp32 master weights stay
sharded); gloo on CPU has no bf16 collectives worth using, so the CPU path computes in fp32.
Ray's ``prepare_model(parallel_strategy="fsdp")`` is FSDP1 and refuses CPU, hence our own call.

No rank materialises the model from disk except rank 0: the others build it on the meta
device, every rank shards it, and rank 0 broadcasts the full state dict tensor by tensor
(``set_model_state_dict(broadcast_from_rank0=True)``), each rank keeping only its shard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from components.moe.freeze import role, set_requires_grad
from components.train.speed import apply_experts_implementation
from components.train.speed import compile_blocks as compile_forwards


@dataclass(frozen=True)
class Placement:
    """Device and dtype policy of one worker."""

    device: torch.device
    param_dtype: torch.dtype  # compute dtype of the unsharded parameters
    reduce_dtype: torch.dtype

    @property
    def is_gpu(self) -> bool:
        return self.device.type == "cuda"


def placement(device: torch.device, precision: str) -> Placement:
    """bf16 compute + fp32 reduction on GPU when ``precision`` is bf16; fp32 everywhere on CPU."""
    if device.type == "cuda" and precision == "bf16":
        return Placement(device, torch.bfloat16, torch.float32)
    return Placement(device, torch.float32, torch.float32)


def device_mesh(device: torch.device) -> DeviceMesh:
    return init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("fsdp",))


def saved_dtype(model_dir: str | Path) -> torch.dtype:
    """The dtype the model directory stores (what the export writes back)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, str(name).removeprefix("torch."), torch.float32)


def set_trainable(model: nn.Module, mode: str, freeze_anchor: bool, freeze_shared: bool,
                  train_layers: tuple[int, ...] | None = None) -> None:
    """``requires_grad`` by role: in ``cpt_moe`` the shared weights and the anchor expert as
    configured (routers always train); in a dense mode everything trains, or with
    ``train_layers`` only those decoder layers (a block-expanded model's new blocks)."""
    if mode == "cpt_moe":
        set_requires_grad(model, freeze_anchor, freeze_shared)
    elif train_layers is not None:
        model.requires_grad_(False)
        layers = decoder_layers(model)
        for index in train_layers:
            layers[index].requires_grad_(True)
    else:
        model.requires_grad_(True)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no model.layers to shard")
    return list(layers)


def build_sharded(init_dir: str, mesh: DeviceMesh, place: Placement, *, mode: str,
                  freeze_anchor: bool, freeze_shared: bool,
                  train_layers: tuple[int, ...] | None = None,
                  activation_checkpointing: bool, experts_implementation: str = "auto",
                  compile_blocks: bool = False) -> nn.Module:
    """The model of ``init_dir``, sharded over ``mesh``, weights loaded from rank 0.

    The experts implementation is set before sharding (FSDP2 swaps the model's class, and
    transformers decides from the class whether it may switch); compiled block forwards too,
    so FSDP2's hooks wrap them from outside."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    import components.moe.modeling  # noqa: F401  (registers the package's MoE class)

    config = AutoConfig.from_pretrained(init_dir)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # non-persistent buffers (rotary inv_freq) are real tensors now; to_empty would wipe them
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    set_trainable(model, mode, freeze_anchor, freeze_shared, train_layers)
    apply_experts_implementation(model, experts_implementation, place.device)
    if activation_checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    if compile_blocks:
        compile_forwards(decoder_layers(model))
    policy = MixedPrecisionPolicy(param_dtype=place.param_dtype, reduce_dtype=place.reduce_dtype)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model.to_empty(device=place.device)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in buffers:
                buf.copy_(buffers[name].to(place.device))
    full: dict[str, torch.Tensor] = {}
    if dist.get_rank() == 0:
        loaded = AutoModelForCausalLM.from_pretrained(init_dir, dtype=torch.float32)
        full = {k: v.to(place.device) for k, v in loaded.state_dict().items()}
        del loaded
    set_model_state_dict(model, full, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True))
    del full
    return model


def local_rows(param: torch.Tensor, rows: int) -> tuple[int, int]:
    """[start, stop) of the global dim-0 rows this rank holds of a (possibly) sharded tensor:
    FSDP2 shards dim 0 as ``torch.chunk`` does."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return 0, rows
    world, rank = param.device_mesh.size(), param.device_mesh.get_local_rank()
    chunk = -(-rows // world)
    start = min(rows, rank * chunk)
    return start, min(rows, start + chunk)


class AnchorGuard:
    """Keeps the anchor expert's slice of fused expert tensors bit-identical under FSDP2.

    transformers 5 holds Mixtral/Qwen experts in one [E, ...] tensor, so the anchor (expert 0)
    cannot be frozen by ``requires_grad``. Sharded parameters are new DTensors, so hooks on the
    original parameters would not apply: this guard zeroes the anchor rows of the local gradient
    shard (before clipping, so they do not count in the norm) and restores the
    saved rows after each optimizer step (AdamW's decoupled weight decay touches every element).
    """

    def __init__(self, model: nn.Module, enabled: bool) -> None:
        self.slices: list[tuple[nn.Parameter, torch.Tensor]] = []
        if not enabled:
            return
        for name, param in model.named_parameters():
            if role(name) != "fused_experts" or not param.requires_grad:
                continue
            start, stop = local_rows(param, param.shape[0])
            if start == 0 and stop > 0:  # this rank holds global row 0
                local = _local(param)
                self.slices.append((param, local[0].detach().clone()))

    @torch.no_grad()
    def zero_grads(self) -> None:
        for param, _ in self.slices:
            if param.grad is not None:
                _local(param.grad)[0].zero_()

    @torch.no_grad()
    def restore(self) -> None:
        for param, saved in self.slices:
            _local(param)[0].copy_(saved)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
