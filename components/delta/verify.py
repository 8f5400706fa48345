"""Check a written graft against a reference computed independently of the streaming engine.

The graft (:mod:`components.delta.graft`) maps target tensors to dense ones through
:mod:`components.delta.expand`, streams row blocks, caches merged deltas per layer and sparsifies
through :data:`components.delta.methods.SPARSIFIERS`. A check that reran that code would agree
with any bug in it, so everything here is written separately, plainly, a whole tensor at a time:

- tensors are read straight from each model's safetensors files (``safe_open``, never pickle),
  through a reader of its own rather than the graft's ``LazyCheckpoint``;
- which dense tensor an output tensor takes its delta from is decided from the output's name
  here (per-expert ``…experts.E.<proj>.weight`` and fused ``…experts.gate_up_proj`` /
  ``down_proj`` layouts), and a tensor is shared when base holds the same name, new otherwise —
  not by the engine's name patterns;
- TIES is written out per the paper and DARE redraws its masks from the per-tensor seeds
  (:func:`~components.delta.methods.tensor_seed`, the one thing shared: it defines the random
  stream).

The order of the arithmetic is the graft's documented contract (``(θ_T − θ_B) + θ_P`` at an
effective scale of 1, so a frozen tensor comes out as θ_post bit for bit), so results are
compared exactly.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from components.delta.graft import GraftError, GraftInputs, GraftOptions
from components.delta.methods import METHODS, tensor_seed
from components.moe.checkpoint import index_files


class _Files:
    """Tensor name → safetensors file of one model directory (sharded index or single file)."""

    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.exists():  # shard paths checked to stay inside the model folder
            self.files = index_files(model_dir)
        else:
            single = model_dir / "model.safetensors"
            with safe_open(single, "pt") as handle:
                self.files = {key: single for key in handle.keys()}

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def get(self, key: str) -> torch.Tensor:
        with safe_open(self.files[key], "pt") as handle:
            return handle.get_tensor(key)


# --- the reference sparsifiers ---------------------------------------------------------------


def _sum(deltas: Sequence[torch.Tensor], density: float, seed: int, key: str) -> torch.Tensor:
    total = deltas[0]
    for delta in deltas[1:]:
        total = total + delta
    return total


def _ties(deltas: Sequence[torch.Tensor], density: float, seed: int, key: str) -> torch.Tensor:
    """TIES-merging, Yadav et al. 2023, Algorithm 1: (1) trim each τ_t to its top-k magnitudes,
    k = max(1, round(density · n)) (ties at the threshold kept); (2) elect the sign
    γ = sgn(Σ_t τ̂_t) per entry; (3) disjoint mean: average τ̂_t over the t whose nonzero entry
    has sign γ (0 where none does)."""
    trimmed = []
    for tau in deltas:
        k = max(1, round(density * tau.numel()))
        threshold = tau.abs().flatten().sort(descending=True).values[k - 1]
        trimmed.append(torch.where(tau.abs() >= threshold, tau, 0.0))
    gamma = torch.sign(_sum(trimmed, density, seed, key))
    total = torch.zeros_like(trimmed[0])
    count = torch.zeros_like(trimmed[0])
    for tau in trimmed:
        agrees = (tau != 0) & (torch.sign(tau) == gamma)
        total = total + torch.where(agrees, tau, 0.0)
        count = count + agrees.float()
    return torch.where(count > 0, total / count.clamp_min(1), 0.0)


def _dare(deltas: Sequence[torch.Tensor], density: float, seed: int, key: str) -> torch.Tensor:
    """DARE, Yu et al. 2024: keep each entry with probability ``density`` (the mask drawn from
    the tensor's own seed), rescale the kept ones by 1 / density, then sum."""
    rescaled = []
    for index, tau in enumerate(deltas):
        generator = torch.Generator().manual_seed(tensor_seed(seed, key, index))
        kept = torch.rand(tau.shape, generator=generator) < density
        rescaled.append(torch.where(kept, tau / density, 0.0))
    return _sum(rescaled, density, seed, key)


REFERENCE_SPARSIFIERS: dict[str, Callable[..., torch.Tensor]] = {
    "none": _sum, "ties": _ties, "dare": _dare}


# --- which dense tensors an output tensor comes from -----------------------------------------

_DENSE_PROJ = {"gate_proj": "gate_proj", "w1": "gate_proj", "up_proj": "up_proj",
               "w3": "up_proj", "down_proj": "down_proj", "w2": "down_proj"}


def _ffn(layer: str, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}.weight"


def _per_expert(key: str) -> tuple[int, str] | None:
    """(expert, dense FFN key) of ``model.layers.L.{mlp|block_sparse_moe}.experts.E.P.weight``."""
    parts = key.split(".")
    if (len(parts) == 8 and parts[:2] == ["model", "layers"]
            and parts[3] in ("mlp", "block_sparse_moe") and parts[4] == "experts"
            and parts[5].isdigit() and parts[6] in _DENSE_PROJ and parts[7] == "weight"):
        return int(parts[5]), _ffn(parts[2], _DENSE_PROJ[parts[6]])
    return None


def _fused(key: str) -> list[str] | None:
    """The dense FFN keys stacked along dim 1 of a fused ``model.layers.L.mlp.experts.*``."""
    parts = key.split(".")
    if len(parts) != 6 or parts[:2] != ["model", "layers"] or parts[3:5] != ["mlp", "experts"]:
        return None
    layer = parts[2]
    return {"gate_up_proj": [_ffn(layer, "gate_proj"), _ffn(layer, "up_proj")],
            "down_proj": [_ffn(layer, "down_proj")]}.get(parts[5])


def _family(key: str) -> str:
    if key == "model.embed_tokens.weight":
        return "embed"
    if key == "lm_head.weight":
        return "lm_head"
    parts = key.split(".")
    if "self_attn" in parts:
        return "attention"
    return "norm" if "norm" in parts[-2] else "mlp"


# --- the reference per method ----------------------------------------------------------------


class _Reference:
    """θ_out of one output tensor, a whole tensor at a time in fp32."""

    def __init__(self, inputs: GraftInputs, options: GraftOptions) -> None:
        self.models = {role: _Files(getattr(inputs, role)) for role in ("base", "post",
                                                                        "target")}
        self.options = options
        self.target_dir = Path(inputs.target)
        own = METHODS[options.method].sparsify
        self.sparsify = REFERENCE_SPARSIFIERS[own if options.sparsify == "auto"
                                               else options.sparsify]
        self.elementwise = self.sparsify is _sum

    def read(self, role: str, key: str) -> torch.Tensor:
        return self.models[role].get(key).float()

    def dense(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Base and post of a dense tensor, post cut to the base's rows (added rows are copied,
        not merged)."""
        base = self.read("base", key)
        return base, self.read("post", key)[:base.shape[0]]

    def merged(self, deltas: list[torch.Tensor], dense_key: str) -> torch.Tensor:
        return self.sparsify(deltas, self.options.density, self.options.seed, dense_key)

    def onto_target(self, t: torch.Tensor, dense_key: str, s: float) -> torch.Tensor:
        """DeltaMoE / ParamΔ on one segment: θ_T + s · S(θ_P − θ_B), exact form at s = 1."""
        b, p = self.dense(dense_key)
        if self.elementwise and s == 1.0:
            return (t - b) + p
        return t + s * self.merged([p - b], dense_key)

    def onto_base(self, t: torch.Tensor, dense_key: str, s: float) -> torch.Tensor:
        """The merges on one dense tensor: θ_B + s · S(θ_T − θ_B, θ_P − θ_B)."""
        b, p = self.dense(dense_key)
        return b + s * self.merged([t - b, p - b], dense_key)

    def shared(self, key: str, s: float,
               formula: Callable[[torch.Tensor, str, float], torch.Tensor]) -> torch.Tensor:
        """A tensor base also holds: the formula on the base's rows; rows a vocabulary grew by
        come from the model that added them (the target's own, else post's)."""
        target = self.read("target", key)
        rows = self.models["base"].get(key).shape[0]
        out = formula(target[:rows], key, s)
        post_rows = self.read("post", key)[rows:]
        if target.shape[0] > rows:
            return torch.cat([out, target[rows:]])
        return torch.cat([out, post_rows]) if post_rows.shape[0] else out

    def scale(self, key: str, expert: int | None = None) -> float:
        s = self.options.scale * self.options.family_scales.get(_family(key), 1.0)
        return s if expert is None else s * self.options.expert_scales.get(expert, 1.0)

    def deltamoe(self, key: str) -> torch.Tensor:
        """θ_CPT-MoE + λ · Expand(Δpost): an expert tensor takes its layer's dense FFN delta ×
        α_e (fused: each expert's slice, gate and up rows stacked); shared tensors take Δpost ×
        s_family; routers and other new tensors stay as the target has them."""
        if (per_expert := _per_expert(key)) is not None:
            expert, dense_key = per_expert
            return self.onto_target(self.read("target", key), dense_key, self.scale(key, expert))
        if (dense_keys := _fused(key)) is not None:
            target = self.read("target", key)
            experts = []
            for expert in range(target.shape[0]):
                segments, row = [], 0
                for dense_key in dense_keys:
                    rows = self.models["base"].get(dense_key).shape[0]
                    segments.append(self.onto_target(target[expert, row:row + rows], dense_key,
                                                     self.scale(key, expert)))
                    row += rows
                experts.append(torch.cat(segments))
            return torch.stack(experts)
        return self.param_delta(key)

    def param_delta(self, key: str) -> torch.Tensor:
        """θ_CPT-dense + λ · s_family · Δpost on every tensor base holds."""
        if key not in self.models["base"]:
            return self.read("target", key)
        return self.shared(key, self.scale(key), self.onto_target)

    def block_expansion(self, key: str) -> torch.Tensor:
        """ParamΔ with layers shifted: an original layer of the expanded target takes Δpost of
        the dense layer it is (read from the target's ``expansion.json``), a new block none."""
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
        if match is None:
            return self.param_delta(key)
        plan = json.loads((self.target_dir / "expansion.json").read_text())["layers"]
        row = plan[int(match.group(1))]
        if row["new"]:
            return self.read("target", key)
        dense_key = f"model.layers.{row['source']}.{match.group(2)}"
        return self.onto_target(self.read("target", key), dense_key, self.scale(key))

    def merge(self, key: str) -> torch.Tensor:
        """Task arithmetic, TIES, DARE: θ_base + λ · S(θ_CPT − θ_base, θ_post − θ_base)."""
        if key not in self.models["base"]:
            return self.read("target", key)
        return self.shared(key, self.scale(key), self.onto_base)


REFERENCES: dict[str, Callable[[_Reference, str], torch.Tensor]] = {
    "deltamoe": _Reference.deltamoe,
    "param_delta": _Reference.param_delta,
    "block_expansion": _Reference.block_expansion,
    "task_arithmetic": _Reference.merge,
    "ties": _Reference.merge,
    "dare": _Reference.merge,
}


def _sample(keys: list[str], sample: int) -> list[str]:
    """Every ``len/sample``-th tensor, plus the first of each kind the stride missed (an expert
    per layout, a router, a shared tensor) and the vocabulary tensors, whose row rules differ."""
    step = max(1, math.ceil(len(keys) / sample))
    chosen = keys[::step][:sample]
    kinds = {"per_expert": _per_expert, "fused": _fused,
             "new": lambda k: ".gate." in k or "shared_expert" in k or "classifier" in k}
    for test in kinds.values():
        if not any(test(k) for k in chosen):
            chosen += [k for k in keys if test(k)][:1]
    chosen += [k for k in ("model.embed_tokens.weight", "lm_head.weight") if k in keys]
    return list(dict.fromkeys(chosen))


def verify(inputs: GraftInputs, out_dir: str | Path, options: GraftOptions,
           sample: int = 8) -> list[str]:
    """Compare a sample of the written tensors with the independent reference of the method;
    returns the keys checked, raises GraftError on the first difference. The output must also
    hold exactly the target's tensors."""
    if options.method not in REFERENCES:
        raise GraftError(f"verify: no reference computation for method {options.method!r}")
    out = _Files(out_dir)
    reference = _Reference(inputs, options)
    if set(out.files) != set(reference.models["target"].files):
        extra = sorted(set(out.files) ^ set(reference.models["target"].files))
        raise GraftError(f"verify: the output and the target hold different tensors (e.g. "
                         f"{', '.join(extra[:3])})")
    dtype = None if options.dtype == "auto" else getattr(torch, options.dtype)
    chosen = _sample(sorted(out.files), sample)
    for key in chosen:
        written = out.get(key)
        want = dtype or reference.models["target"].get(key).dtype
        expected = REFERENCES[options.method](reference, key).to(want)
        if written.dtype != want or written.shape != expected.shape:
            raise GraftError(f"verify: {key} differs from the reference computation "
                             f"({written.dtype} {list(written.shape)} written, {want} "
                             f"{list(expected.shape)} expected)")
        if not torch.equal(written, expected):
            diff = (written.float() - expected.float()).abs().max().item()
            raise GraftError(f"verify: {key} differs from the reference computation (max abs "
                             f"diff {diff:g})")
    return chosen
