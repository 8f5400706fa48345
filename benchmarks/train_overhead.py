"""Ray Train overhead: steps/s of the training loop run bare vs under Ray Train.

Same model (the synthetic world's tiny model upcycled to a 4-expert MoE), same data, same loop
function, one worker each, one torch thread each: "bare" is the inline launcher (the loop in
this process, data from pyarrow), "ray" is TorchTrainer with one worker streaming its shard
from Ray Data and reporting DCP checkpoints through ray.train.report. The timed window is the
step loop's wall time as the loop itself measures it (checkpoints and reports included): Ray's
fixed startup (~25 s here: actors, process group, dataset planning) and the model load are
excluded, since they do not grow with the run. Prints ``ratio=<bare steps/s ÷ ray steps/s>``.

Run alone: ``.venv/bin/python benchmarks/train_overhead.py [--steps 60]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_fixtures import NEW, ORIGINAL, build_world, pack, upcycle_world

from components.config import TrainConfig
from components.train import Resources, TrainSpec, train_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    import ray

    with tempfile.TemporaryDirectory(prefix="train-overhead-") as tmp:
        root = Path(tmp)
        world = build_world(root)
        data = pack(world, [*ORIGINAL, *NEW], root / "data", rows_per_lang=48)
        moe = upcycle_world(world, root / "moe")
        train = TrainConfig(steps=args.steps, micro_batch_size=4, lr=1e-3, warmup_steps=5,
                            precision="fp32", checkpoint_every=20, log_every=10)
        rates = {}
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            for launcher in ("inline", "ray"):
                spec = TrainSpec(
                    init_dir=str(moe), out_dir=str(root / f"out-{launcher}"),
                    train_paths=[str(data / "train/part-0.parquet")],
                    validation_paths=[str(data / "validation/part-0.parquet")],
                    mode="cpt_moe", train=train, checkpoint_root=str(root / "ckpt"),
                    run_name=launcher, seed=0,
                    resources=Resources(num_workers=1, cpus_per_worker=1.0, launcher=launcher))
                result = train_model(spec)
                rates[launcher] = result.steps / result.step_seconds
                print(f"{launcher:>6}: {result.steps} steps in {result.step_seconds:.2f} s "
                      f"= {rates[launcher]:.2f} steps/s (total with setup {result.seconds:.1f} s)")
        finally:
            ray.shutdown()
    print(f"ratio={rates['inline'] / rates['ray']:.3f}")


if __name__ == "__main__":
    main()
