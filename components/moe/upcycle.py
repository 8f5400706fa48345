"""Dense → MoE upcycling, streamed one decoder layer at a time.

Every MoE layer gets N experts that are exact copies of the dense FFN (expert 0 is the anchor the
training stage may freeze) and a new router. With identical experts and renormalised top-k
weights the MoE computes exactly what the dense model computes, which the tests check to 1e-5.
Only one layer's tensors are in memory at a time (plus a bounded output shard), so an 8B or 70B
model upcycles on a machine with far less RAM than the model; tensors are read lazily with
``safe_open``, never through pickle.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from components.moe.families import DENSE_FFN, family_for

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt",
                 "tokenizer.model")


class UpcycleError(ValueError):
    """Input that cannot be upcycled: the message names the file, key or option."""


@dataclass(frozen=True)
class UpcycleOptions:
    num_experts: int = 4
    top_k: int = 2
    layers: tuple[int, ...] | None = None  # None: every layer becomes MoE
    router_init: str = "xavier_normal"
    router_init_std: float = 0.02
    expert_noise_std: float = 0.0
    seed: int = 0
    max_shard_bytes: int = 2 * 1024**3


class _LazyCheckpoint:
    """Tensor names → file, over a single safetensors file or a sharded index."""

    def __init__(self, model_dir: Path) -> None:
        index = model_dir / "model.safetensors.index.json"
        single = model_dir / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as err:
                raise UpcycleError(f"{index}: not a safetensors index ({err})") from None
            self.files = {k: model_dir / v for k, v in weight_map.items()}
        elif single.exists():
            self.files = {k: single for k in self._keys(single)}
        else:
            raise UpcycleError(f"{model_dir}: no model.safetensors or "
                               "model.safetensors.index.json (pickle checkpoints are not read)")
        missing = sorted({str(f) for f in self.files.values() if not f.exists()})
        if missing:
            raise UpcycleError(f"missing shard(s): {', '.join(missing)}")
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    @staticmethod
    def _keys(path: Path) -> list[str]:
        try:
            with safe_open(path, "pt") as handle:
                return list(handle.keys())
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise UpcycleError(f"{path}: unreadable safetensors file ({err})") from None

    def get(self, key: str) -> torch.Tensor:
        """One tensor; each shard's header is parsed once and its handle kept open."""
        try:
            path = self.files[key]
            if path not in self._handles:
                self._handles[path] = self._stack.enter_context(safe_open(path, "pt"))
            return self._handles[path].get_tensor(key)
        except KeyError:
            raise UpcycleError(f"tensor {key} is missing from the checkpoint") from None
        except Exception as err:
            raise UpcycleError(f"{self.files[key]}: cannot read {key} ({err})") from None


class _ShardWriter:
    """Writes tensors into shards of bounded size and the index that maps them."""

    def __init__(self, out_dir: Path, max_bytes: int) -> None:
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        number = len(self.shards) + 1
        save_file(self.pending, self.out_dir / f"model-{number:05d}.tmp.safetensors",
                  metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        count = len(self.shards)
        weight_map = {}
        for i, keys in enumerate(self.shards, start=1):
            name = f"model-{i:05d}-of-{count:05d}.safetensors"
            (self.out_dir / f"model-{i:05d}.tmp.safetensors").rename(self.out_dir / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _router(options: UpcycleOptions, hidden: int, dtype: torch.dtype,
             generator: torch.Generator) -> torch.Tensor:
    weight = torch.empty(options.num_experts, hidden, dtype=torch.float32)
    if options.router_init == "zeros":
        weight.zero_()
    elif options.router_init == "normal":
        weight.normal_(0.0, options.router_init_std, generator=generator)
    elif options.router_init == "xavier_normal":
        std = (2.0 / (hidden + options.num_experts)) ** 0.5
        weight.normal_(0.0, std, generator=generator)
    else:
        raise UpcycleError(f"router_init {options.router_init!r}: expected xavier_normal, "
                           "zeros or normal")
    return weight.to(dtype)


def _by_layer(keys: list[str]) -> Iterator[tuple[int | None, list[str]]]:
    groups: dict[int | None, list[str]] = defaultdict(list)
    for key in keys:
        match = _LAYER.match(key)
        groups[int(match.group(1)) if match else None].append(key)
    for layer in sorted(k for k in groups if k is not None):
        yield layer, sorted(groups[layer])
    yield None, sorted(groups[None])


@dataclass(frozen=True)
class UpcycleResult:
    out_dir: str
    moe_type: str
    moe_layers: list[int]
    dense_parameters: int
    moe_parameters: int
    active_parameters: int


def upcycle(model_dir: str | Path, out_dir: str | Path, options: UpcycleOptions) -> UpcycleResult:
    """Write the MoE HF directory for the dense model in ``model_dir`` into ``out_dir``
    (an empty folder the caller commits atomically)."""
    src, dst = Path(model_dir), Path(out_dir)
    if options.num_experts < 2:
        raise UpcycleError(f"num_experts: expected ≥ 2, got {options.num_experts}")
    if not 1 <= options.top_k <= options.num_experts:
        raise UpcycleError(f"top_k: expected 1 ≤ top_k ≤ num_experts ({options.num_experts}), "
                           f"got {options.top_k}")
    try:
        dense_cfg = json.loads((src / "config.json").read_text())
    except FileNotFoundError:
        raise UpcycleError(f"{src}: no config.json (not a Hugging Face model directory)") from None
    family = family_for(str(dense_cfg.get("model_type")))
    n_layers = int(dense_cfg["num_hidden_layers"])
    moe_layers = sorted(options.layers) if options.layers is not None else list(range(n_layers))
    bad = [i for i in moe_layers if not 0 <= i < n_layers]
    if bad:
        raise UpcycleError(f"layers: {bad} out of range (the model has {n_layers} layers)")
    if len(moe_layers) < n_layers and not family.supports_dense_layers:
        raise UpcycleError(f"layers: {family.moe_type} has no switch for dense layers; "
                           "upcycle every layer for this family")
    ckpt = _LazyCheckpoint(src)
    try:
        generator = torch.Generator().manual_seed(options.seed)
        writer = _ShardWriter(dst, options.max_shard_bytes)
        dense_params = moe_params = active_params = 0
        hidden = int(dense_cfg["hidden_size"])
        for layer, keys in tqdm(list(_by_layer(list(ckpt.files))), desc="upcycle", unit="layer"):
            for key in keys:
                tensor = ckpt.get(key)
                if not torch.isfinite(tensor).all():
                    raise UpcycleError(f"tensor {key} holds NaN or Inf")
                dense_params += tensor.numel()
                proj = next((p for p in DENSE_FFN if key.endswith(f".mlp.{p}.weight")), None)
                if layer is None or layer not in moe_layers or proj is None:
                    writer.add(key, tensor)
                    moe_params += tensor.numel()
                    active_params += tensor.numel()
                    continue
                for expert in range(options.num_experts):
                    copy = tensor.clone()
                    if expert > 0 and options.expert_noise_std > 0:
                        std = options.expert_noise_std
                        noise = torch.randn(copy.shape, generator=generator) * std
                        copy = (copy.float() + noise).to(tensor.dtype)
                    writer.add(family.expert_key(layer, expert, proj), copy)
                moe_params += tensor.numel() * options.num_experts
                active_params += tensor.numel() * options.top_k
                if proj == "down_proj":
                    dtype = tensor.dtype
                    writer.add(family.router_key(layer), _router(options, hidden, dtype, generator))
                    moe_params += options.num_experts * hidden
                    active_params += options.num_experts * hidden
                    if family.has_shared_expert:  # zeroed: contributes nothing until trained
                        inter = int(dense_cfg["intermediate_size"])
                        base = f"model.layers.{layer}.mlp"
                        for name, shape in (("gate_proj", (inter, hidden)),
                                            ("up_proj", (inter, hidden)),
                                            ("down_proj", (hidden, inter))):
                            writer.add(f"{base}.shared_expert.{name}.weight",
                                       torch.zeros(shape, dtype=dtype))
                        writer.add(f"{base}.shared_expert_gate.weight",
                                   torch.zeros((1, hidden), dtype=dtype))
        writer.close()
    finally:
        ckpt.close()
    moe_cfg = family.moe_config(dense_cfg, options.num_experts, options.top_k, moe_layers)
    (dst / "config.json").write_text(json.dumps(moe_cfg, indent=2, sort_keys=True))
    for name in _COPIED_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    result = UpcycleResult(out_dir=str(dst), moe_type=family.moe_type, moe_layers=moe_layers,
                           dense_parameters=dense_params, moe_parameters=moe_params,
                           active_parameters=active_params)
    _model_card(dst, src, options, result)
    return result


def _model_card(dst: Path, src: Path, options: UpcycleOptions, result: UpcycleResult) -> None:
    lineage = {"source_model": str(src), "options": asdict(options), **asdict(result)}
    (dst / "README.md").write_text(
        "---\nlibrary_name: transformers\ntags: [deltamoe, upcycled, moe]\n---\n"
        f"# Upcycled {result.moe_type} model\n\n"
        f"Dense model `{src}` upcycled by deltamoe: every MoE layer "
        f"({len(result.moe_layers)} of them) has {options.num_experts} experts, each an exact "
        f"copy of the dense FFN (expert 0 is the anchor), top-{options.top_k} routing, routers "
        f"initialised with `{options.router_init}`.\n\n"
        f"| | parameters |\n|---|---|\n| dense | {result.dense_parameters:,} |\n"
        f"| MoE total | {result.moe_parameters:,} |\n| MoE active per token | "
        f"{result.active_parameters:,} |\n\n"
        f"```json\n{json.dumps(lineage, indent=2)}\n```\n")
