"""Evaluation on the synthetic world: the suite's acceptance, the stage, MLflow and plots.

The models are trained here with a short plain-PyTorch loop (the training stage is its own
module): a tiny Llama pre-trained on the world's English text (the base), then fine-tuned on
English instruction rows with the loss on the answer tokens only (the post-trained sibling).
"""

from __future__ import annotations

import json
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
from components.moe.upcycle import UpcycleOptions, upcycle
from components.storage import RunDir
from components.synthetic.build import build_world
from components.synthetic.hf import build_tiny_model
from components.tracking import ExpansionTracker, resolve_tracking_uri

ORIGINAL, NEW = "eng_Latn", "swh_Latn"


def _train(model: torch.nn.Module, tok: object, texts: list[str], steps: int, lr: float,
           prompt_lens: list[int] | None = None, batch: int = 16) -> None:
    rng = random.Random(0)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = [rng.randrange(len(texts)) for _ in range(batch)]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                  max_length=96)
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        if prompt_lens is not None:  # loss on the answer only
            for row, i in enumerate(idx):
                labels[row, :prompt_lens[i]] = -100
        model(**enc, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small world, a base pre-trained on English, and its instruction-tuned sibling."""
    root = tmp_path_factory.mktemp("evaluate")
    world = root / "world"
    build_world(world, seed=0, num_people=60, docs_per_language=300, vocab_size=1200,
                languages=[ORIGINAL, NEW])
    tok = AutoTokenizer.from_pretrained(world / "tokenizer")
    build_tiny_model(tok, root / "init", hidden_size=96, num_layers=2, intermediate_size=256)
    model = AutoModelForCausalLM.from_pretrained(root / "init")
    docs = [t for f in sorted((world / "corpora" / "fineweb2").rglob("*.parquet"))
            if ORIGINAL in str(f) for t in pq.read_table(f).column("text").to_pylist()]
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


def test_instruction_tuning_shows_in_its_language_only(scored: dict) -> None:
    base, post = scored["base"], scored["post"]
    key = ("synthetic_instruct", ORIGINAL, "exact_match")
    assert base[key].value == 0.0  # a base model rambles instead of answering
    assert post[key].n == 84  # 12 eval people × 5 attributes, all question forms
    # clearly higher: several standard errors above the base
    assert post[key].value > base[key].value + 3 * post[key].stderr
    # the answer format does not reach a language the model never saw
    assert post[("synthetic_instruct", NEW, "exact_match")].value == 0.0


def test_a_language_never_trained_is_near_chance_on_multiple_choice(scored: dict) -> None:
    for variant in ("base", "post"):
        mc = scored[variant][("synthetic_mc", NEW, "acc")]
        assert mc.n == 60
        assert abs(mc.value - 0.25) < 0.12, (variant, mc)
    # pre-training on English text makes English far more predictable than Swahili
    lm = scored["base"]
    assert lm[("synthetic_lm", ORIGINAL, "bits_per_byte")].value < \
        0.5 * lm[("synthetic_lm", NEW, "bits_per_byte")].value


def test_comparison_table_reports_original_and_new_averages(scored: dict) -> None:
    evaluated = {v: list(s.values()) for v, s in scored.items()}
    table = comparison_table(evaluated, [ORIGINAL], [NEW])
    lines = table.splitlines()
    assert lines[0].startswith("| variant | synthetic_instruct exact_match↑ orig")
    post_line = next(line for line in lines if line.startswith("| post |"))
    em = scored["post"][("synthetic_instruct", ORIGINAL, "exact_match")].value
    assert f"{em:.3f}" in post_line.split("|")[2]


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
        "run_name": "ev", "world": {"num_people": 60, "docs_per_language": 300,
                                    "vocab_size": 1200, "base_steps": 10},
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
        assert tasks == {(t, lang) for t in ("synthetic_lm", "synthetic_instruct",
                                            "synthetic_mc") for lang in (ORIGINAL, NEW)}
        assert all(r.n == 24 for r in rows)  # evaluation.limit
    assert (local / "eval" / "manifest.json").is_file()
    comparison = (local / "eval" / "comparison.md").read_text()
    assert [line.split(" | ")[0] for line in comparison.splitlines()[2:]] == \
        ["| base", "| post", "| cpt_moe", "| deltamoe"]
    for png in ("synthetic_mc.acc.languages.png", "synthetic_instruct.exact_match.averages.png"):
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
    key = ("synthetic_instruct", ORIGINAL, "exact_match")
    assert runs[0].data.metrics[f"eval/synthetic_instruct/exact_match/{ORIGINAL}"] == \
        pytest.approx(rows[key].value)
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
