"""The upcycle stage of a run: dense base → language-allocated MoE in ``models/moe_init``.

Everything comes from the run config: the base model (``models.base``, or the synthetic world's
model), the expert layout, the language allocation (the configured map or the default one), and
for ``allocation.method: layermoe`` the per-layer expert counts measured on held-out text (a
budget below DeltaMoE's, ``allocation.layermoe_budget``, spent where ``allocation.similarity``
finds the languages least alike). The
stage is skipped when its manifest matches; accounting goes to the manifest and MLflow.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from components.config import RunConfig
from components.moe.allocation import (
    language_allocation,
    layer_similarity,
    layermoe_budget,
    layermoe_counts,
    most_similar_layers,
)
from components.moe.upcycle import UpcycleOptions, UpcycleResult, upcycle
from components.storage import Manifest, RunDir, StageBuild, StageDir, fingerprint
from components.tracking import RankZeroLogger

STAGE = "models/moe_init"
BASE_STAGE = "models/base"  # a world run's pre-trained base (world.base_steps > 0)
SIMILARITY_DOCS = 64  # held-out documents per language for LayerMoE's similarity


def base_model_dir(cfg: RunConfig, run_dir: RunDir) -> Path:
    """The dense base: ``models.base`` (a local directory or a hub snapshot), or for a world run
    the base pre-trained on the world's original languages (``models/base``), or the world's
    random model itself when ``world.base_steps`` is 0."""
    if cfg.models is not None:
        path = Path(cfg.models.base).expanduser()
        if path.is_dir():
            return path
        from huggingface_hub import snapshot_download

        token = cfg.models.hf_token.get_secret_value() if cfg.models.hf_token else None
        return Path(snapshot_download(cfg.models.base, revision=cfg.models.revision, token=token,
                                      allow_patterns=["*.json", "*.safetensors", "*.jinja",
                                                      "tokenizer*", "*.txt", "*.model",
                                                      "README.md"]))  # card: licence
    local = run_dir.local_path
    if local is None:
        raise FileNotFoundError("a world run needs a local run directory")
    if cfg.world is not None and cfg.world.base_steps > 0:
        model = local / BASE_STAGE
        if run_dir.stage(BASE_STAGE).read_manifest() is None:
            raise FileNotFoundError(f"{model}: the world's base has not been pre-trained yet "
                                    "(deltamoe run CONFIG --only base)")
        return model
    model = local / "world" / "model"
    if not (model / "config.json").exists():
        raise FileNotFoundError(f"{model}: the world stage has not been built (deltamoe demo)")
    return model


def held_out_texts(cfg: RunConfig, run_dir: RunDir, base: Path) -> dict[str, list[str]]:
    """Held-out text per run language: the world's evaluation text, or the data stage's
    validation split decoded with the base tokenizer."""
    languages = cfg.languages.all
    local = run_dir.local_path
    world_eval = local / "world" / "eval" if local is not None else None
    texts: dict[str, list[str]] = {}
    if cfg.world is not None and world_eval is not None and world_eval.exists():
        for tag in languages:
            path = world_eval / tag / "lm.jsonl"
            if path.exists():
                rows = [json.loads(line) for line in path.read_text().splitlines() if line]
                texts[tag] = [r["text"] for r in rows[:SIMILARITY_DOCS]]
        return texts
    data = run_dir.stage("data")
    validation = f"{data.path}/validation"
    if data.read_manifest() is None:
        raise FileNotFoundError(f"{validation}: LayerMoE allocation needs held-out text; run the "
                                "data stage first (deltamoe data CONFIG)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    table = pq.read_table(validation, columns=["input_ids", "lang"],
                          filesystem=data.fs).to_pydict()
    for ids, tag in zip(table["input_ids"], table["lang"], strict=True):
        if tag in languages and len(texts.setdefault(tag, [])) < SIMILARITY_DOCS:
            texts[tag].append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts


def upcycle_options(cfg: RunConfig, base: Path,
                    texts: dict[str, list[str]] | None = None) -> UpcycleOptions:
    """The upcycler's options for this run (LayerMoE measures similarity on ``texts``)."""
    up, alloc = cfg.upcycle, cfg.upcycle.allocation
    original, new = cfg.languages.original, cfg.languages.new
    common: dict[str, Any] = dict(
        top_k=up.top_k, router_init=up.router_init, router_init_std=up.router_init_std,
        expert_noise_std=up.expert_noise_std, layout=up.layout, seed=cfg.seed,
        seq_len=cfg.data.seq_len, original_languages=tuple(original))
    if alloc.method == "none":
        return UpcycleOptions(num_experts=up.num_experts, **common,
                              layers=None if up.layers == "all" else tuple(up.layers))
    if alloc.method == "language":
        experts, groups = language_allocation(original, new, up.num_experts, alloc.experts,
                                              alloc.groups)
        return UpcycleOptions(num_experts=up.num_experts, allocation=experts, groups=groups,
                              layers=None if up.layers == "all" else tuple(up.layers), **common)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if texts is None:
        raise ValueError("layermoe allocation needs held-out texts")
    missing = sorted((set(original) | set(new)) - set(texts))
    if missing:
        raise FileNotFoundError(f"no held-out text for {', '.join(missing)} (LayerMoE measures "
                                "cross-lingual similarity on every run language)")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    similarity = layer_similarity(model, tokenizer, texts, new, alloc.similarity,
                                  max_length=cfg.data.seq_len)
    layers = len(similarity)
    budget = layermoe_budget(up.num_experts, layers, alloc.layermoe_budget,
                             alloc.total_new_experts)
    counts = [1 + n for n in layermoe_counts(similarity, budget)]
    classifier = most_similar_layers(similarity, min(alloc.classifier_layers, layers))
    experts = {"original": [0], **{tag: list(range(1, max(counts))) for tag in new}}
    groups = {"original": list(original)}
    return UpcycleOptions(experts_per_layer=tuple(counts), classifier_layers=tuple(classifier),
                          allocation=experts, groups=groups,
                          layer_similarity=tuple(similarity), **common)


def stage_fingerprint(cfg: RunConfig, base: Path) -> str:
    """The upcycle section, the languages, the seed and the base model's identity."""
    base_id = (base / "model.safetensors.index.json")
    base_id = base_id if base_id.exists() else base / "model.safetensors"
    stat = base_id.stat() if base_id.exists() else None
    return fingerprint("upcycle", cfg.upcycle.model_dump(mode="json"),
                       cfg.languages.model_dump(mode="json"), cfg.seed, cfg.data.seq_len,
                       str(base.resolve()), stat.st_size if stat else None,
                       stat.st_mtime_ns if stat else None)


def build_upcycled(stage: StageDir, stage_fingerprint: str, base: Path,
                   options: UpcycleOptions | Callable[[], UpcycleOptions], *,
                   refuse_foreign: bool = False) -> tuple[Manifest, UpcycleResult | None,
                                                      UpcycleOptions | None]:
    """Upcycle ``base`` into ``stage`` unless its manifest matches: the one skip-or-build path of
    the run's stage and of ``deltamoe upcycle --model ... --out ...``. ``options`` may be a
    function, so a skipped stage never measures LayerMoE's similarity. Returns (manifest, result,
    options), the last two None when skipped."""
    manifest = stage.read_manifest()
    if manifest is not None and stage.is_complete(stage_fingerprint):
        return manifest, None, None
    chosen = options() if callable(options) else options
    done: list[UpcycleResult] = []

    def build(work: StageBuild) -> None:
        done.append(upcycle(base, work.path, chosen))
        work.extra["upcycle"] = done[0].summary()

    manifest, _ = stage.ensure(stage_fingerprint, build, inputs={"base": str(base)},
                               config=asdict(chosen), refuse_foreign=refuse_foreign)
    return manifest, done[0], chosen


def ensure_upcycled(cfg: RunConfig, run_dir: RunDir, logger: RankZeroLogger | None = None,
                    stage_name: str = STAGE) -> tuple[Manifest, bool]:
    """Build (or skip) the run's upcycled MoE in ``stage_name`` (baselines that upcycle with
    another allocation use their own folder); returns (manifest, built)."""
    base = base_model_dir(cfg, run_dir)
    stage: StageDir = run_dir.stage(stage_name)

    def options() -> UpcycleOptions:
        texts = (held_out_texts(cfg, run_dir, base)
                 if cfg.upcycle.allocation.method == "layermoe" else None)
        return upcycle_options(cfg, base, texts)

    manifest, result, chosen = build_upcycled(stage, stage_fingerprint(cfg, base), base, options)
    if result is None or chosen is None:
        return manifest, False
    if logger is not None:
        log_upcycle(logger, chosen, result, stage, manifest,
                    name=stage_name.rsplit("/", 1)[-1])
    return manifest, True


def ensure_expanded(cfg: RunConfig, run_dir: RunDir, logger: RankZeroLogger | None = None,
                    stage_name: str = "models/blocks_init") -> tuple[Manifest, bool]:
    """Build (or skip) the block-expanded base in ``stage_name``: as many identity blocks as
    make its added parameters closest to what CPT of the run's MoE (``models/moe_init``, with
    ``upcycle.freeze``) trains; both counts go to the manifest and MLflow."""
    from components.block_expansion import (
        block_parameters,
        blocks_to_match,
        expand_blocks,
        moe_trainable_parameters,
    )

    base = base_model_dir(cfg, run_dir)
    moe = run_dir.stage(STAGE).read_manifest()
    local = run_dir.local_path
    if moe is None or local is None:
        raise FileNotFoundError(f"{run_dir.uri}/{STAGE}: block expansion matches the upcycled "
                                "MoE's trainable parameters, which has not been built yet")
    freeze = cfg.upcycle.freeze
    fp = fingerprint("block_expansion", moe.fingerprint, stage_fingerprint(cfg, base))
    stage = run_dir.stage(stage_name)

    def build(work: StageBuild) -> None:
        matched = moe_trainable_parameters(local / STAGE, freeze.anchor_expert, freeze.shared)
        blocks = blocks_to_match(block_parameters(base), matched)
        result = expand_blocks(base, work.path, blocks, matched_parameters=matched)
        work.extra["expansion"] = {k: v for k, v in result.summary().items() if k != "out_dir"}

    manifest, built = stage.ensure(fp, build, inputs={"base": str(base),
                                                      "moe": str(local / STAGE)})
    if built and logger is not None:
        summary = manifest.extra["expansion"]
        logger.log_metrics({"expansion/added_parameters": summary["added_parameters"],
                            "expansion/matched_parameters": summary["matched_parameters"],
                            "expansion/new_blocks": len(summary["new_layers"])}, step=0)
        logger.log_external_model(stage_name.rsplit("/", 1)[-1], stage.uri, manifest,
                                  model_type="hf-causal-lm")
    return manifest, built


def log_upcycle(logger: RankZeroLogger, options: UpcycleOptions, result: UpcycleResult,
                stage: StageDir, manifest: Manifest, name: str = "moe_init") -> None:
    """Accounting as metrics, the plan as params, the allocation as an artifact."""
    logger.log_params({"upcycle": {"model_type": result.model_type, "layout": result.layout,
                                   "experts_per_layer": result.experts_per_layer}})
    logger.log_metrics(result.accounting.metrics("upcycle"), step=0)
    for layer, count in enumerate(result.experts_per_layer):
        logger.log_metrics({"upcycle/experts_per_layer": count}, step=layer)
    for layer, value in enumerate(options.layer_similarity or ()):
        logger.log_metrics({"upcycle/layer_similarity": value}, step=layer)
    logger.log_dict(result.allocation, "allocation.json")
    logger.log_external_model(name, stage.uri, manifest, model_type="hf-causal-lm")
