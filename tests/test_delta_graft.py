"""The delta engine: exact grafts onto MoE and dense targets, merge baselines, vocabulary rules,
checks that refuse bad input before writing, verify, parallel == serial, interrupted reruns."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from common import save_model, tiny_dims
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from components.delta.graft import GraftError, GraftInputs, GraftOptions, graft
from components.delta.methods import METHODS, SPARSIFIERS, dare, ties, trim
from components.delta.verify import REFERENCE_SPARSIFIERS, REFERENCES, verify
from components.moe.checkpoint import LazyCheckpoint
from components.moe.upcycle import UpcycleOptions, upcycle
from components.synthetic.hf import train_tokenizer

TINY = tiny_dims(80)


def _perturbed(base: Path, out: Path, seed: int, std: float = 0.01, extra_rows: int = 0,
               skip: tuple[str, ...] = ()) -> Path:
    model = AutoModelForCausalLM.from_pretrained(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not any(s in name for s in skip):
                param.add_(torch.randn(param.shape, generator=g) * std)
    if extra_rows:
        model.resize_token_embeddings(TINY["vocab_size"] + extra_rows)
    return save_model(model, out)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("graft")
    torch.manual_seed(0)
    tok = train_tokenizer(["hello world ok"] * 50, root / "tok", vocab_size=300)
    base = save_model(LlamaForCausalLM(LlamaConfig(**TINY)), root / "base")
    post = _perturbed(base, root / "post", seed=1)
    tok.save_pretrained(post)  # the post model's tokenizer and chat template go to the output
    cpt_dense = _perturbed(base, root / "cpt-dense", seed=2)
    moe_init = root / "moe-init"
    moe_init.mkdir()
    upcycle(base, moe_init, UpcycleOptions(num_experts=3, top_k=2, expert_noise_std=0.01,
                                           seed=4))
    # "CPT" of the MoE with anchor expert and shared weights frozen: only experts 1, 2 and the
    # routers move
    moe = AutoModelForCausalLM.from_pretrained(moe_init)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in moe.named_parameters():
            if "experts" in name:
                param[1:].add_(torch.randn(param[1:].shape, generator=g) * 0.01)
            elif name.endswith("mlp.gate.weight"):
                param.add_(torch.randn(param.shape, generator=g) * 0.01)
    cpt_moe = save_model(moe, root / "cpt-moe")  # per-expert keys on disk
    fused = root / "cpt-moe-fused"
    moe.save_pretrained(fused, save_original_format=False)
    (fused / "allocation.json").write_text('{"experts": {"swh_Latn": [1, 2]}}')
    return {"root": root, "base": base, "post": post, "cpt_dense": cpt_dense,
            "cpt_moe": cpt_moe, "cpt_moe_fused": fused}


def _state(path: Path) -> dict[str, torch.Tensor]:
    with LazyCheckpoint(path) as ckpt:
        return {k: ckpt.get(k) for k in ckpt.keys()}


def _graft(pair: dict[str, Path], tmp_path: Path, target: str, name: str = "out",
           **options: object) -> Path:
    out = tmp_path / name
    out.mkdir()
    inputs = GraftInputs(str(pair["base"]), str(pair["post"]), str(pair[target]))
    graft(inputs, out, GraftOptions(**options))
    return out


@pytest.mark.parametrize("target", ["cpt_moe", "cpt_moe_fused"])
def test_deltamoe_graft_is_exact_in_both_layouts(pair: dict[str, Path], tmp_path: Path,
                                                 target: str) -> None:
    out = _graft(pair, tmp_path, target, method="deltamoe", max_shard_bytes=40_000)
    base, post, cpt = _state(pair["base"]), _state(pair["post"]), _state(pair[target])
    result = _state(out)
    assert sorted(result) == sorted(cpt)
    for layer in range(TINY["num_hidden_layers"]):
        dense = {p: f"model.layers.{layer}.mlp.{p}.weight" for p in ("gate_proj", "up_proj",
                                                                     "down_proj")}
        delta = {p: post[k] - base[k] for p, k in dense.items()}
        if target == "cpt_moe_fused":
            gate_up = f"model.layers.{layer}.mlp.experts.gate_up_proj"
            down = f"model.layers.{layer}.mlp.experts.down_proj"
            full = torch.cat([delta["gate_proj"], delta["up_proj"]])
            for e in (1, 2):  # trained experts: θ_T + Δ, in memory
                assert torch.equal(result[gate_up][e], (cpt[gate_up][e] - torch.cat(
                    [base[dense["gate_proj"]], base[dense["up_proj"]]])) + torch.cat(
                    [post[dense["gate_proj"]], post[dense["up_proj"]]]))
                assert torch.allclose(result[down][e], cpt[down][e] + delta["down_proj"],
                                      atol=1e-6)
                assert torch.allclose(result[gate_up][e], cpt[gate_up][e] + full, atol=1e-6)
            # frozen anchor expert: exactly θ_post's FFN
            assert torch.equal(result[gate_up][0], torch.cat([post[dense["gate_proj"]],
                                                              post[dense["up_proj"]]]))
            assert torch.equal(result[down][0], post[dense["down_proj"]])
            assert torch.equal(result[f"model.layers.{layer}.mlp.gate.weight"],
                               cpt[f"model.layers.{layer}.mlp.gate.weight"])  # router: nothing
        else:
            names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
            for proj, short in names.items():
                for e in range(3):
                    key = f"model.layers.{layer}.block_sparse_moe.experts.{e}.{short}.weight"
                    expected = (cpt[key] - base[dense[proj]]) + post[dense[proj]]
                    assert torch.equal(result[key], expected), key
                anchor = f"model.layers.{layer}.block_sparse_moe.experts.0.{short}.weight"
                assert torch.equal(result[anchor], post[dense[proj]])
            router = f"model.layers.{layer}.block_sparse_moe.gate.weight"
            assert torch.equal(result[router], cpt[router])
    for key in base:  # frozen shared tensors: exactly θ_post
        if ".mlp." not in key:
            assert torch.equal(result[key], post[key]), key
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral"
    assert (out / "tokenizer.json").read_bytes() == (pair["post"] / "tokenizer.json").read_bytes()
    assert "θ_CPT-MoE + λ · Expand(θ_post − θ_base)" in (out / "README.md").read_text()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # shard-bounded
    if target == "cpt_moe_fused":
        assert (out / "allocation.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3,
                          do_sample=False).shape == (1, 6)


def test_scales_and_parallel_workers_match(pair: dict[str, Path], tmp_path: Path) -> None:
    options = dict(method="deltamoe", scale=0.5, expert_scales={0: 0.0, 2: 2.0},
                   family_scales={"attention": 0.0})
    serial = _graft(pair, tmp_path, "cpt_moe_fused", "serial", **options)
    parallel = _graft(pair, tmp_path, "cpt_moe_fused", "parallel", workers=2, **options)
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
               for p in serial.iterdir() if p.suffix == ".safetensors"}
    assert digests == {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                       for p in parallel.iterdir() if p.suffix == ".safetensors"}
    base, post, cpt = list(_state(pair[k]) for k in ("base", "post", "cpt_moe_fused"))
    out = _state(serial)
    key = "model.layers.1.mlp.experts.down_proj"
    dense = "model.layers.1.mlp.down_proj.weight"
    delta = post[dense] - base[dense]
    assert torch.equal(out[key][0], cpt[key][0])  # α_0 = 0
    assert torch.equal(out[key][1], cpt[key][1] + 0.5 * delta)
    # effective scale 0.5 · 2 = 1: the exact form (θ_T − θ_B) + θ_P
    assert torch.equal(out[key][2], (cpt[key][2] - base[dense]) + post[dense])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(out[q], cpt[q])  # attention family scaled to 0
    norm = "model.norm.weight"
    assert torch.equal(out[norm], cpt[norm] + 0.5 * (post[norm] - base[norm]))


def test_dense_baselines(pair: dict[str, Path], tmp_path: Path) -> None:
    base, post, cpt = (_state(pair[k]) for k in ("base", "post", "cpt_dense"))
    param_delta = _state(_graft(pair, tmp_path, "cpt_dense", "pd", method="param_delta"))
    arithmetic = _state(_graft(pair, tmp_path, "cpt_dense", "ta", method="task_arithmetic",
                               scale=1.0))
    half = _state(_graft(pair, tmp_path, "cpt_dense", "ta-half", method="task_arithmetic",
                         scale=0.5))
    for key in base:
        assert torch.equal(param_delta[key], (cpt[key] - base[key]) + post[key])
        assert torch.allclose(arithmetic[key], param_delta[key], atol=1e-6)
        expected = base[key] + 0.5 * ((cpt[key] - base[key]) + (post[key] - base[key]))
        assert torch.equal(half[key], expected)
    merged = _state(_graft(pair, tmp_path, "cpt_dense", "ties", method="ties", density=0.3))
    key = "model.layers.0.mlp.up_proj.weight"
    tau = [cpt[key] - base[key], post[key] - base[key]]
    assert torch.equal(merged[key], base[key] + ties(tau, 0.3))
    first = _graft(pair, tmp_path, "cpt_dense", "dare1", method="dare", density=0.5, seed=7)
    again = _graft(pair, tmp_path, "cpt_dense", "dare2", method="dare", density=0.5, seed=7,
                   workers=2)
    assert _state(first).keys() == _state(again).keys()
    assert all(torch.equal(a, b) for a, b in zip(_state(first).values(),
                                                 _state(again).values(), strict=True))
    with pytest.raises(GraftError, match=r"model_type 'mixtral' does not fit base 'llama' for "
                                         r"method ties"):
        _graft(pair, tmp_path, "cpt_moe", "bad", method="ties")


def test_sparsifiers() -> None:
    delta = torch.tensor([0.5, -0.1, 0.3, -0.7, 0.05])
    assert torch.equal(trim(delta, 0.4), torch.tensor([0.5, 0.0, 0.0, -0.7, 0.0]))
    a, b = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([3.0, 1.0, -1.0])
    # signs: +, -, +; disjoint means of agreeing entries
    assert ties([a, b], 1.0).tolist() == [2.0, -2.0, 3.0]
    dropped = dare(torch.ones(10_000), 0.25, seed=3)
    kept = dropped[dropped != 0]
    assert torch.all(kept == 4.0) and abs(kept.numel() / 10_000 - 0.25) < 0.02
    assert torch.equal(dare(torch.ones(50), 0.25, 3), dare(torch.ones(50), 0.25, 3))


def test_vocabulary_rules(pair: dict[str, Path], tmp_path: Path) -> None:
    root = pair["root"]
    post_big = _perturbed(pair["base"], root / "post-big", seed=8, extra_rows=4)
    out = tmp_path / "vocab"
    out.mkdir()
    graft(GraftInputs(str(pair["base"]), str(post_big), str(pair["cpt_dense"])), out,
          GraftOptions(method="param_delta"))
    base, post, cpt, res = (_state(p) for p in (pair["base"], post_big, pair["cpt_dense"], out))
    emb = "model.embed_tokens.weight"
    assert res[emb].shape[0] == TINY["vocab_size"] + 4
    assert torch.equal(res[emb][:80], (cpt[emb] - base[emb]) + post[emb][:80])
    assert torch.equal(res[emb][80:], post[emb][80:])  # added rows come from post
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 84
    # a target that extended its vocabulary keeps its new rows
    cpt_big = _perturbed(pair["base"], root / "cpt-big", seed=9, extra_rows=2)
    out2 = tmp_path / "vocab2"
    out2.mkdir()
    graft(GraftInputs(str(pair["base"]), str(pair["post"]), str(cpt_big)), out2,
          GraftOptions(method="param_delta"))
    res2, big = _state(out2), _state(cpt_big)
    assert torch.equal(res2["lm_head.weight"][80:], big["lm_head.weight"][80:])
    out3 = tmp_path / "vocab3"
    out3.mkdir()
    with pytest.raises(GraftError, match=r"both post .* and target .* extend"):
        graft(GraftInputs(str(pair["base"]), str(post_big), str(cpt_big)), out3,
              GraftOptions(method="param_delta"))
    assert list(out3.iterdir()) == []


def test_tied_embeddings_are_handled_once(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY, "tie_word_embeddings": True})
    base = save_model(LlamaForCausalLM(config), tmp_path / "base")
    post = _perturbed(base, tmp_path / "post", seed=1)
    cpt = _perturbed(base, tmp_path / "cpt", seed=2)
    out = tmp_path / "out"
    out.mkdir()
    graft(GraftInputs(str(base), str(post), str(cpt)), out, GraftOptions(method="param_delta"))
    state = _state(out)
    assert "lm_head.weight" not in state
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def _corrupt_copy(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_checks_refuse_bad_input_before_writing(pair: dict[str, Path], tmp_path: Path) -> None:
    base, post, cpt = (str(pair[k]) for k in ("base", "post", "cpt_dense"))
    out = tmp_path / "out"
    out.mkdir()

    def attempt(b: str, p: str, t: str, match: str, **options: object) -> None:
        with pytest.raises(GraftError, match=match):
            graft(GraftInputs(b, p, t), out, GraftOptions(method="param_delta", **options))
        assert list(out.iterdir()) == [], match

    nan = _corrupt_copy(pair["post"], tmp_path / "nan",
                        lambda s: s["model.layers.1.mlp.up_proj.weight"].__setitem__(
                            (0, 0), float("nan")))
    attempt(base, str(nan), cpt, r"post tensor model\.layers\.1\.mlp\.up_proj\.weight holds NaN")
    shape = _corrupt_copy(pair["post"], tmp_path / "shape", lambda s: s.__setitem__(
        "model.layers.0.self_attn.q_proj.weight", torch.zeros(16, 32)))
    attempt(base, str(shape), cpt, r"shape mismatch in model\.layers\.0\.self_attn\.q_proj")
    dtype = _corrupt_copy(pair["post"], tmp_path / "dtype", lambda s: s.__setitem__(
        "model.norm.weight", s["model.norm.weight"].to(torch.bfloat16)))
    attempt(base, str(dtype), cpt, r"model\.norm\.weight: dtype F32 in base, BF16 in post")
    other = tmp_path / "qwen"
    other.mkdir()
    config = json.loads((pair["post"] / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    attempt(base, str(other), cpt, "architecture mismatch: base is 'llama', post is 'qwen2'")
    attempt(base, post, str(pair["cpt_moe"]), "target model_type 'mixtral' does not fit")
    missing = _corrupt_copy(pair["post"], tmp_path / "missing", lambda s: s.pop("lm_head.weight"))
    attempt(base, str(missing), cpt, "base and post hold different tensors")
    attempt(base, post, str(tmp_path / "nowhere"), "no config.json")
    attempt(base, post, cpt, "density", density=0.0)
    attempt(base, post, cpt, r"sparsify 'magic': expected auto, none, ties, dare",
            sparsify="magic")


# one case per method (and a sparsify override): target, options, an output tensor to corrupt
VERIFY_CASES = {
    "deltamoe": ("cpt_moe", dict(scale=0.7, expert_scales={2: 1.5}, family_scales={"norm": 0.5}),
                 "model.layers.1.block_sparse_moe.experts.2.w2.weight"),
    "deltamoe-fused": ("cpt_moe_fused", dict(method="deltamoe"),
                       "model.layers.0.mlp.experts.gate_up_proj"),
    "deltamoe-ties": ("cpt_moe_fused", dict(method="deltamoe", sparsify="ties", density=0.4),
                      "model.layers.1.mlp.experts.down_proj"),
    "param_delta": ("cpt_dense", dict(scale=0.5), "model.layers.0.self_attn.v_proj.weight"),
    "task_arithmetic": ("cpt_dense", dict(), "model.norm.weight"),
    "ties": ("cpt_dense", dict(density=0.3), "model.layers.1.mlp.up_proj.weight"),
    "dare": ("cpt_dense", dict(density=0.5, seed=7), "lm_head.weight"),
}


@pytest.mark.parametrize("case", VERIFY_CASES)
def test_verify_checks_each_method_against_its_reference(pair: dict[str, Path], tmp_path: Path,
                                                         case: str) -> None:
    target, settings, victim = VERIFY_CASES[case]
    options = GraftOptions(**{"method": case, **settings})
    inputs = GraftInputs(str(pair["base"]), str(pair["post"]), str(pair[target]))
    out = tmp_path / "out"
    out.mkdir()
    graft(inputs, out, options)
    assert len(verify(inputs, out, options)) >= 8
    everything = verify(inputs, out, options, sample=10**6)
    assert sorted(everything) == sorted(_state(pair[target]))
    # one entry of one tensor nudged in its shard: caught, and named
    shard = out / json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][
        victim]
    state = load_file(shard)
    state[victim] = state[victim].clone()
    state[victim].view(-1)[5] += 1e-3
    save_file(state, shard, metadata={"format": "pt"})
    with pytest.raises(GraftError, match=rf"{victim} differs from the reference computation"):
        verify(inputs, out, options, sample=10**6)
    # options the graft was not built with do not verify either
    with pytest.raises(GraftError, match="differs from the reference"):
        verify(inputs, out, replace(options, scale=options.scale + 0.25), sample=10**6)


def test_verify_catches_a_bug_in_the_streaming_graft(pair: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference shares no code with the engine, so an engine bug that an identical
    recomputation would repeat is caught: here every tensor is misfiled as ``mlp``."""
    monkeypatch.setattr("components.delta.graft.family_of", lambda key: "mlp")
    options = GraftOptions(method="deltamoe", family_scales={"attention": 0.0})
    inputs = GraftInputs(str(pair["base"]), str(pair["post"]), str(pair["cpt_moe_fused"]))
    out = tmp_path / "out"
    out.mkdir()
    graft(inputs, out, options)
    with pytest.raises(GraftError, match=r"self_attn\.\w+\.weight differs from the reference"):
        verify(inputs, out, options, sample=10**6)


def test_methods_registry_is_light_and_complete() -> None:
    code = "import components.delta.methods, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
    assert set(REFERENCES) == set(METHODS) and set(REFERENCE_SPARSIFIERS) == set(SPARSIFIERS)
    for name, method in METHODS.items():
        assert method.name == name and method.sparsify in SPARSIFIERS and method.help
        assert method.with_sparsify("auto") is method
        assert method.with_sparsify("dare").combine is not None
    assert METHODS["task_arithmetic"].elementwise and not METHODS["ties"].elementwise
    with pytest.raises(ValueError, match="sparsify 'magic'"):
        METHODS["deltamoe"].with_sparsify("magic")
    # the engine's sparsifiers and the reference's, on deltas with ties at the TIES threshold
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(40, 9, generator=g).round(decimals=1) for _ in range(3)]
    for name, combine in SPARSIFIERS.items():
        for density in (0.2, 0.5, 1.0):
            assert torch.equal(combine(deltas, density, 3, "k"),
                               REFERENCE_SPARSIFIERS[name](deltas, density, 3, "k")), name


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "workflows.cli", *args], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_graft_command_interrupted_then_rerun_is_byte_identical(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY, "num_hidden_layers": 12, "hidden_size": 128,
                            "intermediate_size": 512})
    base = save_model(LlamaForCausalLM(config), tmp_path / "base")
    post = _perturbed(base, tmp_path / "post", seed=1)
    cpt = _perturbed(base, tmp_path / "cpt", seed=2)
    args = ["graft", "--base", str(base), "--post", str(post), "--target", str(cpt),
            "--method", "dare", "--density", "0.5", "--max-shard-size", "300KB"]
    # the two outputs share their folder name (the card's title is the output's name)
    clean_dir = tmp_path / "clean" / "dare"
    clean = _cli(*args, "--out", str(clean_dir), "--verify")
    assert clean.returncode == 0, clean.stderr
    assert "verified" in clean.stdout and "dare written" in clean.stdout
    killed = tmp_path / "killed"
    out = killed / "dare"
    proc = subprocess.Popen([sys.executable, "-m", "workflows.cli", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(killed.glob("dare*/unit-*.safetensors")):
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert list(killed.glob("dare*/unit-*.safetensors")), "killed before any write"
    assert not (out / "manifest.json").exists()
    assert not list(killed.glob("dare*/model.safetensors.index.json"))
    rerun = _cli(*args, "--out", str(out))
    assert rerun.returncode == 0, rerun.stderr
    files = sorted(p.name for p in clean_dir.iterdir() if p.name != "manifest.json")
    assert files == sorted(p.name for p in out.iterdir() if p.name != "manifest.json")
    for name in files:
        assert (out / name).read_bytes() == (clean_dir / name).read_bytes(), name
    assert not [p for p in killed.iterdir() if p.name.startswith("dare.")]
    again = _cli(*args, "--out", str(out))
    assert "already complete, skipped" in again.stdout


def test_graft_command_errors(pair: dict[str, Path], tmp_path: Path) -> None:
    bad = _cli("graft", "--base", str(pair["base"]), "--post", str(pair["post"]), "--target",
               str(pair["cpt_moe"]), "--out", str(tmp_path / "x"), "--method", "param_delta")
    assert bad.returncode == 2 and "does not fit base 'llama'" in bad.stderr
    assert not (tmp_path / "x").exists()
    missing = _cli("graft", "--base", str(pair["base"]))
    assert missing.returncode == 2 and "--post, --target, --out required" in missing.stderr


def test_graft_stage_from_a_run_config(pair: dict[str, Path], tmp_path: Path) -> None:
    from components.config import parse_config
    from components.storage import RunDir
    from workflows.graft_stage import ensure_grafted

    cfg = parse_config({"run_name": "g", "models": {"base": str(pair["base"]),
                                                    "post": str(pair["post"])},
                        "languages": {"original": ["eng_Latn"], "new": ["swh_Latn"]},
                        "storage": {"root": str(tmp_path)}, "resources": {"num_workers": 1},
                        "graft": {"method": "deltamoe", "verify": True}})
    run_dir = RunDir(cfg.storage.root, cfg.run_name)
    with pytest.raises(FileNotFoundError, match=r"models/cpt_moe: not built yet"):
        ensure_grafted(cfg, run_dir)
    with run_dir.stage("models/cpt_moe").build("trained") as work:
        for path in pair["cpt_moe_fused"].iterdir():
            (work.path / path.name).write_bytes(path.read_bytes())
    manifest, built = ensure_grafted(cfg, run_dir)
    assert built and len(manifest.extra["verified"]) >= 8
    direct = _graft(pair, tmp_path, "cpt_moe_fused", "direct", method="deltamoe")
    graft_dir = tmp_path / "g" / "models" / "deltamoe"
    assert all(torch.equal(a, b) for a, b in zip(_state(direct).values(),
                                                 _state(graft_dir).values(), strict=True))
    assert not ensure_grafted(cfg, run_dir)[1]  # skipped on rerun
    # the baselines build the CPT-dense model later; the MoE graft does not depend on it
    with run_dir.stage("models/cpt_dense").build("dense") as work:
        (work.path / "config.json").write_text("{}")
    assert not ensure_grafted(cfg, run_dir)[1]


def test_graft_command_from_a_run_config_names_the_missing_stage(pair: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    import yaml

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "run_name": "cfg", "models": {"base": str(pair["base"]), "post": str(pair["post"])},
        "languages": {"original": ["eng_Latn"], "new": ["swh_Latn"]},
        "storage": {"root": str(tmp_path / "runs")},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"}}))
    proc = _cli("graft", str(config), "--method", "param_delta")
    assert proc.returncode == 2
    assert "models/cpt_dense: not built yet" in proc.stderr
    assert not (tmp_path / "runs" / "cfg" / "models" / "param_delta").exists()
