"""Wall time of the default `dvc repro`, per stage and in total, in a fresh copy of the project.

    python benchmarks/repro_stages.py [--out benchmarks/results/repro_stages.json]

Copies the code and pipeline into a temporary git+DVC repository (nothing cached), runs `dvc repro`
with a fresh local Ray (`RAY_ADDRESS=local`, what a laptop without a cluster gets) and timestamps
each "Running stage" line DVC prints: a stage's time runs until the next stage starts. The JSON
records the machine (CPU model, cores, load average before the run) because shared machines vary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROJECT_FILES = ("nnmamba", "pipelines", "dvc.yaml", "params.yaml", ".dvcignore", "pyproject.toml")
STAGE_LINE = re.compile(r"Running stage '(?P<stage>[^']+)'")


def fresh_project(root: Path) -> None:
    for name in PROJECT_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, root / name)
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                    ["git", "add", "-A"], ["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "b"]):
        subprocess.run(command, cwd=root, check=True, env=_env())


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "RAY_ADDRESS": "local"}


def timed_repro(root: Path) -> tuple[float, dict[str, float]]:
    """Total wall seconds and seconds per stage of one `dvc repro`."""
    started = time.perf_counter()
    marks: list[tuple[str, float]] = []
    process = subprocess.Popen(["dvc", "repro"], cwd=root, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        match = STAGE_LINE.search(line)
        if match:
            marks.append((match["stage"], time.perf_counter()))
    if process.wait() != 0:
        raise RuntimeError(f"dvc repro failed in {root}")
    total = time.perf_counter() - started
    ends = [t for _, t in marks[1:]] + [started + total]
    return total, {stage: round(end - begin, 1) for (stage, begin), end in zip(marks, ends)}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_before": list(os.getloadavg()),
            "python": platform.python_version(), "platform": platform.platform()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/repro_stages.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="repro-bench-") as directory:
        root = Path(directory)
        fresh_project(root)
        info = machine()
        total, stages = timed_repro(root)
    result = {"what": "default dvc repro, fresh project, local Ray", "date": datetime.now(timezone.utc).isoformat(),
              "machine": info, "total_s": round(total, 1), "stages_s": stages}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
