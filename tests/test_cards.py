"""Model cards as the hub reads them: the upcycled and grafted models' front matter (base_model,
relation, inherited licence and languages), model-index after evaluation, no local paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from common import save_model, tiny_dims
from transformers import LlamaConfig, LlamaForCausalLM

from components.cards import add_results, clean_title, model_ref, render_card
from components.delta.graft import GraftInputs, GraftOptions, graft
from components.evaluate.results import ResultRow
from components.moe.upcycle import UpcycleOptions, upcycle
from components.storage import RunDir

BASE_ID, POST_ID = "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct"
ROWS = [ResultRow("belebele", "swh_Latn", "acc", 0.4321, 0.017, 900),
        ResultRow("belebele", "eng_Latn", "acc", 0.8123, 0.013, 900)]


def _hub_snapshot(root: Path, repo: str, model: LlamaForCausalLM, card: str) -> Path:
    """A model laid out as the hub cache stores it, with the hub card's front matter."""
    org, name = repo.split("/")
    path = save_model(model, root / f"models--{org}--{name}" / "snapshots" / "0123abcd")
    (path / "README.md").write_text(card)
    return path


@pytest.fixture(scope="module")
def grafted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cards")
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**tiny_dims(64)))
    base = _hub_snapshot(root / "hub", BASE_ID, dense, "---\nlicense: llama3.1\nlanguage: [en, "
                         "de]\n---\n# Llama\n")
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(0.01)
    post = _hub_snapshot(root / "hub", POST_ID, dense, "---\nlicense: llama3.1\nlicense_link: "
                         "LICENSE\nlanguage: [en, de]\n---\n# Instruct\n")
    run_dir = RunDir(str(root / "runs"), "r")
    with run_dir.stage("models/moe_init").build("fp-moe") as work:
        upcycle(base, work.path, UpcycleOptions(num_experts=3, top_k=2, seed=1,
                                                allocation={"swh_Latn": [1, 2]},
                                                original_languages=("eng_Latn",)))
    moe = Path(run_dir.stage("models/moe_init").path)
    with run_dir.stage("models/deltamoe").build("fp-graft") as work:
        graft(GraftInputs(str(base), str(post), str(moe)), work.path,
              GraftOptions(method="deltamoe"))
    return {"root": root, "base": base, "post": post, "moe": moe, "run_dir": run_dir,
            "out": Path(run_dir.stage("models/deltamoe").path)}


def _front(path: Path) -> dict:
    text = (path / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_upcycled_card_names_the_hub_base_and_its_languages(grafted: dict[str, Path]) -> None:
    card = _front(grafted["moe"])
    assert card["base_model"] == BASE_ID and card["base_model_relation"] == "finetune"
    assert card["language"] == ["en", "sw", "de"]  # run languages, then the inputs' others
    assert card["license"] == "llama3.1" and {"deltamoe", "moe", "upcycled"} <= set(card["tags"])
    text = (grafted["moe"] / "README.md").read_text()
    assert "\n# moe_init (upcycled mixtral)\n" in text and ".tmp-" not in text
    assert str(grafted["root"]) not in text
    # an unpublished step names what it came from, so a trained child's card does too
    assert model_ref(grafted["moe"]) == BASE_ID


def test_grafted_card_front_matter_then_model_index(grafted: dict[str, Path]) -> None:
    out, run_dir = grafted["out"], grafted["run_dir"]
    card = _front(out)
    assert card["base_model"] == [BASE_ID, POST_ID] and card["base_model_relation"] == "merge"
    assert card["license"] == "llama3.1" and card["license_link"] == "LICENSE"
    assert set(card["language"]) == {"en", "de", "sw"} and "model-index" not in card
    text = (out / "README.md").read_text()
    assert "\n# deltamoe (deltamoe graft)\n" in text and ".tmp-" not in text
    assert str(grafted["root"]) not in text and f"- base: `{BASE_ID}`" in text
    lineage = json.loads(text.split("```json\n", 1)[1].split("```", 1)[0])
    assert lineage["target"] == "models/moe_init"

    stage = run_dir.stage("models/deltamoe")
    assert add_results(stage, ROWS)
    card = _front(out)
    assert card["base_model"] == [BASE_ID, POST_ID]  # lineage kept as the graft wrote it
    index, = card["model-index"]
    assert index["name"] == "deltamoe (deltamoe graft)"
    got = {(r["dataset"]["type"], r["dataset"]["config"]): r["metrics"][0] for r in
           index["results"]}
    assert got[("belebele", "swh_Latn")] == {"type": "acc", "value": 0.4321, "name": "acc",
                                             "verified": False}
    assert got[("belebele", "eng_Latn")]["value"] == 0.8123
    # the stage stays complete: the manifest declares the new card's size and checksum
    assert stage.is_complete("fp-graft", verify=True)
    assert add_results(stage, ROWS[:1]) and len(_front(out)["model-index"][0]["results"]) == 1
    # an input's own card (not written by deltamoe) is never rewritten
    before = (grafted["post"] / "README.md").read_text()
    assert not add_results(RunDir(str(grafted["post"].parent), grafted["post"].name).stage(""),
                           ROWS)
    assert (grafted["post"] / "README.md").read_text() == before


def test_titles_and_paths() -> None:
    assert clean_title("/x/runs/demo/models/cpt-moe.tmp-59d6e1ab") == "cpt-moe"
    text = render_card("base.tmp-9e68", "from `/scratch/alice/runs/demo/world/model`, λ/2")
    assert "\n# base\n" in text and "/scratch" not in text and "`world/model`" in text
    assert "λ/2" in text and yaml.safe_load(text.split("---\n", 2)[1])["tags"] == ["deltamoe"]
    with pytest.raises(ValueError, match="base_model_relation 'upcycle'"):
        render_card("x", "", base_model=["a/b"], relation="upcycle")
