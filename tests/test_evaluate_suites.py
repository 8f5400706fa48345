"""Real-language suites: task configs for many languages with no network, one run end to end on
local data, the project's FLORES-200 task, and the result-row helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.evaluate.results import ResultRow, merge_rows, rows_from_lmeval
from components.evaluate.runner import EvalOptions, evaluate_loaded
from components.evaluate.suites import (
    SuiteError,
    benchmark_tasks,
    build_suite_tasks,
    task_manager,
)
from components.languages import tasks_for

TEN = ["swh_Latn", "deu_Latn", "fra_Latn", "rus_Cyrl", "tha_Thai", "zho_Hans", "hin_Deva",
       "arb_Arab", "tur_Latn", "vie_Latn"]


def _belebele_rows(lang: str, n: int = 4) -> list[dict[str, str]]:
    return [{"flores_passage": f"{lang} passage {i}.", "question": f"Question {i}?",
             "mc_answer1": "one", "mc_answer2": "two", "mc_answer3": "three",
             "mc_answer4": "four", "correct_answer_num": str(1 + i % 4),
             "link": "", "question_number": i, "dialect": lang, "ds": ""} for i in range(n)]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evaldata")
    for lang in TEN:
        _write_jsonl(root / f"belebele_{lang}" / "test.jsonl", _belebele_rows(lang))
    sentences = {"eng_Latn": ["The cat sleeps.", "It rains today.", "We eat bread.",
                              "The river is long."],
                 "swh_Latn": ["Paka analala.", "Leo mvua inanyesha.", "Tunakula mkate.",
                              "Mto ni mrefu."]}
    for lang, texts in sentences.items():
        folder = root / "flores200" / "devtest"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}),
                       folder / f"{lang}.parquet")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object]:
    from transformers import AutoModelForCausalLM

    from components.synthetic.hf import build_tiny_model, train_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    texts = ["The cat sleeps. Paka analala. Question answer one two three four."] * 50
    tok = train_tokenizer(texts, root / "tok", vocab_size=400)
    build_tiny_model(tok, root / "model", hidden_size=32, num_layers=1, intermediate_size=64)
    return AutoModelForCausalLM.from_pretrained(root / "model").eval(), tok


def test_belebele_configs_for_ten_languages_load_offline(data_dir: Path) -> None:
    tasks = benchmark_tasks("belebele", TEN, data_dir)
    assert sorted(tasks) == sorted(f"belebele_{lang}" for lang in TEN)
    manager = task_manager()
    assert set(tasks) <= set(manager.all_tasks)
    for name, (config, task, lang) in tasks.items():
        assert task == "belebele" and name == f"belebele_{lang}"
        assert config["dataset_path"] == "json" and config["dataset_name"] is None
        assert config["dataset_kwargs"]["data_files"] == {
            "test": str((data_dir / name / "test.jsonl").resolve())}
    loaded = manager.load([config for config, _, _ in tasks.values()])["tasks"]
    assert sorted(loaded) == sorted(tasks)
    for task in loaded.values():  # the local rows, through the registered prompt and target
        docs = list(task.test_docs())
        assert len(docs) == 4
        assert task.doc_to_target(docs[1]) == 1


def test_every_benchmark_names_real_tasks_without_data() -> None:
    manager = task_manager()
    for benchmark in ("xcopa", "xnli", "mgsm", "xstorycloze", "pawsx", "xwinograd"):
        langs = [lang for lang in [*TEN, "eng_Latn", "jpn_Jpan"] if benchmark in tasks_for(lang)]
        tasks = benchmark_tasks(benchmark, langs)
        assert len(tasks) == len(langs) >= 2, benchmark
        assert set(tasks) <= set(manager.all_subtasks)
        assert all(cfg["dataset_path"] not in ("json", "parquet") for cfg, _, _ in tasks.values())


def test_global_mmlu_group_expands_to_leaves_on_one_local_dataset(tmp_path: Path) -> None:
    folder = tmp_path / "global_mmlu_full_sw"
    _write_jsonl(folder / "test.jsonl", [{"question": "q"}])
    _write_jsonl(folder / "dev.jsonl", [{"question": "q"}])
    tasks = benchmark_tasks("global_mmlu", ["swh_Latn"], tmp_path)
    assert len(tasks) == 57  # MMLU's subjects
    files = {json.dumps(cfg["dataset_kwargs"]["data_files"]) for cfg, _, _ in tasks.values()}
    assert len(files) == 1 and "dev.jsonl" in files.pop()
    assert {(t, lang) for _, t, lang in tasks.values()} == {("global_mmlu", "swh_Latn")}


def test_missing_local_data_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SuiteError, match=r"belebele_swh_Latn.*no local data"):
        benchmark_tasks("belebele", ["swh_Latn"], tmp_path)
    (tmp_path / "belebele_swh_Latn").mkdir()
    with pytest.raises(SuiteError, match=r"split 'test'"):
        benchmark_tasks("belebele", ["swh_Latn"], tmp_path)
    with pytest.raises(SuiteError, match="unknown suites"):
        build_suite_tasks(["belebel"], ["swh_Latn"])
    with pytest.raises(SuiteError, match="data_dir"):
        build_suite_tasks(["flores"], ["swh_Latn"], original=["eng_Latn"])
    with pytest.raises(SuiteError, match="no FLORES sentences for eng_Latn"):
        build_suite_tasks(["flores"], ["swh_Latn"], original=["eng_Latn"], data_dir=tmp_path)


def test_belebele_and_flores_run_end_to_end_on_local_data(
        data_dir: Path, tiny: tuple[object, object]) -> None:
    model, tok = tiny
    options = EvalOptions(suites=("belebele", "flores"), batch_size=4, max_gen_tokens=6,
                          data_dir=str(data_dir), original=("eng_Latn",))
    rows = evaluate_loaded(model, tok, ["swh_Latn"], options)  # English is the FLORES pivot
    got = {(r.task, r.lang, r.metric): r for r in rows}
    acc = got[("belebele", "swh_Latn", "acc")]
    assert acc.n == 4 and acc.value in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert {r.lang for r in rows} == {"swh_Latn"}
    for task in ("flores_into", "flores_from"):
        for metric in ("chrf", "bleu"):
            row = got[(task, "swh_Latn", metric)]
            assert row.n == 4 and 0.0 <= row.value <= 100.0


def test_rows_from_lmeval_and_merge() -> None:
    results = {"results": {"t_sw": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1,
                                    "bleu,none": 3.0, "bleu_stderr,none": "N/A"}},
               "n-samples": {"t_sw": {"original": 10, "effective": 8}}}
    rows = rows_from_lmeval(results, {"t_sw": ("t", "swh_Latn")})
    assert rows == [ResultRow("t", "swh_Latn", "acc", 0.5, 0.1, 8),
                    ResultRow("t", "swh_Latn", "bleu", 3.0, None, 8)]
    merged = merge_rows([ResultRow("g", "sw", "acc", 1.0, 0.1, 30),
                         ResultRow("g", "sw", "acc", 0.0, 0.2, 10)])
    assert merged[0].value == pytest.approx(0.75)
    assert merged[0].n == 40
    assert merged[0].stderr == pytest.approx((0.75**2 * 0.01 + 0.25**2 * 0.04) ** 0.5)


def _xcopa_rows(n: int) -> list[dict]:
    return [{"premise": f"Mtu alianguka {i}.", "choice1": "Alikimbia.", "choice2": "Alilala.",
             "question": ("cause", "effect")[i % 2], "label": i % 2, "idx": i,
             "changed": False} for i in range(n)]


def _xnli_rows(n: int) -> list[dict]:
    return [{"premise": f"Paka analala {i}", "hypothesis": "paka yupo", "label": i % 3}
            for i in range(n)]


def _mgsm_rows(n: int, with_answer: bool) -> list[dict]:
    return [{"question": f"Una machungwa {i} na unapata 2. Una mangapi?",
             "answer": f"Hatua kwa hatua: {i + 2}" if with_answer else None,
             "answer_number": i + 2, "equation_solution": f"{i}+2={i + 2}" if with_answer
             else None} for i in range(n)]


def test_xcopa_xnli_mgsm_run_end_to_end_on_local_data(
        tmp_path: Path, tiny: tuple[object, object]) -> None:
    """The registered prompts (XCOPA's Python connector functions, XNLI's Jinja choices, MGSM's
    generation and answer-extraction filters) applied to local rows in the hub's columns."""
    _write_jsonl(tmp_path / "xcopa_sw" / "validation.jsonl", _xcopa_rows(2))
    _write_jsonl(tmp_path / "xcopa_sw" / "test.jsonl", _xcopa_rows(6))
    _write_jsonl(tmp_path / "xnli_sw" / "train.jsonl", _xnli_rows(3))
    _write_jsonl(tmp_path / "xnli_sw" / "validation.jsonl", _xnli_rows(9))
    # MGSM's test answers are null everywhere: parquet keeps their string type (from JSON the
    # datasets loader would infer a null column and refuse the train split's strings)
    schema = pa.schema([("question", pa.string()), ("answer", pa.string()),
                        ("answer_number", pa.int64()), ("equation_solution", pa.string())])
    (tmp_path / "mgsm_direct_sw").mkdir()
    for split, rows in (("train", _mgsm_rows(2, True)), ("test", _mgsm_rows(5, False))):
        pq.write_table(pa.Table.from_pylist(rows, schema=schema),
                       tmp_path / "mgsm_direct_sw" / f"{split}.parquet")

    tasks = build_suite_tasks(["xcopa", "xnli", "mgsm"], ["swh_Latn"], data_dir=tmp_path)
    assert sorted(tasks) == ["mgsm_direct_sw", "xcopa_sw", "xnli_sw"]
    loaded = task_manager().load([cfg for cfg, _, _ in tasks.values()])["tasks"]
    xcopa = next(iter(loaded["xcopa_sw"].test_docs()))
    assert loaded["xcopa_sw"].doc_to_text(xcopa) == "Mtu alianguka 0 kwa sababu"
    assert loaded["xcopa_sw"].doc_to_choice(xcopa) == ["alikimbia.", "alilala."]
    xnli = next(iter(loaded["xnli_sw"].validation_docs()))
    assert loaded["xnli_sw"].doc_to_choice(xnli)[2] == "Paka analala 0, sahihi? Hapana, paka yupo"
    mgsm = next(iter(loaded["mgsm_direct_sw"].test_docs()))
    assert loaded["mgsm_direct_sw"].doc_to_text(mgsm).startswith("Swali: Una machungwa 0")
    assert loaded["mgsm_direct_sw"].doc_to_target(mgsm) == "2"

    model, tok = tiny
    options = EvalOptions(suites=("xcopa", "xnli", "mgsm"), batch_size=4, max_gen_tokens=6,
                          data_dir=str(tmp_path))
    rows = evaluate_loaded(model, tok, ["swh_Latn"], options)
    got = {(r.task, r.metric): r for r in rows}
    for key, n in {("xcopa", "acc"): 6, ("xnli", "acc"): 9, ("mgsm", "exact_match"): 5}.items():
        row = got[key]
        assert row.lang == "swh_Latn" and row.n == n, row
        assert abs(row.value * n - round(row.value * n)) < 1e-9  # a share of the n local rows
