"""The reduced reproduction (one seed, tiny budgets) runs every variant of the comparison end to
end and writes numbers for each: the table in the run folder, in MLflow and on the results
page. The full three-seed run is `deltamoe reproduce` outside CI (benchmarks/results/)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from mlflow import MlflowClient

from components.config import load_config
from components.evaluate.gates import load_plan
from workflows.cli import REPRODUCE_CONFIG
from workflows.reproduce import run_reproduce

VARIANTS = {"base", "post", "cpt_dense", "param_delta", "flops_matched", "cpt_moe", "deltamoe",
            "moe_unfrozen", "block_expansion", "layermoe"}
REDUCED = {
    "world.num_people": 16, "world.eval_people": 4, "world.new_fact_people": 4,
    "world.bios_per_person": 4, "world.openbook_people": 4, "world.openbook_train_people": 8,
    "world.background_people": 10, "world.heldout_docs": 8, "world.docs_per_language": 40,
    "world.vocab_size": 600, "world.model_hidden_size": 32, "world.model_layers": 2,
    "world.model_intermediate_size": 64, "world.base_steps": 20, "world.post_steps": 10,
    "data.seq_len": 64, "train.review.steps": 4,
    "train.steps": 8, "train.micro_batch_size": 4, "train.warmup_steps": 2,
    "train.checkpoint_every": 8, "evaluation.limit": 8, "resources.launcher": "inline",
}


def test_reduced_reproduction_has_numbers_for_every_variant(tmp_path: Path) -> None:
    cfg = load_config(REPRODUCE_CONFIG, overrides={**REDUCED,
                                                   "storage.root": str(tmp_path / "runs")})
    out = tmp_path / "reproduce.md"
    plan = load_plan(REPRODUCE_CONFIG.with_suffix(".gates.yaml"))
    result = run_reproduce(cfg, [0], command="deltamoe reproduce (reduced)", out=out, plan=plan,
                           plan_text="# the plan\n")
    assert set(result.aggregate) == VARIANTS
    assert result.missing(VARIANTS) == []
    for variant, cells in result.aggregate.items():
        groups = {group for _, _, group in cells}
        assert groups == {"original", "new"}, variant
        assert all(math.isfinite(c.mean) and c.n == 1 for c in cells.values()), variant
    page = out.read_text()
    assert page.count("\n| ") >= len(VARIANTS) + 1 and "deltamoe reproduce (reduced)" in page
    saved = json.loads((tmp_path / "runs/reproduce/reproduce/results.json").read_text())
    assert set(saved["aggregate"]) == VARIANTS and saved["seeds"] == [0]
    client = MlflowClient(result.tracking_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("deltamoe-reproduce").experiment_id],
        filter_string="tags.`deltamoe.stage` = 'reproduce'")
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    assert any(k.startswith("reproduce/deltamoe/") and k.endswith("/new/mean") for k in metrics)
