"""`deltamoe reproduce`: the aggregation over languages and seeds, the table and its headline."""

from __future__ import annotations

import math

import pytest

from components.config import load_config
from workflows.cli import REPRODUCE_CONFIG
from workflows.reproduce import aggregate, language_averages, markdown_table, seed_config

ORIG, NEW = ["eng_Latn", "deu_Latn"], ["swh_Latn", "rus_Cyrl"]


def _rows(instr: dict[str, float], ppl: dict[str, float]) -> list[dict]:
    rows = [{"task": "synthetic_instruct", "lang": lang, "metric": "exact_match", "value": v,
             "stderr": 0.01, "n": 50} for lang, v in instr.items()]
    rows += [{"task": "synthetic_ppl", "lang": lang, "metric": "word_perplexity", "value": v,
              "stderr": None, "n": 20} for lang, v in ppl.items()]
    # an aggregate row without a language and a stderr row must not enter the averages
    rows += [{"task": "synthetic_instruct", "lang": None, "metric": "exact_match", "value": 9.0},
             {"task": "synthetic_instruct", "lang": "swh_Latn", "metric": "exact_match_stderr",
              "value": 9.0}]
    return rows


def test_language_averages_split_original_and_new() -> None:
    rows = _rows({"eng_Latn": 0.8, "deu_Latn": 0.6, "swh_Latn": 0.2, "rus_Cyrl": 0.4},
                 {"eng_Latn": 10.0, "deu_Latn": 20.0, "swh_Latn": 100.0})
    avg = language_averages(rows, ORIG, NEW)
    assert avg[("synthetic_instruct", "exact_match", "original")] == pytest.approx(0.7)
    assert avg[("synthetic_instruct", "exact_match", "new")] == pytest.approx(0.3)
    assert avg[("synthetic_ppl", "word_perplexity", "original")] == pytest.approx(15.0)
    # only one new language has a perplexity row: its value, not a mean with a made-up zero
    assert avg[("synthetic_ppl", "word_perplexity", "new")] == pytest.approx(100.0)
    assert len(avg) == 4


def test_aggregate_mean_and_sample_std_over_seeds() -> None:
    seeds = [
        {"deltamoe": _rows({"eng_Latn": 0.8, "swh_Latn": 0.5}, {}),
         "param_delta": _rows({"eng_Latn": 0.8, "swh_Latn": 0.25}, {})},
        {"deltamoe": _rows({"eng_Latn": 0.6, "swh_Latn": 0.7}, {}),
         "param_delta": _rows({"eng_Latn": 0.7, "swh_Latn": 0.35}, {})},
    ]
    agg = aggregate(seeds, ORIG, NEW)
    cell = agg["deltamoe"][("synthetic_instruct", "exact_match", "new")]
    assert cell.n == 2 and cell.mean == pytest.approx(0.6)
    assert cell.std == pytest.approx(math.sqrt(((0.5 - 0.6) ** 2 + (0.7 - 0.6) ** 2) / 1))
    assert cell.text() == "0.600 ± 0.141"

    table = markdown_table(agg).splitlines()
    assert table[0].startswith("| variant | synthetic_instruct exact_match ↑ (original)")
    # the dense route is listed before the MoE route, whatever the dict order
    assert [line.split("|")[1].strip() for line in table[2:]] == ["param_delta", "deltamoe"]
    assert "| 0.600 ± 0.141 |" in table[3]


def test_missing_cells_are_marked_not_invented() -> None:
    agg = aggregate([{"base": _rows({"eng_Latn": 0.1}, {}),
                      "deltamoe": _rows({"swh_Latn": 0.4}, {})}], ORIG, NEW)
    table = markdown_table(agg)
    base_line = next(line for line in table.splitlines() if line.startswith("| base"))
    assert base_line.split("|")[2:4] == [" 0.100 ", " — "]
    # reference rows: chance and ceiling only under a column some variant measured
    only_original = aggregate([{"base": _rows({"eng_Latn": 0.1}, {})}], ORIG, NEW)
    lines = markdown_table(only_original, chance={"synthetic_instruct/exact_match": 0.25})
    chance, ceiling = lines.splitlines()[-2:]
    assert chance.split("|")[1:4] == [" *chance* ", " 0.250 ", " — "]
    assert ceiling.split("|")[1:4] == [" *ceiling* ", " 1.000 ", " — "]


def test_seed_replicates_differ_only_where_they_must() -> None:
    cfg = load_config(REPRODUCE_CONFIG)
    one = seed_config(cfg, 1, "sqlite:////tmp/x.db")
    assert (one.run_name, one.seed, one.world.seed, one.graft.seed) == ("reproduce-seed1", 1, 1, 1)
    assert one.tracking.uri == "sqlite:////tmp/x.db"
    same = {k: v for k, v in cfg.model_dump().items()
            if k not in ("run_name", "seed", "world", "graft", "tracking")}
    assert same == {k: v for k, v in one.model_dump().items() if k in same}
    # every variant the committed plan reads is built by the committed config
    from components.evaluate.gates import load_plan
    from workflows.comparison import needed_variants

    plan = load_plan(REPRODUCE_CONFIG.with_suffix(".gates.yaml"))
    assert set(needed_variants(plan)) <= {"base", "post", "deltamoe", *cfg.baselines.variants}
    assert set(cfg.baselines.variants) == {"cpt_dense", "param_delta", "flops_matched",
                                           "cpt_moe", "moe_unfrozen", "block_expansion",
                                           "layermoe"}
