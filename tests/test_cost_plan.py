"""`deltamoe plan`: the cost model against a hand computation and against the real transformers
classes (instantiated on the meta device: shapes only, no weights), and every shipped recipe
validates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoConfig, AutoModelForCausalLM

from components.config import load_config
from components.cost import Shapes, find_shapes, parameter_counts, plan_run
from components.moe.families import family_for
from workflows.cli import cli

CONFIGS = Path(__file__).resolve().parents[1] / "workflows" / "configs"
SHAPES = CONFIGS / "shapes"
# run configs only: a comparison plan (*.gates.yaml) is not one
RECIPES = sorted(p for p in CONFIGS.glob("*.yaml") if p.name not in ("demo.yaml",
                                                                     "reproduce.yaml")
                 and not p.name.endswith(".gates.yaml"))
LLAMA = CONFIGS / "llama3.1-8b-swahili-thai.yaml"
ENV = {"DELTAMOE_RUNS": "s3://bucket/deltamoe/runs", "MLFLOW_TRACKING_URI": "http://mlflow:5000",
       "HF_TOKEN": "hf_test"}


def test_llama_recipe_plan_matches_a_hand_computation() -> None:
    plan = plan_run(load_config(LLAMA, env=ENV), search=[SHAPES])
    # Llama-3.1-8B: H 4096, I 14336, 32 layers, 32 heads × 128, 8 kv heads, vocab 128256, untied
    embedding = 128256 * 4096                                    # 525,336,576
    attention = 4096 * 4096 + 2 * (4096 * 1024) + 4096 * 4096    # q, k, v, o: 41,943,040
    ffn = 3 * 4096 * 14336                                       # gate, up, down: 176,160,768
    layer = attention + 2 * 4096 + ffn                           # + 2 RMSNorms: 218,112,000
    dense = embedding + 32 * layer + 4096 + embedding            # + final norm + lm_head
    assert dense == 8_030_261_248                                # the published 8.03B
    router = 4 * 4096                                            # 4 experts
    total = dense + 32 * (3 * ffn + router)                      # 3 more expert copies per layer
    active = dense + 32 * (1 * ffn + router)                     # top-2: one more expert active
    trainable = 32 * (4 * ffn + router)                          # fused experts + routers
    assert (plan.counts.dense, plan.counts.moe_total, plan.counts.moe_active) == (
        dense, total, active) == (8_030_261_248, 24_942_219_264, 13_667_930_112)
    assert plan.counts.trainable == trainable and plan.counts.learned == trainable - 32 * ffn

    # memory per GPU over 8 GPUs: fp32 params of everything, fp32 grads + AdamW of the trainable
    gpus = 8
    states = (4 * total + 4 * trainable + 8 * trainable) / gpus
    moe_layer = attention + 2 * 4096 + 4 * ffn + router
    gathered = 2 * (2 * embedding + 4096) + 2 * 2 * moe_layer   # root unit + layer and prefetch
    tokens = 8 * 1024                                           # micro-batch × sequence
    per_layer = 2 * (6 * 4096 + 2 * 1024 + 2 * (3 * 14336 + 2 * 4096))
    activations = tokens * (32 * 2 * 4096 + per_layer)          # checkpointed inputs + one layer
    logits = 8 * tokens * 128256
    hand = states + gathered + activations + logits             # ≈ 59.65 GiB
    assert abs(plan.memory.total - hand) / hand < 0.05
    assert 55 * 2**30 < plan.memory.total < 64 * 2**30  # fits an 80 GB GPU with headroom

    # 61,035 steps × 262,144 tokens, 6·N_active (no embedding lookup) + the attention term
    assert plan.tokens == 61_035 * 8 * 4 * 8 * 1024 == 15_999_959_040
    per_token = 6 * (active - embedding) + 6 * 32 * 1024 * 32 * 128
    assert plan.flops == pytest.approx(per_token * (plan.tokens + 500 * 262_144), rel=1e-12)
    assert plan.gpu_hours == pytest.approx(plan.flops / (989e12 * 0.4) / 3600)
    dense_per_token = 6 * (dense - embedding) + 6 * 32 * 1024 * 32 * 128  # cpt_dense, same tokens
    assert plan.dense_flops == pytest.approx(dense_per_token * plan.tokens, rel=1e-12)


@pytest.mark.parametrize("name", ["meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-7B"])
def test_counts_equal_the_transformers_classes(name: str) -> None:
    """The formulas against the real dense and upcycled classes, on the meta device."""
    config = json.loads((SHAPES / f"{name.replace('/', '--')}.json").read_text())
    shapes, _ = find_shapes(name, [SHAPES])
    counts = parameter_counts(shapes, 4, 2, list(range(shapes.layers)))
    family = family_for(config["model_type"])
    moe = family.moe_config(config, 4, 2, list(range(shapes.layers)))
    with torch.device("meta"):
        dense_model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
        moe_model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**moe))
    assert sum(p.numel() for p in dense_model.parameters()) == counts.dense
    assert sum(p.numel() for p in moe_model.parameters()) == counts.moe_total


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates_and_plans(recipe: Path) -> None:
    cfg = load_config(recipe, env=ENV)
    assert cfg.models is not None and cfg.resources.use_gpu and "://" in cfg.storage.root
    assert cfg.train.warmup_steps < cfg.train.steps
    for model in (cfg.models.base, cfg.models.post):  # the recipe ships both models' shapes
        assert isinstance(find_shapes(model, [SHAPES])[0], Shapes)
    runner = CliRunner()
    valid = runner.invoke(cli, ["config", "validate", str(recipe)], env=ENV)
    assert valid.exit_code == 0, valid.output
    # no credentials needed for a plan: unset variables are named, not required
    out = runner.invoke(cli, ["plan", str(recipe), "--gpus", "16", "--mfu", "0.5"],
                        env=dict.fromkeys(ENV))
    assert out.exit_code == 0, out.output
    assert "MoE total" in out.output and "at 50% MFU" in out.output
    assert "FSDP2 over 16 GPUs" in out.output


def test_plan_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text(LLAMA.read_text().replace("meta-llama/Llama-3.1-8B\n", "org/unknown-model\n"))
    out = CliRunner().invoke(cli, ["plan", str(bad)], env=ENV)
    assert out.exit_code == 2
    assert "no config.json shapes for 'org/unknown-model'" in out.output
