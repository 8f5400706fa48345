"""The comparison plan: gates on cells, the plan file's errors, paired rows from lm-eval samples."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from components.config import ConfigError
from components.evaluate.gates import ComparisonPlan, load_plan
from workflows.cli import REPRODUCE_CONFIG
from workflows.comparison import (
    collect_items,
    gate_rows,
    gates_table,
    headline_row,
    headline_text,
    paired_rows,
    paired_table,
)

GROUPS = {"original": ["eng_Latn"], "new": ["swh_Latn", "rus_Cyrl"]}
PLAN = {
    "gates": [
        {"name": "post_follows", "why": "post follows", "measure":
         "post/synthetic_openbook/exact_match/original", "min": 0.85},
        {"name": "post_lacks_new", "why": "room to add", "measure":
         "post/synthetic_openbook/exact_match/new",
         "max": {"factor": 0.5, "of": "post/synthetic_openbook/exact_match/original"}},
        {"name": "in_range", "why": "not at floor", "measure":
         "param_delta/synthetic_openbook/exact_match/new", "min": 0.2, "max": 0.8},
    ],
    "headline": {"metric": "synthetic_openbook/exact_match/new"},
    "baselines": ["param_delta"],
    "metrics": ["synthetic_openbook/exact_match/new", "synthetic_lm/bits_per_byte/new"],
    "bootstrap": {"iters": 300},
}


def test_gates_on_cells_pass_fail_and_missing() -> None:
    plan = ComparisonPlan.model_validate(PLAN)
    cells = {("post", "synthetic_openbook", "exact_match", "original"): 0.9,
             ("post", "synthetic_openbook", "exact_match", "new"): 0.5,
             ("param_delta", "synthetic_openbook", "exact_match", "new"): 0.3}
    results = plan.check(cells)
    assert [r.passed for r in results] == [True, False, True]
    assert results[1].high == pytest.approx(0.45)  # 0.5 × 0.9, a bound from another cell
    assert results[1].gate.rule() == "≤ 0.5 × post/synthetic_openbook/exact_match/original"
    # a gate whose cell was never measured fails: it cannot pass unseen
    missing = plan.check({})
    assert not any(r.passed for r in missing) and math.isnan(missing[0].value)
    per_seed = [cells, {**cells, ("post", "synthetic_openbook", "exact_match", "new"): 0.1}]
    rows = gate_rows(plan, cells, per_seed)
    assert [passing for _, passing in rows] == [2, 1, 2]
    table = gates_table(rows, 2)
    assert "| post_lacks_new |" in table and "**FAIL**" in table and "1/2" in table


def test_committed_plan_loads_and_bad_plans_name_the_key(tmp_path: Path) -> None:
    plan = load_plan(REPRODUCE_CONFIG.with_suffix(".gates.yaml"))
    assert plan.headline.against == "param_delta" and len(plan.gates) >= 6
    bad = tmp_path / "p.gates.yaml"
    bad.write_text("gates:\n  - name: g\n    why: w\n    measure: post/openbook/original\n"
                   "    min: 1\nheadline: {metric: a/b/new}\nbaselines: [x]\nmetrics: [a/b/new]\n"
                   "typo: 1\n")
    with pytest.raises(ConfigError) as err:
        load_plan(bad)
    text = str(err.value)
    assert "gates.0.measure" in text and "variant/task/metric/group" in text
    assert ":9: typo" in text  # the unknown key with its line
    bad.write_text("gates:\n  - {name: g, why: w, measure: a/b/c/new}\n"
                   "headline: {metric: a/b/new}\nbaselines: [x]\nmetrics: [a/b/new]\n")
    with pytest.raises(ConfigError, match="give min, max or both"):
        load_plan(bad)


def _write(root: Path, variant: str, task: str, lang: str, rows: list[dict]) -> None:
    folder = root / "eval_parts" / variant / "lm_eval" / "samples_generated"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{task}_{lang}.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_paired_rows_from_samples_of_three_seeds(tmp_path: Path) -> None:
    plan = ComparisonPlan.model_validate(PLAN)
    rng = np.random.default_rng(0)
    seeds = []
    for seed in range(3):
        root = tmp_path / f"seed{seed}"
        for lang in GROUPS["new"]:
            b = rng.integers(0, 2, 100)
            a = np.maximum(b, rng.integers(0, 2, 100) * (rng.random(100) < 0.4))
            for variant, hits in (("deltamoe", a), ("param_delta", b)):
                _write(root, variant, "synthetic_openbook", lang,
                       [{"doc_id": i, "exact_match": float(h)} for i, h in enumerate(hits)])
                # bits per byte: deltamoe spends 10 % more bits on the same bytes
                scale = 1.1 if variant == "deltamoe" else 1.0
                _write(root, variant, "synthetic_lm", lang,
                       [{"doc_id": i, "bits_per_byte": [-math.log(2) * 50 * scale, 100]}
                        for i in range(20)])
        seeds.append(collect_items(root, ["deltamoe", "param_delta"], plan.metrics, GROUPS))
    rows = paired_rows(seeds, plan, GROUPS)
    assert [(r.metric, r.baseline) for r in rows] == [
        ("synthetic_openbook/exact_match/new", "param_delta"),
        ("synthetic_lm/bits_per_byte/new", "param_delta")]
    em, bpb = rows
    assert all(d > 0 for d in em.per_seed) and em.wins == (3, 3)
    assert em.bootstrap.low > 0 and em.favours_variant() is True
    assert em.mcnemar is not None and len(em.mcnemar) == 3
    assert all(m.b_only == 0 and m.a_only > 0 and m.p_value < 0.05 for m in em.mcnemar)
    # bits per byte: 0.55 − 0.5 on every item of every seed; lower is better, so it loses
    assert bpb.per_seed == pytest.approx([0.05] * 3)
    assert bpb.wins == (0, 3) and bpb.mcnemar is None and bpb.favours_variant() is False
    head = headline_row(rows, plan)
    assert head is em
    assert "Not read" in headline_text(head, plan, certified=False)
    assert "Not read" not in headline_text(head, plan, certified=True)
    table = paired_table(rows, "deltamoe")
    assert "| synthetic_lm/bits_per_byte/new | param_delta | +0.050, +0.050, +0.050 |" in table


def test_a_seed_without_items_gives_no_partial_row(tmp_path: Path) -> None:
    plan = ComparisonPlan.model_validate(PLAN)
    root = tmp_path / "s0"
    for variant in ("deltamoe", "param_delta"):
        _write(root, variant, "synthetic_openbook", "swh_Latn",
               [{"doc_id": 0, "exact_match": 1.0}])
    one = collect_items(root, ["deltamoe", "param_delta"], plan.metrics, GROUPS)
    empty = collect_items(tmp_path / "nothing", ["deltamoe", "param_delta"], plan.metrics,
                          GROUPS)
    assert paired_rows([one, empty], plan, GROUPS) == []
    assert headline_row([], plan) is None
