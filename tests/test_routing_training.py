"""The method's routing pieces trained: LayerMoE's classifier learns to tell the language groups
apart (alone, and inside the training loop), and MoE-LPR's router-only review sends
original-language tokens of the synthetic world to the anchor expert."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from common import tiny_dims
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from components.moe.routing import RouterCapture, classifier_correct, classifier_loss
from components.moe.upcycle import UpcycleOptions, upcycle


def _two_languages(seed: int, rows: int = 8, length: int = 16) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """Sequences of two clearly different token distributions (ids 0-31 original, 32-63 new),
    interleaved; and each sequence's group (0 original, 1 new)."""
    g = torch.Generator().manual_seed(seed)
    original = torch.randint(0, 32, (rows, length), generator=g)
    new = torch.randint(32, 64, (rows, length), generator=g)
    ids = torch.stack([original, new], dim=1).reshape(2 * rows, length)
    return ids, torch.arange(2 * rows) % 2


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_classifier_learns_to_separate_two_languages(tmp_path: Path, level: str) -> None:
    torch.manual_seed(0)
    dense = tmp_path / "dense"
    LlamaForCausalLM(LlamaConfig(**tiny_dims(64, hidden_size=64))).save_pretrained(dense)
    (tmp_path / "moe").mkdir()
    upcycle(dense, tmp_path / "moe", UpcycleOptions(experts_per_layer=(3, 3), top_k=2,
                                                    classifier_layers=(0, 1), seed=0))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    classifiers = [p for n, p in model.named_parameters() if ".classifier." in n]
    optimizer = torch.optim.Adam(classifiers, lr=0.05)

    def targets(group: torch.Tensor, length: int) -> torch.Tensor:
        return group[:, None].expand(-1, length) if level == "token" else group

    with RouterCapture(model) as capture:
        for step in range(40):
            ids, group = _two_languages(step)
            capture.clear()
            model(ids)
            layers = sorted(capture.classifier_logits)
            loss = classifier_loss([capture.classifier_logits[i] for i in layers],
                                   targets(group, ids.shape[1]), level=level)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        ids, group = _two_languages(1000, rows=32)  # held out
        capture.clear()
        with torch.no_grad():
            model(ids)
        for layer_logits in capture.classifier_logits.values():
            right, rows = classifier_correct(layer_logits, group, level="sequence")
            assert rows == 64 and right / rows >= 0.9
            if level == "token":  # the per-token decision routing makes
                right, rows = classifier_correct(layer_logits, group[:, None].expand_as(ids))
                assert rows == 64 * 16 and right / rows >= 0.9


def test_loop_trains_the_classifier_and_review_reaches_the_anchor(tmp_path: Path) -> None:
    """On the synthetic world (eng/deu original, swh new): CPT with a classifier on the last
    layer, then MoE-LPR's review with the defaults the configs use; held-out figures."""
    from train_fixtures import NEW, ORIGINAL, SEQ_LEN, build_world, pack

    from components.config import ReviewConfig, TrainConfig
    from components.train import Resources, TrainSpec, train_model

    world = build_world(tmp_path)
    data = pack(world, [*ORIGINAL, *NEW], tmp_path / "data", rows_per_lang=16)
    moe = tmp_path / "moe"
    moe.mkdir()
    upcycle(world / "model", moe, UpcycleOptions(
        experts_per_layer=(4, 4, 4, 4), top_k=2, classifier_layers=(3,), seq_len=SEQ_LEN,
        allocation={"original": [0], "swh_Latn": [1, 2, 3]}, groups={"original": ORIGINAL},
        original_languages=tuple(ORIGINAL)))
    train = TrainConfig(steps=12, micro_batch_size=8, lr=1e-2, warmup_steps=1, precision="fp32",
                        checkpoint_every=1000, log_every=1000, review=ReviewConfig(enabled=True))
    result = train_model(TrainSpec(
        init_dir=str(moe), out_dir=str(tmp_path / "out"),
        train_paths=[str(data / "train/part-0.parquet")],
        validation_paths=[str(data / "validation/part-0.parquet")], mode="cpt_moe", train=train,
        checkpoint_root=str(tmp_path / "ckpt"), run_name="review",
        resources=Resources(num_workers=1, launcher="inline"), seed=0))
    m = result.metrics
    assert result.steps == 12 + 50
    # zero-initialised, the classifier sends every token to the anchor: right on eng/deu only
    assert m["val/classifier_acc/initial"] == pytest.approx(2 / 3)
    assert m["val/classifier_acc/sequence/pre_review"] > m["val/classifier_acc/initial"]
    before, after = m["router/anchor_share/pre_review"], m["router/anchor_share"]
    assert before < 0.9 < after
    for layer in range(3):  # the routers' own layers (layer 3 routes through its classifier)
        assert m[f"router/anchor_share/{layer}"] > m[f"router/anchor_share/{layer}/pre_review"]
    print({k: round(v, 3) for k, v in sorted(m.items()) if "val/loss" not in k})
