"""Upcycling: the MoE computes what the dense model computes, for every family; bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from common import tiny_dims
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from components.cards import model_ref, read_card
from components.moe.checkpoint import LazyCheckpoint, detect_layout, relayout
from components.moe.families import UnsupportedArchitectureError
from components.moe.upcycle import UpcycleError, UpcycleOptions, upcycle

TINY = tiny_dims(97, num_hidden_layers=3)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, "mixtral"),
    "mistral": (MistralConfig, MistralForCausalLM, "mixtral"),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, "qwen2_moe"),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, "qwen3_moe"),
}


def _dense(root: Path, family: str, seed: int = 0) -> Path:
    config_cls, model_cls, _ = FAMILIES[family]
    torch.manual_seed(seed)
    extra = {"head_dim": 8} if family == "qwen3" else {}
    model = model_cls(config_cls(**TINY, **extra)).eval()
    path = root / f"dense-{family}"
    model.save_pretrained(path)
    return path


def _logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_upcycled_logits_equal_dense(tmp_path: Path, family: str) -> None:
    dense = _dense(tmp_path, family)
    out = tmp_path / "moe"
    out.mkdir()
    result = upcycle(dense, out, UpcycleOptions(num_experts=4, top_k=2, seed=1,
                                                max_shard_bytes=60_000))
    assert result.model_type == FAMILIES[family][2]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == result.model_type
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    ids = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(0))
    diff = (_logits(out, ids) - _logits(dense, ids)).abs().max().item()
    assert diff <= 1e-5
    moe = AutoModelForCausalLM.from_pretrained(out)
    generated = moe.generate(ids[:1, :3], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)
    acc = result.accounting
    assert acc.moe_parameters > acc.active_parameters > acc.dense_parameters
    assert acc.active_flops_per_token > acc.dense_flops_per_token
    card = (out / "README.md").read_text()
    assert str(tmp_path) not in card  # no local paths in a card that travels with the model
    assert read_card(out)["base_model"] == model_ref(dense) == f"{dense.parent.name}/{dense.name}"
    assert read_card(out)["base_model_relation"] == "finetune"


def test_router_and_experts_are_what_was_asked(tmp_path: Path) -> None:
    dense = _dense(tmp_path, "llama")
    out = tmp_path / "moe"
    out.mkdir()
    upcycle(dense, out, UpcycleOptions(num_experts=3, top_k=1, router_init="zeros"))
    moe = AutoModelForCausalLM.from_pretrained(out)
    dense_model = AutoModelForCausalLM.from_pretrained(dense)
    layer, dense_layer = moe.model.layers[1].mlp, dense_model.model.layers[1].mlp
    assert torch.count_nonzero(layer.gate.weight) == 0
    gate_up = torch.cat([dense_layer.gate_proj.weight, dense_layer.up_proj.weight])
    for expert in range(3):  # every expert an exact copy of the dense FFN (fused in memory)
        assert torch.equal(layer.experts.gate_up_proj[expert], gate_up)
        assert torch.equal(layer.experts.down_proj[expert], dense_layer.down_proj.weight)


def test_qwen_keeps_chosen_layers_dense(tmp_path: Path) -> None:
    dense = _dense(tmp_path, "qwen2")
    out = tmp_path / "moe"
    out.mkdir()
    result = upcycle(dense, out, UpcycleOptions(num_experts=2, top_k=1, layers=(0, 2)))
    assert result.moe_layers == [0, 2]
    assert json.loads((out / "config.json").read_text())["mlp_only_layers"] == [1]
    ids = torch.arange(9).unsqueeze(0)
    assert (_logits(out, ids) - _logits(dense, ids)).abs().max().item() <= 1e-5


def test_bad_input(tmp_path: Path) -> None:
    dense = _dense(tmp_path, "llama")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UpcycleError, match="num_experts: expected ≥ 2"):
        upcycle(dense, out, UpcycleOptions(num_experts=1, top_k=1))
    with pytest.raises(UpcycleError, match=r"top_k: expected 1 ≤ top_k ≤ num_experts \(2\)"):
        upcycle(dense, out, UpcycleOptions(num_experts=2, top_k=3))
    with pytest.raises(UpcycleError, match="fused is written for the standard MoE classes"):
        upcycle(dense, out, UpcycleOptions(layers=(0,), layout="fused"))
    with pytest.raises(UpcycleError, match=r"allocation\.swahil: neither a group nor a language"
                                           r".*swh_Latn"):
        upcycle(dense, out, UpcycleOptions(allocation={"swahil": [1]}))
    with pytest.raises(UpcycleError, match=r"allocation\.swh_Latn: expert ids \[4\] do not "
                                           r"exist"):
        upcycle(dense, out, UpcycleOptions(allocation={"swh_Latn": [1, 4]}))
    with pytest.raises(UpcycleError, match="classifier_layers: layer 1 is not an MoE layer"):
        upcycle(dense, out, UpcycleOptions(experts_per_layer=(3, 0, 2), classifier_layers=(1,)))
    with pytest.raises(UpcycleError, match=r"each entry is 0 \(dense\) or ≥ 2"):
        upcycle(dense, out, UpcycleOptions(experts_per_layer=(3, 1, 2)))
    with pytest.raises(UpcycleError, match="layers: \\[7\\] out of range"):
        upcycle(dense, out, UpcycleOptions(layers=(0, 7)))
    config = json.loads((dense / "config.json").read_text())
    (dense / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(UnsupportedArchitectureError, match=r"'gpt2'.*llama/mistral → mixtral"):
        upcycle(dense, out, UpcycleOptions())
    (dense / "config.json").write_text(json.dumps(config))
    (dense / "model.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(UpcycleError, match="unreadable safetensors"):
        upcycle(dense, out, UpcycleOptions())
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (dense / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UpcycleError, match=r"missing shard\(s\): .*model-00001-of-00002"):
        upcycle(dense, out, UpcycleOptions())
    (dense / "model.safetensors.index.json").unlink()
    (dense / "model.safetensors").unlink()
    with pytest.raises(UpcycleError, match=r"no model\.safetensors"):
        upcycle(dense, out, UpcycleOptions())
    assert list(out.iterdir()) == []  # nothing written for any bad input


def test_mixtral_with_dense_layers_uses_the_package_class(tmp_path: Path) -> None:
    dense = _dense(tmp_path, "mistral")
    out = tmp_path / "moe"
    out.mkdir()
    result = upcycle(dense, out, UpcycleOptions(num_experts=3, top_k=2, layers=(1,),
                                                expert_noise_std=0.0))
    assert result.model_type == "deltamoe" and result.experts_per_layer == [0, 3, 0]
    moe = AutoModelForCausalLM.from_pretrained(out)
    assert type(moe).__name__ == "DeltaMoeForCausalLM"
    assert not hasattr(moe.model.layers[0].mlp, "experts")
    assert len(moe.model.layers[1].mlp.experts) == 3
    ids = torch.arange(10).unsqueeze(0)
    assert (_logits(out, ids) - _logits(dense, ids)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_layout_and_round_trip(tmp_path: Path, family: str) -> None:
    """Fused output loads and is exact; per-expert → fused → per-expert is bit-identical."""
    dense = _dense(tmp_path, family)
    options = UpcycleOptions(num_experts=3, top_k=2, expert_noise_std=0.01, seed=3,
                             max_shard_bytes=50_000)
    per_expert, fused = tmp_path / "per_expert", tmp_path / "fused"
    per_expert.mkdir()
    fused.mkdir()
    upcycle(dense, per_expert, options)
    result = upcycle(dense, fused, replace(options, layout="fused"))
    assert result.layout == "fused"
    with LazyCheckpoint(fused) as ckpt:
        assert detect_layout(ckpt.keys()) == "fused"
        assert ckpt.get("model.layers.0.mlp.experts.gate_up_proj").shape == (3, 96, 32)
        assert ckpt.get("model.layers.0.mlp.experts.down_proj").shape == (3, 32, 48)
    ids = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    reference = _logits(per_expert, ids)
    assert torch.equal(_logits(fused, ids), reference)  # same tensors, other layout
    back, again = tmp_path / "back", tmp_path / "again"
    back.mkdir()
    again.mkdir()
    assert relayout(per_expert, back, "fused", max_bytes=50_000) == TINY["num_hidden_layers"]
    relayout(back, again, "per_expert")
    with LazyCheckpoint(per_expert) as a, LazyCheckpoint(again) as b, \
            LazyCheckpoint(fused) as f, LazyCheckpoint(back) as c:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get(k), b.get(k)) for k in a.keys())
        assert sorted(f.keys()) == sorted(c.keys())
        assert all(torch.equal(f.get(k), c.get(k)) for k in f.keys())
    assert torch.equal(_logits(again, ids), reference)
    generated = AutoModelForCausalLM.from_pretrained(fused).generate(
        ids[:1, :3], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)


def test_layermoe_plan_is_exact_and_loads_without_remote_code(tmp_path: Path) -> None:
    for family in ("llama", "qwen3"):
        dense = _dense(tmp_path, family)
        out = tmp_path / f"layermoe-{family}"
        out.mkdir()
        result = upcycle(dense, out, UpcycleOptions(
            experts_per_layer=(3, 0, 2), top_k=2, classifier_layers=(2,),
            allocation={"original": [0], "swh_Latn": [1, 2]},
            groups={"original": ["eng_Latn"]}, original_languages=("eng_Latn",)))
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == "deltamoe" and "auto_map" not in config
        assert config["experts_per_layer"] == [3, 0, 2]
        allocation = json.loads((out / "allocation.json").read_text())
        assert allocation["experts"]["swh_Latn"] == [1, 2]
        assert result.accounting.moe_parameters > result.accounting.active_parameters
        moe = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
        assert moe.model.layers[2].mlp.classifier is not None
        ids = torch.arange(1, 12).unsqueeze(0)
        assert (_logits(out, ids) - _logits(dense, ids)).abs().max().item() <= 1e-5
        assert moe.generate(ids[:, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_accounting_figures(tmp_path: Path) -> None:
    dense = _dense(tmp_path, "llama")
    out = tmp_path / "moe"
    out.mkdir()
    acc = upcycle(dense, out, UpcycleOptions(num_experts=4, top_k=2, seq_len=64)).accounting
    h, i, v, layers = 32, 48, 97, 3
    ffn = 3 * h * i
    assert acc.moe_parameters == acc.dense_parameters + layers * (3 * ffn + 4 * h)
    assert acc.active_parameters == acc.dense_parameters + layers * (ffn + 4 * h)
    attention = 2 * layers * 64 * h  # 4 heads × head_dim 8
    assert acc.dense_flops_per_token == 2 * (acc.dense_parameters - v * h) + attention
    assert acc.active_ratio == pytest.approx(
        (2 * (acc.active_parameters - v * h) + attention) / acc.dense_flops_per_token)


def test_upcycle_command(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from workflows.cli import cli

    dense = _dense(tmp_path, "qwen3")
    out = tmp_path / "moe"
    args = ["upcycle", "--model", str(dense), "--out", str(out), "--num-experts", "3",
            "--top-k", "2"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "qwen3_moe written" in result.output and "active per token" in result.output
    assert (out / "manifest.json").exists()
    again = CliRunner().invoke(cli, args)
    assert "already complete, skipped" in again.output
    bad = CliRunner().invoke(cli, [*args[:-2], "--top-k", "4", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "top_k" in bad.output
    assert not (tmp_path / "x").exists()
