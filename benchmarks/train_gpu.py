"""GPU figures of the train component: tokens/s, MFU and peak memory of bf16 FSDP2.

1. one GPU, the inline launcher (one NCCL rank, FSDP2 bf16 params / fp32 reduce);
2. two ranks sharing that GPU, FSDP2 over NCCL: ``--two-launcher spawn`` (default: two local
   processes in one torch process group, no Ray needed on the GPU machine) or ``ray`` (two Ray
   Train workers with ``gpus_per_worker=0.5``). Should NCCL refuse two ranks on one device, the
   script says so instead of a figure.
The model is a randomly initialised Llama (~110M parameters) on random tokens; MFU counts
6 · parameters · tokens/s against the GPU's dense bf16 peak (``--peak-tflops``, H100 SXM 989).
Run from the repo root: ``python benchmarks/train_gpu.py``. The last line is
``ratio=<2-process tokens/s ÷ 1-process tokens/s>`` (nan when the 2-process run failed).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.config import TrainConfig
from components.train import Resources, TrainSpec, train_model


def make_inputs(root: Path, seq_len: int, rows: int) -> tuple[Path, Path, int]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                         num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                         max_position_embeddings=seq_len, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 32000, size=(rows, seq_len), dtype=np.int32)
    (root / "data").mkdir()
    pq.write_table(pa.table({"input_ids": pa.array(list(ids), pa.list_(pa.int32())),
                             "lang": ["eng_Latn"] * rows, "source": ["random"] * rows}),
                   root / "data" / "train.parquet")
    return root / "model", root / "data" / "train.parquet", params


def run(root: Path, model: Path, data: Path, name: str, resources: Resources,
        steps: int, micro: int) -> tuple[float, float]:
    train = TrainConfig(steps=steps, micro_batch_size=micro, lr=3e-4, warmup_steps=2,
                        precision="bf16", checkpoint_every=steps, log_every=5)
    torch.cuda.reset_peak_memory_stats()
    result = train_model(TrainSpec(
        init_dir=str(model), out_dir=str(root / f"out-{name}"), train_paths=[str(data)],
        validation_paths=[], mode="dense", train=train, checkpoint_root=str(root / "ckpt"),
        run_name=name, resources=resources, seed=0))
    return result.tokens / result.step_seconds, torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--two-launcher", choices=["spawn", "ray"], default="spawn",
                        help="how the 2-process run starts its ranks (ray needs a GPU-visible "
                             "Ray; spawn is one torch process group without Ray)")
    parser.add_argument("--two-backend", choices=["nccl", "gloo"], default="nccl",
                        help="collectives of the 2-process run: NCCL refuses two ranks on one "
                             "device ('Duplicate GPU detected'); gloo takes CUDA tensors too")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark needs a GPU")
    with tempfile.TemporaryDirectory(prefix="train-gpu-") as tmp:
        root = Path(tmp)
        model, data, params = make_inputs(root, args.seq_len, rows=args.steps * args.micro * 2)
        print(f"model: {params / 1e6:.1f} M parameters, {torch.cuda.get_device_name()}")
        one, peak = run(root, model, data, "one", Resources(use_gpu=True, launcher="inline"),
                        args.steps, args.micro)
        mfu = 6 * params * one / (args.peak_tflops * 1e12)
        print(f"1 GPU, 1 process (inline, FSDP2 bf16): {one:,.0f} tokens/s, MFU {mfu:.1%}, "
              f"peak memory {peak:.2f} GiB")
        two = math.nan
        try:
            two, _ = run(root, model, data, "two", Resources(
                num_workers=2, use_gpu=True, gpus_per_worker=0.5, cpus_per_worker=1.0,
                launcher=args.two_launcher, backend=args.two_backend), args.steps, args.micro)
            print(f"1 GPU, 2 processes ({args.two_launcher}, FSDP2 over {args.two_backend}): "
                  f"{two:,.0f} "
                  f"tokens/s, MFU {6 * params * two / (args.peak_tflops * 1e12):.1%} "
                  "(peak memory above is the driver's; each rank holds half the shards)")
        except Exception as err:  # report, do not hide: NCCL may refuse a shared device
            print(f"2-process run on one GPU failed: {type(err).__name__}: {err}")
    print(f"ratio={two / one:.3f}")


if __name__ == "__main__":
    main()
