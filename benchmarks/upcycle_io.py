"""Upcycling time against a plain copy of the same bytes.

Upcycling is I/O: read each dense tensor once, write N expert copies, a router, an index. The
floor is copying the output's bytes from disk to disk; this measures how close the streaming
upcycler gets to it. Both sides run alternately on the same machine and the ratio of medians is
reported (absolute times on a shared machine mean little).

    python benchmarks/upcycle_io.py [--hidden 512] [--layers 8] [--experts 4] [--repeats 3]

Prints per-repeat times side by side, then ``ratio=<upcycle time / plain copy time>``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from components.moe.upcycle import UpcycleOptions, upcycle


def _copy(src: Path, dst: Path) -> None:
    """The floor: every output byte read and written once, synced like the upcycler's shards."""
    dst.mkdir()
    for path in sorted(src.iterdir()):
        shutil.copyfile(path, dst / path.name)
        with open(dst / path.name, "rb+") as handle:
            os.fsync(handle.fileno())


def _sync(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shard-mb", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8000, hidden_size=args.hidden,
                         intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                         num_attention_heads=8, num_key_value_heads=4)
    options = UpcycleOptions(num_experts=args.experts, top_k=2, seed=0,
                             max_shard_bytes=args.shard_mb * 1024 * 1024)
    upcycle_times, copy_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        LlamaForCausalLM(config).save_pretrained(root / "dense", max_shard_size="256MB")
        for rep in range(args.repeats):
            out = root / f"moe-{rep}"
            out.mkdir()
            start = time.perf_counter()
            upcycle(root / "dense", out, options)
            _sync(out)
            upcycle_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            _copy(out, root / f"copy-{rep}")
            copy_times.append(time.perf_counter() - start)
            size = sum(p.stat().st_size for p in out.iterdir())
            shutil.rmtree(out)
            shutil.rmtree(root / f"copy-{rep}")
            print(f"repeat {rep}: upcycle {upcycle_times[-1]:.3f}s   plain copy "
                  f"{copy_times[-1]:.3f}s   ({size / 1e6:.0f} MB written, {args.experts} experts)")
    ratio = statistics.median(upcycle_times) / statistics.median(copy_times)
    print(f"median: upcycle {statistics.median(upcycle_times):.3f}s, plain copy "
          f"{statistics.median(copy_times):.3f}s")
    print(f"ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
