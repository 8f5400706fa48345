"""The training stages of a run: CPT of the MoE and of the dense baselines, and the world's pair.

``ensure_trained(cfg, run_dir, variant)`` trains what a variant of
:data:`components.variants.VARIANTS` trains, into ``models/<variant.trained>``:

* an MoE variant (``cpt_moe``, ``moe_unfrozen``, ``layermoe``) trains its upcycled MoE
  (``models/moe_init`` or ``models/moe_init_<variant>``) on the data stage's parquet;
* ``block_expansion`` trains the new blocks of the block-expanded base (``models/blocks_init``)
  on the same data and budget, every other weight frozen;
* a dense one (``cpt_dense``) trains the base on the same data, everything trainable;
  ``flops_matched`` does so with the token budget scaled by the MoE's active-FLOPs ratio
  (``extra.upcycle.active_ratio`` of the moe_init manifest).

``ensure_base`` pre-trains the world's random model on the ``base_data`` stage into
``models/base``; ``ensure_post`` fine-tunes the base on the world's instruction data of the
original languages into ``models/post`` (SFT rows built into ``sft_data``). Every one is
skipped when its manifest fingerprint matches; checkpoints live in ``checkpoints/<variant>/
<fingerprint>``, so a killed run resumes on the next call and a changed config starts afresh.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from components.config import RunConfig
from components.storage import Manifest, RunDir, StageBuild, StageDir, fingerprint
from components.tracking import RankZeroLogger
from components.train import Resources, TrainResult, TrainSpec, train_model
from components.train.spec import Mode, TrainError
from components.variants import VARIANTS, get_variant

log = logging.getLogger(__name__)

TRAINING_VARIANTS = tuple(name for name, v in VARIANTS.items() if v.train is not None)
WORLD_MODEL = "world/model"


def resources(cfg: RunConfig) -> Resources:
    """Ray Train's workers: sizes from ``resources``, custom resources from
    ``resources.stages.train`` (so the workers land where the training nodes are)."""
    r = cfg.resources
    return Resources(num_workers=r.num_workers, use_gpu=r.use_gpu,
                     cpus_per_worker=r.cpus_per_worker, gpus_per_worker=r.gpus_per_worker,
                     backend=r.backend, launcher=r.launcher,
                     worker_resources=dict(r.stages.train.resources))


def _local(run_dir: RunDir) -> Path:
    local = run_dir.local_path
    if local is None:
        raise TrainError(f"{run_dir.uri}: training needs a local (or mounted) run directory for "
                         "its checkpoints and data")
    return local


def _parquet(stage: StageDir, what: str) -> tuple[list[str], list[str], str]:
    """Train and validation parquet files of a data stage, and its manifest fingerprint."""
    manifest = stage.read_manifest()
    if manifest is None:
        raise FileNotFoundError(f"{stage.uri}: the {what} stage has not been built yet")
    root = Path(stage.path)
    train = sorted(str(p) for p in (root / "train").glob("*.parquet"))
    validation = sorted(str(p) for p in (root / "validation").glob("*.parquet"))
    if not train:
        raise FileNotFoundError(f"{root / 'train'}: no parquet files")
    return train, validation, manifest.fingerprint


def _model_identity(path: Path) -> Any:
    manifest = StageDir(str(path)).read_manifest()
    if manifest is not None:
        return manifest.fingerprint
    index = path / "model.safetensors.index.json"
    index = index if index.exists() else path / "model.safetensors"
    stat = index.stat() if index.exists() else None
    return [str(path.resolve()), stat.st_size if stat else None,
            stat.st_mtime_ns if stat else None]


def _train(cfg: RunConfig, run_dir: RunDir, name: str, init: Path, data: tuple[list[str],
           list[str], str], mode: Mode, logger: RankZeroLogger | None, *,
           steps: int | None = None, tokens: int | None = None,
           extra: dict[str, Any] | None = None,
           train_layers: tuple[int, ...] | None = None) -> tuple[Manifest, bool]:
    """Train ``init`` into ``models/<name>`` (skipped when the manifest matches); with
    ``train_layers`` only those decoder layers train."""
    local = _local(run_dir)
    train_paths, validation_paths, data_fp = data
    res = resources(cfg)
    freeze = cfg.upcycle.freeze
    fp = fingerprint("train", name, mode, cfg.train.model_dump(mode="json"), res.world_size,
                     cfg.seed, steps, tokens, _model_identity(init), data_fp,
                     freeze.model_dump(mode="json") if mode == "cpt_moe" else None,
                     *(() if train_layers is None else (list(train_layers),)))
    stage = run_dir.stage(f"models/{name}")

    def build(work: StageBuild) -> None:
        spec = TrainSpec(
            init_dir=str(init), out_dir=str(work.path), train_paths=train_paths,
            validation_paths=validation_paths, mode=mode, train=cfg.train,
            checkpoint_root=str(local / "checkpoints" / name), run_name=fp[:16],
            resources=res, tracking_uri=logger.tracking_uri if logger else None,
            mlflow_run_id=logger.run_id if logger else None, steps=steps, tokens=tokens,
            seed=cfg.seed, freeze_anchor=freeze.anchor_expert, freeze_shared=freeze.shared,
            train_layers=train_layers)
        result: TrainResult = train_model(spec)
        work.extra["train"] = {"steps": result.steps, "tokens": result.tokens,
                               "seconds": round(result.seconds, 2), "metrics": result.metrics,
                               "attempts": result.attempts, "resumed_from": result.resumed_from,
                               "counts": result.counts, **(extra or {})}

    manifest, built = stage.ensure(
        fp, build, inputs={"init": str(init), "train": train_paths,
                           "validation": validation_paths},
        config={"train": cfg.train.model_dump(mode="json"), "mode": mode, "steps": steps,
                "tokens": tokens})
    if built and logger is not None:
        logger.log_external_model(name, stage.uri, manifest, model_type="hf-causal-lm")
    return manifest, built


def ensure_trained(cfg: RunConfig, run_dir: RunDir, variant: str,
                   logger: RankZeroLogger | None = None) -> tuple[Manifest, bool]:
    """Train (or skip) what ``variant`` trains (one of :data:`TRAINING_VARIANTS`)."""
    from workflows.upcycle_stage import STAGE as MOE_INIT
    from workflows.upcycle_stage import base_model_dir

    v = get_variant(variant)
    if v.trained is None:
        raise ValueError(f"variant {variant!r} trains nothing; training variants: "
                         f"{', '.join(TRAINING_VARIANTS)}")
    local = _local(run_dir)
    data = _parquet(run_dir.stage("data"), "data")
    if v.train in ("moe", "blocks"):
        stage = f"models/{v.upcycled}"
        if run_dir.stage(stage).read_manifest() is None:
            raise FileNotFoundError(f"{local / stage}: the upcycled model has not been built "
                                    "yet (deltamoe upcycle CONFIG)")
        if v.train == "blocks":
            from components.block_expansion import new_layers

            return _train(cfg, run_dir, v.trained, local / stage, data, "dense", logger,
                          train_layers=new_layers(local / stage))
        return _train(cfg, run_dir, v.trained, local / stage, data, "cpt_moe", logger)
    base = base_model_dir(cfg, run_dir)
    if v.tokens != "flops_matched":
        return _train(cfg, run_dir, v.trained, base, data, "dense", logger)
    upcycled = run_dir.stage(MOE_INIT).read_manifest()
    if upcycled is None or "upcycle" not in upcycled.extra:
        raise FileNotFoundError(f"{local / MOE_INIT}: the FLOPs-matched baseline needs the "
                                "upcycle stage's accounting (active_ratio)")
    ratio = float(upcycled.extra["upcycle"]["active_ratio"])
    seq_len = _seq_len(data[0])
    tokens = int(cfg.train.steps * cfg.train.micro_batch_size * cfg.train.grad_accum
                 * resources(cfg).world_size * seq_len * ratio)
    return _train(cfg, run_dir, v.trained, base, data, "dense", logger, tokens=tokens,
                  extra={"active_ratio": ratio})


def _seq_len(paths: list[str]) -> int:
    from components.train.data import scan

    return scan(paths)[2]


def ensure_base(cfg: RunConfig, run_dir: RunDir,
                logger: RankZeroLogger | None = None) -> tuple[Manifest, bool]:
    """Pre-train the world's random model on the base_data stage into ``models/base``."""
    if cfg.world is None or cfg.world.base_steps <= 0:
        raise ValueError("ensure_base needs a world section with base_steps > 0")
    init = _local(run_dir) / WORLD_MODEL
    if not (init / "config.json").exists():
        raise FileNotFoundError(f"{init}: the world stage has not been built (deltamoe demo)")
    data = _parquet(run_dir.stage("base_data"), "base_data")
    pretrain = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"lr": cfg.world.base_lr})})
    return _train(pretrain, run_dir, "base", init, data, "pretrain", logger,
                  steps=cfg.world.base_steps)


def ensure_sft_data(cfg: RunConfig, run_dir: RunDir, base: Path) -> tuple[list[str], list[str],
                                                                           str]:
    """SFT rows from the world's instructions of the original languages, in ``sft_data``."""
    from transformers import AutoTokenizer

    from components.train.sft import build_sft_parquet

    world = _local(run_dir) / "world"
    files = [world / "instructions" / tag / "train.jsonl" for tag in cfg.languages.original]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"no instruction data: {', '.join(missing)}")
    stage = run_dir.stage("sft_data")
    fp = fingerprint("sft-data", [str(f) for f in files], [f.stat().st_size for f in files],
                     cfg.data.seq_len, _model_identity(base))

    def build(work: StageBuild) -> None:
        tokenizer = AutoTokenizer.from_pretrained(base)
        work.extra["rows"] = build_sft_parquet(tokenizer, files, work.path, cfg.data.seq_len)

    stage.ensure(fp, build, inputs={"instructions": [str(f) for f in files]})
    return _parquet(stage, "sft_data")


def ensure_post(cfg: RunConfig, run_dir: RunDir,
                logger: RankZeroLogger | None = None) -> tuple[Manifest, bool]:
    """Supervised fine-tuning of the base on the original languages' instructions into
    ``models/post`` (loss on response tokens only)."""
    from workflows.upcycle_stage import base_model_dir

    if cfg.world is None:
        raise ValueError("ensure_post makes the synthetic world's post-trained model; this run "
                         "has no world section (its post model is models.post)")
    base = base_model_dir(cfg, run_dir)
    data = ensure_sft_data(cfg, run_dir, base)
    sft = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": cfg.world.post_lr})})
    return _train(sft, run_dir, "post", base, data, "sft", logger, steps=cfg.world.post_steps)
