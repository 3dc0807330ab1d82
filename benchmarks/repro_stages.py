"""Wall time of the default `dvc repro`, per stage and in total, in a fresh copy of the project.

    python benchmarks/repro_stages.py [--out benchmarks/results/cpu_vm/repro_stages.json]

Copies the code and pipeline into a temporary git+DVC repository (nothing cached), runs `dvc repro`
with a fresh local Ray (`RAY_ADDRESS=local`, what a laptop without a cluster gets) and timestamps
each "Running stage" line DVC prints: a stage's time runs until the next stage starts. The JSON
records the machine, the code and the load average before and after the run (shared machines vary).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from _common import REPO, code_version, machine

sys.path[:0] = [str(REPO), str(REPO / "tests")]

from project_copy import fresh_project  # noqa: E402

STAGE_LINE = re.compile(r"Running stage '(?P<stage>[^']+)'")


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "RAY_ADDRESS": "local"}


def timed_repro(root: Path) -> tuple[float, dict[str, float]]:
    """Total wall seconds and seconds per stage of one `dvc repro`."""
    started = time.perf_counter()
    marks: list[tuple[str, float]] = []
    process = subprocess.Popen(["dvc", "repro"], cwd=root, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    for line in process.stdout:
        output.append(line)
        match = STAGE_LINE.search(line)
        if match:
            marks.append((match["stage"], time.perf_counter()))
            print(f"{time.perf_counter() - started:7.1f} s  {match['stage']}", flush=True)
    if process.wait() != 0:
        raise RuntimeError(f"dvc repro failed in {root}:\n{''.join(output[-80:])}")
    total = time.perf_counter() - started
    ends = [t for _, t in marks[1:]] + [started + total]
    return total, {stage: round(end - begin, 1) for (stage, begin), end in zip(marks, ends)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/cpu_vm/repro_stages.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="repro-bench-") as directory:
        root = Path(directory)
        fresh_project(root)
        load_before = list(os.getloadavg())
        total, stages = timed_repro(root)
    result = {"what": "default dvc repro, fresh project, local Ray", "date": datetime.now(timezone.utc).isoformat(),
              "machine": machine(), "code": code_version(), "load_average_before": load_before,
              "load_average_after": list(os.getloadavg()), "total_s": round(total, 1), "stages_s": stages}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
