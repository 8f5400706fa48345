"""The spawn launcher: the same loop in two local processes of one torch process group (gloo on
CPU here; NCCL on a GPU), without Ray. Sharded checkpoints from both ranks, rank 0 alone writes
progress and the trainer state, the driver exports, the frozen tensors stay bit-identical, and
an injected failure resumes from the last checkpoint on rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_fixtures import NEW, ORIGINAL, build_world, pack, upcycle_world

from components.config import TrainConfig
from components.moe.checkpoint import LazyCheckpoint
from components.train import Resources, TrainSpec, train_model
from components.train.spec import TrainError


def test_two_spawned_ranks_train_checkpoint_and_resume(tmp_path: Path) -> None:
    world = build_world(tmp_path)
    data = pack(world, [*ORIGINAL, *NEW], tmp_path / "data", rows_per_lang=24)
    moe = upcycle_world(world, tmp_path / "moe")
    train = TrainConfig(steps=6, micro_batch_size=4, lr=2e-3, warmup_steps=1, precision="fp32",
                        checkpoint_every=3, log_every=3)
    spec = TrainSpec(
        init_dir=str(moe), out_dir=str(tmp_path / "out"),
        train_paths=[str(data / "train/part-0.parquet")],
        validation_paths=[str(data / "validation/part-0.parquet")], mode="cpt_moe",
        train=train, checkpoint_root=str(tmp_path / "ckpt"), run_name="spawn",
        resources=Resources(num_workers=2, launcher="spawn"), seed=0,
        fail_at_step=4, fail_marker=str(tmp_path / "fail.marker"))
    with pytest.raises(TrainError, match="rerun to resume"):
        train_model(spec)
    run = tmp_path / "ckpt" / "spawn"
    shards = sorted(p.name for p in (run / "checkpoint_00000003").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # both ranks wrote their shards
    assert not (tmp_path / "out" / "config.json").exists()

    result = train_model(spec)  # the marker exists now: the rerun resumes at step 3
    assert (result.steps, result.resumed_from, result.attempts) == (6, 3, 1)
    starts = [json.loads(line) for line in (run / "starts.jsonl").read_text().splitlines()]
    assert [s["world_size"] for s in starts] == [2, 2]  # one line per start: rank 0 only
    # 6 steps × 2 ranks × 4 rows × 64 tokens
    assert result.tokens == 6 * 2 * 4 * 64
    with LazyCheckpoint(moe) as before, LazyCheckpoint(result.out_dir) as after:
        changed = 0
        for key in before.keys():
            frozen = ".experts.0." in key or not (".experts." in key or ".gate." in key)
            if frozen:
                assert torch.equal(before.get(key), after.get(key)), key
            else:
                changed += not torch.equal(before.get(key), after.get(key))
        assert changed > 0
