"""The world's coverage rule and the question tasks' scorers.

Rule (issue 20): at least 99 % of the new languages' CPT token occurrences are of ids the base's
pre-training text holds at least 10 times, at the default world size; the new languages are
about ``new_language_share`` of the base tokens.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from components.evaluate.synthetic import score_answer, synthetic_tasks
from components.synthetic import build_world
from components.synthetic.coverage import id_counts, seen_coverage

ORIGINAL, NEW = ["eng_Latn", "deu_Latn"], ["swh_Latn", "rus_Cyrl"]


def _texts(path: Path) -> list[str]:
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("coverage") / "world"
    summary = build_world(root, seed=0, languages=[*ORIGINAL, *NEW], original=ORIGINAL)
    return root, summary


def test_default_world_meets_the_coverage_rule(world: tuple[Path, object]) -> None:
    root, summary = world
    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    base = id_counts(tok(t)["input_ids"] for f in sorted(
        (root / "corpora/base/fineweb2/data").rglob("*.parquet")) for t in _texts(f))
    for tag in NEW:
        # the CPT documents, without the planted copies and junk after them
        docs = _texts(root / "corpora/fineweb2/data" / tag / "train/000_00000.parquet")[:800]
        ids = [tok(t)["input_ids"] for t in docs]
        assert seen_coverage(base, ids, 10) >= 0.99, tag
        assert seen_coverage(base, ids, 10) == pytest.approx(summary.coverage[tag], abs=1e-4)
    total = sum(summary.base_tokens.values())
    for tag in NEW:
        assert summary.base_tokens[tag] / total == pytest.approx(0.025, abs=0.003)


def test_seen_coverage_counts_occurrences() -> None:
    base = [[1] * 10 + [2] * 9]
    assert seen_coverage(base, [[1, 1, 2, 3]], 10) == 0.5
    assert seen_coverage(Counter({1: 10}), [[1], [1, 4]], 10) == pytest.approx(2 / 3)
    assert seen_coverage(base, [], 10) == 1.0


def test_question_scorer_on_hand_made_items() -> None:
    doc = {"answer": "Hund", "answer_words": ["Hund", "Katze", "Pferd"]}
    assert score_answer(doc, ["hund."]) == {"exact_match": 1, "right_kind": 1}
    assert score_answer(doc, [" Katze"]) == {"exact_match": 0, "right_kind": 1}
    assert score_answer(doc, ["dog"]) == {"exact_match": 0, "right_kind": 0}
    assert score_answer(doc, ["Hund und Katze"]) == {"exact_match": 0, "right_kind": 0}
    ru = {"answer": "врач", "answer_words": ["учитель", "врач"]}
    assert score_answer(ru, ["Врач"]) == {"exact_match": 1, "right_kind": 1}


def test_suite_skips_closed_new_for_original_languages(world: tuple[Path, object]) -> None:
    root, _ = world
    tasks = synthetic_tasks(root / "eval", [*ORIGINAL, *NEW])
    assert "synthetic_closed_new_eng_Latn" not in tasks
    assert "synthetic_closed_new_swh_Latn" in tasks
    config = tasks["synthetic_openbook_rus_Cyrl"][0]
    assert config["process_results"] is score_answer
    assert [m["metric"] for m in config["metric_list"]] == ["exact_match", "right_kind"]
    assert len(tasks) == 5 * 4 - 2
    with pytest.raises(FileNotFoundError, match="tur_Latn"):
        synthetic_tasks(root / "eval", ["tur_Latn"])
