"""Models in and out are what they claim to be, through the console entry point: an upcycled MoE
computes exactly what its dense model computes for every config feature that changes the
computation (or the upcycle is refused); a graft target holds exactly the tensors its method
expects; flags and files that would be silently wrong are refused; weight shards follow the
umask."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from common import save_model, tiny_dims
from safetensors.torch import load_file, save_file
from test_bad_inputs import looks_complete, run_cli
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from components.delta.verify import _Files
from components.moe.checkpoint import CheckpointError

VOCAB = 96
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8,
               "rope_theta": 500000.0}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
        "rope_theta": 10000.0}
WINDOW = {"use_sliding_window": True, "sliding_window": 4}  # 12 tokens: the window matters
# family: {case: (config changes, the class the upcycle must choose)}
EXACT_CASES: dict[str, dict[str, tuple[dict[str, Any], str]]] = {
    "llama": {
        "attention_bias": ({"attention_bias": True}, "deltamoe"),
        "mlp_bias": ({"mlp_bias": True}, "deltamoe"),
        "head_dim": ({"head_dim": 16}, "mixtral"),
        "rope_llama3": ({"rope_parameters": LLAMA3_ROPE}, "mixtral"),
        "rope_legacy_fields": ({"rope_parameters": LLAMA3_ROPE}, "mixtral"),  # see _legacy
        "rope_yarn_tied": ({"rope_parameters": YARN, "tie_word_embeddings": True}, "mixtral"),
        "sliding_window_ignored": ({"sliding_window": 4}, "mixtral"),  # Llama never slides
    },
    "mistral": {
        "sliding_window": ({"sliding_window": 4}, "mixtral"),
        "head_dim_tied": ({"head_dim": 16, "tie_word_embeddings": True}, "mixtral"),
        "rope_dynamic": ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0,
                                              "rope_theta": 10000.0},
                          "max_position_embeddings": 8}, "mixtral"),
    },
    "qwen2": {
        "qkv_bias": ({}, "qwen2_moe"),
        "sliding_some_layers": ({**WINDOW, "max_window_layers": 1}, "qwen2_moe"),
        "head_dim_tied_yarn": ({"head_dim": 16, "tie_word_embeddings": True,
                                "rope_parameters": YARN}, "qwen2_moe"),
    },
    "qwen3": {
        "qk_norms": ({"head_dim": 8}, "qwen3_moe"),
        "attention_bias": ({"head_dim": 8, "attention_bias": True}, "qwen3_moe"),
        "head_dim_tied": ({"head_dim": 16, "tie_word_embeddings": True}, "qwen3_moe"),
        "sliding_all_layers": ({"head_dim": 8, **WINDOW, "max_window_layers": 0}, "qwen3_moe"),
        "sliding_some_layers": ({"head_dim": 8, **WINDOW, "max_window_layers": 1}, "deltamoe"),
    },
}


def _dense(path: Path, family: str, changes: dict[str, Any]) -> Path:
    """A tiny dense model whose biases and norm weights hold random values (transformers
    initialises them to zero and one, which would hide a dropped bias or norm)."""
    config = AutoConfig.for_model(family, **tiny_dims(VOCAB, **changes))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.5)
            elif "norm" in name:
                param.uniform_(0.5, 1.5)
    return save_model(model, path)


def _legacy(path: Path) -> None:
    """Rewrite config.json with transformers 4's rotary fields (Llama-3.1 on the hub)."""
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    (path / "config.json").write_text(json.dumps(config))


def _logits(path: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                       output_loading_info=True)
    with torch.no_grad():
        return model.eval()(IDS).logits, info


@pytest.mark.parametrize("case", [f"{family}:{name}" for family, cases in EXACT_CASES.items()
                                  for name in cases])
def test_upcycle_is_exact_for_every_config_feature(case: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    family, name = case.split(":")
    changes, expected_type = EXACT_CASES[family][name]
    dense = _dense(tmp_path / "dense", family, changes)
    if name == "rope_legacy_fields":
        _legacy(dense)
    out = tmp_path / "moe"
    code, text = run_cli(["upcycle", "--model", str(dense), "--out", str(out),
                          "--num-experts", "4", "--top-k", "2"], capsys, monkeypatch)
    assert code == 0, text
    assert json.loads((out / "config.json").read_text())["model_type"] == expected_type
    want, _ = _logits(dense)
    got, info = _logits(out)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[kind], (kind, info[kind])
    assert (got - want).abs().max().item() <= 1e-5


def test_ffn_biases_upcycle_into_every_expert_and_take_their_delta(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A Llama with ``mlp_bias``: every expert of the own class keeps the FFN biases, a graft
    adds the dense bias delta to each, and a target missing one expert's bias is refused."""
    base = _dense(tmp_path / "base", "llama", {"mlp_bias": True})
    post = _rewrite(base, tmp_path / "post", lambda t: [v.add_(0.01) for v in t.values()])
    moe, out = tmp_path / "moe", tmp_path / "out"
    for args in (["upcycle", "--model", str(base), "--out", str(moe)],
                 ["graft", "--base", str(base), "--post", str(post), "--target", str(moe),
                  "--out", str(out)]):
        code, text = run_cli(args, capsys, monkeypatch)
        assert code == 0, text
    dense, grafted = load_file(base / "model.safetensors"), {}
    for shard in out.glob("model-*.safetensors"):
        grafted.update(load_file(shard))
    key = "model.layers.1.mlp.down_proj.bias"
    for expert in range(4):
        got = grafted[f"model.layers.1.mlp.experts.{expert}.down_proj.bias"]
        assert torch.allclose(got, dense[key] + 0.01, atol=1e-6)
    single = _single_file_moe(tmp_path, base, "moe-single")
    lacking = _rewrite(single, tmp_path / "moe-no-bias",
                       _without("model.layers.0.mlp.experts.3.up_proj.bias"))
    code, text = run_cli(["graft", "--base", str(base), "--post", str(post), "--target",
                          str(lacking), "--out", str(tmp_path / "out2")], capsys, monkeypatch)
    assert code == 2, text
    assert "model.layers.0.mlp.experts.3.up_proj.bias is missing" in text
    assert not looks_complete(tmp_path / "out2")


def test_upcycle_backstop_refuses_a_class_that_would_drop_tensors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Were a feature missing from compat's list, the meta-device comparison still refuses the
    class: here the list is emptied and Mixtral offered a Llama with attention biases."""
    import components.moe.upcycle as upcycle_module

    monkeypatch.setattr(upcycle_module, "standard_gaps", lambda family, config: [])
    dense = _dense(tmp_path / "dense", "llama", {"attention_bias": True})
    out = tmp_path / "moe"
    code, text = run_cli(["upcycle", "--model", str(dense), "--out", str(out)],
                         capsys, monkeypatch)
    assert code == 2, text
    assert "MixtralForCausalLM cannot hold this model" in text and "self_attn" in text
    assert not looks_complete(out)


# --- inputs shared by the graft and file cases ------------------------------------------------


def _rewrite(src: Path, dst: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of single-file model ``src`` whose tensors went through ``change``."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "manifest.json"))
    tensors = {k: v.clone() for k, v in load_file(src / "model.safetensors").items()}
    change(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _single_file_moe(root: Path, base: Path, name: str, *extra: str) -> Path:
    """An upcycled MoE of ``base`` as one model.safetensors (so cases can drop a tensor)."""
    from components.moe.upcycle import UpcycleOptions, upcycle

    out = root / name
    out.mkdir()
    layout = extra[0] if extra else "per_expert"
    upcycle(base, out, UpcycleOptions(num_experts=4, top_k=2, layout=layout))
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("model-*.safetensors")):
        tensors.update(load_file(shard))
        shard.unlink()
    (out / "model.safetensors.index.json").unlink()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _without(*keys: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        for key in keys:
            del tensors[key]
    return change


def _adding(key: str, shape: tuple[int, ...]) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = torch.zeros(shape)
    return change


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("integrity")
    torch.manual_seed(0)
    base = save_model(LlamaForCausalLM(LlamaConfig(**tiny_dims(VOCAB))), root / "base")
    post = _rewrite(base, root / "post", lambda t: [v.add_(0.01) for v in t.values()])
    moe = _single_file_moe(root, base, "moe")
    v_proj = "model.layers.1.self_attn.v_proj.weight"
    return {
        "root": root, "base": base, "post": post, "moe": moe,
        "moe-no-v_proj": _rewrite(moe, root / "moe-no-v", _without(v_proj)),
        "moe-no-w1": _rewrite(moe, root / "moe-no-w1", _without(
            "model.layers.0.block_sparse_moe.experts.2.w1.weight")),
        "moe-no-router": _rewrite(moe, root / "moe-no-router", _without(
            "model.layers.1.block_sparse_moe.gate.weight")),
        "moe-dense-ffn-too": _rewrite(moe, root / "moe-dense-ffn", _adding(
            "model.layers.0.mlp.up_proj.weight", (48, 32))),
        "fused-no-down": _rewrite(_single_file_moe(root, base, "fused", "fused"),
                                  root / "fused-no-down",
                                  _without("model.layers.1.mlp.experts.down_proj")),
        "dense-no-v_proj": _rewrite(post, root / "dense-no-v", _without(v_proj)),
        "dense-with-router": _rewrite(post, root / "dense-router", _adding(
            "model.layers.0.block_sparse_moe.gate.weight", (4, 32))),
    }


DENSE_METHODS = ("param_delta", "task_arithmetic", "ties", "dare")
TENSOR_CASES = {
    # case: (method, target, words the message must contain)
    "deltamoe: missing v_proj": ("deltamoe", "moe-no-v_proj",
                                 ["model.layers.1.self_attn.v_proj.weight", "missing"]),
    "deltamoe: one expert's w1 missing": ("deltamoe", "moe-no-w1", [
        "model.layers.0.block_sparse_moe.experts.2.w1.weight", "missing"]),
    "deltamoe: router missing": ("deltamoe", "moe-no-router",
                                 ["model.layers.1.block_sparse_moe.gate.weight", "missing"]),
    "deltamoe: dense FFN beside the experts": ("deltamoe", "moe-dense-ffn-too",
                                               ["unexpected", "model.layers.0.mlp.up_proj"]),
    "deltamoe: fused down_proj missing": ("deltamoe", "fused-no-down",
                                          ["model.layers.1.mlp.down_proj.weight", "missing"]),
    **{f"{m}: missing v_proj": (m, "dense-no-v_proj",
                                ["model.layers.1.self_attn.v_proj.weight", "missing"])
       for m in DENSE_METHODS},
    "param_delta: a router in a dense target": ("param_delta", "dense-with-router", [
        "unexpected", "model.layers.0.block_sparse_moe.gate.weight"]),
}


@pytest.mark.parametrize("case", sorted(TENSOR_CASES))
def test_graft_target_holds_exactly_the_expected_tensors(
        case: str, models: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    method, target, words = TENSOR_CASES[case]
    out = tmp_path / "out"
    code, text = run_cli(["graft", "--base", str(models["base"]), "--post", str(models["post"]),
                          "--target", str(models[target]), "--out", str(out), "--method",
                          method], capsys, monkeypatch)
    assert code == 2, text
    for word in [*words, str(models[target] / "model.safetensors")]:
        assert word in text, (case, text)
    assert "Traceback" not in text
    assert not looks_complete(out)


FLAG_CASES = {
    # case: (extra flags, method, words the message must contain)
    "expert index beyond the experts": (["--expert-scale", "9=0.5"], "deltamoe",
                                        ["expert scale 9", "0..3"]),
    "expert scale on a dense target": (["--expert-scale", "1=0.5"], "param_delta",
                                       ["dense target", "no experts"]),
    "unknown tensor family": (["--family-scale", "foo=2"], "deltamoe",
                              ["'foo'", "attention, mlp, norm, embed, lm_head"]),
    "NaN scale": (["--scale", "nan"], "deltamoe", ["scale", "finite"]),
    "infinite scale": (["--scale", "inf"], "deltamoe", ["scale", "finite"]),
    "NaN expert scale": (["--expert-scale", "1=nan"], "deltamoe", ["expert scale 1", "finite"]),
    "shard size unit": (["--max-shard-size", "12XB"], "deltamoe", ["'12XB'", "GiB"]),
}


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_graft_refuses_flags_that_would_be_ignored(
        case: str, models: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    extra, method, words = FLAG_CASES[case]
    target = models["moe"] if method == "deltamoe" else models["post"]
    out = tmp_path / "out"
    code, text = run_cli(["graft", "--base", str(models["base"]), "--post", str(models["post"]),
                          "--target", str(target), "--out", str(out), "--method", method,
                          *extra], capsys, monkeypatch)
    assert code == 2, text
    for word in words:
        assert word in text, (case, text)
    assert "Traceback" not in text and not out.exists()


def _config_edit(models: dict[str, Path], name: str,
                 change: Callable[[dict[str, Any]], Any] | str) -> Path:
    """A copy of the base whose config.json went through ``change`` (or became that text)."""
    path = models["root"] / name
    if not path.exists():
        shutil.copytree(models["base"], path)
        if isinstance(change, str):
            (path / "config.json").write_text(change)
        else:
            config = json.loads((path / "config.json").read_text())
            change(config)
            (path / "config.json").write_text(json.dumps(config))
    return path


def _outside_shard(models: dict[str, Path]) -> Path:
    """A sharded model whose index names one shard as ``../elsewhere/...``."""
    path = models["root"] / "escaping"
    if not path.exists():
        LlamaForCausalLM.from_pretrained(models["base"]).save_pretrained(
            path, max_shard_size="20KB")
        index = json.loads((path / "model.safetensors.index.json").read_text())
        shard = next(iter(index["weight_map"].values()))
        (models["root"] / "elsewhere").mkdir()
        shutil.copy(path / shard, models["root"] / "elsewhere" / shard)
        index["weight_map"] = {k: (f"../elsewhere/{v}" if v == shard else v)
                               for k, v in index["weight_map"].items()}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


Build = Callable[[dict[str, Path]], Path]
FILE_CASES: dict[str, tuple[Build, list[str]]] = {
    "config.json not JSON": (lambda m: _config_edit(m, "not-json", "{model_type: llama"),
                             ["config.json", "not JSON"]),
    "config.json without num_hidden_layers": (
        lambda m: _config_edit(m, "no-layers", lambda c: c.pop("num_hidden_layers")),
        ["config.json", "num_hidden_layers"]),
    # (a graft takes its vocabulary rows from the tensors, so this one is the upcycler's)
    "vocab_size disagrees with the embedding": (
        lambda m: _config_edit(m, "vocab", lambda c: c.update(vocab_size=VOCAB + 4)),
        [str(VOCAB), str(VOCAB + 4), "vocab_size"]),
    "index shard outside the model folder": (_outside_shard, ["outside", "../elsewhere"]),
}


@pytest.mark.parametrize(("case", "command"), [
    (case, command) for case in sorted(FILE_CASES) for command in ("upcycle", "graft")
    if command == "upcycle" or not case.startswith("vocab_size")])
def test_bad_model_files_are_one_clear_error(
        case: str, command: str, models: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    build, words = FILE_CASES[case]
    model = build(models)
    out = tmp_path / "out"
    if command == "upcycle":
        args = ["upcycle", "--model", str(model), "--out", str(out)]
    else:  # the bad model as post: every input of a graft is read the same way
        args = ["graft", "--base", str(models["base"]), "--post", str(model), "--target",
                str(models["moe"]), "--out", str(out)]
    code, text = run_cli(args, capsys, monkeypatch)
    assert code == 2, text
    for word in words:
        assert word in text, (case, text)
    assert "Traceback" not in text
    assert not looks_complete(out)


def test_verify_reader_refuses_an_escaping_index(models: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError, match="outside the model folder"):
        _Files(_outside_shard(models))


def test_upcycle_drops_a_stale_auto_map(models: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    dense = _config_edit(models, "auto-map", lambda c: c.update(
        auto_map={"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}))
    out = tmp_path / "moe"
    code, text = run_cli(["upcycle", "--model", str(dense), "--out", str(out)],
                         capsys, monkeypatch)
    assert code == 0, text
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and config["model_type"] == "mixtral"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_weight_shards_follow_the_umask(umask: int, models: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """safetensors writes 0600 whatever the umask; a serving process under another uid must be
    able to read what the umask allows, like every other output file."""
    previous = os.umask(umask)
    try:
        moe, grafted = tmp_path / "moe", tmp_path / "grafted"
        code, text = run_cli(["upcycle", "--model", str(models["base"]), "--out", str(moe)],
                             capsys, monkeypatch)
        assert code == 0, text
        code, text = run_cli(["graft", "--base", str(models["base"]), "--post",
                              str(models["post"]), "--target", str(moe), "--out",
                              str(grafted)], capsys, monkeypatch)
        assert code == 0, text
    finally:
        os.umask(previous)
    for folder in (moe, grafted):
        shards = sorted(folder.glob("*.safetensors"))
        assert shards
        for path in [*shards, folder / "config.json"]:
            assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
