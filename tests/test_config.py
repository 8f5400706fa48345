"""Run config: defaults, key paths in errors, ${ENV} interpolation, cross-section rules."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from components.config import ConfigError, dump_config, load_config, parse_config

DEMO = Path(__file__).resolve().parents[1] / "workflows" / "configs" / "demo.yaml"

MINIMAL = {
    "run_name": "t",
    "models": {"base": "/models/base", "post": "/models/post"},
    "languages": {"original": ["eng_Latn"], "new": ["swh_Latn"]},
}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _issues(data: dict, env: dict | None = None) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, env=env or {})
    return info.value.issues


def _with(**sections) -> dict:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in MINIMAL.items()}
    data.update(sections)
    return data


def test_demo_config_loads_with_defaults() -> None:
    cfg = load_config(DEMO, env={})
    assert cfg.run_name == "demo"
    assert cfg.languages.new == ["swh_Latn", "rus_Cyrl"]
    assert cfg.upcycle.router_init == "xavier_normal"  # a default, not written in the file
    assert cfg.storage.root == "runs"  # ${DELTAMOE_RUNS:-runs} with the variable unset
    shown = yaml.safe_load(dump_config(cfg))
    assert shown["train"]["steps"] == 60
    assert shown["train"]["max_failures"] == 2
    assert shown["upcycle"]["allocation"]["experts"]["swh_Latn"] == [1, 2]


def test_misspelt_key_names_path_line_and_suggestion(tmp_path: Path) -> None:
    path = _write(tmp_path, """\
        run_name: t
        models: {base: b, post: p}
        languages: {original: [eng_Latn], new: [swh_Latn]}
        upcycle:
          num_expert: 4
        """)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.issues == [("upcycle.num_expert", "unknown key; did you mean 'num_experts'?")]
    assert f"{path}:5: upcycle.num_expert" in str(info.value)


def test_top_k_above_num_experts() -> None:
    issues = _issues(_with(upcycle={"num_experts": 4, "top_k": 5}))
    assert issues == [("upcycle.top_k", "expected int ≤ upcycle.num_experts (4), got 5")]


def test_wrong_type_names_path_and_value() -> None:
    [(path, message)] = _issues(_with(train={"steps": "many"}))
    assert path == "train.steps"
    assert "integer" in message and "'many'" in message


def test_several_errors_reported_together() -> None:
    issues = _issues(_with(train={"steps": 0, "lr": -1}, resources={"num_workerz": 2}))
    paths = sorted(p for p, _ in issues)
    assert paths == ["resources.num_workerz", "train.lr", "train.steps"]


def test_missing_required_section() -> None:
    data = {k: v for k, v in MINIMAL.items() if k != "languages"}
    assert _issues(data) == [("languages", "required key is missing")]


def test_models_or_world_required() -> None:
    data = {k: v for k, v in MINIMAL.items() if k != "models"}
    assert _issues(data) == [
        ("models", "required unless a synthetic `world` section makes the pair (or, for the "
                   "data stage alone, data.tokenizer is set)")]


def test_env_interpolation(tmp_path: Path) -> None:
    path = _write(tmp_path, """\
        run_name: ${RUN:-fallback}
        models: {base: "${MODELS}/base", post: "${MODELS}/post", hf_token: "${HF_TOKEN}"}
        languages: {original: [eng_Latn], new: [swh_Latn]}
        train: {steps: "${STEPS}", warmup_steps: 0}
        storage: {root: "$${literal}"}
        """)
    cfg = load_config(path, env={"MODELS": "/m", "STEPS": "7", "HF_TOKEN": "hf_secret"})
    assert cfg.run_name == "fallback"
    assert cfg.models is not None and cfg.models.base == "/m/base"
    assert cfg.train.steps == 7
    assert cfg.storage.root == "${literal}"
    assert cfg.models.hf_token is not None
    assert cfg.models.hf_token.get_secret_value() == "hf_secret"
    assert "hf_secret" not in dump_config(cfg)


def test_missing_env_variable_names_key(tmp_path: Path) -> None:
    path = _write(tmp_path, """\
        run_name: t
        models: {base: "${NOPE}/base", post: p}
        languages: {original: [eng_Latn], new: [swh_Latn]}
        """)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    [(key, message)] = info.value.issues
    assert key == "models.base"
    assert "NOPE is not set" in message


def test_language_codes_normalised_and_rejected() -> None:
    cfg = parse_config(_with(languages={"original": ["en"], "new": ["sw", "rus_Cyrl"]}), env={})
    assert cfg.languages.original == ["eng_Latn"]
    assert cfg.languages.new == ["swh_Latn", "rus_Cyrl"]
    [(path, message)] = _issues(_with(languages={"original": ["eng_Latn"],
                                                 "new": ["swh_Latin"]}))
    assert path == "languages.new.0"
    assert "swh_Latn" in message  # the closest known tag is suggested


def test_original_and_new_must_be_disjoint() -> None:
    [(path, message)] = _issues(_with(languages={"original": ["eng_Latn", "sw"],
                                                 "new": ["swh_Latn"]}))
    assert path == "languages.new"
    assert "swh_Latn" in message


def test_allocation_rules() -> None:
    issues = _issues(_with(upcycle={"num_experts": 4, "allocation": {
        "experts": {"swh_Latn": [1, 7]}}}))
    assert issues[0][0] == "upcycle"
    assert "expert ids [7] do not exist" in issues[0][1]
    issues = _issues(_with(upcycle={"allocation": {"experts": {"tha_Thai": [1]}}}))
    assert issues == [("upcycle.allocation.experts.tha_Thai",
                       "tha_Thai is not one of the run's languages")]
    issues = _issues(_with(upcycle={"allocation": {"groups": {"g": ["deu_Latn"]}}}))
    assert issues[0][0] == "upcycle.allocation.groups.g"


def test_mix_keys_must_be_run_languages() -> None:
    issues = _issues(_with(data={"mix": {"ratios": {"fra_Latn": 1.0}}}))
    assert issues == [("data.mix.ratios.fra_Latn", "fra_Latn is not one of the run's languages")]


def test_glotlid_needs_model_path() -> None:
    [(path, message)] = _issues(_with(data={"lid": {"backend": "glotlid"}}))
    assert path == "data.lid"
    assert "model_path" in message


def test_overrides_apply_dotted_keys() -> None:
    cfg = load_config(DEMO, env={}, overrides={"train.steps": 3, "train.warmup_steps": 1,
                                                  "upcycle.top_k": 1})
    assert (cfg.train.steps, cfg.upcycle.top_k) == (3, 1)


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = _write(tmp_path, "run_name: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    top = _write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(top)


def test_section_is_json_data_with_secrets_masked() -> None:
    cfg = parse_config(_with(models={"base": "b", "post": "p", "hf_token": "abc"}), env={})
    assert cfg.section("models")["hf_token"] == "**********"
    assert cfg.section("upcycle")["num_experts"] == 4
