"""Acceptance of the train component on Ray Train: 2 CPU workers sharding the MoE with FSDP2 on
gloo. One run of 50 steps with a worker failing once at step 30 (resumes from the step-25
checkpoint, one continuous MLflow run, new language's validation loss falls, frozen tensors
bit-identical, live figures on Ray's Prometheus endpoint); one run killed outright and re-run
(resumes from its last checkpoint)."""

from __future__ import annotations

import threading
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from servers import free_ports
from train_fixtures import NEW, ORIGINAL, build_world, pack, upcycle_world

from components.config import TrainConfig
from components.moe.checkpoint import LazyCheckpoint
from components.tracking import ExpansionTracker
from components.train import Resources, TrainSpec, train_model
from components.train.spec import TrainError

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train-ray")
    world = build_world(root)
    data = pack(world, [*ORIGINAL, *NEW], root / "data", rows_per_lang=48)
    moe = upcycle_world(world, root / "moe")
    port, = free_ports(1)  # for the node's metrics endpoint
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=port, _system_config={"metrics_report_interval_ms": 1000})
    yield {"root": root, "data": data, "moe": moe, "metrics_port": port}
    ray.shutdown()


class _Scraper(threading.Thread):
    """Reads Ray's Prometheus endpoint every half second while a run trains: name → labels →
    the values seen, in order."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.url, self.seen = f"http://127.0.0.1:{port}/metrics", {}
        self.done = threading.Event()

    def run(self) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        while not self.done.wait(0.5):
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    text = r.read().decode()
            except OSError:
                continue
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name.startswith("ray_deltamoe_train_"):
                        labels = tuple(sorted((k, v) for k, v in sample.labels.items()
                                              if k in ("run", "mode", "lang")))
                        self.seen.setdefault(sample.name, {}).setdefault(labels, []).append(
                            sample.value)


def _spec(inputs: dict[str, Path], name: str, **kw: object) -> TrainSpec:
    data = inputs["data"]
    train = kw.pop("train")
    return TrainSpec(
        init_dir=str(inputs["moe"]), out_dir=str(inputs["root"] / f"out-{name}"),
        train_paths=[str(data / "train/part-0.parquet")],
        validation_paths=[str(data / "validation/part-0.parquet")], mode="cpt_moe",
        train=train, checkpoint_root=str(inputs["root"] / "ckpt"), run_name=name,
        resources=Resources(num_workers=2, cpus_per_worker=0.5, launcher="ray"),
        seed=0, **kw)  # type: ignore[arg-type]


def test_fault_restarts_from_checkpoint_and_training_works(inputs: dict[str, Path]) -> None:
    root = inputs["root"]
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    tracker = ExpansionTracker(tracking, "train-test", "ray-run")
    run_id = tracker.stage_run_id("cpt_moe")
    train = TrainConfig(steps=50, micro_batch_size=4, lr=2e-3, warmup_steps=5,
                        precision="fp32", checkpoint_every=25, keep_checkpoints=2,
                        max_failures=1, log_every=5, lpr_coef=0.01, peak_tflops=1.0)
    spec = _spec(inputs, "fault", train=train, tracking_uri=tracking, mlflow_run_id=run_id,
                 fail_at_step=30, fail_marker=str(root / "fault.marker"))
    scraper = _Scraper(inputs["metrics_port"])
    scraper.start()
    try:
        result = train_model(spec)
    finally:
        scraper.done.set()
        scraper.join()

    assert (root / "fault.marker").read_text() == "30"  # the fault did fire
    assert result.steps == 50 and result.attempts == 2 and result.resumed_from == 25
    assert result.tokens == 50 * 2 * 4 * 64  # steps × workers × micro batch × seq_len
    swh = "val/loss/swh_Latn"
    assert result.metrics[swh] < result.metrics[f"{swh}/initial"] - 0.3
    # anchor expert and every shared tensor bit-identical; new experts and routers trained
    with LazyCheckpoint(inputs["moe"]) as before, LazyCheckpoint(result.out_dir) as after:
        assert sorted(before.keys()) == sorted(after.keys())
        for key in before.keys():
            frozen = ".experts.0." in key or not (".experts." in key or ".gate." in key)
            assert torch.equal(before.get(key), after.get(key)) == frozen, key
    # one MLflow run holds the whole history across the restart
    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_run(run_id).info.experiment_id])
    assert [r.info.run_id for r in runs if r.data.tags.get("deltamoe.stage") == "cpt_moe"] == \
        [run_id]
    history = client.get_metric_history(run_id, "train/loss")
    steps = sorted({m.step for m in history})
    assert steps == list(range(5, 55, 5))
    data = client.get_run(run_id).data.metrics
    assert data[swh] == pytest.approx(result.metrics[swh])
    assert 0.0 <= data["router/allocated_share/swh_Latn"] <= 1.0
    loads = [data[f"router/load/0/{e}/swh_Latn"] for e in range(4)]
    assert sum(loads) == pytest.approx(1.0)
    assert data["train/tokens_per_s"] > 0 and data["train/lr"] > 0
    assert data["params/trainable"] > 0 and data["params/frozen"] > 0
    # throughput figures: MFU against the given 1 TFLOP/s per worker, peak RSS, active params
    assert data["params/active"] < data["params/trainable"] + data["params/frozen"]
    assert 0 < data["train/mfu"] < 1 and data["train/peak_memory_gib"] > 0
    assert client.get_run(run_id).data.tags["deltamoe.train.experts_implementation"] == \
        "eager"  # auto on a CPU
    # checkpoints kept: the last two
    kept = sorted(p.name for p in (root / "ckpt" / "fault").glob("checkpoint_0*"))
    assert kept == ["checkpoint_00000025", "checkpoint_00000050"]
    # the live figures reached Prometheus while it trained (rank 0 only, so one series each)
    run = (("mode", "cpt_moe"), ("run", "fault"))
    steps = scraper.seen["ray_deltamoe_train_step"][run]
    assert set(steps) <= set(range(5, 55, 5)) and max(steps) >= 20  # log steps, both attempts
    progress = scraper.seen["ray_deltamoe_train_progress"][run]
    assert all(0 < p <= 1 for p in progress)
    assert min(scraper.seen["ray_deltamoe_train_tokens_per_second"][run]) > 0
    swh_loss = scraper.seen["ray_deltamoe_train_loss"][(("lang", "swh_Latn"), *run)]
    assert all(0 < v < 20 for v in swh_loss)


def test_killed_job_resumes_when_rerun(inputs: dict[str, Path]) -> None:
    root = inputs["root"]
    train = TrainConfig(steps=6, micro_batch_size=4, lr=1e-3, warmup_steps=1, precision="fp32",
                        checkpoint_every=3, max_failures=0, log_every=3)
    spec = _spec(inputs, "kill", train=train, fail_at_step=4,
                 fail_marker=str(root / "kill.marker"))
    with pytest.raises(TrainError, match="failed"):
        train_model(spec)
    assert not (root / "out-kill" / "config.json").exists()
    result = train_model(spec)  # the marker exists now: the rerun runs through
    assert result.resumed_from == 3 and result.attempts == 1 and result.steps == 6
    assert (Path(result.out_dir) / "model.safetensors.index.json").exists()
