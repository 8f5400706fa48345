"""The paper's comparison at toy scale, as a benchmark: every variant over seeds, side by side.

Runs exactly what ``deltamoe reproduce`` runs (the committed, fixed config
``workflows/configs/reproduce.yaml``; each seed a replicate of the whole pipeline) and writes the
results page. The baseline of the headline is ParamΔ, the dense route DeltaMoE claims to beat:
the last line is ``ratio=<DeltaMoE ÷ ParamΔ>`` on the new languages' instruction exact match
(mean over seeds; above 1 favours DeltaMoE).

Run alone (outside CI; about 45 minutes on 2 CPU cores for three seeds):
``.venv/bin/python benchmarks/reproduce.py [--seeds 0,1,2] [--out benchmarks/results/reproduce.md]``
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.config import load_config
from workflows.cli import REPRODUCE_CONFIG
from workflows.reproduce import headline, run_reproduce


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(REPRODUCE_CONFIG))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="benchmarks/results/reproduce.md")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    command = shlex.join(["python", "benchmarks/reproduce.py", "--seeds", args.seeds,
                          "--out", args.out])
    result = run_reproduce(load_config(args.config), seeds, command=command, out=args.out)
    print(result.table)
    name, ratio = headline(result.aggregate)
    print(f"{name}: {ratio:.3f}")
    print(f"ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
