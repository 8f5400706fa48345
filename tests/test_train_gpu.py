"""GPU path of the train component (skipped without CUDA): bf16 FSDP2 on one GPU trains the
MoE, keeps frozen tensors bit-identical and exports fp32 weights in the init's format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from train_fixtures import NEW, ORIGINAL, build_world, pack, upcycle_world

from components.config import TrainConfig
from components.moe.checkpoint import LazyCheckpoint
from components.train import Resources, TrainSpec, train_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _cpt_on_gpu(tmp_path: Path, rows_per_lang: int, run_name: str,
                train: TrainConfig) -> tuple[Path, Any]:
    """The world's MoE after bf16 CPT on one GPU (inline launcher): (its init, the result)."""
    world = build_world(tmp_path)
    data = pack(world, [*ORIGINAL, *NEW], tmp_path / "data", rows_per_lang=rows_per_lang)
    moe = upcycle_world(world, tmp_path / "moe")
    result = train_model(TrainSpec(
        init_dir=str(moe), out_dir=str(tmp_path / "out"),
        train_paths=[str(data / "train/part-0.parquet")],
        validation_paths=[str(data / "validation/part-0.parquet")], mode="cpt_moe",
        train=train, checkpoint_root=str(tmp_path / "ckpt"), run_name=run_name,
        resources=Resources(use_gpu=True, launcher="inline"), seed=0))
    swh = "val/loss/swh_Latn"
    assert result.metrics[swh] < result.metrics[f"{swh}/initial"]
    return moe, result


def _frozen(key: str) -> bool:
    """The anchor expert and every shared tensor (not a new expert, not a router)."""
    return ".experts.0." in key or not (".experts." in key or ".gate." in key)


def test_bf16_fsdp2_on_one_gpu(tmp_path: Path) -> None:
    moe, result = _cpt_on_gpu(tmp_path, 48, "gpu", TrainConfig(
        steps=30, micro_batch_size=8, lr=2e-3, warmup_steps=3, precision="bf16",
        checkpoint_every=15, log_every=5))
    with LazyCheckpoint(moe) as before, LazyCheckpoint(result.out_dir) as after:
        for key in before.keys():
            assert after.get(key).dtype == before.get(key).dtype
            if _frozen(key):
                assert torch.equal(before.get(key), after.get(key)), key


def _moe_pair() -> dict[str, torch.nn.Module]:
    from test_experts_impl import _build

    return {name: _build(name).cuda() for name in ("mixtral", "own_llama_classifier")}


def test_grouped_experts_on_gpu_agree_and_own_block_never_syncs() -> None:
    """On CUDA the grouped path matches the loop (fp32) and the package's block runs it with
    no host sync: sync debug mode "error" raises on the loop's ``tolist`` but not here."""
    ids = torch.randint(0, 61, (4, 32), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    for name, model in _moe_pair().items():
        logits = {}
        for impl in ("eager", "grouped_mm"):
            model.set_experts_implementation(impl)
            with torch.no_grad():
                logits[impl] = model(input_ids=ids).logits
        assert torch.allclose(logits["grouped_mm"], logits["eager"], atol=1e-4), name
    own = _moe_pair()["own_llama_classifier"].to(torch.bfloat16)  # the kernel's training dtype
    block = own.model.layers[2].mlp
    hidden = torch.randn(4, 32, own.config.hidden_size, device="cuda", dtype=torch.bfloat16,
                         requires_grad=True)
    own.set_experts_implementation("grouped_mm")
    block(hidden)  # warm: lazy CUDA init may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        block(hidden).sum().backward()
        own.set_experts_implementation("eager")
        with pytest.raises(RuntimeError, match="synchroniz"):
            block(hidden)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_grouped_compiled_run_keeps_frozen_weights(tmp_path: Path) -> None:
    """bf16 FSDP2 with grouped experts, compiled blocks and fused AdamW: trains, frozen tensors
    (the anchor rows of the fused experts included) bit-identical after export."""
    moe, result = _cpt_on_gpu(tmp_path, 32, "gpu-grouped", TrainConfig(
        steps=12, micro_batch_size=8, lr=2e-3, warmup_steps=2, precision="bf16",
        checkpoint_every=12, log_every=4, experts_implementation="grouped_mm", compile=True))
    assert result.counts["active"] < result.counts["trainable"] + result.counts["frozen"]
    with LazyCheckpoint(moe) as before, LazyCheckpoint(result.out_dir) as after:
        for key in before.keys():
            if _frozen(key):
                assert torch.equal(before.get(key), after.get(key)), key
