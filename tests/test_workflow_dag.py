"""The workflow as a DAG on a simulated two-node cluster: a head with CPUs only, and a node
carrying the custom resource ``gpu_node`` that stands in for a GPU node, configured as where
training and evaluation run.

One module-scoped cluster and one expansion (three training branches, six evaluated variants)
serve every test: the first walk has one branch made to fail, the second is the rerun."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from components.config import ConfigError, parse_config
from workflows.expand import WorkflowError, run_workflow

GPU_NODE = {"gpu_node": 0.01}  # a sliver per task: many tasks share the stand-in GPU node
TRAINING = ("cpt_dense", "cpt_flops_matched", "cpt_moe")
EVALUATED = ("base", "post", "cpt_dense", "param_delta", "flops_matched", "cpt_moe", "deltamoe")


@pytest.fixture(scope="module")
def cluster() -> Any:
    import ray
    from ray.cluster_utils import Cluster

    sim = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = sim.add_node(num_cpus=2, resources={"gpu_node": 1})
    ray.init(address=sim.address, log_to_driver=False)
    yield {"worker": worker.node_id, "head": sim.head_node.node_id}
    ray.shutdown()
    sim.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small synthetic world for corpora and evaluation sets, and a base/post pair large
    enough (~30M parameters as an MoE) that loading one would show in the driver's memory."""
    from transformers import AutoTokenizer

    from components.synthetic.build import build_world
    from components.synthetic.hf import build_tiny_model

    root = tmp_path_factory.mktemp("dag")
    world = root / "world"
    build_world(world, seed=0, num_people=16, docs_per_language=40, vocab_size=600)
    tokenizer = AutoTokenizer.from_pretrained(world / "model")
    for name, seed in (("base", 0), ("post", 1)):
        build_tiny_model(tokenizer, root / name, seed=seed, hidden_size=384, num_layers=4,
                         intermediate_size=1536)
    (root / "evaldata").mkdir()
    (root / "evaldata" / "synthetic").symlink_to(world / "eval")
    return {"root": root, "world": world}


def _config(inputs: dict[str, Path], **resources: Any) -> Any:
    root = inputs["root"]
    return parse_config({
        "run_name": "dag", "seed": 0,
        "models": {"base": str(root / "base"), "post": str(root / "post"), "dtype": "float32"},
        "languages": {"original": ["eng_Latn", "deu_Latn"], "new": ["swh_Latn", "rus_Cyrl"]},
        "data": {"sources": [{"name": "w", "format": "fineweb2",
                              "path": str(inputs["world"] / "corpora" / "fineweb2")}],
                 "seq_len": 64, "mix": {"ratios": {"swh_Latn": 0.5, "rus_Cyrl": 0.5}}},
        "upcycle": {"num_experts": 4, "top_k": 2},
        "train": {"steps": 12, "micro_batch_size": 2, "warmup_steps": 1, "precision": "fp32",
                  "checkpoint_every": 100, "log_every": 4},
        "baselines": {"variants": ["cpt_dense", "param_delta", "flops_matched"]},
        "evaluation": {"suites": ["synthetic"], "data_dir": str(root / "evaldata"), "limit": 4,
                       "batch_size": 4, "max_gen_tokens": 4},
        "storage": {"root": str(root / "runs")},
        "resources": {"launcher": "inline", "num_workers": 1,
                      "stages": {"train": {"resources": GPU_NODE},
                                 "evaluate": {"resources": GPU_NODE}}, **resources},
    }, env={})


class _RssSampler:
    """Peak resident memory of this process (the driver) while the workflow runs."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def _manifest(run: Path, stage: str) -> dict[str, Any]:
    return json.loads((run / stage / "manifest.json").read_text())


def _warm_up(cfg: Any, root: Path) -> None:
    """One-time costs that do not grow with any model: the MLflow store's schema (created by the
    first client of a new SQLite file), matplotlib's font cache, Ray's task submission path."""
    import matplotlib.pyplot as plt
    import ray

    from components.storage import RunDir
    from components.tracking import ExpansionTracker, resolve_tracking_uri

    run_dir = RunDir(cfg.storage.root, cfg.run_name)
    ExpansionTracker(resolve_tracking_uri(cfg.tracking.uri, run_dir), cfg.tracking.experiment,
                     cfg.run_name)
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    ax.set_title("warm-up")
    fig.savefig(root / "warm-up.png")
    plt.close(fig)
    assert ray.get(ray.remote(lambda: 1).remote()) == 1


@pytest.fixture(scope="module")
def walks(cluster: Any, inputs: dict[str, Path]) -> dict[str, Any]:
    """First walk: ``cpt_dense`` fails (its checkpoint folder is a file); second: fixed. The
    driver's memory is sampled through both."""
    # what the driver imports anyway before any stage runs, so that the sample shows the
    # workflow's memory, not the import of plotting, tracking and data-stage libraries (the
    # data stage's modules alone are ~8 MB; the bound below is 25 % of a 122 MB model)
    import matplotlib.pyplot  # noqa: F401
    import mlflow  # noqa: F401
    import pandas  # noqa: F401

    import dashboards.report  # noqa: F401
    import workflows.data_stage
    import workflows.evaluate_stage  # noqa: F401

    cfg = _config(inputs)
    run = inputs["root"] / "runs" / "dag"
    _warm_up(cfg, inputs["root"])
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "cpt_dense").write_text("in the way")
    with _RssSampler() as rss:  # both walks: the second builds the tables and the report
        with pytest.raises(WorkflowError) as failed:
            run_workflow(cfg)
        (run / "checkpoints" / "cpt_dense").unlink()
        rerun = run_workflow(cfg)
    return {"cfg": cfg, "run": run, "failed": failed.value, "rss": rss, "rerun": rerun}


def test_failing_branch_blocks_only_its_dependants(walks: dict[str, Any]) -> None:
    states = {name: o.state for name, o in walks["failed"].result.outcomes.items()}
    assert states["cpt_dense"] == "failed"
    assert "cpt_dense" in str(walks["failed"])
    for blocked in ("param_delta", "eval_cpt_dense", "eval_param_delta", "evaluate", "report"):
        assert states[blocked] == "blocked", (blocked, states)
    for done in ("data", "moe_init", "cpt_moe", "deltamoe", "cpt_flops_matched",
                 "flops_matched", "eval_base", "eval_post", "eval_cpt_moe", "eval_deltamoe",
                 "eval_flops_matched"):
        assert states[done] == "built", (done, states)
    assert not walks["failed"].user_error  # a file in the way is the machine's, not the config


def test_rerun_builds_only_what_failed_or_was_blocked(walks: dict[str, Any]) -> None:
    outcomes = walks["rerun"].outcomes
    built = sorted(name for name, o in outcomes.items() if o.state == "built")
    assert built == sorted(["cpt_dense", "param_delta", "eval_cpt_dense", "eval_param_delta",
                            "evaluate", "report"])
    assert all(o.state in ("built", "skipped") for o in outcomes.values())
    assert list(walks["rerun"].evaluated) == list(EVALUATED)


def test_training_and_evaluation_ran_on_the_gpu_node(walks: dict[str, Any],
                                                     cluster: Any) -> None:
    run = walks["run"]
    stages = [f"models/{name}" for name in TRAINING] + \
        [f"eval_parts/{name}" for name in EVALUATED]
    for stage in stages:
        placement = _manifest(run, stage)["placement"]
        assert placement["node_id"] == cluster["worker"], stage
        assert placement["resources"].get("gpu_node") == pytest.approx(0.01), stage
    # what needs no GPU node stayed free to go anywhere, and the driver loaded no model
    assert _manifest(run, "models/moe_init")["placement"]["pid"] != psutil.Process().pid


def test_independent_training_branches_overlap_in_time(walks: dict[str, Any]) -> None:
    from datetime import datetime

    def span(stage: str) -> tuple[float, float]:
        t = _manifest(walks["run"], stage)["timings"]
        return (datetime.fromisoformat(t["started_at"]).timestamp(),
                datetime.fromisoformat(t["finished_at"]).timestamp())

    (a0, a1), (b0, b1) = span("models/cpt_moe"), span("models/cpt_flops_matched")
    assert min(a1, b1) > max(a0, b0), "the two training branches ran one after the other"


def test_driver_memory_stays_far_below_a_model(walks: dict[str, Any]) -> None:
    run = walks["run"]
    largest = max(sum(p.stat().st_size for p in (run / "models" / m).glob("*.safetensors"))
                  for m in ("moe_init", "cpt_moe", "deltamoe"))
    assert largest > 100e6  # the MoE is ~30M fp32 parameters
    growth = walks["rss"].peak - walks["rss"].start
    print(f"driver RSS growth {growth / 1e6:.1f} MB; largest model {largest / 1e6:.1f} MB")
    # a model through the driver grows it by the model's size; measured without one: 3.4 MB
    # alone, 12.5-14.9 MB late in the full suite (allocator state the earlier tests left)
    assert growth < 0.25 * largest, f"driver grew {growth / 1e6:.1f} MB, model {largest / 1e6:.0f}"


def test_max_parallel_one_runs_one_stage_at_a_time(walks: dict[str, Any],
                                                   inputs: dict[str, Path]) -> None:
    """The cap holds: with max_parallel 1 a rerun that rebuilds two evaluations does them in
    turn (their parts are removed; everything else is skipped)."""
    import shutil

    run = walks["run"]
    for name in ("cpt_moe", "deltamoe"):
        shutil.rmtree(run / "eval_parts" / name)
    result = run_workflow(_config(inputs, max_parallel=1), only=("evaluate",))
    spans = sorted((o.started_at, o.finished_at) for name, o in result.outcomes.items()
                   if name in ("eval_cpt_moe", "eval_deltamoe"))
    assert len(spans) == 2 and spans[0][1] <= spans[1][0]
    # only the two removed parts are rebuilt; the same parts again make the same eval stage
    assert {n for n, state in result.stages.items() if state == "built"} == \
        {"eval_cpt_moe", "eval_deltamoe"}
    assert result.stages["evaluate"] == "skipped (manifest matches)"


def test_a_relative_root_is_refused_inside_a_ray_jobs_working_dir_copy(
        inputs: dict[str, Path]) -> None:
    from workflows.expand import refuse_ephemeral_root

    copy = "/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_0a1b2c"
    relative = _config(inputs).model_copy(update={"storage": _config(inputs).storage.model_copy(
        update={"root": "runs"})})
    with pytest.raises(ConfigError, match="temporary copy of its working dir"):
        refuse_ephemeral_root(relative, cwd=copy)
    refuse_ephemeral_root(relative, cwd="/home/me/project")  # a checkout keeps its runs/
    refuse_ephemeral_root(_config(inputs), cwd=copy)  # an absolute root survives the copy
