"""Multi-language sweeps: one config → one validated RunConfig per language set."""

from __future__ import annotations

import json

import pytest
import yaml

from components.config import ConfigError, load_config
from workflows.cli import DEMO_CONFIG
from workflows.sweep import LANGUAGES_TAG, SWEEP_TAG, expand_sweep, set_name, sweep_runs


@pytest.fixture(scope="module")
def demo():
    return load_config(DEMO_CONFIG, env={})


def test_one_run_per_set_with_narrowed_tables(demo) -> None:
    runs = expand_sweep(demo, [["swh_Latn"], ["Russian"], ["sw", "rus_Cyrl"]])
    assert [r.run_name for r in runs] == ["demo-swh", "demo-rus", "demo-swh-rus"]
    assert [r.languages.new for r in runs] == [["swh_Latn"], ["rus_Cyrl"],
                                               ["swh_Latn", "rus_Cyrl"]]
    assert all(r.languages.original == ["eng_Latn", "deu_Latn"] for r in runs)
    assert runs[0].data.mix.ratios == {"swh_Latn": 0.5}
    assert runs[2].data.mix.ratios == {"swh_Latn": 0.5, "rus_Cyrl": 0.5}
    assert runs[0].upcycle.allocation.experts == {"original": [0], "swh_Latn": [1, 2]}
    assert runs[1].upcycle.allocation.experts == {"original": [0], "rus_Cyrl": [1, 3]}
    # every run reads the same corpora, and the rest of the config is untouched
    for r in runs:
        assert r.data.sources == demo.data.sources
        assert r.train == demo.train and r.world == demo.world
        assert r.tracking.tags == {SWEEP_TAG: "demo", LANGUAGES_TAG: ",".join(r.languages.new)}
    assert demo.run_name == "demo" and demo.languages.new == ["swh_Latn", "rus_Cyrl"]


def test_named_sets_and_groups_narrowed(demo) -> None:
    cfg = demo.model_copy(deep=True)
    cfg.upcycle.allocation.groups["bantu_slavic"] = ["swh_Latn", "rus_Cyrl"]
    cfg.upcycle.allocation.experts["bantu_slavic"] = [3]
    runs = expand_sweep(cfg, {"east-africa": ["swh_Latn"]})
    assert runs[0].run_name == "demo-east-africa"
    assert runs[0].upcycle.allocation.groups == {"original": ["eng_Latn", "deu_Latn"],
                                                 "bantu_slavic": ["swh_Latn"]}
    assert runs[0].upcycle.allocation.experts["bantu_slavic"] == [3]


def test_overrides_reproduce_the_run_through_set(demo) -> None:
    """What a submitter ships: the base file plus ``--set KEY=JSON`` (read back as YAML)."""
    (name, overrides), = sweep_runs(demo, [["rus_Cyrl"]])
    assert name == "demo-rus"
    parsed = {k: yaml.safe_load(json.dumps(v)) for k, v in overrides.items()}
    again = load_config(DEMO_CONFIG, env={}, overrides=parsed)
    assert again == expand_sweep(demo, [["rus_Cyrl"]])[0]


def test_set_names() -> None:
    assert set_name(["swh_Latn", "yor_Latn"]) == "swh-yor"
    assert set_name(["srp_Cyrl", "srp_Latn"]) == "srp-cyrl-srp-latn"


@pytest.mark.parametrize("sets, where, message", [
    ([], "language_sets", "at least one"),
    ([["eng_Latn"]], "language_sets.eng", "already in languages.original"),
    ([["xx_Nope"]], "language_sets.0", "xx_Nope"),
    ([[]], "language_sets.0", "non-empty list"),
    (["swh_Latn"], "language_sets.0", "non-empty list"),
    ([["swh_Latn"], ["swh"]], "language_sets.swh", "named more than once"),
])
def test_bad_sets_name_the_key(demo, sets, where, message) -> None:
    with pytest.raises(ConfigError) as err:
        expand_sweep(demo, sets)
    assert any(path == where and message in text for path, text in err.value.issues), \
        err.value.issues
