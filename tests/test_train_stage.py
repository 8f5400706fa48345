"""The train stage on the inline launcher: the world's base pre-training, its SFT sibling, the
MoE's CPT and the dense baselines, each skipped on a rerun; SFT labels; the LR schedule."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from train_fixtures import NEW, ORIGINAL, build_world, pack

from components.config import parse_config
from components.moe.checkpoint import LazyCheckpoint
from components.storage import RunDir
from components.train.data import IGNORE
from components.train.schedule import lr_factor


def test_lr_schedule_warmup_then_cosine_to_floor() -> None:
    factors = [lr_factor(s, 20, 4, 0.1) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.1)
    decay = factors[4:]
    assert all(decay[i] >= decay[i + 1] for i in range(len(decay) - 1))


def _config(tmp: Path) -> object:
    return parse_config({
        "run_name": "t", "seed": 0,
        "world": {"seed": 0, "num_people": 24, "docs_per_language": 60, "vocab_size": 600,
                  "base_steps": 4, "post_steps": 3},
        "languages": {"original": ORIGINAL, "new": NEW},
        "data": {"seq_len": 64},
        "upcycle": {"num_experts": 4, "top_k": 2},
        "train": {"steps": 4, "micro_batch_size": 4, "warmup_steps": 1, "precision": "fp32",
                  "checkpoint_every": 2, "log_every": 2, "lr": 1e-3},
        "storage": {"root": str(tmp / "runs")},
        "resources": {"launcher": "inline", "num_workers": 1},
    })


def _data_stage(run_dir: RunDir, name: str, world: Path, languages: list[str],
                corpus: str = "fineweb2") -> None:
    stage = run_dir.stage(name)
    with stage.build("test-data-" + name) as work:
        pack(world, languages, work.path, rows_per_lang=16, corpus=corpus)


def test_world_pair_and_cpt_variants_inline(tmp_path: Path) -> None:
    from workflows.train_stage import ensure_base, ensure_post, ensure_trained
    from workflows.upcycle_stage import ensure_upcycled

    cfg = _config(tmp_path)
    run_dir = RunDir(cfg.storage.root, cfg.run_name)
    local = run_dir.local_path
    world = build_world(tmp_path)
    (local / "world").symlink_to(world, target_is_directory=True)
    _data_stage(run_dir, "base_data", world, ORIGINAL, corpus="base/fineweb2")

    base, built = ensure_base(cfg, run_dir)
    assert built and base.extra["train"]["steps"] == 4
    assert base.extra["train"]["tokens"] == 4 * 4 * 64  # steps × micro batch × seq_len
    with LazyCheckpoint(world / "model") as a, LazyCheckpoint(local / "models/base") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(not torch.equal(a.get(k), b.get(k)) for k in a.keys()
                   if k.endswith("q_proj.weight"))  # pre-training changed the model
    assert ensure_base(cfg, run_dir)[1] is False  # manifest matches: skipped

    post, built = ensure_post(cfg, run_dir)
    assert built and post.extra["train"]["steps"] == 3
    sft = pq.read_table(local / "sft_data/train/part-0.parquet").to_pydict()
    assert set(sft["lang"]) == set(ORIGINAL)
    assert all(len(ids) == len(labels) == 64
               for ids, labels in zip(sft["input_ids"], sft["labels"], strict=True))
    # an open-book conversation longer than a 64-token row is left out and counted (cut, it
    # would lose its answer); every row that is kept supervises its responses
    rows = run_dir.stage("sft_data").read_manifest().extra["rows"]
    assert rows["train_too_long"] > 0 and rows["train"] == len(sft["input_ids"])
    assert all(any(x != IGNORE for x in labels) for labels in sft["labels"])
    ids, labels = sft["input_ids"][0], sft["labels"][0]
    assert IGNORE in labels
    kept = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE]
    assert kept == [label for label in labels if label != IGNORE]  # labels are the tokens

    _data_stage(run_dir, "data", world, [*ORIGINAL, *NEW])
    ensure_upcycled(cfg, run_dir)
    moe, built = ensure_trained(cfg, run_dir, "cpt_moe")
    assert built and moe.extra["train"]["counts"]["frozen"] > 0
    out = local / "models/cpt_moe"
    assert json.loads((out / "allocation.json").read_text()) == json.loads(
        (local / "models/moe_init/allocation.json").read_text())
    trained: set[str] = set()
    with LazyCheckpoint(local / "models/moe_init") as a, LazyCheckpoint(out) as b:
        assert sorted(a.keys()) == sorted(b.keys())  # same (per-expert) layout as upcycle
        for key in a.keys():
            frozen = ".experts.0." in key or not (".experts." in key or ".gate." in key)
            same = torch.equal(a.get(key), b.get(key))
            if frozen or ".gate." in key:  # anchor and shared weights kept; every router trains
                assert same == frozen, key
            elif not same:  # a new expert changes iff tokens reached it in these 4 steps
                trained.add(key.split(".block_sparse_moe.")[0])
        layers = {k.split(".block_sparse_moe.")[0] for k in a.keys() if ".experts.1." in k}
        assert trained == layers  # in every layer some new expert trained
    dense, built = ensure_trained(cfg, run_dir, "cpt_dense")
    assert built and dense.extra["train"]["counts"]["frozen"] == 0
    assert ensure_trained(cfg, run_dir, "cpt_moe")[1] is False

    from transformers import AutoModelForCausalLM

    import components.moe.modeling  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "MixtralForCausalLM"
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        ensure_trained(cfg, run_dir, "nope")


def test_cli_train_names_the_missing_stage(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from workflows.cli import cli

    config = tmp_path / "run.yaml"
    config.write_text(f"run_name: x\nworld: {{}}\nlanguages: {{original: [en], new: [sw]}}\n"
                      f"storage: {{root: {tmp_path / 'runs'}}}\n")
    result = CliRunner().invoke(cli, ["train", str(config)])
    assert result.exit_code == 2
    assert "data stage has not been built yet" in result.output
