"""Block expansion (LLaMA-Pro): exact at init, only new blocks train, parameters matched to the
MoE's trainable ones, Δpost at the shifted layers, and the variant in every registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from common import tiny_dims
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from components.block_expansion import (
    blocks_to_match,
    expand_blocks,
    moe_trainable_parameters,
    new_layers,
    plan_blocks,
)
from components.delta.graft import GraftError, GraftInputs, GraftOptions, graft
from components.delta.methods import METHODS
from components.delta.verify import verify
from components.moe.upcycle import UpcycleOptions, upcycle
from components.train.fsdp import set_trainable
from components.variants import BASELINES, VARIANTS, get_variant
from workflows.train_stage import TRAINING_VARIANTS

TINY = tiny_dims(97, num_hidden_layers=4)


def _dense(root: Path, family: str, name: str = "dense", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    if family == "qwen3":  # sliding layers make layer_types a real per-layer list
        config = Qwen3Config(**TINY, head_dim=8, use_sliding_window=True, sliding_window=4,
                             max_window_layers=2)
        model = Qwen3ForCausalLM(config)
    else:
        model = LlamaForCausalLM(LlamaConfig(**TINY))
    path = root / name
    model.eval().save_pretrained(path)
    return path


def _state(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def test_plan_spreads_blocks_evenly() -> None:
    assert [(x.source, x.new) for x in plan_blocks(4, 2)] == [
        (0, False), (1, False), (1, True), (2, False), (3, False), (3, True)]
    assert sum(x.new for x in plan_blocks(4, 9)) == 9  # more than one per block when P > L
    assert [x.source for x in plan_blocks(4, 9) if not x.new] == [0, 1, 2, 3]
    assert blocks_to_match(100, 349) == 3 and blocks_to_match(100, 10) == 1


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_expanded_model_computes_the_dense_model_exactly(tmp_path: Path, family: str) -> None:
    dense = _dense(tmp_path, family)
    out = tmp_path / "expanded"
    out.mkdir()
    result = expand_blocks(dense, out, 3, max_shard_bytes=40_000)
    assert result.new_layers == new_layers(out) == (2, 4, 6)  # after dense blocks 1, 2 and 3
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 7 and config["model_type"] == family
    if family == "qwen3":
        before = json.loads((dense / "config.json").read_text())["layer_types"]
        assert config["layer_types"] == [before[x.source] for x in result.layers]
    ids = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
              for p in (dense, out)]
    with torch.no_grad():
        logits = [m(ids).logits for m in models]
    assert len(models[1].model.layers) == 7
    assert torch.equal(logits[0], logits[1])
    # a new block is its source block with the output projections zeroed, nothing else
    weights = _state(out)
    src = _state(dense)
    assert torch.equal(weights["model.layers.2.self_attn.q_proj.weight"],
                       src["model.layers.1.self_attn.q_proj.weight"])
    assert not weights["model.layers.2.mlp.down_proj.weight"].any()
    assert not weights["model.layers.2.self_attn.o_proj.weight"].any()
    assert torch.equal(weights["model.layers.3.mlp.down_proj.weight"],
                       src["model.layers.2.mlp.down_proj.weight"])
    record = json.loads((out / "expansion.json").read_text())
    assert record["added_parameters"] == 3 * record["block_parameters"]


def test_only_new_blocks_train_and_match_the_moe(tmp_path: Path) -> None:
    dense = _dense(tmp_path, "llama")
    moe = tmp_path / "moe"
    moe.mkdir()
    upcycle(dense, moe, UpcycleOptions(num_experts=4, top_k=2))
    matched = moe_trainable_parameters(moe)
    hidden, inter, layers = TINY["hidden_size"], TINY["intermediate_size"], 4
    assert matched == layers * (3 * 3 * hidden * inter + 4 * hidden)  # 3 new experts + router
    assert moe_trainable_parameters(moe, anchor_frozen=False) == \
        matched + layers * 3 * hidden * inter
    block = sum(t.numel() for k, t in _state(dense).items() if k.startswith("model.layers.0."))
    count = blocks_to_match(block, matched)
    out = tmp_path / "expanded"
    out.mkdir()
    result = expand_blocks(dense, out, count, matched_parameters=matched)
    assert abs(result.added_parameters - matched) <= block / 2  # the nearest whole block
    assert abs(result.added_parameters - matched) / matched < 0.1
    model = AutoModelForCausalLM.from_pretrained(out)
    set_trainable(model, "dense", True, True, result.new_layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()
                         if n.split(".")[:2] == ["model", "layers"]
                         and int(n.split(".")[2]) in result.new_layers}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == \
        result.added_parameters


def test_graft_puts_each_delta_at_its_shifted_layer(tmp_path: Path) -> None:
    base = _dense(tmp_path, "llama")
    post = _dense(tmp_path, "llama", "post", seed=1)
    expanded = tmp_path / "expanded"
    expanded.mkdir()
    layers = expand_blocks(base, expanded, 2).layers
    target = tmp_path / "cpt"
    target.mkdir()
    generator = torch.Generator().manual_seed(3)
    weights = {k: t + 0.01 * torch.randn(t.shape, generator=generator)
               for k, t in _state(expanded).items()}  # "trained": every tensor moved
    save_file(weights, target / "model.safetensors")
    for name in ("config.json", "expansion.json"):
        (target / name).write_text((expanded / name).read_text())
    out = tmp_path / "grafted"
    out.mkdir()
    options = GraftOptions(method="block_expansion")
    inputs = GraftInputs(str(base), str(post), str(target))
    graft(inputs, out, options)
    result, b, p = _state(out), _state(base), _state(post)
    for j, layer in enumerate(layers):
        for key in (k for k in weights if k.startswith(f"model.layers.{j}.")):
            dense_key = key.replace(f"model.layers.{j}.", f"model.layers.{layer.source}.")
            want = weights[key] if layer.new else (weights[key] - b[dense_key]) + p[dense_key]
            assert torch.equal(result[key], want), key
    assert torch.equal(result["model.norm.weight"],
                       (weights["model.norm.weight"] - b["model.norm.weight"])
                       + p["model.norm.weight"])
    assert verify(inputs, out, options, sample=64)
    with pytest.raises(GraftError, match="block-expanded"):
        graft(inputs, tmp_path / "x", GraftOptions(method="param_delta"))
    with pytest.raises(GraftError, match=r"no expansion\.json"):
        graft(GraftInputs(str(base), str(post), str(post)), tmp_path / "y", options)


def test_variant_is_registered_and_the_old_name_says_the_new_one() -> None:
    v = get_variant("block_expansion")
    assert (v.upcycled, v.trained, v.graft) == ("blocks_init", "cpt_block_expansion",
                                                "block_expansion")
    assert "block_expansion" in BASELINES and "block_expansion" in TRAINING_VARIANTS
    assert METHODS["block_expansion"].expanded_target
    assert "moe_unfrozen" in VARIANTS and "param_matched" not in VARIANTS
    with pytest.raises(ValueError, match="now called 'moe_unfrozen'"):
        get_variant("param_matched")
    from components.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="now called 'moe_unfrozen'"):
        parse_config({"run_name": "r", "models": {"base": "b", "post": "p"},
                      "languages": {"original": ["eng_Latn"], "new": ["swh_Latn"]},
                      "baselines": {"variants": ["param_matched"]}}, env={})
