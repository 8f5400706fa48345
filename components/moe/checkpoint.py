"""Sharded safetensors I/O for model directories, and the two expert layouts of an MoE checkpoint.

Reading is lazy (``safe_open``, one open handle per shard, one tensor at a time; never pickle) so
a stage can walk a 70B checkpoint layer by layer. Writing is shard-bounded: tensors collect until
the next one would overflow ``max_bytes``, then a shard is written and the index maps every key.

transformers 5 holds MoE experts fused in memory (``mlp.experts.gate_up_proj`` [E, 2I, H], gate
rows first, then up; ``mlp.experts.down_proj`` [E, H, I]) and loads that layout from disk as is,
while ``save_pretrained`` writes per-expert keys (``experts.<e>.<proj>.weight``). Readers here
accept both; writers write the one a caller declares. Which key is an expert, a router or shared
is :func:`components.moe.families.tensor_role`'s answer, never a pattern of this module's own.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from components.moe.families import (
    DENSE_FFN,
    FAMILIES,
    FUSED_EXPERTS,
    PROJECTIONS,
    tensor_role,
)

Layout = Literal["per_expert", "fused"]
# what a model directory holds besides config and weights: copied by the stages that write one
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt",
              "tokenizer.model")
LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf: one fp32-accumulated sum (NaN and Inf propagate through it), and the exact
    elementwise check only when the sum is not finite (a sum can also overflow on its own)."""
    if not tensor.is_floating_point() or torch.isfinite(tensor.sum(dtype=torch.float32)):
        return True
    return bool(torch.isfinite(tensor).all())


class CheckpointError(ValueError):
    """A model directory that cannot be read or written: the message names the file or key."""


# what every reader of a dense or MoE config needs before it touches a tensor
REQUIRED_CONFIG = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                   "intermediate_size", "vocab_size")


def read_config(model_dir: str | Path, role: str = "model") -> dict[str, Any]:
    """``config.json`` of a model directory as a dict, or one :class:`CheckpointError` naming the
    file and what is wrong (absent, not JSON, not an object, a required field missing or not a
    positive integer): a broken config must not surface as a ``KeyError`` deep in a stage."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{role} {model_dir}: no config.json (not a Hugging Face model "
                              "directory)") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{role} {path}: not JSON ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{role} {path}: expected a JSON object, got "
                              f"{type(config).__name__}")
    missing = [k for k in REQUIRED_CONFIG if k not in config]
    if missing:
        raise CheckpointError(f"{role} {path}: missing required field(s) {', '.join(missing)}")
    if not isinstance(config["model_type"], str):
        raise CheckpointError(f"{role} {path}: model_type must be a string, got "
                              f"{config['model_type']!r}")
    for key in REQUIRED_CONFIG[1:]:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"{role} {path}: {key} must be a positive integer, got "
                                  f"{value!r}")
    return config


def index_files(model_dir: str | Path) -> dict[str, Path]:
    """Tensor name → shard file from ``model.safetensors.index.json``, every shard checked to lie
    inside ``model_dir``: an index naming ``../elsewhere.safetensors`` or an absolute path would
    otherwise make a stage read (and record as its input) a file outside the model folder."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise ValueError("weight_map is not an object")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{index}: not a safetensors index ({err})") from None
    files: dict[str, Path] = {}
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{index}: tensor {key} maps to {name!r}, not a file name")
        # judged by the name, not by resolving it: a hub snapshot's shards are symlinks into
        # the cache's blob folder, which is the user's layout, not the index's doing
        normal = os.path.normpath(name)
        if os.path.isabs(name) or normal in (".", "..") or normal.startswith(f"..{os.sep}"):
            raise CheckpointError(f"{index}: shard {name!r} of tensor {key} lies outside the "
                                  f"model folder {model_dir}")
        files[key] = model_dir / normal
    return files


def _umask() -> int:
    """The process umask, read without changing it where the OS says it (Linux), so a writer
    thread never sees the transient 0 of the ``os.umask`` round trip."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path) -> None:
    """Give a file written by safetensors (always 0600) the mode every other output gets, 0666
    less the umask, so a serving process under another uid can read the shards."""
    os.chmod(path, 0o666 & ~_umask())


def save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """One safetensors file with the umask's mode: the only way this package writes weights."""
    save_file(tensors, path, metadata={"format": "pt"})
    follow_umask(path)


class LazyCheckpoint:
    """Tensor names → file, over a single ``model.safetensors`` or a sharded index (``source``:
    the index or the single file, which error messages name)."""

    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        single = model_dir / "model.safetensors"
        if index.exists():
            self.files = index_files(model_dir)
            self.source = index
        elif single.exists():
            self.files = {k: single for k in self._keys(single)}
            self.source = single
        else:
            raise CheckpointError(f"{model_dir}: no model.safetensors or "
                                  "model.safetensors.index.json (pickle checkpoints are not read)")
        missing = sorted({str(f) for f in self.files.values() if not f.exists()})
        if missing:
            raise CheckpointError(f"missing shard(s): {', '.join(missing)}")
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}

    def __enter__(self) -> LazyCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def keys(self) -> list[str]:
        return list(self.files)

    def __contains__(self, key: str) -> bool:
        return key in self.files

    @staticmethod
    def _keys(path: Path) -> list[str]:
        try:
            with safe_open(path, "pt") as handle:
                return list(handle.keys())
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None

    def _handle(self, key: str) -> Any:
        if key not in self.files:
            raise CheckpointError(f"tensor {key} is missing from the checkpoint")
        path = self.files[key]
        if path not in self._handles:
            try:
                self._handles[path] = self._stack.enter_context(safe_open(path, "pt"))
            except Exception as err:
                raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None
        return self._handles[path]

    def meta(self, key: str) -> tuple[tuple[int, ...], str]:
        """Shape and dtype name (``BF16``, ``F32``, ...) from the header, without reading data."""
        try:
            tensor = self._handle(key).get_slice(key)
            return tuple(tensor.get_shape()), str(tensor.get_dtype())
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"{self.files[key]}: cannot read {key} ({err})") from None

    def get(self, key: str) -> torch.Tensor:
        """One tensor; each shard's header is parsed once and its handle kept open."""
        handle = self._handle(key)
        try:
            return handle.get_tensor(key)
        except Exception as err:
            raise CheckpointError(f"{self.files[key]}: cannot read {key} ({err})") from None


class ShardWriter:
    """Writes tensors into shards of bounded size and the index that maps them.

    Shards are written under temporary names and renamed to ``model-XXXXX-of-YYYYY`` only when the
    count is known, so a crash leaves no directory that looks like a finished checkpoint. Parallel
    writers (one per Ray task) each use their own ``prefix`` and call :meth:`parts`; the driver
    then names every part in order with :func:`commit_shards`. A full shard is written by a
    background thread while the caller fills the next one (safetensors serialises without the
    GIL), so computing and writing overlap and at most two shards are held in memory.
    """

    def __init__(self, out_dir: str | Path, max_bytes: int, prefix: str = "part") -> None:
        self.out_dir, self.max_bytes, self.prefix = Path(out_dir), max_bytes, prefix
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[str, list[str], int]] = []  # (temporary file, keys, bytes)
        self.total_bytes = 0
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._inflight: Future[None] | None = None

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        self._wait()
        name = f"{self.prefix}-{len(self.written) + 1:05d}.tmp.safetensors"
        self._inflight = self._io.submit(save_shard, self.pending, self.out_dir / name)
        self.written.append((name, list(self.pending), self.pending_bytes))
        self.pending, self.pending_bytes = {}, 0

    def _wait(self) -> None:
        if self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            inflight.result()  # re-raises a failed write (disk full, permissions) here

    def parts(self) -> list[tuple[str, list[str], int]]:
        """Flush what is pending and wait for it; the temporary files written, in order."""
        try:
            if self.pending:
                self._flush()
            self._wait()
        finally:
            self._io.shutdown(wait=True)
        return list(self.written)

    def abort(self) -> None:
        """After a failure: let the write in flight finish, then remove every part written."""
        try:
            self._wait()
        except Exception:  # the original error is what the caller reports
            pass
        finally:
            self._io.shutdown(wait=True)
        for name, _, _ in self.written:
            (self.out_dir / name).unlink(missing_ok=True)

    def close(self) -> None:
        commit_shards(self.out_dir, self.parts())


def commit_shards(out_dir: str | Path, parts: list[tuple[str, list[str], int]]) -> None:
    """Rename temporary parts to ``model-i-of-n.safetensors`` in the given order and write the
    index: the step that makes a checkpoint directory look complete."""
    out_dir = Path(out_dir)
    count = len(parts)
    weight_map: dict[str, str] = {}
    for i, (tmp, keys, _) in enumerate(parts, start=1):
        name = f"model-{i:05d}-of-{count:05d}.safetensors"
        (out_dir / tmp).rename(out_dir / name)
        weight_map.update(dict.fromkeys(keys, name))
    index = {"metadata": {"total_size": sum(size for _, _, size in parts)},
             "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def split_layers(keys: list[str]) -> list[tuple[int | None, list[str]]]:
    """Keys grouped by decoder layer, in layer order, then the non-layer keys (layer ``None``)."""
    groups: dict[int | None, list[str]] = {}
    for key in keys:
        match = LAYER_KEY.match(key)
        groups.setdefault(int(match.group(1)) if match else None, []).append(key)
    layers = sorted(k for k in groups if k is not None)
    ordered = [(layer, sorted(groups[layer])) for layer in layers]
    return [*ordered, (None, sorted(groups.get(None, [])))]


# --- expert layouts ---------------------------------------------------------------------------


def detect_layout(keys: list[str]) -> Layout | None:
    """Which expert layout a checkpoint uses (``None`` for a dense model); every key must have
    a role (:func:`~components.moe.families.tensor_role` raises for one that has none)."""
    kinds = {tensor_role(k).kind for k in keys}
    if "fused_experts" in kinds:
        return "fused"
    if "expert" in kinds:
        return "per_expert"
    return None


def fuse_experts(gate: list[torch.Tensor], up: list[torch.Tensor],
                 down: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert [I, H] gate/up and [H, I] down → fused ``gate_up_proj`` and ``down_proj``."""
    gate_up = torch.stack([torch.cat([g, u], dim=0) for g, u in zip(gate, up, strict=True)])
    return gate_up, torch.stack(down)


def unfuse_experts(gate_up: torch.Tensor, down: torch.Tensor
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """The inverse of :func:`fuse_experts` (gate rows come first in ``gate_up_proj``)."""
    inter = gate_up.shape[1] // 2
    return ([gate_up[e, :inter] for e in range(gate_up.shape[0])],
            [gate_up[e, inter:] for e in range(gate_up.shape[0])],
            [down[e] for e in range(down.shape[0])])


def read_experts(ckpt: LazyCheckpoint, keys: list[str]
                 ) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]]:
    """Expert weights of the MoE blocks among ``keys`` (one layer's), whatever their layout.

    Returns ``{block prefix: (gate, up, down)}`` with one [I, H] / [I, H] / [H, I] tensor per
    expert, so callers (layout conversion, the graft) never care how the file stores them.
    """
    blocks: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key in keys:
        role = tensor_role(key)
        if role.kind == "fused_experts":
            assert role.block is not None
            fused.setdefault(role.block, {})[key.rsplit(".", 1)[1]] = ckpt.get(key)
        elif role.kind == "expert" and not role.bias:  # weights only (biases: the own class's)
            assert role.block is not None and role.proj is not None and role.expert is not None
            projections = blocks.setdefault(role.block, {p: {} for p in PROJECTIONS})
            projections[role.proj][role.expert] = ckpt.get(key)
    out = {}
    for block, projections in blocks.items():
        count = len(projections["down"])
        for proj, by_expert in projections.items():
            if sorted(by_expert) != list(range(count)):
                raise CheckpointError(f"{block}: expert {proj} weights for experts "
                                      f"{sorted(by_expert)}; expected 0..{count - 1}")
        out[block] = tuple([projections[p][e] for e in range(count)] for p in PROJECTIONS)
    for block, pair in fused.items():
        if set(pair) != set(FUSED_EXPERTS):
            raise CheckpointError(f"{block}.experts: fused layout needs "
                                  f"{' and '.join(FUSED_EXPERTS)}, found {sorted(pair)}")
        out[block] = unfuse_experts(*(pair[name] for name in FUSED_EXPERTS))
    return out  # type: ignore[return-value]


def expert_keys_of(keys: list[str]) -> set[str]:
    """The keys among ``keys`` that hold expert weights (in either layout)."""
    return {k for k in keys if tensor_role(k).is_expert}


def write_experts(block: str, gate: list[torch.Tensor], up: list[torch.Tensor],
                  down: list[torch.Tensor], layout: Layout,
                  names: tuple[str, str, str] = DENSE_FFN,
                  ) -> dict[str, torch.Tensor]:
    """The keys → tensors of one MoE block's experts in ``layout``.

    ``names`` are the per-expert projection names of the family (Mixtral: w1, w3, w2); the fused
    layout always lives under ``<layer>.mlp.experts`` because that is where transformers 5 keeps
    the module, so ``block`` must be the in-memory block prefix for it.
    """
    if layout == "fused":
        return {f"{block}.experts.{name}": tensor for name, tensor
                in zip(FUSED_EXPERTS, fuse_experts(gate, up, down), strict=True)}
    out = {}
    for e, tensors in enumerate(zip(gate, up, down, strict=True)):
        for name, tensor in zip(names, tensors, strict=True):
            out[f"{block}.experts.{e}.{name}.weight"] = tensor
    return out


def relayout(src: str | Path, dst: str | Path, layout: Layout,
             max_bytes: int = 2 * 1024**3) -> int:
    """Copy the MoE checkpoint in ``src`` into ``dst`` (an empty folder) with its experts in
    ``layout``; every other tensor and file is copied as is. Returns the number of MoE blocks.

    Only the standard families have a fused layout in transformers; the package's own class
    (``deltamoe``) and dense models are refused, naming the model type.
    """
    src, dst = Path(src), Path(dst)
    config = read_config(src)
    family = next((f for f in FAMILIES if f.moe_type == config.get("model_type")), None)
    if family is None:
        raise CheckpointError(f"{src}: model_type {config.get('model_type')!r} has no fused "
                              "expert layout; expected " + ", ".join(f.moe_type for f in FAMILIES))
    blocks = 0
    writer = ShardWriter(dst, max_bytes)
    try:
        with LazyCheckpoint(src) as ckpt:
            for layer, keys in split_layers(ckpt.keys()):
                experts = read_experts(ckpt, keys)
                routed = expert_keys_of(keys)
                for key in keys:
                    if key in routed:
                        continue
                    if tensor_role(key).kind == "router":  # moves with its block
                        assert layer is not None
                        key_out = f"{family.block(layer, layout == 'fused')}.gate.weight"
                        writer.add(key_out, ckpt.get(key))
                    else:
                        writer.add(key, ckpt.get(key))
                for gate, up, down in experts.values():
                    assert layer is not None
                    out_block = family.block(layer, layout == "fused")
                    for key, tensor in write_experts(out_block, gate, up, down, layout,
                                                     family.expert_names).items():
                        writer.add(key, tensor.clone())
                    blocks += 1
        writer.close()
    except BaseException:
        writer.abort()  # no parts, no writer thread left behind
        raise
    for path in src.iterdir():
        if path.is_file() and not path.name.startswith("model") and path.name != "manifest.json":
            (dst / path.name).write_bytes(path.read_bytes())
    return blocks
