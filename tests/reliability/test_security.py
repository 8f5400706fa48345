"""Security properties as tests: no pickle-based loading of model files, ``trust_remote_code``
never on (no option turns it on), secrets never reach MLflow, servers bound to loopback (the
project's Python and ray up's cluster.yaml)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from components.config import ModelsConfig, parse_config
from components.storage import RunDir, fingerprint
from components.tracking import ExpansionTracker

ROOT = Path(__file__).resolve().parents[2]
PROJECT_CODE = sorted(p for folder in ("components", "workflows", "dashboards", "cluster",
                                       "benchmarks")
                      for p in (ROOT / folder).rglob("*.py") if ".mergekit" not in p.parts)


def _calls(path: Path) -> list[tuple[str, ast.Call]]:
    """Every call in ``path`` with its dotted callee name (``torch.load``, ``pickle.loads``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            found.append((ast.unparse(node.func), node))
    return found


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_project_code_is_scanned() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in PROJECT_CODE}
    assert "components/delta/graft.py" in names and "workflows/cli/app.py" in names
    assert len(PROJECT_CODE) > 20


def test_no_pickle_based_loading() -> None:
    offenders = []
    for path in PROJECT_CODE:
        for name, call in _calls(path):
            where = f"{path.relative_to(ROOT)}:{call.lineno}"
            if name.endswith("torch.load"):
                weights_only = _keyword(call, "weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    offenders.append(f"{where}: torch.load without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads",
                        "joblib.load", "dill.load", "dill.loads"):
                offenders.append(f"{where}: {name}")
            if name.endswith("np.load") or name.endswith("numpy.load"):
                allow = _keyword(call, "allow_pickle")
                if isinstance(allow, ast.Constant) and allow.value is True:
                    offenders.append(f"{where}: np.load(allow_pickle=True)")
            if name.endswith("from_pretrained"):
                safetensors = _keyword(call, "use_safetensors")
                if isinstance(safetensors, ast.Constant) and safetensors.value is False:
                    offenders.append(f"{where}: from_pretrained(use_safetensors=False)")
    assert offenders == []


def test_trust_remote_code_is_never_turned_on() -> None:
    """There is no option to turn it on (a config that sets it is refused), and no call in the
    project's code passes it as True."""
    assert "trust_remote_code" not in ModelsConfig.model_fields
    with pytest.raises(ValueError, match="trust_remote_code is not supported"):
        ModelsConfig.model_validate({"base": "b", "post": "p", "trust_remote_code": True})
    offenders = []
    for path in PROJECT_CODE:
        for _, call in _calls(path):
            value = _keyword(call, "trust_remote_code")
            if isinstance(value, ast.Constant) and value.value is True:
                offenders.append(f"{path.relative_to(ROOT)}:{call.lineno}")
    assert offenders == []


def test_servers_bind_to_loopback_by_default() -> None:
    offenders = []
    for path in PROJECT_CODE:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in ("0.0.0.0", "::"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
    # ray up's head: the dashboard and its job API answer on loopback, reached by
    # `ray dashboard` (an SSH port-forward), as the file's own header says
    ray_up = (ROOT / "cluster" / "cluster.yaml").read_text(encoding="utf-8")
    assert "0.0.0.0" not in ray_up and "--dashboard-host=127.0.0.1" in ray_up
    assert "forwards 8265 to localhost" in ray_up
    from workflows.expand import WorkflowResult

    shown = WorkflowResult("runs/x", "sqlite:////tmp/m.db", "abc").summary()
    assert "mlflow ui" in shown and "--host 127.0.0.1" in shown


SECRET = "hf_TOPSECRETvalue1234567890"


def test_secrets_never_reach_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    raw = {"run_name": "sec", "models": {"base": "b", "post": "p", "hf_token": "${HF_TOKEN}"},
           "languages": {"original": ["eng_Latn"], "new": ["swh_Latn"]},
           "storage": {"root": str(tmp_path / "runs"),
                       "storage_options": {"secret": "${AWS_SECRET_ACCESS_KEY}"}},
           "data": {"sources": [{"name": "s3", "format": "parquet", "path": "s3://b/x",
                                 "storage_options": {"key": "id", "secret": SECRET}}]}}
    cfg = parse_config(raw)
    assert cfg.models is not None and cfg.models.hf_token is not None
    assert cfg.models.hf_token.get_secret_value() == SECRET
    run_dir = RunDir(cfg.storage.root, cfg.run_name)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = ExpansionTracker(uri, "sec", cfg.run_name)
    resolved = cfg.model_dump(mode="json")
    tracker.log_config(resolved, fingerprint(resolved))
    tracker.finish()
    client = MlflowClient(uri)
    run = client.get_run(tracker.parent_run_id)
    assert run.data.params["models.hf_token"] != SECRET
    assert all(SECRET not in v for v in run.data.params.values())
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    texts = [p.read_text() for p in artifacts.rglob("*") if p.is_file()]
    assert texts and all(SECRET not in t for t in texts)
    assert SECRET not in json.dumps(resolved)
    assert run_dir.local_path is not None
