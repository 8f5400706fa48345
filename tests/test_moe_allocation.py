"""Expert allocation: the language map, LayerMoE's similarity and counts, and the upcycle stage
driven by a run config on a small synthetic world."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from components.config import parse_config
from components.moe.allocation import (
    centroid_similarity,
    language_allocation,
    layer_similarity,
    layermoe_budget,
    layermoe_counts,
    most_similar_layers,
)
from components.storage import RunDir
from components.tracking import ExpansionTracker
from workflows.upcycle_stage import STAGE, ensure_upcycled
from workflows.world import ensure_world


def test_default_language_allocation() -> None:
    experts, groups = language_allocation(["eng_Latn"], ["swh_Latn", "rus_Cyrl"], 5)
    assert experts == {"original": [0], "swh_Latn": [1, 3], "rus_Cyrl": [2, 4]}
    assert groups == {"original": ["eng_Latn"]}
    shared, _ = language_allocation(["eng_Latn"], ["swh_Latn", "rus_Cyrl", "tha_Thai"], 3)
    assert shared["tha_Thai"] == [1]  # fewer experts than languages: shared round-robin
    given, _ = language_allocation(["eng_Latn"], ["swh_Latn"], 4, {"swh_Latn": [2, 3]})
    assert given == {"swh_Latn": [2, 3]}


def test_layermoe_counts_follow_dissimilarity_within_budget() -> None:
    similarity = [0.95, 0.2, 0.6, 0.9]
    counts = layermoe_counts(similarity, 10)
    assert sum(counts) == 10 and min(counts) >= 1
    assert counts == [1, 5, 3, 1]  # spare 6 split ∝ (0.05, 0.8, 0.4, 0.1)
    order = sorted(range(4), key=lambda i: similarity[i])
    assert [counts[i] for i in order] == sorted(counts, reverse=True)  # more alike, fewer
    assert layermoe_counts([0.5, 0.5, 0.5], 7) == [3, 2, 2]
    assert layermoe_counts([1.0, 1.0], 4) == [2, 2]
    with pytest.raises(ValueError, match="below 1 per layer"):
        layermoe_counts(similarity, 3)
    assert most_similar_layers(similarity, 2) == [0, 3]


def test_layer_similarity_measures_ffn_inputs(tmp_path: Path) -> None:
    from components.synthetic.hf import build_tiny_model, train_tokenizer

    texts = {"a": ["the red cat sat on the mat today"] * 3,
             "b": ["the red cat sat on the mat today"] * 3,
             "c": ["zq xv kk pp qq zz ww vv"] * 3}
    tokenizer = train_tokenizer([t for docs in texts.values() for t in docs] * 20,
                                tmp_path / "tok", vocab_size=300)
    build_tiny_model(tokenizer, tmp_path / "model", hidden_size=32, num_layers=3,
                     intermediate_size=48)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    same = layer_similarity(model, tok, {"a": texts["a"], "b": texts["b"]}, ["b"])
    assert len(same) == 3 and all(s == pytest.approx(1.0, abs=1e-5) for s in same)
    different = layer_similarity(model, tok, {"a": texts["a"], "c": texts["c"]}, ["c"])
    assert all(d < 0.999 for d in different)
    # a and b are the same text: all pairs count their cosine of 1, new pairs (c new) do not
    every = layer_similarity(model, tok, texts, ["c"], "all_pairs")
    new_pairs = layer_similarity(model, tok, texts, ["c"])
    for d, e, n in zip(different, every, new_pairs, strict=True):
        assert n == pytest.approx(d, abs=1e-5) and e == pytest.approx((1 + 2 * d) / 3, abs=1e-5)
    with pytest.raises(ValueError, match="≥ 2 languages"):
        layer_similarity(model, tok, {"a": texts["a"]}, ["a"])


def test_new_pairs_similarity_leaves_original_pairs_out() -> None:
    """Hand-made centroids over two layers: the originals eng/deu are identical (cosine 1), the
    new swh is orthogonal to both in layer 0 and at 60° in layer 1, the new rus equals eng."""
    e0, e1 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    half = torch.tensor([0.5, 3 ** 0.5 / 2, 0.0])  # cos 0.5 with e0
    centroids = {"eng": torch.stack([e0, e0]), "deu": torch.stack([e0, e0]),
                 "swh": torch.stack([e1, half]), "rus": torch.stack([e0, e0])}
    # pairs with a new language: eng-swh, deu-swh, rus-swh, eng-rus, deu-rus (not eng-deu)
    new = centroid_similarity(centroids, ["swh", "rus"])
    assert new == pytest.approx([(0 + 0 + 0 + 1 + 1) / 5, (0.5 * 3 + 1 + 1) / 5])
    every = centroid_similarity(centroids, ["swh", "rus"], "all_pairs")  # + eng-deu = 1
    assert every == pytest.approx([3 / 6, (0.5 * 3 + 3) / 6])
    alone = centroid_similarity({"eng": centroids["eng"], "swh": centroids["swh"]}, ["swh"])
    assert alone == pytest.approx([0.0, 0.5])
    with pytest.raises(ValueError, match="no language pair involves a new language"):
        centroid_similarity({"eng": centroids["eng"], "deu": centroids["deu"]}, ["swh"])


def test_layermoe_budget_is_below_deltamoe_unless_given() -> None:
    assert layermoe_budget(4, 4, 0.6) == 7  # ⌊0.6 × 3 × 4⌋ of DeltaMoE's 12
    assert layermoe_budget(4, 4, 1.0) == 12
    assert layermoe_budget(8, 2, 0.6) == 8  # ⌊8.4⌋
    assert layermoe_budget(2, 5, 0.6) == 5  # never below one new expert per layer
    assert layermoe_budget(4, 4, 0.6, total_new_experts=10) == 10  # explicit override
    alloc = parse_config({"run_name": "b", "models": {"base": "b", "post": "p"},
                          "languages": {"original": ["eng_Latn"], "new": ["swh_Latn"]}}
                         ).upcycle.allocation
    assert (alloc.layermoe_budget, alloc.similarity, alloc.total_new_experts) == (
        0.6, "new_pairs", None)


@pytest.fixture(scope="module")
def world_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("runs")
    raw = {"run_name": "alloc", "world": {"num_people": 16, "docs_per_language": 24,
                                          "vocab_size": 600, "base_steps": 0},
           "languages": {"original": ["eng_Latn", "deu_Latn"], "new": ["swh_Latn", "rus_Cyrl"]},
           "data": {"seq_len": 64}, "storage": {"root": str(root)},
           "upcycle": {"num_experts": 3, "top_k": 2}}
    cfg = parse_config(raw)
    run_dir = RunDir(cfg.storage.root, cfg.run_name)
    ensure_world(run_dir.stage("world"), cfg.world)
    return raw, root


def _ids(run: Path) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(run / "world" / "model")
    text = json.loads((run / "world/eval/swh_Latn/lm.jsonl").read_text().splitlines()[0])["text"]
    return tok(text, return_tensors="pt").input_ids[:, :48]


def test_stage_with_language_allocation(world_run: tuple[dict, Path], tmp_path: Path) -> None:
    raw, root = world_run
    cfg = parse_config(raw)
    run_dir = RunDir(cfg.storage.root, cfg.run_name)
    tracker = ExpansionTracker(f"sqlite:///{tmp_path}/mlflow.db", "test", cfg.run_name)
    with tracker.stage("upcycle") as logger:
        manifest, built = ensure_upcycled(cfg, run_dir, logger)
    assert built and manifest.extra["upcycle"]["model_type"] == "mixtral"
    out = root / "alloc" / STAGE
    allocation = json.loads((out / "allocation.json").read_text())
    assert allocation["experts"] == {"original": [0], "swh_Latn": [1], "rus_Cyrl": [2]}
    assert allocation["original_languages"] == ["eng_Latn", "deu_Latn"]
    run = MlflowClient(tracker.tracking_uri).get_run(tracker.stage_run_id("upcycle"))
    acc = manifest.extra["upcycle"]
    assert run.data.metrics["upcycle/active_parameters"] == acc["active_parameters"]
    assert run.data.metrics["upcycle/active_ratio"] == pytest.approx(acc["active_ratio"])
    assert acc["seq_len"] == 64
    _, again = ensure_upcycled(cfg, run_dir)
    assert not again  # manifest matches: skipped
    tracker.finish()
    ids = _ids(root / "alloc")
    dense = AutoModelForCausalLM.from_pretrained(root / "alloc/world/model")
    moe = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert (moe(ids).logits - dense(ids).logits).abs().max() <= 1e-5


def test_stage_with_layermoe_allocation(world_run: tuple[dict, Path]) -> None:
    raw, root = world_run
    upcycle = {"num_experts": 3, "top_k": 2,
               "allocation": {"method": "layermoe", "total_new_experts": 7,
                              "classifier_layers": 1}}
    cfg = parse_config({**raw, "run_name": "alloc", "upcycle": upcycle})
    run_dir = RunDir(cfg.storage.root, cfg.run_name)
    _, built = ensure_upcycled(cfg, run_dir)  # replaces the language-allocated stage
    assert built
    out = root / "alloc" / STAGE
    allocation = json.loads((out / "allocation.json").read_text())
    similarity, counts = allocation["layer_similarity"], allocation["experts_per_layer"]
    assert len(similarity) == 4 and sum(c - 1 for c in counts) == 7
    assert counts == [1 + n for n in layermoe_counts(similarity, 7)]
    assert allocation["classifier_layers"] == most_similar_layers(similarity, 1)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deltamoe" and config["experts_per_layer"] == counts
    ids = _ids(root / "alloc")
    dense = AutoModelForCausalLM.from_pretrained(root / "alloc/world/model")
    moe = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert (moe(ids).logits - dense(ids).logits).abs().max() <= 1e-5


def test_upcycle_command_from_a_run_config(world_run: tuple[dict, Path], tmp_path: Path) -> None:
    import yaml
    from click.testing import CliRunner

    from workflows.cli import cli

    raw, root = world_run
    cfg = parse_config({**raw, "run_name": "cli"})
    ensure_world(RunDir(cfg.storage.root, "cli").stage("world"), cfg.world)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**raw, "run_name": "cli",
                                    "tracking": {"uri": f"sqlite:///{tmp_path}/m.db"}}))
    result = CliRunner().invoke(cli, ["upcycle", str(path), "--set", "upcycle.layout=fused"])
    assert result.exit_code == 0, result.output
    assert "mixtral written" in result.output and "fused layout" in result.output
    assert "forward FLOPs per token (n_ctx=64)" in result.output
    assert (root / "cli" / STAGE / "allocation.json").exists()
    both = CliRunner().invoke(cli, ["upcycle", str(path), "--model", str(tmp_path)])
    assert both.exit_code == 2 and "not both" in both.output


def test_upcycle_command_allocation_flags(world_run: tuple[dict, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from workflows.cli import cli

    _, root = world_run
    model = root / "alloc" / "world" / "model"
    out = tmp_path / "moe"
    base = ["upcycle", "--model", str(model), "--out", str(out), "--num-experts", "3"]
    bad = CliRunner().invoke(cli, [*base, "--allocate", "swahil=1"])
    assert bad.exit_code == 2 and "allocation.swahil: neither a group nor a language" in bad.output
    bad = CliRunner().invoke(cli, [*base, "--allocate", "swh_Latn"])
    assert bad.exit_code == 2 and "expected LANGUAGE=ID" in bad.output
    assert not out.exists()
    ok = CliRunner().invoke(cli, [*base, "--allocate", "swh_Latn=1,2", "--experts-per-layer",
                                  "3,0,2,2", "--classifier-layers", "0"])
    assert ok.exit_code == 0, ok.output
    assert "deltamoe written" in ok.output
    assert json.loads((out / "allocation.json").read_text())["experts"] == {"swh_Latn": [1, 2]}
