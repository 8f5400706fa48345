"""The data stage of a run: ``data/`` (continued pre-training data) and, for a synthetic-world
run, ``base_data/`` (the world's base text, to pre-train the world's tiny base).

Both call :func:`components.data.prepare_data` inside ``StageDir.build``, so a failed or killed
run leaves no folder that looks complete, and both are skipped when their fingerprint (the data
section, the languages, the seed, the tokenizer's bytes and the source files' names and sizes)
matches the manifest. Statistics go to the manifest, ``stats.json`` and MLflow (metrics
``data/...`` and a per-language table).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from components.config import (
    DataConfig,
    DataSource,
    FiltersConfig,
    FilterThresholds,
    MixConfig,
    RunConfig,
)
from components.data import DataResult, prepare_data
from components.data.readers import resolve_source
from components.storage import Manifest, RunDir, StageBuild, StageDir, fingerprint
from components.tracking import RankZeroLogger

log = logging.getLogger(__name__)

STAGE = "data"
BASE_STAGE = "base_data"


def tokenizer_dir(cfg: RunConfig, run_dir: RunDir) -> Path:
    """``data.tokenizer``, else the base model's directory (its tokenizer files)."""
    if cfg.data.tokenizer:
        return Path(cfg.data.tokenizer).expanduser()
    from workflows.upcycle_stage import base_model_dir

    return base_model_dir(cfg, run_dir)


def _tokenizer_identity(path: Path) -> str:
    """Digest of the tokenizer's files: a retrained tokenizer must not reuse old shards."""
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        file = path / name
        if file.exists():
            digest.update(name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def _sources_identity(data: DataConfig, languages: list[str], run_dir: RunDir) -> list[Any]:
    """Name, size and version (content tag or modification time) of every input file: cheap,
    and a changed corpus means new shards."""
    local = str(run_dir.local_path) if run_dir.local_path is not None else run_dir.uri
    return [[source.name, resolve_source(source, languages, local).versions()]
            for source in data.sources]


def _fingerprint(cfg: RunConfig, run_dir: RunDir, languages: list[str], tokenizer: Path) -> str:
    data = cfg.data
    # `actors` only changes how fast the same shards are made
    return fingerprint("data", data.model_dump(mode="json", exclude={"actors"}), languages,
                       list(cfg.languages.original), cfg.seed, _tokenizer_identity(tokenizer),
                       _sources_identity(data, languages, run_dir))


def complete_data_manifest(cfg: RunConfig, run_dir: RunDir) -> Manifest | None:
    """The manifest of ``data/`` when it is complete for ``cfg`` (checked without Ray: file
    listings, sizes and the tokenizer's bytes), else ``None`` — so a rerun of a finished stage
    returns in a second instead of starting Ray first."""
    try:
        tokenizer = tokenizer_dir(cfg, run_dir)
        fp = _fingerprint(cfg, run_dir, cfg.languages.all, tokenizer)
    except (OSError, ValueError):  # anything off: let the real stage say what it is
        return None
    stage = run_dir.stage(STAGE)
    return stage.read_manifest() if stage.is_complete(fp) else None


def _ensure(cfg: RunConfig, run_dir: RunDir, stage_name: str, languages: list[str],
            tokenizer: Path, logger: RankZeroLogger | None) -> tuple[Manifest, bool]:
    from components.data.tokenize import load_tokenizer

    load_tokenizer(tokenizer)  # a missing or EOS-less tokenizer is named before anything else
    stage: StageDir = run_dir.stage(stage_name)
    data = cfg.data
    local = str(run_dir.local_path) if run_dir.local_path is not None else None
    fp = _fingerprint(cfg, run_dir, languages, tokenizer)
    results: list[DataResult] = []

    def build(work: StageBuild) -> None:
        results.append(prepare_data(data, languages, cfg.languages.original, tokenizer,
                                    work.uri, run_dir=local, seed=cfg.seed,
                                    storage_options=cfg.storage.storage_options,
                                    final_dir=stage.uri))
        work.extra["data"] = {k: v for k, v in results[0].to_dict().items() if k != "files"}

    manifest, built = stage.ensure(fp, build, inputs={"tokenizer": str(tokenizer)},
                                   config=data.model_dump(mode="json"))
    if built:
        if logger is not None:
            log_data(logger, results[0])
        _print_summary(results[0])
    return manifest, built


def log_data(logger: RankZeroLogger, result: DataResult) -> None:
    """Statistics as ``data/...`` metrics, the per-language table and the full stats."""
    logger.log_metrics(result.metrics(), step=0)
    logger.log_dict(result.to_dict(), "data/stats.json")
    if result.warnings:  # e.g. most kept tokens in no shard: visible on the run's page
        logger.set_tags({"data.warnings": " | ".join(result.warnings)})
    if logger.is_rank_zero:
        import pandas as pd

        logger.client.log_table(logger.run_id, data=pd.DataFrame(result.table()),
                                artifact_file="data/languages.json")


def _print_summary(result: DataResult) -> None:
    for lang in result.languages:
        log.info("data %s: %d → %d documents, %d train + %d validation tokens (share %.3f, "
                 "asked %.3f)", lang, result.documents_in.get(lang, 0),
                 result.documents_out.get(lang, 0), result.tokens_train.get(lang, 0),
                 result.tokens_validation.get(lang, 0), result.share_realized.get(lang, 0.0),
                 result.share_requested.get(lang, 0.0))


def ensure_data(cfg: RunConfig, run_dir: RunDir,
                logger: RankZeroLogger | None = None) -> tuple[Manifest, bool]:
    """Build (or skip) ``data/``: every run language, mixed as ``data.mix`` asks."""
    languages = cfg.languages.all
    return _ensure(cfg, run_dir, STAGE, languages, tokenizer_dir(cfg, run_dir), logger)


def ensure_base_data(cfg: RunConfig, run_dir: RunDir,
                     logger: RankZeroLogger | None = None) -> tuple[Manifest, bool]:
    """Build (or skip) ``base_data/``: the world's base text (``world/corpora/base``, not the
    CPT corpora) in every run language, the new ones at ``world.new_language_share`` of the
    tokens, tokenized with the world model's tokenizer, for pre-training the world's tiny base
    from scratch. The world's text is generated clean, so no filter or dedup runs on it."""
    local = run_dir.local_path
    if local is None or not (local / "world" / "model" / "config.json").exists():
        raise FileNotFoundError(f"{run_dir.uri}/world/model: the world stage has not been "
                                "built (deltamoe run CONFIG --only world)")
    share = cfg.world.new_language_share if cfg.world is not None else 0.0
    languages = list(cfg.languages.original) + (list(cfg.languages.new) if share > 0 else [])
    source = DataSource(name="world-base", format="fineweb2",
                        path=str(local / "world" / "corpora" / "base" / "fineweb2"))
    off = FilterThresholds(min_chars=None, max_chars=None, max_duplicate_line_fraction=None,
                           max_non_alpha_fraction=None)
    data = cfg.data.model_copy(update={
        "sources": [source], "lid": cfg.data.lid.model_copy(update={"backend": "source"}),
        "filters": FiltersConfig(**off.model_dump()),
        "dedup": cfg.data.dedup.model_copy(update={"exact": False, "minhash": False}),
        "mix": MixConfig(replay_ratio=1.0 - share if share > 0 else 0.1)})
    return _ensure(cfg.model_copy(update={"data": data}), run_dir, BASE_STAGE, languages,
                   local / "world" / "model", logger)
