"""The registry of model variants: every model a run can build or compare, and how it is made.

A variant is a recipe over four moves — upcycle the base, continue pre-training, graft a delta,
or take an input as it is — and its name is the one spelling used everywhere: the config
(``baselines.variants``, ``evaluation.variants``), the model folder (``models/<name>``), the
workflow stage that builds it, its evaluation and its MLflow run. The workflow turns these
recipes into its DAG; nothing else lists variants.

This module imports nothing heavy, so the run config can validate names against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["BASELINES", "VARIANTS", "Variant", "get_variant", "graft_target"]

Upcycle = Literal["language", "layermoe", "unallocated", "blocks"]
RENAMED = {"param_matched": "moe_unfrozen"}  # old name → new name, for a clear error


@dataclass(frozen=True)
class Variant:
    """How one variant's model is made.

    ``train`` says which model continued pre-training starts from: ``moe`` (this variant's
    upcycled MoE, from its ``upcycle`` allocation), ``dense`` (the base) or ``blocks`` (the
    base with LLaMA-Pro blocks added, ``upcycle: blocks``; only the new blocks train).
    ``graft`` names the method (:data:`components.delta.methods.METHODS`) applied to the
    trained model, or to ``graft_onto``'s when the variant trains nothing itself. ``tokens`` is
    the training budget: the config's steps, or the dense tokens matched to the MoE's active
    FLOPs.
    """

    name: str
    help: str
    baseline: bool  # may be listed in baselines.variants
    upcycle: Upcycle | None = None
    train: Literal["moe", "dense", "blocks"] | None = None
    tokens: Literal["steps", "flops_matched"] = "steps"
    graft: str | None = None
    graft_onto: str | None = None  # the variant whose trained model the graft targets

    @property
    def trained(self) -> str | None:
        """The stage (and ``models/`` folder) this variant's training writes, if it trains:
        the variant itself when nothing is grafted on top, else ``cpt_<name>``."""
        if self.train is None:
            return None
        return self.name if self.graft is None else f"cpt_{self.name}"

    @property
    def upcycled(self) -> str | None:
        """The ``models/`` folder of this variant's own upcycled MoE (or block-expanded base)."""
        if self.upcycle is None:
            return None
        if self.upcycle == "blocks":
            return "blocks_init"
        return "moe_init" if self.upcycle == "language" else f"moe_init_{self.name}"


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("base", "the dense base model, as given", baseline=False),
    Variant("post", "its post-trained (instruct) sibling, as given", baseline=False),
    Variant("cpt_dense", "the dense base after continued pre-training, all weights trained",
            baseline=True, train="dense"),
    Variant("param_delta", "ParamΔ: CPT-dense + Δpost", baseline=True, graft="param_delta",
            graft_onto="cpt_dense"),
    Variant("task_arithmetic", "task arithmetic: base + (CPT-dense − base) + Δpost",
            baseline=True, graft="task_arithmetic", graft_onto="cpt_dense"),
    Variant("ties", "TIES merge of the CPT-dense delta and Δpost", baseline=True, graft="ties",
            graft_onto="cpt_dense"),
    Variant("dare", "DARE merge of the CPT-dense delta and Δpost", baseline=True, graft="dare",
            graft_onto="cpt_dense"),
    Variant("flops_matched", "ParamΔ on a dense CPT given the MoE's active-FLOPs token budget",
            baseline=True, train="dense", tokens="flops_matched", graft="param_delta"),
    Variant("cpt_moe", "the language-allocated MoE after continued pre-training (CPT only)",
            baseline=True, upcycle="language", train="moe"),
    Variant("deltamoe", "DeltaMoE: CPT-MoE + Expand(Δpost), the method itself", baseline=False,
            graft="deltamoe", graft_onto="cpt_moe"),
    Variant("moe_unfrozen", "DeltaMoE on an MoE with no language allocation, nothing frozen",
            baseline=True, upcycle="unallocated", train="moe", graft="deltamoe"),
    Variant("block_expansion", "LLaMA-Pro: identity blocks added to the base, only they train "
            "(as many parameters as the MoE trains), then Δpost at the shifted layers",
            baseline=True, upcycle="blocks", train="blocks", graft="block_expansion"),
    Variant("layermoe", "DeltaMoE on LayerMoE's per-layer expert counts", baseline=True,
            upcycle="layermoe", train="moe", graft="deltamoe"),
)}
"""Every variant, in the order tables list them."""

BASELINES: tuple[str, ...] = tuple(name for name, v in VARIANTS.items() if v.baseline)
"""The variants ``baselines.variants`` may ask for."""


def get_variant(name: str) -> Variant:
    """The registered variant; a hyphenated spelling (``cpt-dense``) is read as its name."""
    key = name.replace("-", "_")
    if key in RENAMED:
        raise ValueError(f"variant {name!r} is now called {RENAMED[key]!r}")
    try:
        return VARIANTS[key]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}") from None


def graft_target(variant: Variant) -> str:
    """The ``models/`` folder a grafting variant's method writes onto: what ``graft_onto``
    trains, or the variant's own training."""
    onto = VARIANTS[variant.graft_onto] if variant.graft_onto is not None else variant
    if onto.trained is None:
        raise ValueError(f"variant {variant.name!r} has nothing to graft onto")
    return onto.trained
