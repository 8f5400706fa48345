"""DCP checkpoints of a sharded run, and the export of the last one as a HF model directory.

A checkpoint is one DCP directory (every rank writes its own shard files, rank 0 the metadata)
holding ``model`` and ``optim`` state dicts, plus ``trainer_state.json`` (step, tokens, phase).
The export runs in the driver with no process group: it reads the DCP checkpoint one decoder
layer at a time (DCP loads any subset of keys), casts to the dtype the initial model was stored
in, and writes bounded safetensors shards — the full model is never gathered in memory. Experts
come out in the initial model's layout (per-expert keys for a Mixtral written by the upcycle
stage), next to the initial model's config, tokenizer, generation config, ``allocation.json`` and
``expansion.json``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from components.block_expansion import EXPANSION_FILE
from components.moe.checkpoint import (
    SIDE_FILES,
    LazyCheckpoint,
    ShardWriter,
    detect_layout,
    relayout,
    split_layers,
)
from components.train.fsdp import saved_dtype

STATE_FILE = "trainer_state.json"
MODEL_PREFIX = "model."
DEFAULT_SHARD_BYTES = 2 * 1024**3


def save(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
         state: dict[str, Any]) -> None:
    """Every rank writes its shards of model and optimizer into ``path``; rank 0 the state."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))
    if not dist.is_initialized() or dist.get_rank() == 0:
        (path / STATE_FILE).write_text(json.dumps(state, indent=1))


def load(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimizer shards from ``path``; returns the trainer state."""
    path = Path(path)
    msd, osd = get_state_dict(model, optimizer)
    loaded = {"model": msd, "optim": osd}
    dcp.load(loaded, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=loaded["model"],
                   optim_state_dict=loaded["optim"])
    return read_state(path)


def read_state(path: str | Path) -> dict[str, Any]:
    """The trainer state of a checkpoint (rank 0's file; Ray merges every worker's files)."""
    return json.loads((Path(path) / STATE_FILE).read_text())


def is_complete(path: str | Path) -> bool:
    """A checkpoint counts only with its DCP metadata and trainer state both written."""
    path = Path(path)
    return (path / ".metadata").exists() and (path / STATE_FILE).exists()


def model_keys(path: str | Path) -> dict[str, TensorStorageMetadata]:
    """Model tensor names (in-memory FQNs) → their DCP metadata."""
    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k[len(MODEL_PREFIX):]: v for k, v in meta.items()
            if k.startswith(MODEL_PREFIX) and isinstance(v, TensorStorageMetadata)}


def read_tensors(path: str | Path, keys: list[str],
                 meta: dict[str, TensorStorageMetadata]) -> dict[str, torch.Tensor]:
    """Just ``keys`` of the model state, read from a DCP checkpoint in this process."""
    target = {k: torch.empty(tuple(meta[k].size), dtype=meta[k].properties.dtype) for k in keys}
    dcp.load({"model": target}, checkpoint_id=str(path))
    return target


def export_hf(checkpoint: str | Path, init_dir: str | Path, out_dir: str | Path, *,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, card: str | None = None) -> int:
    """Write the model of DCP ``checkpoint`` as a HF directory in ``out_dir`` (an empty folder),
    in the format of ``init_dir``; returns the number of tensors written."""
    init_dir, out_dir = Path(init_dir), Path(out_dir)
    config = json.loads((init_dir / "config.json").read_text())
    dtype = saved_dtype(init_dir)
    meta = model_keys(checkpoint)
    keys = list(meta)
    if config.get("tie_word_embeddings") and "lm_head.weight" in meta:
        keys.remove("lm_head.weight")
    with LazyCheckpoint(init_dir) as init:
        init_layout = detect_layout(init.keys())
    memory_layout = detect_layout(keys)
    convert = memory_layout is not None and init_layout is not None \
        and memory_layout != init_layout
    out_dir.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent)) if convert else out_dir
    writer = ShardWriter(target, max_shard_bytes)
    try:
        for _, group in split_layers(keys):
            for key, tensor in read_tensors(checkpoint, group, meta).items():
                writer.add(key, tensor.to(dtype) if tensor.is_floating_point() else tensor)
        writer.close()
    except BaseException:
        writer.abort()
        if convert:
            shutil.rmtree(target, ignore_errors=True)
        raise
    # the upcycler's and the block expander's records travel with the trained model: the graft
    # and the routing prior read them from whatever model is trained from it
    for name in ("config.json", "allocation.json", EXPANSION_FILE, *SIDE_FILES):
        if (init_dir / name).exists():
            shutil.copyfile(init_dir / name, target / name)
    if convert:
        try:
            relayout(target, out_dir, init_layout)  # type: ignore[arg-type]
        finally:
            shutil.rmtree(target, ignore_errors=True)
    if card:
        (out_dir / "README.md").write_text(card, encoding="utf-8")
    return len(keys)
