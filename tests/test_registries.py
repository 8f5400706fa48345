"""Each list of names lives once, in its registry: the run config accepts exactly the registry's
names, the CLI offers them, and the README documents every one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from components.config import ConfigError, parse_config
from components.data.readers import READERS
from components.delta.methods import METHODS, SPARSIFIERS
from components.evaluate.catalog import suites
from components.moe.families import DENSE_TYPES
from components.variants import BASELINES, VARIANTS
from workflows.cli import cli
from workflows.train_stage import TRAINING_VARIANTS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BASE = {"run_name": "r", "models": {"base": "b", "post": "p"},
        "languages": {"original": ["eng_Latn"], "new": ["swh_Latn"]}}


def _cfg(**sections: object) -> object:
    return parse_config({**BASE, **sections}, env={})


def _choices(command: str, option: str) -> tuple[str, ...]:
    cmd = cli
    for part in command.split():
        cmd = cmd.commands[part]  # type: ignore[attr-defined]
    param = next(p for p in cmd.params if p.name == option)
    return tuple(param.type.choices)


def test_config_accepts_every_registered_name() -> None:
    for method in METHODS:
        assert _cfg(graft={"method": method}).graft.method == method
    for fmt in READERS:
        source = {"name": "s", "format": fmt, "path": "/data"}
        assert _cfg(data={"sources": [source]}).data.sources[0].format == fmt
    for arch in DENSE_TYPES:
        world = parse_config({k: v for k, v in BASE.items() if k != "models"} |
                             {"world": {"arch": arch}}, env={})
        assert world.world.arch == arch
    assert _cfg(evaluation={"suites": list(suites())}).evaluation.suites == list(suites())
    assert _cfg(baselines={"variants": list(BASELINES)}).baselines.variants == list(BASELINES)
    assert _cfg(evaluation={"variants": list(VARIANTS)}).evaluation.variants == list(VARIANTS)


@pytest.mark.parametrize(("section", "value", "what"), [
    ({"graft": {"method": "tie"}}, "tie", "graft method"),
    ({"data": {"sources": [{"name": "s", "format": "csv", "path": "/d"}]}}, "csv",
     "source format"),
    ({"evaluation": {"suites": ["xcopaa"]}}, "xcopaa", "evaluation suite"),
    ({"baselines": {"variants": ["deltamoe"]}}, "deltamoe", "baseline variant"),
])
def test_config_refuses_a_name_no_registry_has(section: dict, value: str, what: str) -> None:
    with pytest.raises(ConfigError) as err:
        _cfg(**section)
    assert f"unknown {what} {value!r}" in str(err.value)


def test_cli_offers_exactly_the_registries() -> None:
    assert _choices("graft", "method") == tuple(METHODS)
    assert _choices("graft", "sparsify") == ("auto", *SPARSIFIERS)
    assert _choices("demo world", "arch") == tuple(DENSE_TYPES)
    assert _choices("train", "variant") == TRAINING_VARIANTS
    assert set(TRAINING_VARIANTS) == {n for n, v in VARIANTS.items() if v.train}


def test_readme_names_every_registered_name() -> None:
    names = [*METHODS, *SPARSIFIERS, *READERS, *DENSE_TYPES, *suites(), *VARIANTS]
    missing = [n for n in names if f"`{n}`" not in README]
    assert not missing, f"README lacks {missing}"


def test_config_loads_without_heavy_libraries() -> None:
    code = ("import sys; from components.config import load_config; "
            "load_config('workflows/configs/demo.yaml'); "
            "import components.delta.methods, components.moe.families, components.variants, "
            "components.evaluate.catalog; "
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'transformers', 'ray', 'lm_eval', 'mlflow'}); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_no_module_is_over_500_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for folder in ("components", "workflows", "dashboards")
            for p in (ROOT / folder).rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 520}
    assert not long, long
