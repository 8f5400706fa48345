"""Outputs that must not be written and secrets that must not be shown, through the console
entry point: an ``--out`` that is, contains or lies inside an input, a folder holding a user's
file, a folder another writer holds; credentials in ``config show``, a stage manifest, MLflow
params and the config artifact; YAML alias bombs and duplicate keys; remote code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from common import save_model, tiny_dims
from mlflow import MlflowClient
from safetensors.torch import load_file, save_file
from test_bad_inputs import run_cli
from transformers import LlamaConfig, LlamaForCausalLM

from components.config import parse_config
from components.moe.upcycle import UpcycleOptions, upcycle
from components.storage import MANIFEST, StageDir, fingerprint
from components.tracking import ExpansionTracker

TINY = tiny_dims(64)


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A world-like folder written by deltamoe (manifest, model inside), a post model and an
    upcycled target."""
    root = tmp_path_factory.mktemp("outs")
    torch.manual_seed(0)
    world = StageDir(str(root / "world"))
    with world.build("world-fp") as work:
        save_model(LlamaForCausalLM(LlamaConfig(**TINY)), work.path / "model")
    base = root / "world" / "model"
    post = root / "post"
    post.mkdir()
    (post / "config.json").write_text((base / "config.json").read_text())
    tensors = {k: v + 0.01 for k, v in load_file(base / "model.safetensors").items()}
    save_file(tensors, post / "model.safetensors", metadata={"format": "pt"})
    target = root / "moe"
    target.mkdir()
    upcycle(base, target, UpcycleOptions(num_experts=2, top_k=1))
    return {"root": root, "world": root / "world", "base": base, "post": post, "target": target}


def _graft(models: dict[str, Path], out: Path | str, *extra: str) -> list[str]:
    return ["graft", "--base", str(models["base"]), "--post", str(models["post"]),
            "--target", str(models["target"]), "--out", str(out), *extra]


def test_upcycle_into_the_world_holding_its_model_is_refused(
        models: dict[str, Path], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    before = _tree(models["world"])
    link = models["root"] / "world-link"
    link.symlink_to(models["world"], target_is_directory=True)
    for out in (models["world"], link):  # the folder itself, and through a symlink
        code, shown = run_cli(["upcycle", "--model", str(models["base"]), "--out", str(out),
                               "--num-experts", "2"], capsys, monkeypatch)
        assert code == 2, shown
        assert "the output folder contains the input" in shown and "Traceback" not in shown
    code, shown = run_cli(["upcycle", "--model", str(models["base"]), "--out",
                           str(models["base"] / "moe")], capsys, monkeypatch)
    assert code == 2 and "the output folder lies inside the input" in shown
    assert _tree(models["world"]) == before
    assert sorted(p.name for p in models["root"].iterdir() if "world" in p.name) == \
        ["world", "world-link"]


def test_graft_onto_its_own_target_is_refused(models: dict[str, Path],
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    before = _tree(models["target"])
    code, shown = run_cli(_graft(models, models["target"]), capsys, monkeypatch)
    assert code == 2 and "the output folder is the input" in shown, shown
    code, shown = run_cli(_graft(models, models["root"]), capsys, monkeypatch)
    assert code == 2 and "the output folder contains the input" in shown, shown
    assert _tree(models["target"]) == before


def test_a_users_file_in_a_written_folder_is_never_deleted(
        models: dict[str, Path], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = models["root"] / "grafted"
    code, shown = run_cli(_graft(models, out), capsys, monkeypatch)
    assert code == 0, shown
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "eval.json").write_text("{}")
    before = _tree(out)
    code, shown = run_cli(_graft(models, out, "--scale", "0.5"), capsys, monkeypatch)
    assert code == 2, shown
    assert "holds files deltamoe did not write" in shown
    assert "notes.txt" in shown and "sub/eval.json" in shown
    assert _tree(out) == before  # the old graft, its manifest and the user's files, untouched


def test_a_second_writer_is_refused_and_the_first_ones_build_survives(
        models: dict[str, Path], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = models["root"] / "contested"
    holder = StageDir(str(out))
    with holder.build("first-writer") as work:
        (work.path / "half.safetensors").write_bytes(b"first writer's build")
        code, shown = run_cli(_graft(models, out), capsys, monkeypatch)
        assert code == 2, shown
        assert f"being written by pid {os.getpid()}" in shown
        assert work.path.is_dir() and (work.path / "half.safetensors").read_bytes() == \
            b"first writer's build"
        assert not out.exists()
    assert holder.is_complete("first-writer")
    assert sorted(p.name for p in out.iterdir()) == ["half.safetensors", MANIFEST]


def test_reproduce_out_over_its_config_is_refused(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("run_name: x\n")
    link = tmp_path / "page.md"
    link.symlink_to(config)
    code, shown = run_cli(["reproduce", str(config), "--out", str(link)], capsys, monkeypatch)
    assert code == 2 and "is the config it reads" in shown, shown
    assert config.read_text() == "run_name: x\n"


# --------------------------------------------------------------------------- secrets

ACCOUNT_KEY = "AZaccountKEY0123456789+/=="
CONNECTION = "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=CONNsecret42"
S3_KEY = "AKIAS3KEYID777"
PASSWORD = "mlflowPASSWORD31337"
SAS = "sv=2024&sig=SASsig999"
SECRETS = (ACCOUNT_KEY, CONNECTION, S3_KEY, PASSWORD, SAS, "CONNsecret42")


def _secret_config(tmp_path: Path) -> Path:
    path = tmp_path / "secret.yaml"
    path.write_text(f"""\
run_name: sec
models: {{base: b, post: p}}
languages: {{original: [eng_Latn], new: [swh_Latn]}}
tracking:
  uri: https://me:${{MLFLOW_TRACKING_PASSWORD}}@mlflow.example
  tags: {{share: "${{AZURE_STORAGE_SAS}}", tokenizer: "${{TOKENIZER_DIR}}"}}
storage:
  root: {tmp_path / "runs"}
  storage_options: {{account_name: a, account_key: "{ACCOUNT_KEY}"}}
data:
  sources:
    - name: az
      format: parquet
      path: az://c/x
      storage_options: {{connection_string: "{CONNECTION}"}}
    - name: s3
      format: parquet
      path: s3://b/x
      storage_options: {{key: {S3_KEY}, client_kwargs: {{region_name: eu}}}}
""")
    return path


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    monkeypatch.setenv("AZURE_STORAGE_SAS", SAS)
    monkeypatch.setenv("TOKENIZER_DIR", "/not/a/secret")


@pytest.mark.usefixtures("secret_env")
def test_config_show_masks_every_credential(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    code, shown = run_cli(["config", "show", str(_secret_config(tmp_path))], capsys,
                          monkeypatch)
    assert code == 0, shown
    assert [s for s in SECRETS if s in shown] == []
    assert "/not/a/secret" in shown  # a variable whose name is not a credential's is shown
    assert shown.count("'**********'") >= 6  # 2 interpolated, 4 storage options (region too)


@pytest.mark.usefixtures("secret_env")
def test_manifest_mlflow_params_and_artifact_hold_no_credential(tmp_path: Path) -> None:
    from components.config import load_config

    cfg = load_config(_secret_config(tmp_path))
    assert cfg.storage.storage_options["account_key"] == ACCOUNT_KEY  # fsspec gets the value
    assert cfg.tracking.uri is not None and PASSWORD in cfg.tracking.uri
    stage = StageDir(str(tmp_path / "data"))
    with stage.build("fp", config=cfg.data.model_dump(mode="json")) as work:  # as data_stage
        (work.path / "x").write_text("x")
    manifest = (tmp_path / "data" / MANIFEST).read_text()
    assert [s for s in SECRETS if s in manifest] == []
    assert json.loads(manifest)["config"]["sources"][1]["storage_options"]["key"] == \
        "**********"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = ExpansionTracker(uri, "sec", cfg.run_name)
    resolved = cfg.model_dump(mode="json")  # what workflows/expand.py logs
    tracker.log_config(resolved, fingerprint(resolved))
    tracker.finish()
    run = MlflowClient(uri).get_run(tracker.parent_run_id)
    assert "storage.storage_options.account_key" in run.data.params
    assert [s for s in SECRETS if any(s in v for v in run.data.params.values())] == []
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    texts = [p.read_text() for p in artifacts.rglob("*") if p.is_file()]
    assert texts and [s for s in SECRETS if any(s in t for t in texts)] == []


def test_known_credential_keys_are_masked_outside_storage_options() -> None:
    from components.config import mask_secrets

    options = {k: "v" for k in ("key", "secret", "token", "account_key", "connection_string",
                                "sas_token", "client_secret", "credential", "credentials",
                                "password", "aws_secret_access_key", "aws_session_token")}
    assert set(mask_secrets({"x": options})["x"].values()) == {"**********"}
    assert mask_secrets({"x": {"region_name": "eu", "tokenizer": "t"}}) == \
        {"x": {"region_name": "eu", "tokenizer": "t"}}
    cfg = parse_config({"run_name": "s", "models": {"base": "b", "post": "p"},
                        "languages": {"original": ["eng_Latn"], "new": ["swh_Latn"]},
                        "tracking": {"tags": {"owner": "${HF_TOKEN}"}}},
                       env={"HF_TOKEN": "hf_abc"})
    assert cfg.tracking.tags["owner"] == "hf_abc"
    assert cfg.model_dump(mode="json")["tracking"]["tags"]["owner"] == "**********"
    assert cfg.section("tracking")["tags"]["owner"] == "**********"  # what fingerprints hash


# --------------------------------------------------------------------------- YAML


def test_alias_bomb_and_duplicate_keys_are_config_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [{','.join([f'*{prev}'] * 9)}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert bomb.stat().st_size < 400
    code, shown = run_cli(["config", "validate", str(bomb)], capsys, monkeypatch)
    assert code == 2 and "expand it past 50,000 YAML nodes" in shown, shown
    recursive = tmp_path / "recursive.yaml"
    recursive.write_text("run_name: &r [x, *r]\n")
    code, shown = run_cli(["config", "validate", str(recursive)], capsys, monkeypatch)
    assert code == 2 and "recursive alias" in shown, shown
    dup = tmp_path / "dup.yaml"
    dup.write_text("run_name: x\nseed: 1\nlanguages:\n  original: [eng_Latn]\n"
                   "  new: [swh_Latn]\n  original: [fra_Latn]\nseed: 2\n"
                   "models: {base: b, post: p}\n")
    code, shown = run_cli(["config", "validate", str(dup)], capsys, monkeypatch)
    assert code == 2, shown
    assert f"{dup}:6: languages.original: duplicate key (first given at line 4)" in shown
    assert f"{dup}:7: seed: duplicate key (first given at line 2)" in shown
    merged = tmp_path / "merged.yaml"  # an anchor and a merge key that overrides: allowed
    merged.write_text("run_name: x\nmodels: {base: b, post: p}\n"
                      "languages: {original: [eng_Latn], new: [swh_Latn]}\n"
                      "train: &t {steps: 5, warmup_steps: 0}\n"
                      "resources: {stages: {train: {num_cpus: 1}, graft: {num_cpus: 1}}}\n"
                      "graft: {<<: {method: deltamoe, scale: 0.5}, scale: 0.25}\n")
    code, shown = run_cli(["config", "validate", str(merged)], capsys, monkeypatch)
    assert code == 0, shown


# --------------------------------------------------------------------------- remote code


def test_trust_remote_code_is_refused_and_remote_code_never_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "remote.yaml"
    config.write_text("run_name: x\nmodels: {base: b, post: p, trust_remote_code: true}\n"
                      "languages: {original: [eng_Latn], new: [swh_Latn]}\n")
    code, shown = run_cli(["config", "validate", str(config)], capsys, monkeypatch)
    assert code == 2 and "models.trust_remote_code is not supported" in shown, shown

    from components.data.tokenize import DataError, load_tokenizer
    from components.evaluate.runner import load_for_eval

    model = tmp_path / "remote-model"
    model.mkdir()
    marker = tmp_path / "remote-code-ran"
    (model / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    auto = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel",
            "AutoTokenizer": ["evil.EvilTokenizer", None]}
    (model / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": auto}))
    (model / "tokenizer_config.json").write_text(json.dumps({"auto_map": auto}))
    with pytest.raises(DataError, match="cannot load a tokenizer"):
        load_tokenizer(model)
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_for_eval(model, device="cpu")
    assert not marker.exists()
