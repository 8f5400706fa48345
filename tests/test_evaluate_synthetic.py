"""Evaluation on the synthetic world: the suite's acceptance, the stage, MLflow and plots.

The models are trained here with a short plain-PyTorch loop (the training stage is its own
module): a tiny Llama pre-trained on the world's English base text (the base), then fine-tuned
on English instruction rows (closed-book and open-book) with the loss on the answer tokens only
(the post-trained sibling). Item counts are read from the world's ``world.json``, never assumed:
the world's sizes are its own business.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from components.config import parse_config
from components.evaluate.results import ResultRow, comparison_table, read_results
from components.evaluate.runner import evaluate_model
from components.evaluate.synthetic import SYNTHETIC_TASKS
from components.moe.upcycle import UpcycleOptions, upcycle
from components.storage import RunDir
from components.synthetic.build import build_world
from components.synthetic.hf import build_tiny_model
from components.tracking import ExpansionTracker, resolve_tracking_uri

ORIGINAL, NEW = "eng_Latn", "swh_Latn"
# small evaluated groups keep generation short; the open-book training people stay the world's
WORLD = {"num_people": 60, "docs_per_language": 300, "vocab_size": 1200, "eval_people": 12,
         "new_fact_people": 12, "openbook_people": 24, "heldout_docs": 60}


def _train(model: torch.nn.Module, tok: object, texts: list[str], steps: int, lr: float,
           prompt_lens: list[int] | None = None, batch: int = 16) -> None:
    rng = random.Random(0)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = [rng.randrange(len(texts)) for _ in range(batch)]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                  max_length=160)  # an open-book row (biography, question, answer) fits
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        if prompt_lens is not None:  # loss on the answer only
            for row, i in enumerate(idx):
                labels[row, :prompt_lens[i]] = -100
        model(**enc, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _items(world: Path, lang: str, task: str) -> int:
    """How many items the world wrote for ``task`` in ``lang`` (its eval file's key)."""
    meta = json.loads((world / "world.json").read_text())
    return meta["summary"]["eval_items"][lang][task.removeprefix("synthetic_")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small world, a base pre-trained on English, and its instruction-tuned sibling."""
    root = tmp_path_factory.mktemp("evaluate")
    world = root / "world"
    build_world(world, seed=0, languages=[ORIGINAL, NEW], original=[ORIGINAL], **WORLD)
    tok = AutoTokenizer.from_pretrained(world / "tokenizer")
    build_tiny_model(tok, root / "init", hidden_size=96, num_layers=2, intermediate_size=256)
    model = AutoModelForCausalLM.from_pretrained(root / "init")
    base_text = world / "corpora" / "base" / "fineweb2" / "data" / ORIGINAL
    docs = [t for f in sorted(base_text.rglob("*.parquet"))
            for t in pq.read_table(f).column("text").to_pylist()]
    _train(model, tok, docs, steps=300, lr=3e-3)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    rows = [json.loads(line) for line in
            (world / "instructions" / ORIGINAL / "train.jsonl").read_text().splitlines()]
    prompts = [tok.apply_chat_template(r["messages"][:1], tokenize=False,
                                       add_generation_prompt=True) for r in rows]
    _train(model, tok, [r["text"] for r in rows], steps=150, lr=2e-3,
           prompt_lens=[len(tok(p)["input_ids"]) for p in prompts])
    model.save_pretrained(root / "post")
    tok.save_pretrained(root / "post")
    return {"root": root, "world": world, "base": root / "base", "post": root / "post"}


def _scores(rows: list[ResultRow]) -> dict[tuple[str, str, str], ResultRow]:
    return {(r.task, r.lang, r.metric): r for r in rows}


@pytest.fixture(scope="module")
def scored(trained: dict[str, Path]) -> dict[str, dict[tuple[str, str, str], ResultRow]]:
    out = {}
    for variant in ("base", "post"):
        rows = evaluate_model(trained[variant], suites=["synthetic"], languages=[ORIGINAL, NEW],
                              world_eval_dir=trained["world"] / "eval", batch_size=32,
                              max_gen_tokens=8)
        out[variant] = _scores(rows)
    return out


def test_every_task_and_item_is_scored(scored: dict, trained: dict) -> None:
    """Each task in each language over all the world's items; closed_new only where there are
    new-fact people (a new language); every question task reports exact_match and right_kind."""
    for rows in scored.values():
        tasks = {(task, lang) for task, lang, _ in rows}
        assert tasks == {(t, lang) for t in SYNTHETIC_TASKS for lang in (ORIGINAL, NEW)} - \
            {("synthetic_closed_new", ORIGINAL)}
        for (task, lang, metric), row in rows.items():
            assert row.n == _items(trained["world"], lang, task), (task, lang, metric)
        for task in ("synthetic_openbook", "synthetic_closed_original", "synthetic_closed_new"):
            metrics = {m for t, lang, m in rows if t == task and lang == NEW}
            assert {"exact_match", "right_kind"} <= metrics, task


def test_instruction_tuning_shows_in_its_language_only(scored: dict) -> None:
    base, post = scored["base"], scored["post"]
    em, kind = (("synthetic_openbook", ORIGINAL, m) for m in ("exact_match", "right_kind"))
    # a base model rambles instead of answering: neither the answer nor an answer word
    assert base[em].value < 0.02 and base[kind].value < 0.05
    # clearly higher: several standard errors above the base
    assert post[em].value > base[em].value + 3 * post[em].stderr
    # the format is learnt (a bare answer word of the asked attribute) beyond the right value
    assert post[kind].value > 0.8
    assert post[kind].value >= post[em].value
    assert post[kind].value > base[kind].value + 3 * post[kind].stderr
    # the answer format does not reach a language the model never saw
    for task in ("synthetic_openbook", "synthetic_closed_original", "synthetic_closed_new"):
        assert post[(task, NEW, "right_kind")].value < 0.05, task
        assert post[(task, NEW, "exact_match")].value < 0.05, task


def test_a_language_never_trained_is_near_chance_on_multiple_choice(scored: dict) -> None:
    for variant in ("base", "post"):
        mc = scored[variant][("synthetic_mc", NEW, "acc")]
        chance_stderr = math.sqrt(0.25 * 0.75 / mc.n)
        assert abs(mc.value - 0.25) < 3 * chance_stderr, (variant, mc)
    # the base read every English fact many times: well above chance in English
    mc = scored["base"][("synthetic_mc", ORIGINAL, "acc")]
    assert mc.value > 0.25 + 3 * math.sqrt(0.25 * 0.75 / mc.n), mc
    # pre-training on English text makes English far more predictable than Swahili
    lm = scored["base"]
    assert lm[("synthetic_lm", ORIGINAL, "bits_per_byte")].value < \
        0.5 * lm[("synthetic_lm", NEW, "bits_per_byte")].value


def test_comparison_table_reports_original_and_new_averages(scored: dict) -> None:
    evaluated = {v: list(s.values()) for v, s in scored.items()}
    table = comparison_table(evaluated, [ORIGINAL], [NEW])
    lines = table.splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[0] == "variant"
    # every question task's exact_match, lm's bits per byte and mc's accuracy, orig and new
    assert {"synthetic_openbook exact_match↑ orig", "synthetic_closed_new exact_match↑ new",
            "synthetic_closed_original exact_match↑ new", "synthetic_mc acc↑ orig",
            "synthetic_lm bits_per_byte↓ new"} <= set(header)
    post = [cell.strip() for cell in
            next(line for line in lines if line.startswith("| post |")).strip("|").split("|")]
    em = scored["post"][("synthetic_openbook", ORIGINAL, "exact_match")].value
    assert post[header.index("synthetic_openbook exact_match↑ orig")] == f"{em:.3f}"
    # no original language has new-fact questions: a dash, not a made-up score
    assert post[header.index("synthetic_closed_new exact_match↑ orig")] == "–"


# ----------------------------------------------------------------------------- the stage


def _stage_copy(run_dir: RunDir, stage: str, src: Path, perturb_routers: float = 0.0) -> Path:
    """Put a model into ``models/<stage>`` as a completed stage (optionally moving routers)."""
    with run_dir.stage(stage).build(f"test-{stage}-{perturb_routers}") as work:
        for item in src.iterdir():
            if item.name != "manifest.json":
                shutil.copy(item, work.path / item.name)
        if perturb_routers:
            for shard in work.path.glob("*.safetensors"):
                tensors = load_file(shard)
                gen = torch.Generator().manual_seed(1)
                for name, tensor in tensors.items():
                    if name.endswith(".gate.weight"):
                        tensors[name] = tensor + perturb_routers * torch.randn(
                            tensor.shape, generator=gen)
                save_file(tensors, shard, metadata={"format": "pt"})
    return Path(run_dir.stage(stage).path)


@pytest.fixture(scope="module")
def run(trained: dict[str, Path]) -> dict[str, object]:
    from workflows.evaluate_stage import ensure_evaluated

    root = trained["root"] / "runs"
    cfg = parse_config({
        "run_name": "ev", "world": {**WORLD, "languages": [ORIGINAL, NEW],
                                    "original": [ORIGINAL], "base_steps": 10},
        "languages": {"original": [ORIGINAL], "new": [NEW]},
        "evaluation": {"suites": ["synthetic"], "batch_size": 32, "max_gen_tokens": 8,
                       "limit": 24},
        "storage": {"root": str(root)},
    })
    run_dir = RunDir(cfg.storage.root, cfg.run_name)
    local = run_dir.local_path
    assert local is not None
    shutil.copytree(trained["world"], local / "world")
    _stage_copy(run_dir, "models/base", trained["base"])
    _stage_copy(run_dir, "models/post", trained["post"])
    with run_dir.stage("models/moe_init").build("test-moe") as work:
        upcycle(trained["base"], work.path, UpcycleOptions(num_experts=4, top_k=2))
    moe = Path(run_dir.stage("models/moe_init").path)
    _stage_copy(run_dir, "models/cpt_moe", moe)
    _stage_copy(run_dir, "models/deltamoe", moe, perturb_routers=0.5)
    tracker = ExpansionTracker(resolve_tracking_uri(None, run_dir), "t", cfg.run_name)
    evaluated = ensure_evaluated(cfg, run_dir, tracker=tracker)
    return {"cfg": cfg, "run_dir": run_dir, "local": local, "tracker": tracker,
            "evaluated": evaluated}


def test_stage_writes_one_json_per_variant(run: dict) -> None:
    evaluated, local = run["evaluated"], run["local"]
    assert list(evaluated) == ["base", "post", "cpt_moe", "deltamoe"]  # moe_init excluded
    for name, rows in evaluated.items():
        assert read_results(local / "eval" / f"{name}.json") == rows
        tasks = {(r.task, r.lang) for r in rows}
        assert tasks == {(t, lang) for t in SYNTHETIC_TASKS for lang in (ORIGINAL, NEW)} - \
            {("synthetic_closed_new", ORIGINAL)}
        limit = run["cfg"].evaluation.limit
        assert all(r.n == min(limit, _items(local / "world", r.lang, r.task)) for r in rows)
    assert (local / "eval" / "manifest.json").is_file()
    comparison = (local / "eval" / "comparison.md").read_text()
    assert [line.split(" | ")[0] for line in comparison.splitlines()[2:]] == \
        ["| base", "| post", "| cpt_moe", "| deltamoe"]
    for png in ("synthetic_mc.acc.languages.png", "synthetic_openbook.exact_match.averages.png",
                "synthetic_closed_new.exact_match.languages.png"):
        assert (local / "eval" / "plots" / png).read_bytes()[:4] == b"\x89PNG"



def test_evaluated_model_cards_get_a_model_index(run: dict) -> None:
    """Each evaluated model folder of the run carries its scores in its card's model-index; the
    folder stays a complete stage (its manifest records the new card)."""
    from components.cards import read_card

    run_dir, evaluated = run["run_dir"], run["evaluated"]
    card = read_card(run["local"] / "models" / "deltamoe")
    assert card["base_model_relation"] == "finetune" and card["base_model"]
    results = card["model-index"][0]["results"]  # one per (task, language), its metrics inside
    assert sum(len(r["metrics"]) for r in results) == len(evaluated["deltamoe"])
    acc = {r["dataset"]["config"]: m["value"] for r in results for m in r["metrics"]
           if r["dataset"]["type"] == "synthetic_mc" and m["type"] == "acc"}
    assert acc == {r.lang: round(r.value, 6) for r in evaluated["deltamoe"]
                   if (r.task, r.metric) == ("synthetic_mc", "acc")}
    stage = run_dir.stage("models/deltamoe")
    assert stage.is_complete(stage.read_manifest().fingerprint, verify=True)


def test_routing_analysis_of_moe_variants(run: dict) -> None:
    local = run["local"]
    load = json.loads((local / "eval" / "routing" / "load.json").read_text())
    assert {row["variant"] for row in load} == {"cpt_moe", "deltamoe"}
    for variant in ("cpt_moe", "deltamoe"):
        for layer in (0, 1):
            for lang in (ORIGINAL, NEW):
                shares = [r["share"] for r in load if r["variant"] == variant and
                          r["layer"] == layer and r["lang"] == lang]
                assert len(shares) == 4
                assert sum(shares) == pytest.approx(1.0)
    drift = json.loads((local / "eval" / "routing" / "drift.json").read_text())
    assert set(drift) == {"0", "1"}
    assert all(0.0 < v <= 1.0 for by in drift.values() for v in by.values())
    assert (local / "eval" / "routing" / "drift.png").is_file()


def test_mlflow_has_a_run_per_variant_and_the_tables(run: dict) -> None:
    tracker: ExpansionTracker = run["tracker"]
    client = MlflowClient(tracker.tracking_uri)
    runs = client.search_runs([tracker.experiment_id], "tags.variant = 'post'")
    assert len(runs) == 1
    assert runs[0].data.tags["mlflow.parentRunId"] == tracker.parent_run_id
    rows = _scores(run["evaluated"]["post"])
    for task, metric in (("synthetic_openbook", "exact_match"), ("synthetic_openbook",
                                                                  "right_kind"),
                         ("synthetic_closed_original", "exact_match")):
        assert runs[0].data.metrics[f"eval/{task}/{metric}/{ORIGINAL}"] == \
            pytest.approx(rows[(task, ORIGINAL, metric)].value)
    assert runs[0].data.metrics[f"eval/synthetic_closed_new/exact_match/{NEW}"] == \
        pytest.approx(rows[("synthetic_closed_new", NEW, "exact_match")].value)
    assert f"eval/synthetic_closed_new/exact_match/{ORIGINAL}" not in runs[0].data.metrics
    moe = client.search_runs([tracker.experiment_id], "tags.variant = 'deltamoe'")[0]
    assert any(k.startswith("router/load/0/") for k in moe.data.metrics)
    # lm-eval's own record beside the rows, in the part folder and as the run's artifacts
    lm_eval = json.loads((run["local"] / "eval_parts" / "deltamoe" / "lm_eval" /
                          "results_scored.json").read_text())
    assert lm_eval["n-shot"][f"synthetic_mc_{NEW}"] == 0
    assert lm_eval["configs"][f"synthetic_mc_{NEW}"]["output_type"] == "multiple_choice"
    assert lm_eval["versions"] and "samples" not in lm_eval  # samples only when asked
    assert {a.path for a in client.list_artifacts(moe.info.run_id, "lm_eval")} == \
        {"lm_eval/results_scored.json", "lm_eval/results_generated.json"}
    stage = client.search_runs([tracker.experiment_id], "tags.`deltamoe.stage` = 'evaluate'")[0]
    files = {a.path for a in client.list_artifacts(stage.info.run_id, "eval")}
    assert {"eval/results.json", "eval/comparison.md", "eval/plots", "eval/routing"} <= files


def test_rerun_reads_results_back(run: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import components.evaluate.runner as runner
    from workflows.evaluate_stage import comparison_table as stage_table
    from workflows.evaluate_stage import ensure_evaluated

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("an unchanged variant was evaluated again")

    monkeypatch.setattr(runner, "evaluate_loaded", refuse)
    manifest = (run["local"] / "eval" / "manifest.json").read_text()
    again = ensure_evaluated(run["cfg"], run["run_dir"])
    assert again == run["evaluated"]
    assert (run["local"] / "eval" / "manifest.json").read_text() == manifest
    assert stage_table(run["cfg"], again).splitlines()[0].startswith("| variant |")


# ----------------------------------------------------------------------------- the command


def _config_file(run: dict, tmp_path: Path, **evaluation: object) -> Path:
    import yaml

    data = run["cfg"].model_dump(mode="json", exclude_none=True)
    data["evaluation"].update(evaluation)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _invoke(args: list[str]) -> tuple[int, str]:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "workflows.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).parents[1])
    return proc.returncode, proc.stdout + proc.stderr


def test_cli_evaluates_one_variant_and_keeps_the_others(run: dict, tmp_path: Path) -> None:
    config = _config_file(run, tmp_path)
    parts = run["local"] / "eval_parts"
    before = {p.name: (p / "manifest.json").read_text() for p in parts.iterdir()}
    code, out = _invoke(["evaluate", str(config), "--variant", "post"])
    assert code == 0, out
    assert [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| ")][1:] == \
        ["| base", "| post", "| cpt_moe", "| deltamoe"]
    assert {p.name: (p / "manifest.json").read_text() for p in parts.iterdir()} == before
    # the eval stage still lists every variant evaluated with these settings
    names = sorted(p.stem for p in (run["local"] / "eval").glob("*.json")
                   if p.stem not in ("results", "manifest"))
    assert names == ["base", "cpt_moe", "deltamoe", "post"]


def test_cli_names_missing_suite_data_and_exits_2(run: dict, tmp_path: Path) -> None:
    config = _config_file(run, tmp_path, suites=["flores"])
    code, out = _invoke(["evaluate", str(config)])
    assert code == 2, out
    assert "flores" in out and "data_dir" in out
    assert "Traceback" not in out
