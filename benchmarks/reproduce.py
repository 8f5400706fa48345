"""The paper's comparison at toy scale, as a benchmark of its own cost: the whole from-scratch
reproduction against the 30-minute budget it must fit on 2 CPU cores.

Runs exactly what ``deltamoe reproduce`` runs (the committed config
``workflows/configs/reproduce.yaml`` and its plan ``reproduce.gates.yaml``; each seed a replicate
of the whole pipeline) and writes the results page. The comparison's own headline is a paired
difference with its interval (printed, never a ratio of two scores); the last line is
``ratio=<wall minutes ÷ 30>``, the run's time against its budget (goal ≤ 1; point
``DELTAMOE_RUNS`` at an empty folder, stages an earlier run finished are skipped).

Run alone (outside CI; about 30 minutes on 2 CPU cores for three seeds):
``.venv/bin/python benchmarks/reproduce.py [--seeds 0,1,2] [--out benchmarks/results/reproduce.md]``
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.config import load_config
from components.evaluate.gates import load_plan
from workflows.cli import REPRODUCE_CONFIG
from workflows.comparison import headline_row, headline_text
from workflows.reproduce import run_reproduce

BUDGET_MINUTES = 30.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(REPRODUCE_CONFIG))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="benchmarks/results/reproduce.md")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    command = shlex.join(["python", "benchmarks/reproduce.py", "--seeds", args.seeds,
                          "--out", args.out])
    plan_file = Path(args.config).with_suffix(".gates.yaml")
    plan = load_plan(plan_file)
    result = run_reproduce(load_config(args.config), seeds, command=command, out=args.out,
                           plan=plan, plan_text=plan_file.read_text(encoding="utf-8"))
    print(result.table)
    print(headline_text(headline_row(result.paired, plan), plan, result.certified))
    minutes = sum(result.seconds.values()) / 60
    print(f"wall time {minutes:.1f} min for {len(seeds)} seeds, budget {BUDGET_MINUTES:.0f} min")
    print(f"ratio={minutes / BUDGET_MINUTES:.3f}")


if __name__ == "__main__":
    main()
