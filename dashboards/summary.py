"""What the report says about its numbers: cells with their noise, which differences are real,
the headline comparison, the run's configuration and its actual status.

Evaluation rows carry ``stderr`` and ``n`` (:mod:`components.evaluate.results`); with a few dozen
items per language most differences between variants are noise, so the report marks a cell only
when it beats every other variant by more than 1.96 standard errors of the difference, and it
states the headline as a difference with a 95 % interval — never as a ratio of two small
numbers. The interval treats the two variants' scores as independent (√(se₁² + se₂²)): both
were scored on the same items, so a paired interval would be narrower; this one errs on the
side of calling a difference noise.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from components.evaluate.results import LOWER_IS_BETTER, ResultRow, primary_metric

__all__ = ["Z95", "config_summary", "group_mean", "headline", "legend", "marked_best",
           "run_status"]

Z95 = 1.96
METHOD, REFERENCE = "deltamoe", "post"
ASSEMBLY = "evaluate"  # the MLflow stage run that assembles the evaluation, last before the report


def group_mean(rows: Sequence[ResultRow]) -> tuple[float | None, float | None, int]:
    """Mean over languages, its standard error (languages are independent samples:
    √Σse² / k; None when a language has none) and the items behind it."""
    if not rows:
        return None, None, 0
    value = sum(r.value for r in rows) / len(rows)
    known = [r.stderr for r in rows if r.stderr is not None]
    stderr = math.sqrt(sum(s * s for s in known)) / len(rows) if len(known) == len(rows) \
        else None
    return value, stderr, sum(r.n for r in rows)


def _beyond(a: tuple[float, float | None], b: tuple[float, float | None]) -> bool:
    if a[1] is None or b[1] is None:
        return False  # no stderr: nothing can be called beyond noise
    return abs(a[0] - b[0]) > Z95 * math.sqrt(a[1] ** 2 + b[1] ** 2)


def marked_best(cells: Mapping[str, tuple[float, float | None]], metric: str) -> str | None:
    """The variant whose cell is best and beyond noise against every other one, else None
    (ties, overlapping intervals and cells without stderr mark nothing)."""
    if len(cells) < 2:
        return None
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    ranked = sorted(cells.items(), key=lambda kv: -sign * kv[1][0])
    best, value = ranked[0]
    if all(_beyond(value, other) for _, other in ranked[1:]):
        return best
    return None


def headline(results: Mapping[str, Sequence[ResultRow]], original: Sequence[str],
             new: Sequence[str]) -> dict[str, Any] | None:
    """DeltaMoE (else the last variant) against the post-trained model (else the first) on the
    first task's main metric measured for both in the new languages: the difference of the
    expanded-language means with its 95 % interval, and the same on the original languages."""
    names = list(results)
    if len(names) < 2:
        return None
    method = METHOD if METHOD in results else names[-1]
    reference = REFERENCE if REFERENCE in results and REFERENCE != method else \
        next(n for n in names if n != method)
    tasks = sorted({r.task for r in results[method]} & {r.task for r in results[reference]})
    for task in tasks:
        metric = primary_metric(task)
        out: dict[str, Any] = {"task": task, "metric": metric, "method": method,
                               "reference": reference, "lower_is_better": metric in
                               LOWER_IS_BETTER}
        for group, langs in (("new", new), ("original", original)):
            pick = {v: [r for r in results[v] if r.task == task and r.metric == metric
                        and r.lang in langs] for v in (method, reference)}
            (m, ms, mn), (b, bs, bn) = group_mean(pick[method]), group_mean(pick[reference])
            if m is None or b is None:
                out[group] = None
                continue
            diff = m - b
            se = math.sqrt(ms * ms + bs * bs) if ms is not None and bs is not None else None
            better = (diff < 0) if metric in LOWER_IS_BETTER else (diff > 0)
            out[group] = {"method": m, "reference": b, "diff": diff, "stderr": se,
                          "low": None if se is None else diff - Z95 * se,
                          "high": None if se is None else diff + Z95 * se,
                          "n": (mn, bn), "languages": len(pick[method]),
                          "beyond_noise": se is not None and abs(diff) > Z95 * se,
                          "better": better}
        if out.get("new") is not None:
            return out
    return None


def run_status(parent_status: str, stages: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The run's state as its stages tell it. The workflow builds the report as its last stage,
    while the parent MLflow run is still open (it is closed right after), so the parent alone
    would always read RUNNING in a report of a finished run: a run whose stages all finished,
    the evaluation's assembly (the stage before the report) among them, is finished."""
    failed = [s["name"] for s in stages if s["status"] in ("FAILED", "KILLED")]
    running = [s["name"] for s in stages if s["status"] in ("RUNNING", "SCHEDULED")]
    if parent_status in ("FAILED", "KILLED") or failed:
        return {"status": "FAILED", "detail": f"failed: {', '.join(failed) or 'the run'}"}
    if running:
        return {"status": "RUNNING", "detail": f"still running: {', '.join(running)}"}
    if parent_status == "FINISHED" or (parent_status == "RUNNING" and any(
            s["name"] == ASSEMBLY for s in stages)):
        return {"status": "FINISHED", "detail": f"all {len(stages)} stages finished"}
    if not stages:
        return {"status": parent_status, "detail": "no stage has run yet"}
    return {"status": parent_status, "detail": f"{len(stages)} stages finished, the evaluation "
            "not assembled yet"}


def _param(params: Mapping[str, str], key: str) -> Any:
    raw = params.get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (TypeError, ValueError):
        return raw


def config_summary(params: Mapping[str, str], stages: Sequence[Mapping[str, Any]]
                   ) -> list[tuple[str, str]]:
    """(label, value) lines: the model pair, the budget, the MoE and its allocation."""
    base, post = _param(params, "models.base"), _param(params, "models.post")
    if base and post:
        pair = f"{base} + {post}"
    else:
        arch = _param(params, "world.arch") or "?"
        pair = f"synthetic world ({arch}): models/base + models/post"
    steps = _param(params, "train.steps")
    trained = {s["name"]: s.get("tokens") for s in stages if s.get("tokens")}
    tokens = trained.get("cpt_moe") or next(iter(trained.values()), None)
    budget = f"{steps} steps" if steps is not None else "?"
    if tokens:
        budget += f", {int(tokens):,} tokens (cpt_moe)" if "cpt_moe" in trained else \
            f", {int(tokens):,} tokens"
    seq = _param(params, "data.seq_len")
    if seq:
        budget += f", sequences of {seq}"
    prefix = "upcycle.allocation.experts."
    alloc = {k[len(prefix):]: _param(params, k) for k in sorted(params) if k.startswith(prefix)}
    groups = {k.rsplit(".", 1)[-1]: _param(params, k) for k in sorted(params)
              if k.startswith("upcycle.allocation.groups.")}
    experts = _param(params, "upcycle.num_experts")
    top_k = _param(params, "upcycle.top_k")
    method = _param(params, "upcycle.allocation.method")
    moe = f"{experts} experts, top-{top_k}, allocation {method}"
    lines = [("model pair", pair), ("budget", budget), ("MoE", moe)]
    if alloc:
        lines.append(("experts", "; ".join(
            f"{name}{' (' + ', '.join(groups[name]) + ')' if name in groups else ''}: "
            f"{', '.join(map(str, ids))}" for name, ids in alloc.items())))
    graft = _param(params, "graft.method")
    if graft:
        lines.append(("graft", f"{graft}, λ = {_param(params, 'graft.scale')}"))
    baselines = _param(params, "baselines.variants")
    if baselines:
        lines.append(("baselines", ", ".join(baselines)))
    return lines


def legend(names: Sequence[str]) -> list[tuple[str, str]]:
    """(variant, what it is) from the variant registry, for the names the report shows."""
    from components.variants import VARIANTS

    return [(n, VARIANTS[n].help if n in VARIANTS else "not a registered variant")
            for n in names]
