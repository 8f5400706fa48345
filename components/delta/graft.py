"""The streaming graft: θ_out computed tensor by tensor in per-layer tasks, never a whole model.

The driver checks the three checkpoints from their headers alone (architectures, per-tensor
shapes and dtypes, vocabulary rows) before anything is written, then splits the target's tensors
by decoder layer (plus one unit for embeddings, final norm and head). Each unit reads only its
tensors from base, post and target, computes in fp32, casts once to the output dtype and writes
shard-bounded parts of its own; with ``workers > 1`` units run as Ray tasks with one CPU each,
so memory per task is one layer of three models plus one output shard. The driver names the
parts in unit order and writes the index last, so the output is byte-identical however the units
were scheduled, and a crash leaves no index (the caller's stage folder is never committed).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from components.block_expansion import EXPANSION_FILE, ExpandedLayer, read_layers
from components.cards import clean_title, model_ref, portable, write_card
from components.delta.checks import (
    GraftError,
    GraftInputs,
    check_architectures,
    check_expert_scales,
    check_scales,
    check_target_keys,
    check_tensors,
    model_config,
    parse_size,  # noqa: F401  (the CLI and the stage import it from here)
)
from components.delta.expand import VOCAB_KEYS, family_of, source_for
from components.delta.methods import Method, get_method
from components.moe.checkpoint import (
    SIDE_FILES,
    CheckpointError,
    LazyCheckpoint,
    ShardWriter,
    all_finite,
    commit_shards,
    split_layers,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class GraftOptions:
    method: str = "deltamoe"
    scale: float = 1.0
    expert_scales: dict[int, float] = field(default_factory=dict)
    family_scales: dict[str, float] = field(default_factory=dict)
    sparsify: str = "auto"  # auto: the method's own; else a key of methods.SPARSIFIERS
    density: float = 1.0
    seed: int = 0
    dtype: str = "auto"  # auto: the target's dtype, tensor by tensor
    max_shard_bytes: int = 2 * 1024**3
    workers: int = 1  # > 1: Ray tasks on the current (or a new local) Ray instance

    def __post_init__(self) -> None:
        check_scales(self.scale, self.expert_scales, self.family_scales)
        if isinstance(self.max_shard_bytes, bool) or not isinstance(self.max_shard_bytes, int) \
                or self.max_shard_bytes < 1:
            raise GraftError(f"max_shard_bytes: expected a positive integer, got "
                             f"{self.max_shard_bytes!r}")

    def resolved_method(self) -> Method:
        """The registry's method with the ``sparsify`` override applied: the one object the
        graft consults for anchor, deltas and combine."""
        return get_method(self.method).with_sparsify(self.sparsify)


@dataclass(frozen=True)
class GraftResult:
    out_dir: str
    method: str
    formula: str
    tensors: int
    bytes: int
    units: int
    vocab_rows: int


# --- one unit of work -------------------------------------------------------------------------


# fp32 working block: 1 MB, small enough to stay in cache between the passes over it (measured:
# about 2x faster than 16 MB blocks), and reused rather than allocated per block
BLOCK_ELEMENTS = 256 * 1024


class UnitReader:
    """The three checkpoints as one unit of work sees them: every input tensor is read and
    checked for NaN/Inf once, however many experts reuse it (an MoE layer's E experts all take
    the same dense FFN delta), and sparsified deltas are kept for the same reason. A unit is one
    decoder layer, so what is kept is bounded by one layer."""

    def __init__(self, checkpoints: dict[str, LazyCheckpoint]) -> None:
        self.checkpoints = checkpoints
        self._raw: dict[tuple[str, str], torch.Tensor] = {}
        self.merged: dict[str, torch.Tensor] = {}

    def raw(self, role: str, key: str, keep: bool = False, check: bool = True) -> torch.Tensor:
        """One input tensor; ``check=False`` when the caller checks what it computes from it
        (NaN and Inf propagate through the graft's arithmetic, so a finite result proves
        finite inputs, and a non-finite one is traced back by :func:`_blame`)."""
        if (role, key) in self._raw:
            return self._raw[role, key]
        tensor = self.checkpoints[role].get(key)
        if check:
            _finite(tensor, role, key)
        if keep:
            self._raw[role, key] = tensor
        return tensor


def _row_blocks(rows: int, row_elements: int) -> list[tuple[int, int]]:
    step = max(1, BLOCK_ELEMENTS // max(1, row_elements))
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def compute_tensor(key: str, reader: UnitReader, method: Method, options: GraftOptions,
                   layers: Sequence[ExpandedLayer] | None = None) -> torch.Tensor:
    """θ_out for one target tensor: fp32 arithmetic, cast once to the output dtype.

    Elementwise methods run over row blocks of at most ``BLOCK_ELEMENTS`` fp32 values, so the
    working memory is the output tensor plus a few blocks, however large the tensor (a 70B
    model's embedding included). The order of operations is part of the contract: with one
    unsparsified Δ at an effective scale of 1 the result is ``(θ_T − θ_B) + θ_P``, so a tensor
    the training stage froze (θ_T = θ_B bit for bit) comes out as θ_post exactly; otherwise
    ``θ_T + s · (θ_P − θ_B)``, or ``θ_B + s · ((θ_T − θ_B) + (θ_P − θ_B))`` for the merges.
    TIES and DARE need the whole delta (a magnitude threshold, a mask drawn per tensor), so they
    work on full fp32 tensors. Vocabulary tensors take the delta on the base's rows; rows beyond
    them come from the model that added them (the target keeps its own new rows; otherwise
    post's added rows are copied). ``layers``: a block-expanded target's plan
    (:func:`~components.delta.expand.source_for`).
    """
    source = source_for(key, layers)
    blockwise = source.kind != "none" and method.elementwise
    target = reader.raw("target", key, check=not blockwise)
    dtype = target.dtype if options.dtype == "auto" else DTYPES[options.dtype]
    if source.kind == "none":
        return target.to(dtype)
    if method.anchor == "base" and source.kind != "same":
        raise GraftError(f"{key}: method {method.name} needs a dense target")
    scale = options.scale * options.family_scales.get(family_of(key), 1.0)
    keep = source.kind != "same"  # experts reuse their layer's dense tensors
    out = torch.empty(target.shape, dtype=dtype)
    if source.kind in ("fused_gate_up", "fused_down"):
        views = [(target[e], out[e], scale * options.expert_scales.get(e, 1.0))
                 for e in range(target.shape[0])]
    elif source.kind == "expert":
        views = [(target, out, scale * options.expert_scales.get(source.expert or 0, 1.0))]
    else:
        views = [(target, out, scale)]
    buffers: list[torch.Tensor] = []

    def work(index: int, shape: torch.Size) -> torch.Tensor:
        """Reusable fp32 scratch of ``shape`` (at most one block, or one row if larger)."""
        size = shape.numel()
        while len(buffers) <= index:
            buffers.append(torch.empty(0))
        if buffers[index].numel() < size:
            buffers[index] = torch.empty(max(size, BLOCK_ELEMENTS))
        return buffers[index][:size].view(shape)

    offset = 0
    for dense_key in source.dense_keys:
        base = reader.raw("base", dense_key, keep, check=not blockwise)
        post = reader.raw("post", dense_key, keep, check=not blockwise)
        rows = base.shape[0]
        if not method.elementwise:
            delta = _sparse_delta(reader, method, options, dense_key, base, post, target)
        for t_view, o_view, s in views:
            segment = slice(offset, offset + rows)
            if not method.elementwise:
                anchor = base if method.anchor == "base" else t_view[segment]
                o_view[segment] = (anchor.float() + s * delta).to(dtype)
                continue
            row = base[0].numel()
            for start, stop in _row_blocks(rows, row):
                b, p = base[start:stop], post[start:stop]
                t = work(0, b.shape).copy_(t_view[offset + start:offset + stop])
                if method.anchor == "target" and s == 1.0:
                    t.sub_(b).add_(p)
                elif method.anchor == "target":  # θ_T + s·(θ_P − θ_B), no fused multiply-add
                    t = work(1, b.shape).copy_(p).sub_(b).mul_(s).add_(t)
                else:  # θ_B + s·((θ_T − θ_B) + (θ_P − θ_B))
                    t.sub_(b).add_(work(1, b.shape).copy_(p).sub_(b)).mul_(s).add_(b)
                if not torch.isfinite(t.sum()):
                    _blame(key, dense_key, t_view, b, p, offset + start, offset + stop, t)
                o_view[offset + start:offset + stop] = t
        offset += rows
    if key in VOCAB_KEYS and target.shape[0] > offset:
        out[offset:] = _finite(target[offset:], "target", key)
    elif key in VOCAB_KEYS:
        added = _finite(reader.raw("post", key, check=False)[offset:], "post", key)
        out = torch.cat([out, added.to(dtype)]) if added.shape[0] else out
    return out


def _sparse_delta(reader: UnitReader, method: Method, options: GraftOptions, dense_key: str,
                  base: torch.Tensor, post: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The TIES/DARE-merged delta of one dense tensor (cached when only Δpost is involved)."""
    cache = dense_key if method.deltas == ("post",) else None
    if cache in reader.merged:
        return reader.merged[cache]
    rows = base.shape[0]
    deltas = [(post if role == "post" else target)[:rows].float() - base.float()
              for role in method.deltas]
    delta = method.combine(deltas, options.density, options.seed, dense_key)
    if cache is not None:
        reader.merged[cache] = delta
    return delta


def _blame(key: str, dense_key: str, target: torch.Tensor, base: torch.Tensor,
           post: torch.Tensor, start: int, stop: int, result: torch.Tensor) -> None:
    """A block came out non-finite: name the input that holds NaN/Inf, or the overflow."""
    for role, name, tensor in (("target", key, target[start:stop]), ("base", dense_key, base),
                               ("post", dense_key, post)):
        if not torch.isfinite(tensor).all():
            raise GraftError(f"{role} tensor {name} holds NaN or Inf")
    if not torch.isfinite(result).all():
        raise GraftError(f"{key}: the graft overflows fp32 (inputs are finite)")


def _finite(tensor: torch.Tensor, role: str, key: str) -> torch.Tensor:
    if not all_finite(tensor):
        raise GraftError(f"{role} tensor {key} holds NaN or Inf")
    return tensor


def graft_unit(unit: int, keys: list[str], inputs: GraftInputs, options: GraftOptions,
               out_dir: str) -> list[tuple[str, list[str], int]]:
    """Compute and write one unit (a decoder layer, or the non-layer tensors) as shard parts."""
    method = options.resolved_method()
    layers = read_layers(inputs.target)
    checkpoints = {role: LazyCheckpoint(getattr(inputs, role)) for role in ("base", "post",
                                                                             "target")}
    try:
        writer = ShardWriter(out_dir, options.max_shard_bytes, prefix=f"unit-{unit:05d}")
        reader = UnitReader(checkpoints)
        try:
            for key in keys:
                writer.add(key, compute_tensor(key, reader, method, options, layers))
                if source_for(key, layers).kind == "same":
                    # unmap what this tensor touched: mapped pages count as resident memory
                    # until the file is closed (handles reopen lazily on the next read)
                    for checkpoint in checkpoints.values():
                        checkpoint.close()
            return writer.parts()
        except BaseException:
            writer.abort()
            raise
    finally:
        for checkpoint in checkpoints.values():
            checkpoint.close()


# --- the driver -------------------------------------------------------------------------------


def _run_units(units: list[tuple[int, list[str]]], inputs: GraftInputs, options: GraftOptions,
               out_dir: str) -> list[list[tuple[str, list[str], int]]]:
    bar = tqdm(total=len(units), desc=f"graft ({options.method})", unit="layer")
    results: dict[int, list[tuple[str, list[str], int]]] = {}
    if options.workers <= 1:
        for unit, keys in units:
            results[unit] = graft_unit(unit, keys, inputs, options, out_dir)
            bar.update()
    else:
        import ray

        started = not ray.is_initialized()
        if started:  # a local instance; on a cluster the caller has connected already
            ray.init(num_cpus=options.workers, include_dashboard=False, log_to_driver=False)
        task = ray.remote(num_cpus=1, max_retries=0)(graft_unit)
        pending = {task.remote(u, k, inputs, options, out_dir): u for u, k in units}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                results[pending.pop(done[0])] = ray.get(done[0])
                bar.update()
        except ray.exceptions.RayTaskError as err:
            for ref in pending:
                ray.cancel(ref, force=True)
            cause = err.as_instanceof_cause()
            raise (cause if isinstance(cause, GraftError | CheckpointError)
                   else GraftError(str(err))) from None
        finally:
            if started:
                ray.shutdown()
    bar.close()
    return [results[unit] for unit, _ in units]


def graft(inputs: GraftInputs, out_dir: str | Path, options: GraftOptions) -> GraftResult:
    """Write θ_out into ``out_dir`` (an empty folder the caller commits atomically)."""
    try:
        method = options.resolved_method()
    except ValueError as err:  # an unknown method or sparsifier, named by the registry
        raise GraftError(str(err)) from None
    if not 0.0 < options.density <= 1.0:
        raise GraftError(f"density: expected 0 < density ≤ 1, got {options.density}")
    if options.dtype not in ("auto", *DTYPES):
        raise GraftError(f"dtype {options.dtype!r}: expected auto, {', '.join(DTYPES)}")
    check_architectures(inputs, method)
    try:
        with LazyCheckpoint(inputs.base) as base, LazyCheckpoint(inputs.post) as post, \
                LazyCheckpoint(inputs.target) as target:
            layers = read_layers(inputs.target)
            rows = check_tensors(base, post, target, method, layers)
            check_expert_scales(options.expert_scales,
                                check_target_keys(base, target, method, layers), method)
            units = list(enumerate(keys for _, keys in split_layers(target.keys()) if keys))
    except CheckpointError as err:
        raise GraftError(str(err)) from None
    out = Path(out_dir)
    try:
        parts = [part for unit in _run_units(units, inputs, options, str(out)) for part in unit]
    except BaseException as err:
        for leftover in out.glob("unit-*.tmp.safetensors"):  # no partial output stays behind
            leftover.unlink()
        if isinstance(err, CheckpointError):
            raise GraftError(str(err)) from None
        raise
    commit_shards(out, parts)
    _finish_directory(inputs, out, method, options, rows)
    return GraftResult(out_dir=str(out), method=method.name, formula=method.formula,
                       tensors=sum(len(k) for _, k in units),
                       bytes=sum(size for _, _, size in parts), units=len(units),
                       vocab_rows=rows)


def _finish_directory(inputs: GraftInputs, out: Path, method: Method, options: GraftOptions,
                      rows: int) -> None:
    """Config from the target (vocabulary resized), tokenizer, chat template and generation
    config from post, the target's allocation, a model card with lineage and the formula."""
    config = model_config(inputs.target, "target")
    if rows:
        config["vocab_size"] = rows
    if options.dtype != "auto":
        config["dtype"] = options.dtype
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for name in SIDE_FILES:
        if (Path(inputs.post) / name).exists():
            shutil.copy2(Path(inputs.post) / name, out / name)
    for record in ("allocation.json", EXPANSION_FILE):
        if (Path(inputs.target) / record).exists():
            shutil.copy2(Path(inputs.target) / record, out / record)
    lineage = portable({**asdict(inputs), "options": asdict(options), "formula": method.formula})
    refs = [model_ref(m) for m in (inputs.base, inputs.post, inputs.target)]
    write_card(
        out, f"{clean_title(out.name)} ({method.name} graft)",
        f"`{method.formula}`\n\n"
        f"- base: `{refs[0]}`\n- post: `{refs[1]}`\n- target: `{refs[2]}`\n"
        f"- scale λ = {options.scale}, sparsify = {method.sparsify}, "
        f"density = {options.density}, seed = {options.seed}\n\n"
        "Tokenizer, chat template and generation config are the post-trained model's.\n\n"
        f"```json\n{json.dumps(lineage, indent=2)}\n```\n",
        base_model=[inputs.base, inputs.post], relation="merge",
        inputs=[inputs.post, inputs.base, inputs.target], tags=["graft", method.name])
