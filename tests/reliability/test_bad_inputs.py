"""The bad-input matrix: each case goes through the real entry point (``workflows.cli.main``),
and must end with one clear message naming what is wrong, a non-zero exit, and no output that
looks complete (no manifest, no model files in the output folder)."""

from __future__ import annotations

import errno
import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from common import save_model, tiny_dims
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from components.moe.upcycle import UpcycleOptions, upcycle
from components.storage import MANIFEST
from workflows.cli import main

TINY = tiny_dims(96)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str],
            monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """Exit status and everything printed, through the console entry point itself."""
    monkeypatch.setattr(sys, "argv", ["deltamoe", *args])
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def looks_complete(out: Path) -> bool:
    return (out / MANIFEST).exists() or any(out.glob("*.safetensors")) or \
        (out / "config.json").exists()


def _edit(src: Path, dst: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of model ``src`` whose tensors went through ``change``."""
    dst.mkdir()
    for item in src.iterdir():
        if item.suffix != ".safetensors":
            (dst / item.name).write_bytes(item.read_bytes())
    tensors = {k: v.clone() for k, v in load_file(src / "model.safetensors").items()}
    change(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    base = save_model(LlamaForCausalLM(LlamaConfig(**TINY)), root / "base")
    post = _edit(base, root / "post", lambda t: [v.add_(0.01) for v in t.values()])
    moe = root / "moe"
    moe.mkdir()
    upcycle(base, moe, UpcycleOptions(num_experts=2, top_k=1))
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((base / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    missing = save_model(LlamaForCausalLM(LlamaConfig(**TINY)), root / "sharded-src")
    sharded = root / "missing-shard"
    LlamaForCausalLM.from_pretrained(missing).save_pretrained(sharded, max_shard_size="20KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()

    def shape(t: dict[str, torch.Tensor]) -> None:
        key = "model.layers.0.mlp.up_proj.weight"
        t[key] = torch.zeros(t[key].shape[0] + 1, t[key].shape[1])

    def vocab(t: dict[str, torch.Tensor]) -> None:
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            t[key] = t[key][:-8].clone()

    def nan(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.1.self_attn.q_proj.weight"][3, 5] = float("nan")

    qwen = Qwen2Config(**{**TINY, "intermediate_size": 48})
    return {
        "root": root, "base": base, "post": post, "moe": moe, "corrupt": corrupt,
        "missing_shard": sharded,
        "shape": _edit(post, root / "post-shape", shape),
        "vocab": _edit(post, root / "post-vocab", vocab),
        "nan": _edit(post, root / "post-nan", nan),
        "qwen": save_model(Qwen2ForCausalLM(qwen), root / "qwen"),
    }


GRAFT_CASES = {
    # case: (post, target, words the message must contain)
    "shape mismatch": ("shape", "moe", ["shape mismatch", "model.layers.0.mlp.up_proj.weight"]),
    "vocabulary mismatch": ("vocab", "moe", ["vocabulary mismatch", "post [88, 32]"]),
    "base/post architecture mismatch": ("qwen", "moe", ["architecture mismatch"]),
    "NaN weights": ("nan", "moe", ["NaN", "model.layers.1.self_attn.q_proj.weight"]),
    "corrupt safetensors": ("corrupt", "moe", ["corrupt", "safetensors"]),
    "missing shard": ("missing_shard", "moe", ["missing shard"]),
    "dense target for deltamoe": ("post", "post", ["dense", "param_delta"]),
}


@pytest.mark.parametrize("case", sorted(GRAFT_CASES))
def test_graft_refuses(case: str, models: dict[str, Path], tmp_path: Path,
                       capsys: pytest.CaptureFixture[str],
                       monkeypatch: pytest.MonkeyPatch) -> None:
    post, target, words = GRAFT_CASES[case]
    out = tmp_path / "out"
    code, text = run_cli(["graft", "--base", str(models["base"]), "--post", str(models[post]),
                          "--target", str(models[target]), "--out", str(out)],
                         capsys, monkeypatch)
    assert code == 2, text
    for word in words:
        assert word.lower() in text.lower(), (case, text)
    assert "Traceback" not in text
    assert not looks_complete(out)


UPCYCLE_CASES = {
    "corrupt safetensors": ("corrupt", [], ["safetensors"]),
    "missing shard": ("missing_shard", [], ["missing shard"]),
    "NaN weights": ("nan", [], ["NaN", "q_proj"]),
    "top-k above expert count": ("base", ["--num-experts", "2", "--top-k", "3"], ["top_k"]),
    "unsupported architecture": ("moe", [], ["mixtral"]),
}


@pytest.mark.parametrize("case", sorted(UPCYCLE_CASES))
def test_upcycle_refuses(case: str, models: dict[str, Path], tmp_path: Path,
                         capsys: pytest.CaptureFixture[str],
                         monkeypatch: pytest.MonkeyPatch) -> None:
    model, extra, words = UPCYCLE_CASES[case]
    out = tmp_path / "out"
    code, text = run_cli(["upcycle", "--model", str(models[model]), "--out", str(out), *extra],
                         capsys, monkeypatch)
    assert code == 2, text
    for word in words:
        assert word.lower() in text.lower(), (case, text)
    assert "Traceback" not in text
    assert not looks_complete(out)


def test_unwritable_output_path(models: dict[str, Path], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, text = run_cli(["upcycle", "--model", str(models["base"]), "--out",
                          str(blocker / "moe")], capsys, monkeypatch)
    assert code != 0 and "a-file" in text and "Traceback" not in text
    assert blocker.read_text() == "not a folder"


def test_full_disk_leaves_nothing_complete(models: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills while shards are written (simulated where safetensors writes)."""
    import components.moe.checkpoint as checkpoint

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(args[1]))

    monkeypatch.setattr(checkpoint, "save_file", full)
    out = tmp_path / "moe"
    code, text = run_cli(["upcycle", "--model", str(models["base"]), "--out", str(out)],
                         capsys, monkeypatch)
    assert code != 0
    assert "No space left on device" in text and "Traceback" not in text
    assert not out.exists() and not list(tmp_path.glob("moe*"))


CONFIG_CASES = {
    "unknown language code": ({"languages": {"original": ["eng_Latn"], "new": ["swahil"]}},
                              ["languages.new", "swh_Latn"]),
    "wrong config types": ({"train": {"steps": "many"}}, ["train.steps", "integer"]),
    "unknown key": ({"upcycle": {"num_expert": 4}}, ["upcycle.num_expert", "num_experts"]),
    "top-k above expert count": ({"upcycle": {"num_experts": 2, "top_k": 3}}, ["upcycle.top_k"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_refuses(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                        monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    patch, words = CONFIG_CASES[case]
    raw = {"run_name": "bad", "world": {"num_people": 16},
           "languages": {"original": ["eng_Latn"], "new": ["swh_Latn"]},
           "storage": {"root": str(tmp_path / "runs")}, **patch}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    for command in (["config", "validate", str(path)], ["run", str(path)]):
        code, text = run_cli(command, capsys, monkeypatch)
        assert code == 2, text
        for word in words:
            assert word in text, (case, text)
    assert not (tmp_path / "runs").exists()  # refused before any stage started


def test_missing_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose base model folder has weights but no tokenizer: the data stage says so."""
    import yaml

    torch.manual_seed(0)
    base = save_model(LlamaForCausalLM(LlamaConfig(**TINY)), tmp_path / "base")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "habari ya asubuhi " * 5}) + "\n")
    raw = {"run_name": "notok", "models": {"base": str(base), "post": str(base)},
           "languages": {"original": ["eng_Latn"], "new": ["swh_Latn"]},
           "data": {"sources": [{"name": "c", "format": "jsonl", "path": str(corpus),
                                 "languages": ["swh_Latn"]}]},
           "storage": {"root": str(tmp_path / "runs")},
           "tracking": {"uri": f"sqlite:///{tmp_path}/m.db"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    code, text = run_cli(["data", str(path)], capsys, monkeypatch)
    assert code == 2, text
    assert "tokenizer" in text.lower() and str(base) in text and "Traceback" not in text
    assert not (tmp_path / "runs" / "notok" / "data" / MANIFEST).exists()


def _base_with_tokenizer(root: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(0)
    base = save_model(LlamaForCausalLM(LlamaConfig(**TINY)), root / "base")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["habari ya asubuhi", "good morning friend"],
                            trainers.BpeTrainer(vocab_size=90, special_tokens=["<unk>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>",
                            unk_token="<unk>").save_pretrained(base)
    return base


@pytest.mark.parametrize("case", ["empty_corpus", "non_utf8"])
def test_data_stage_on_bad_text(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty corpus is one clear error naming the language; invalid UTF-8 bytes are replaced
    and counted, never a crash."""
    import ray
    import yaml

    base = _base_with_tokenizer(tmp_path)
    good = "habari ya asubuhi rafiki yangu, leo tunasoma kitabu kipya pamoja sasa. "
    swh, eng = tmp_path / "swh.jsonl", tmp_path / "eng.jsonl"
    eng.write_text("".join(json.dumps({"text": f"good morning friend number {i}, we read a "
                                                f"new book together today."}) + "\n"
                           for i in range(30)))
    if case == "empty_corpus":
        swh.write_bytes(b"")
    else:
        swh.write_bytes(b"".join(b'{"text": "' + good.encode()[:20] + b"\xff" +
                                 f"{good} {i}".encode() + b'"}\n' for i in range(30)))
    raw = {"run_name": case, "models": {"base": str(base), "post": str(base)},
           "languages": {"original": ["eng_Latn"], "new": ["swh_Latn"]},
           "data": {"seq_len": 16, "sources": [
               {"name": "e", "format": "jsonl", "path": str(eng), "languages": ["eng_Latn"]},
               {"name": "s", "format": "jsonl", "path": str(swh), "languages": ["swh_Latn"]}]},
           "storage": {"root": str(tmp_path / "runs")},
           "tracking": {"uri": f"sqlite:///{tmp_path}/m.db"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    try:
        code, text = run_cli(["data", str(path)], capsys, monkeypatch)
    finally:
        ray.shutdown()
    stage = tmp_path / "runs" / case / "data"
    if case == "empty_corpus":
        assert code == 2, text
        assert "no documents left for swh_Latn" in text and "Traceback" not in text
        assert not (stage / MANIFEST).exists()
    else:
        assert code == 0, text
        stats = json.loads((stage / "stats.json").read_text())
        assert stats["bad_utf8_documents"] == {"swh_Latn": 30}
        assert stats["bad_utf8_replacements"] == {"swh_Latn": 30}
        assert stats["documents_out"]["swh_Latn"] == 30
