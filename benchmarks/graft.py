"""The graft engine against its I/O floor, against mergekit, in memory, and on 2 Ray workers.

    python benchmarks/graft.py [--small-hidden 512] [--large-hidden 1024] [--repeats 3]

All in one run, side by side, on models built from config (bf16 on disk, like real checkpoints):
(a) DeltaMoE graft time ÷ the I/O floor (read every input byte, write the output's bytes, fsync);
(b) the dense ParamΔ graft vs mergekit's ``task_arithmetic`` on the same dense pair (same
    formula: base + (cpt − base) + (post − base)), time and max abs difference; mergekit is
    installed with ``pip --target`` into ``benchmarks/.mergekit`` (git-ignored), never vendored;
(c) peak RSS of a graft at two model sizes, in a fresh process, in units of the shard size
    (64 MiB here, so both models span many shards);
(d) speedup of 2 Ray workers over 1 on the large model (Ray already running and warm).
The last line carries headline (a) as ``ratio=<graft time / I/O floor>`` on the large model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from components.delta.graft import GraftInputs, GraftOptions, graft
from components.moe.checkpoint import LazyCheckpoint
from components.moe.upcycle import UpcycleOptions, upcycle

SHARD = 256 * 1024 * 1024
RSS_SHARD = 64 * 1024 * 1024  # (c): small enough that both models span many shards
MERGEKIT_DIR = Path(__file__).parent / ".mergekit"


def _model(root: Path, name: str, hidden: int, layers: int, seed: int) -> Path:
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=max(1, hidden // 256), tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(root / name, max_shard_size="500MB")
    return root / name


def _world(root: Path, hidden: int, layers: int) -> dict[str, Path]:
    paths = {name: _model(root, name, hidden, layers, seed)
             for seed, name in enumerate(("base", "post", "cpt_dense"))}
    moe = root / "cpt_moe"
    moe.mkdir()
    upcycle(paths["base"], moe, UpcycleOptions(num_experts=4, top_k=2, expert_noise_std=1e-3,
                                               max_shard_bytes=SHARD))
    paths["cpt_moe"] = moe
    return paths


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix == ".safetensors")


def _sync(path: Path) -> None:
    for file in _files(path):
        with open(file, "rb+") as handle:
            os.fsync(handle.fileno())


def _io_floor(inputs: list[Path], out_bytes: int, out: Path) -> float:
    """Read every input byte, then write and fsync as many output bytes."""
    start = time.perf_counter()
    for folder in inputs:
        for file in _files(folder):
            with open(file, "rb") as handle:
                while handle.read(64 * 1024 * 1024):
                    pass
    out.mkdir()
    block = os.urandom(64 * 1024 * 1024)
    with open(out / "floor.bin", "wb") as handle:
        written = 0
        while written < out_bytes:
            handle.write(block[:min(len(block), out_bytes - written)])
            written += min(len(block), out_bytes - written)
        handle.flush()
        os.fsync(handle.fileno())
    elapsed = time.perf_counter() - start
    (out / "floor.bin").unlink()
    out.rmdir()
    return elapsed


def _timed_graft(paths: dict[str, Path], target: str, out: Path, **options: object) -> float:
    out.mkdir()
    start = time.perf_counter()
    graft(GraftInputs(str(paths["base"]), str(paths["post"]), str(paths[target])), out,
          GraftOptions(max_shard_bytes=SHARD, **options))
    _sync(out)
    return time.perf_counter() - start


def _rm(path: Path) -> None:
    for file in path.iterdir():
        file.unlink()
    path.rmdir()


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in _files(path))


def _mergekit_python() -> dict[str, str] | None:
    """An environment where mergekit imports, installing it into benchmarks/.mergekit once."""
    env = {**os.environ, "PYTHONPATH": str(MERGEKIT_DIR)}
    probe = [sys.executable, "-c", "import mergekit.merge"]
    if subprocess.run(probe, env=env, capture_output=True).returncode == 0:
        return env
    install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
               str(MERGEKIT_DIR), "mergekit==0.1.5", "immutables==0.21"]
    if subprocess.run(install, capture_output=True).returncode != 0:
        return None
    return env if subprocess.run(probe, env=env, capture_output=True).returncode == 0 else None


_MERGEKIT = """
import sys, time, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
base, cpt, post, out = sys.argv[1:5]
config = MergeConfiguration.model_validate(yaml.safe_load(f'''
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {cpt}
    parameters: {{weight: 1.0}}
  - model: {post}
    parameters: {{weight: 1.0}}
dtype: bfloat16
'''))
start = time.perf_counter()
run_merge(config, out, options=MergeOptions(copy_tokenizer=False, out_shard_size={shard},
                                            quiet=True))
print(time.perf_counter() - start)
"""

_RSS = """
import json, sys
from components.delta.graft import GraftInputs, GraftOptions, graft
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
start = status("VmRSS:")
graft(GraftInputs(*sys.argv[1:4]), sys.argv[4], GraftOptions(max_shard_bytes={shard}))
print(json.dumps([start, status("VmHWM:")]))
"""


def _params(path: Path) -> int:
    with LazyCheckpoint(path) as ckpt:
        return sum(torch.Size(ckpt.meta(k)[0]).numel() for k in ckpt.keys())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-hidden", type=int, default=512)
    parser.add_argument("--small-layers", type=int, default=8)
    parser.add_argument("--large-hidden", type=int, default=1024)
    parser.add_argument("--large-layers", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sizes = {"small": _world(root / "small", args.small_hidden, args.small_layers),
                 "large": _world(root / "large", args.large_hidden, args.large_layers)}
        for name, paths in sizes.items():
            print(f"{name}: dense {_params(paths['base']) / 1e6:.0f}M parameters, MoE "
                  f"{_params(paths['cpt_moe']) / 1e6:.0f}M")

        # (a) graft vs I/O floor, DeltaMoE onto the upcycled MoE
        ratios = {}
        for name, paths in sizes.items():
            grafts, floors = [], []
            for rep in range(args.repeats if name == "small" else 1):
                out = root / f"a-{name}-{rep}"
                grafts.append(_timed_graft(paths, "cpt_moe", out, method="deltamoe"))
                size = _bytes(out)
                _rm(out)
                floors.append(_io_floor([paths["base"], paths["post"], paths["cpt_moe"]], size,
                                        root / f"floor-{name}-{rep}"))
                print(f"(a) {name} repeat {rep}: graft {grafts[-1]:.2f}s   I/O floor "
                      f"{floors[-1]:.2f}s   ({size / 1e6:.0f} MB out)")
            ratios[name] = statistics.median(grafts) / statistics.median(floors)
            print(f"(a) {name}: graft / I/O floor = {ratios[name]:.2f}")

        # (b) dense ParamΔ vs mergekit task_arithmetic, same pair, same formula
        env = _mergekit_python()
        paths = sizes["small"]
        ours = [_timed_graft(paths, "cpt_dense", root / f"b-ours-{rep}", method="param_delta")
                for rep in range(args.repeats)]
        if env is None:
            print("(b) mergekit could not be installed here: comparison skipped")
        else:
            theirs = []
            for rep in range(args.repeats):
                out = root / f"b-mergekit-{rep}"
                proc = subprocess.run(
                    [sys.executable, "-c", _MERGEKIT.replace("{shard}", str(SHARD)),
                     str(paths["base"]), str(paths["cpt_dense"]), str(paths["post"]), str(out)],
                    env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"(b) mergekit failed: {proc.stderr.strip().splitlines()[-1]}")
                    break
                start = time.perf_counter()
                _sync(out)  # like ours: the merge's own time plus making it durable
                theirs.append(float(proc.stdout.strip().splitlines()[-1])
                              + time.perf_counter() - start)
                print(f"(b) repeat {rep}: ours {ours[rep]:.2f}s   mergekit {theirs[-1]:.2f}s")
            if theirs:
                with LazyCheckpoint(root / "b-ours-0") as a, \
                        LazyCheckpoint(root / "b-mergekit-0") as b:
                    diff = max((a.get(k).float() - b.get(k).float()).abs().max().item()
                               for k in a.keys())
                print(f"(b) ParamΔ {statistics.median(ours):.2f}s vs mergekit task_arithmetic "
                      f"{statistics.median(theirs):.2f}s: mergekit / ours = "
                      f"{statistics.median(theirs) / statistics.median(ours):.2f}; "
                      f"max abs diff {diff:.2e} (bf16 output)")

        # (c) peak RSS in a fresh process, two sizes
        for name, paths in sizes.items():
            out = root / f"c-{name}"
            out.mkdir()
            proc = subprocess.run(
                [sys.executable, "-c", _RSS.replace("{shard}", str(RSS_SHARD)), str(paths["base"]),
                 str(paths["post"]), str(paths["cpt_moe"]), str(out)],
                capture_output=True, text=True, check=True)
            before, peak = json.loads(proc.stdout.strip().splitlines()[-1])
            grew = (peak - before) * 1024
            print(f"(c) {name}: peak RSS {peak / 1024:.0f} MB, +{grew / 1e6:.0f} MB over the "
                  f"imports = {grew / RSS_SHARD:.2f} shards of {RSS_SHARD / 2**20:.0f} MiB "
                  f"(model {_bytes(paths['cpt_moe']) / 1e6:.0f} MB)")

        # (d) 2 Ray workers vs 1, large model, Ray running and its workers warm
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        paths = sizes["large"]
        _timed_graft(sizes["small"], "cpt_moe", root / "d-warm", method="deltamoe", workers=2)
        one = _timed_graft(paths, "cpt_moe", root / "d-1", method="deltamoe", workers=1)
        two = _timed_graft(paths, "cpt_moe", root / "d-2", method="deltamoe", workers=2)
        ray.shutdown()
        print(f"(d) large: 1 worker {one:.2f}s, 2 Ray workers {two:.2f}s: speedup "
              f"{one / two:.2f}x")
    print(f"ratio={ratios['large']:.2f}")


if __name__ == "__main__":
    main()
