"""The evaluate stage of a run: each model variant on the configured suites, then the tables.

Each variant is evaluated by its own workflow node (a Ray task where the evaluation resources
are) into its own atomic folder ``eval_parts/<variant>/`` (rows, and for an MoE its expert load
per language), skipped when the variant's model manifest and the evaluation settings are
unchanged — so a rerun after a crash, or after one more baseline was built, evaluates only what
is new. The ``eval`` stage is then assembled from the parts: one JSON per variant (the
``{task, lang, metric, value, stderr, n}`` rows), the comparison table, the plots and the routing
analysis (CPT-MoE vs DeltaMoE: the drift the graft causes). MLflow gets a child run per variant
(``eval_<variant>``, tagged ``variant=<name>``) with metrics ``eval/<task>/<metric>/<lang>`` and
``eval/<task>/<metric>/avg_original|avg_new`` (the same keys on every variant's run, and on the
variant's LoggedModel), lm-eval's own outputs under ``lm_eval/``; the final model is registered
with the ``candidate`` alias. The ``evaluate`` child run holds the results table, the plots and
the routing tables, and puts the headline on the parent run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from components.config import RunConfig
from components.evaluate.results import (
    ResultRow,
    comparison_rows,
    language_averages,
    primary_metric,
    read_results,
    write_results,
)
from components.evaluate.results import comparison_table as _table
from components.storage import Manifest, RunDir, StageBuild, fingerprint
from components.tracking import ExpansionTracker, RankZeroLogger

__all__ = ["EVAL_STAGE", "PARTS", "comparison_table", "discover_variants", "ensure_assembled",
           "ensure_evaluated", "ensure_variant_evaluated", "log_variant", "metric_key",
           "read_evaluated", "registered_model_name", "variant_metrics", "variant_model_dir"]

log = logging.getLogger(__name__)

EVAL_STAGE = "eval"
PARTS = "eval_parts"
LMEVAL = "lm_eval"  # lm-eval's own results (and samples) of a variant, beside its rows
CANDIDATE_ALIAS = "candidate"
EVAL_VERSION = 1
ROUTING_BEFORE_AFTER = ("cpt_moe", "deltamoe")
ROUTING_DOCS = 32


def variant_model_dir(cfg: RunConfig, run_dir: RunDir, name: str) -> Path:
    """Where variant ``name``'s model is: the base and post inputs, else ``models/<name>``
    (which must be complete)."""
    from workflows.upcycle_stage import base_model_dir

    if name == "base":
        return base_model_dir(cfg, run_dir)
    if name == "post" and cfg.models is not None:
        return Path(cfg.models.post).expanduser()
    local = run_dir.local_path
    folder = local / "models" / name if local is not None else None
    if folder is None or run_dir.stage(f"models/{name}").read_manifest() is None \
            or not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir.uri}/models/{name}: variant {name!r} has not been "
                                "built yet")
    return folder


def discover_variants(cfg: RunConfig, run_dir: RunDir) -> dict[str, Path]:
    """Every registered variant present in the run: name → model directory, in table order
    (kept by ``evaluation.variants`` when set)."""
    from components.variants import VARIANTS

    found: dict[str, Path] = {}
    for name in VARIANTS:
        try:
            found[name] = variant_model_dir(cfg, run_dir, name)
        except FileNotFoundError:
            continue
    if "post" in found and not found["post"].is_dir():
        del found["post"]  # a hub id: nothing local to evaluate
    wanted = cfg.evaluation.variants
    if wanted is not None:
        missing = [v for v in wanted if v not in found]
        if missing:
            log.warning("evaluation.variants names variants this run does not have yet: %s "
                        "(present: %s)", ", ".join(missing), ", ".join(found) or "none")
        found = {n: p for n, p in found.items() if n in wanted}
    return found


def model_fingerprint(model_dir: Path) -> str:
    """What identifies a model's bytes: its stage manifest (or its world's), else the files'
    names, sizes and modification times."""
    from components.storage import Manifest

    for manifest in (model_dir / "manifest.json", model_dir.parent / "manifest.json"):
        if manifest.is_file():
            try:
                return Manifest.from_json(manifest.read_text()).fingerprint + \
                    ("" if manifest.parent == model_dir else f":{model_dir.name}")
            except (ValueError, KeyError, TypeError):
                continue
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    return fingerprint("files", [(str(p.relative_to(model_dir)), p.stat().st_size,
                                  p.stat().st_mtime_ns) for p in files])


def _world_eval_dir(cfg: RunConfig, run_dir: RunDir) -> Path | None:
    local = run_dir.local_path
    if cfg.world is not None and local is not None and (local / "world" / "eval").is_dir():
        return local / "world" / "eval"
    if cfg.evaluation.data_dir:
        candidate = Path(cfg.evaluation.data_dir).expanduser() / "synthetic"
        if candidate.is_dir():
            return candidate
    return None


def _options(cfg: RunConfig, run_dir: RunDir) -> Any:
    from components.evaluate.runner import EvalOptions

    ev = cfg.evaluation
    world_eval = _world_eval_dir(cfg, run_dir)
    return EvalOptions(
        suites=tuple(ev.suites), batch_size=ev.batch_size, limit=ev.limit,
        num_fewshot=ev.num_fewshot, max_gen_tokens=ev.max_gen_tokens,
        world_eval_dir=str(world_eval) if world_eval else None, data_dir=ev.data_dir,
        original=tuple(cfg.languages.original), seed=cfg.seed, log_samples=ev.log_samples,
        device="cuda" if cfg.resources.use_gpu else None)


def _routing_texts(cfg: RunConfig, run_dir: RunDir, base: Path | None) -> dict[str, list[str]]:
    """Evaluation text per run language: the world's held-out text, the perplexity suite's
    files, or the data stage's validation split."""
    from workflows.upcycle_stage import held_out_texts

    if cfg.evaluation.data_dir and cfg.world is None:
        folder = Path(cfg.evaluation.data_dir).expanduser() / "perplexity"
        texts = {}
        for lang in cfg.languages.all:
            path = folder / f"{lang}.jsonl"
            if path.is_file():
                rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
                texts[lang] = [r["text"] for r in rows[:ROUTING_DOCS]]
        if texts:
            return texts
    if base is None:
        return {}
    try:
        return {k: v[:ROUTING_DOCS] for k, v in held_out_texts(cfg, run_dir, base).items()}
    except (FileNotFoundError, KeyError, ValueError) as err:
        log.info("no evaluation text for the routing analysis: %s", err)
        return {}


def _part_fingerprint(model_dir: Path, cfg: RunConfig, options: Any,
                      texts: Mapping[str, list[str]]) -> tuple[str, dict[str, Any]]:
    settings = {**asdict(options), "languages": cfg.languages.all}
    return fingerprint("evaluate", EVAL_VERSION, model_fingerprint(model_dir), settings,
                       sorted(texts)), settings


def _base_or_none(cfg: RunConfig, run_dir: RunDir) -> Path | None:
    from workflows.upcycle_stage import base_model_dir

    try:
        return base_model_dir(cfg, run_dir)
    except FileNotFoundError:
        return None


def ensure_variant_evaluated(cfg: RunConfig, run_dir: RunDir, name: str,
                             logger: RankZeroLogger | None = None, *,
                             model_dir: Path | None = None) -> tuple[Manifest, bool]:
    """Evaluate variant ``name`` in this process into ``eval_parts/<name>`` (skipped when its
    model and the settings are unchanged); metrics go to ``logger``'s run when built."""
    model_dir = model_dir or variant_model_dir(cfg, run_dir, name)
    options = _options(cfg, run_dir)
    texts = _routing_texts(cfg, run_dir, _base_or_none(cfg, run_dir))
    stage = run_dir.stage(f"{PARTS}/{name}")
    fp, settings = _part_fingerprint(model_dir, cfg, options, texts)
    rows: list[ResultRow] = []
    load: dict[int, dict[str, list[float]]] | None = None

    def build(work: StageBuild) -> None:
        # lm-eval and torch load only for a part that is built, not for one that is skipped
        from components.evaluate.routing import routing_load
        from components.evaluate.runner import (
            evaluate_loaded,
            load_for_eval,
            write_lmeval_outputs,
        )
        from components.evaluate.suites import build_suite_tasks

        nonlocal rows, load
        # every suite's data is checked before the model is loaded
        build_suite_tasks(options.suites, cfg.languages.all,
                          world_eval_dir=options.world_eval_dir, data_dir=options.data_dir,
                          original=list(options.original))
        log.info("evaluating %s (%s)", name, model_dir)
        model, tokenizer = load_for_eval(model_dir, options.device)
        outputs: dict[str, Any] = {}
        rows = evaluate_loaded(model, tokenizer, cfg.languages.all, options, outputs)
        write_lmeval_outputs(outputs, work.path / LMEVAL)
        load = routing_load(model, tokenizer, texts, max_docs=ROUTING_DOCS) if texts else None
        del model
        write_results(work.path / "results.json", name, rows,
                      meta={"model": str(model_dir), "fingerprint": fp})
        if load is not None:
            (work.path / "routing.json").write_text(json.dumps(
                {str(layer): by for layer, by in load.items()}, indent=1) + "\n")
        work.extra["rows"] = len(rows)

    manifest, built = stage.ensure(fp, build, inputs={"model": str(model_dir)}, config=settings)
    if built and run_dir.local_path is not None \
            and Path(model_dir).resolve() == (run_dir.local_path / "models" / name).resolve():
        from components.cards import add_results

        add_results(run_dir.stage(f"models/{name}"), rows)  # model-index on the model's card
    if built and logger is not None:
        log_variant(logger, cfg, run_dir, name, model_dir, fp, rows, load)
    return manifest, built


def _read_load(part: Path) -> dict[int, dict[str, list[float]]] | None:
    path = part / "routing.json"
    if not path.is_file():
        return None
    return {int(k): v for k, v in json.loads(path.read_text()).items()}


def _assemble(cfg: RunConfig, run_dir: RunDir, evaluated: Mapping[str, list[ResultRow]],
              loads: Mapping[str, Any], out: Path) -> dict[str, Any]:
    """Write the eval stage's files into ``out``; returns what MLflow gets."""
    from components.evaluate.plots import (
        plot_drift,
        plot_group_averages,
        plot_language_scores,
        plot_routing,
    )
    from components.evaluate.routing import routing_drift, routing_rows

    original, new = cfg.languages.original, cfg.languages.new
    for name, rows in evaluated.items():
        write_results(out / f"{name}.json", name, rows)
    table = comparison_table(cfg, evaluated)
    (out / "comparison.md").write_text(table + "\n", encoding="utf-8")
    flat = [{"variant": v, **r.to_dict()} for v, rows in evaluated.items() for r in rows]
    (out / "results.json").write_text(json.dumps(flat, indent=1) + "\n", encoding="utf-8")
    plots = out / "plots"
    plots.mkdir()
    pairs = sorted({(r.task, r.metric) for rows in evaluated.values() for r in rows
                    if r.metric == primary_metric(r.task)})
    for task, metric in pairs:
        plot_language_scores(evaluated, task, metric, cfg.languages.all,
                             plots / f"{task}.{metric}.languages.png")
        plot_group_averages(evaluated, task, metric, original, new,
                            plots / f"{task}.{metric}.averages.png")
    routing: list[dict[str, Any]] = []
    drift: dict[str, Any] = {}
    if loads:
        folder = out / "routing"
        folder.mkdir()
        for name, load in loads.items():
            routing += routing_rows(load, name)
            plot_routing(load, f"{name}: expert load per layer and language",
                         folder / f"{name}.png")
        before, after = ROUTING_BEFORE_AFTER
        if before in loads and after in loads:
            drift = routing_drift(loads[before], loads[after])
            plot_drift(drift, f"routing drift {before} → {after} (total variation)",
                       folder / "drift.png")
        (folder / "load.json").write_text(json.dumps(routing, indent=1) + "\n")
        (folder / "drift.json").write_text(json.dumps(
            {str(k): v for k, v in drift.items()}, indent=1) + "\n")
    return {"table": table, "flat": flat, "routing": routing, "drift": drift,
            "comparison": comparison_rows(evaluated, original, new)}


def metric_key(task: str, metric: str, lang: str) -> str:
    """MLflow key of one score: ``eval/<task>/<metric>/<lang>`` (``lang`` also ``avg_original``
    / ``avg_new``). The UI puts the charts of one key prefix in one section, so every language of
    a metric, and its two averages, sit side by side; every variant run uses the same keys, so a
    chart (or the compare view's table) sets the variants against each other."""
    return f"eval/{task}/{metric}/{lang}"


def variant_metrics(cfg: RunConfig, rows: Sequence[ResultRow]) -> dict[str, float]:
    """Every row of one variant, and each (task, metric)'s original/new averages."""
    metrics = {metric_key(r.task, r.metric, r.lang): r.value for r in rows}
    averages = language_averages(rows, cfg.languages.original, cfg.languages.new)
    for (task, metric), groups in averages.items():
        for group, value in groups.items():
            if value is not None:
                metrics[metric_key(task, metric, f"avg_{group}")] = value
    return metrics


def _lineage(cfg: RunConfig, run_dir: RunDir, name: str) -> dict[str, str]:
    """Where variant ``name`` came from: the model pair, what it was trained or grafted onto,
    and the training data (its URI and fingerprint)."""
    from components.variants import VARIANTS, graft_target

    if cfg.models is not None:  # as configured: a hub id stays an id, nothing is fetched
        lineage = {"base": cfg.models.base, "post": cfg.models.post}
    else:  # the world's own pair
        pretrained = cfg.world is not None and cfg.world.base_steps > 0
        lineage = {"base": f"{run_dir.uri}/{'models/base' if pretrained else 'world/model'}",
                   "post": f"{run_dir.uri}/models/post"}
    v = VARIANTS.get(name)
    if v is None or (v.train is None and v.graft is None):
        return lineage
    if v.graft is not None:
        lineage["target"] = f"{run_dir.uri}/models/{graft_target(v)}"
        lineage["method"] = v.graft
    elif v.train == "moe" and v.upcycled:
        lineage["target"] = f"{run_dir.uri}/models/{v.upcycled}"
    elif v.train == "dense":
        lineage["target"] = lineage["base"]
    trained = v.trained or (VARIANTS[v.graft_onto].trained if v.graft_onto else None)
    data = run_dir.stage("data").read_manifest()
    if trained is not None and data is not None:
        lineage["data"] = f"{run_dir.uri}/data (fingerprint {data.fingerprint[:16]})"
    return lineage


def log_variant(logger: RankZeroLogger, cfg: RunConfig, run_dir: RunDir, name: str,
                model_dir: Path, fp: str, rows: Sequence[ResultRow], load: Any) -> None:
    """The variant's run: its scores under the keys every variant shares (also on its
    LoggedModel, with its lineage), its router load, lm-eval's own outputs; the run's final
    model is registered with the ``candidate`` alias."""
    logger.set_tags({"variant": name})
    logger.log_params({"variant": name, "model": str(model_dir), "eval_fingerprint": fp})
    uri = model_dir.resolve().as_uri()
    model_id = logger.variant_model(name, uri, _lineage(cfg, run_dir, name))
    logger.log_metrics(variant_metrics(cfg, rows), step=0, model_id=model_id)
    if load:
        logger.log_metrics({f"router/load/{layer}/{e}/{lang}": share
                            for layer, by in load.items() for lang, row in by.items()
                            for e, share in enumerate(row)}, step=0)
    part = Path(run_dir.stage(f"{PARTS}/{name}").path)
    if (part / LMEVAL).is_dir() and logger.is_rank_zero:
        logger.client.log_artifacts(logger.run_id, str(part / LMEVAL), LMEVAL)
    if name == cfg.graft.method and model_id is not None:
        version = logger.register_model(registered_model_name(cfg), model_id, uri,
                                        CANDIDATE_ALIAS)
        log.info("registered %s version %s as %r", registered_model_name(cfg), version,
                 CANDIDATE_ALIAS)


def registered_model_name(cfg: RunConfig) -> str:
    """The Model Registry entry of a run's final model: ``<run_name>-<graft method>``."""
    return f"{cfg.run_name}-{cfg.graft.method}"


def read_evaluated(run_dir: RunDir, variants: Sequence[str]) -> dict[str, list[ResultRow]]:
    """Rows of each of ``variants`` whose evaluation part is complete, in that order."""
    out: dict[str, list[ResultRow]] = {}
    for name in variants:
        part = run_dir.stage(f"{PARTS}/{name}")
        if part.read_manifest() is not None:
            out[name] = read_results(Path(part.path) / "results.json")
    return out


def ensure_assembled(cfg: RunConfig, run_dir: RunDir, variants: Sequence[str],
                     logger: RankZeroLogger | None = None) -> tuple[Manifest, bool]:
    """The ``eval`` stage from the parts of ``variants`` and of every other variant already
    evaluated with these settings (``--variant post`` must not drop the others)."""
    from workflows.plan import evaluated_variants

    missing = [v for v in variants if run_dir.stage(f"{PARTS}/{v}").read_manifest() is None]
    if missing:
        raise FileNotFoundError(f"{run_dir.uri}/{PARTS}: not evaluated yet: {', '.join(missing)}")
    options = _options(cfg, run_dir)
    texts = _routing_texts(cfg, run_dir, _base_or_none(cfg, run_dir))
    unfiltered = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(
        update={"variants": None})})
    others = []
    for name, model_dir in discover_variants(unfiltered, run_dir).items():
        fp, _ = _part_fingerprint(model_dir, cfg, options, texts)
        if name not in variants and run_dir.stage(f"{PARTS}/{name}").is_complete(fp):
            others.append(name)  # its model and these settings: still its scores
    order = evaluated_variants(unfiltered, [*variants, *others])
    evaluated = read_evaluated(run_dir, order)
    manifests = {name: run_dir.stage(f"{PARTS}/{name}").read_manifest() for name in evaluated}
    fps = {name: m.fingerprint for name, m in manifests.items() if m is not None}
    loads = {name: load for name in evaluated
             if (load := _read_load(Path(run_dir.stage(f"{PARTS}/{name}").path))) is not None}
    stage = run_dir.stage(EVAL_STAGE)
    stage_fp = fingerprint("eval-stage", EVAL_VERSION, fps, cfg.languages.model_dump())
    summary: dict[str, Any] = {}

    def build(work: StageBuild) -> None:
        summary.update(_assemble(cfg, run_dir, evaluated, loads, work.path))
        work.extra["variants"] = list(evaluated)
        work.extra["comparison"] = summary["comparison"]

    manifest, built = stage.ensure(stage_fp, build, inputs={"variants": list(evaluated)},
                                   config={"fingerprints": fps})
    if built and logger is not None:
        _log_stage(logger, cfg, Path(stage.path), summary)
    return manifest, built


def ensure_evaluated(cfg: RunConfig, run_dir: RunDir, variants: Mapping[str, Path] | None = None,
                     tracker: ExpansionTracker | None = None) -> dict[str, list[ResultRow]]:
    """Evaluate every variant present in the run (or ``variants``) in this process, then
    assemble ``eval/``; variant → rows. For libraries and tests: the workflow runs each variant
    as its own node instead."""
    chosen = dict(variants) if variants is not None else discover_variants(cfg, run_dir)
    if not chosen:
        raise FileNotFoundError(f"{run_dir.uri}: no model variant to evaluate yet (models/ has "
                                "none with a manifest, and no base model is configured)")
    for name, model_dir in chosen.items():
        if tracker is None:
            ensure_variant_evaluated(cfg, run_dir, name, model_dir=Path(model_dir))
            continue
        with tracker.stage(f"eval_{name}") as logger:
            ensure_variant_evaluated(cfg, run_dir, name, logger, model_dir=Path(model_dir))
    if tracker is None:
        ensure_assembled(cfg, run_dir, list(chosen))
    else:
        with tracker.stage("evaluate") as logger:
            ensure_assembled(cfg, run_dir, list(chosen), logger)
    manifest = run_dir.stage(EVAL_STAGE).read_manifest()
    assert manifest is not None
    return read_evaluated(run_dir, manifest.extra["variants"])


def _log_stage(logger: RankZeroLogger, cfg: RunConfig, folder: Path,
               summary: Mapping[str, Any]) -> None:
    import pandas as pd

    client = logger.client
    client.log_table(logger.run_id, data=pd.DataFrame(summary["flat"]),
                     artifact_file="eval/results.json")
    if summary["routing"]:
        client.log_table(logger.run_id, data=pd.DataFrame(summary["routing"]),
                         artifact_file="eval/routing_load.json")
    client.log_text(logger.run_id, summary["table"], "eval/comparison.md")
    client.log_artifacts(logger.run_id, str(folder / "plots"), "eval/plots")
    if (folder / "routing").is_dir():
        client.log_artifacts(logger.run_id, str(folder / "routing"), "eval/routing")
    logger.log_parent_summary(*_headline(cfg, summary["comparison"], summary["table"]))


def _headline(cfg: RunConfig, comparison: Sequence[Mapping[str, Any]], table: str
              ) -> tuple[dict[str, float], str]:
    """The parent run's summary: the final model's original/new averages of each task's main
    metric (``summary/<task>/<metric>/avg_<group>``) and their change from the post-trained
    model (``…/avg_<group>_vs_post``); its description says what was expanded, with the
    table. (Each variant's own run has its averages under keys all variants share.)"""
    final, cells = cfg.graft.method, {(r["variant"], r["task"], r["metric"]): r
                                      for r in comparison}
    metrics: dict[str, float] = {}
    for (variant, task, metric), row in cells.items():
        if variant != final:
            continue
        post = cells.get(("post", task, metric), {})
        for group in ("original", "new"):
            if row[group] is None:
                continue
            metrics[f"summary/{task}/{metric}/avg_{group}"] = row[group]
            if post.get(group) is not None:
                metrics[f"summary/{task}/{metric}/avg_{group}_vs_post"] = \
                    row[group] - post[group]
    pair = f"`{cfg.models.base}` + `{cfg.models.post}`" if cfg.models is not None \
        else "the synthetic world's base and post-trained pair"
    description = (f"**{cfg.run_name}**: {pair} expanded from "
                   f"{', '.join(cfg.languages.original)} to {', '.join(cfg.languages.new)} "
                   f"with {final} ({cfg.upcycle.num_experts} experts, "
                   f"{cfg.train.steps} CPT steps). Averages of each task's main metric over the "
                   f"original and the new languages:\n\n{table}\n")
    return metrics, description


def comparison_table(cfg: RunConfig, evaluated: Mapping[str, Sequence[ResultRow]]) -> str:
    """Markdown: variants × original/expanded averages of each task's main metric."""
    return _table(evaluated, cfg.languages.original, cfg.languages.new)
