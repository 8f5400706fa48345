"""Cost of the stage contract (temp sibling, sha256 of every output, rename, manifest) against
writing the same bytes into a plain folder. Checkpoints are many GB, so hashing must stay cheap
next to the write itself.

    python benchmarks/stage_commit.py [--mb 256] [--files 4] [--repeats 3]

Prints per-repeat times side by side, then ``ratio=<stage time / plain write time>`` (median).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from components.storage import StageDir


def _write(folder: Path, blobs: list[bytes]) -> None:
    for i, blob in enumerate(blobs):
        path = folder / f"model-{i:05d}.safetensors"
        with open(path, "wb") as handle:
            handle.write(blob)
            handle.flush()
            os.fsync(handle.fileno())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="total output size")
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    size = args.mb * 1024 * 1024 // args.files
    blobs = [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for _ in range(args.files)]
    plain_times, stage_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for rep in range(args.repeats):
            plain = root / f"plain-{rep}"
            plain.mkdir()
            start = time.perf_counter()
            _write(plain, blobs)
            plain_times.append(time.perf_counter() - start)
            shutil.rmtree(plain)

            stage = StageDir(str(root / f"stage-{rep}"))
            start = time.perf_counter()
            with stage.build(f"fp-{rep}") as work:
                _write(work.path, blobs)
            stage_times.append(time.perf_counter() - start)
            shutil.rmtree(root / f"stage-{rep}")
            print(f"repeat {rep}: plain write {plain_times[-1]:.3f}s   "
                  f"stage build+commit {stage_times[-1]:.3f}s")
    ratio = statistics.median(stage_times) / statistics.median(plain_times)
    print(f"{args.mb} MB in {args.files} files, median of {args.repeats}")
    print(f"ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
