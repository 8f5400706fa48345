"""GPU path of the train component (skipped without CUDA): bf16 FSDP2 on one GPU trains the
MoE, keeps frozen tensors bit-identical and exports fp32 weights in the init's format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_fixtures import NEW, ORIGINAL, build_world, pack, upcycle_world

from components.config import TrainConfig
from components.moe.checkpoint import LazyCheckpoint
from components.train import Resources, TrainSpec, train_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_fsdp2_on_one_gpu(tmp_path: Path) -> None:
    world = build_world(tmp_path)
    data = pack(world, [*ORIGINAL, *NEW], tmp_path / "data", rows_per_lang=48)
    moe = upcycle_world(world, tmp_path / "moe")
    train = TrainConfig(steps=30, micro_batch_size=8, lr=2e-3, warmup_steps=3,
                        precision="bf16", checkpoint_every=15, log_every=5)
    result = train_model(TrainSpec(
        init_dir=str(moe), out_dir=str(tmp_path / "out"),
        train_paths=[str(data / "train/part-0.parquet")],
        validation_paths=[str(data / "validation/part-0.parquet")], mode="cpt_moe",
        train=train, checkpoint_root=str(tmp_path / "ckpt"), run_name="gpu",
        resources=Resources(use_gpu=True, launcher="inline"), seed=0))
    swh = "val/loss/swh_Latn"
    assert result.metrics[swh] < result.metrics[f"{swh}/initial"]
    with LazyCheckpoint(moe) as before, LazyCheckpoint(result.out_dir) as after:
        for key in before.keys():
            frozen = ".experts.0." in key or not (".experts." in key or ".gate." in key)
            assert after.get(key).dtype == before.get(key).dtype
            if frozen:
                assert torch.equal(before.get(key), after.get(key)), key
