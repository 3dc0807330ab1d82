"""One study through the real stages on a GPU, timed: where a lab's first day on one GPU goes.

Runs dvc.yaml's commands for one study in dvc.yaml's order (synthesize, prepare, split, train,
evaluate; `--report` adds the report stage) under a profile, samples the GPU's utilisation every
second, and writes one JSON: each stage's wall time, each trial's epochs split into train steps and
validation (from the MLflow runs the train stage logged), trial start to first step, the driver's
MLflow time per epoch, evaluate's time per case, and the GPU busy fraction inside training epochs.
With `--speed` (a `model_speed.py` JSON of the same card) each epoch's train steps are compared with
`steps_per_epoch` times the variant's CUDA-graph step. With `--train-job` the train stage goes to a
`ray start` head on this machine through `ray job submit`, as docs/cluster.md spells it (the head is
started first and stopped after; if the job fails, the stage's own command runs instead).

    python benchmarks/pipeline_gpu.py --profile gpu-smoke --study brats2023 --out results/
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from _common import ResultFile

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("synthesize", "prepare", "split", "train", "evaluate")
TIMING_KEYS = ("epoch_time_s", "train_time_s", "loader_wait_s", "val_time_s", "setup_time_s",
               "controller_launch_s", "worker_launch_s", "worker_imported_s", "trial_start_to_train_s", "trial_start_to_first_step_s")


class GpuSampler(threading.Thread):
    """Utilisation and memory of GPU 0 once a second (NVML), with the host's wall clock; each sample is
    also appended to `csv` at once, so a run killed mid-stage keeps them."""

    def __init__(self, csv: Path, period_s: float = 1.0):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, int, float]] = []
        self.csv = csv
        self.stopped = threading.Event()
        self.period = period_s
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception as error:  # a CPU machine: the stages' timings still count
            print(f"pipeline_gpu: no GPU sampling ({error})", flush=True)
            self.nvml = None

    def run(self) -> None:
        if not self.nvml:
            return
        with self.csv.open("a", buffering=1) as sink:
            sink.write("time_s,utilisation_percent,memory_used_gib\n")
            while not self.stopped.wait(self.period):
                rates = self.nvml.nvmlDeviceGetUtilizationRates(self.handle)
                memory = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
                self.samples.append((time.time(), int(rates.gpu), memory.used / 2**30))
                sink.write("%.3f,%d,%.3f\n" % self.samples[-1])

    def busy_fraction(self, windows: list[tuple[float, float]]) -> float | None:
        return busy_fraction(self.samples, windows)


def busy_fraction(samples: list[tuple[float, int, float]], windows: list[tuple[float, float]]) -> float | None:
    """Mean utilisation (0-1) of the samples inside the windows, each shrunk by a second at both ends."""
    inside = [util for t, util, _ in samples if any(a + 1 < t < b - 1 for a, b in windows)]
    return sum(inside) / len(inside) / 100 if inside else None


def set_profile(profile: str) -> None:
    """Point params.yaml's `profile:` at `profile` (what `dvc exp run -S profile=...` does)."""
    params = ROOT / "params.yaml"
    text = params.read_text()
    updated = re.sub(r"^profile: *\S+", f"profile: {profile}", text, count=1, flags=re.M)
    if updated != text:
        params.write_text(updated)
        print(f"pipeline_gpu: params.yaml profile set to {profile}", flush=True)


def set_variants(profile: str, study: str, variants: list[str]) -> None:
    """Train only these variants in the profile's `study` (rewrites params.yaml without its comments,
    as `dvc exp run -S` rewrites it)."""
    import yaml

    params = ROOT / "params.yaml"
    raw = yaml.safe_load(params.read_text())
    target = raw if profile == "default" else raw.setdefault("profiles", {}).setdefault(profile, {})
    train = target.setdefault("studies", {}).setdefault(study, {}).setdefault("train", {})
    train["variants"] = variants
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    print(f"pipeline_gpu: params.yaml trains {variants} in {study} under {profile}", flush=True)


def stage_commands(study: str, synthetic: str, report: bool) -> list[tuple[str, list[str]]]:
    """(name, command) of each stage of one study, as dvc.yaml's `cmd` lines spell them."""
    stages = [(f"synthesize@{synthetic}", ["synthesize", synthetic])] + [
        (f"{stage}@{study}", [stage, study]) for stage in STAGES[1:]]
    if report:
        stages.append(("report", ["report"]))
    return [(name, [sys.executable, "-m", f"pipelines.{args[0]}", *args[1:]]) for name, args in stages]


def run_stage(name: str, command: list[str], log: Path) -> tuple[float, int]:
    """Run one stage, its output streamed to the console and appended to `log`; (seconds, exit code)."""
    print(f"=== {name}: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    with log.open("a") as sink, subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                                                 stderr=subprocess.STDOUT, text=True) as process:
        sink.write(f"=== {name}\n")
        for line in process.stdout:
            sys.stdout.write(line)
            sink.write(line)
    return time.perf_counter() - started, process.returncode


DASHBOARD = "http://127.0.0.1:8265"


def ray_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ray.scripts.scripts", *args]


def start_head(log: Path) -> float:
    """`ray start --head` with token authentication (docs/cluster.md); its seconds. Every later Ray
    client of this process's children reads the token from ~/.ray/auth_token."""
    os.environ["RAY_AUTH_MODE"] = "token"
    run_stage("ray get-auth-token", ray_cli("get-auth-token", "--generate"), log)
    seconds, code = run_stage("ray start", ray_cli("start", "--head", "--dashboard-host=127.0.0.1"), log)
    if code:
        raise RuntimeError(f"ray start failed (exit {code}); see {log}")
    return seconds


def train_job_command(study: str, workspace: Path) -> list[str]:
    """The train stage as a job on the head (docs/cluster.md's `ray job submit` line)."""
    return ray_cli("job", "submit", "--address", DASHBOARD, "--working-dir", ".", "--runtime-env",
                   "ray_configs/runtime_env.yaml", "--", f"NNMAMBA_WORKSPACE={workspace}", sys.executable, "-m",
                   "pipelines.train", study)


def graph_step_ms(speed_json: Path | None, shape: str) -> dict[str, float]:
    """Median CUDA-graph train step (ms) per nnMamba variant from a model_speed.py JSON."""
    if speed_json is None or not speed_json.is_file():
        return {}
    rows = json.loads(speed_json.read_text())["results"]
    return {r["variant"]: r["train_step"]["median_ms"] for r in rows
            if r["backbone"] == "nnmamba" and r["shape"] == shape and r["config"].endswith("graph")}


def trial_epochs(study: str, workspace: Path, tracking_uri: str) -> dict[str, list[dict]]:
    """Each trial's per-epoch timing metrics and the wall-clock time the driver logged them."""
    from mlflow.tracking import MlflowClient

    trials = json.loads((workspace / "models" / study / "trials.json").read_text())["trials"]
    client = MlflowClient(tracking_uri)
    out = {}
    for trial in trials:
        history = {key: {m.step: m for m in client.get_metric_history(trial["run_id"], key)} for key in TIMING_KEYS}
        epochs = []
        for step, total in sorted(history["epoch_time_s"].items()):
            row = {"epoch": step, "logged_at": total.timestamp / 1e3}
            row |= {key: history[key][step].value for key in TIMING_KEYS if step in history[key]}
            epochs.append(row)
        out[f"{trial['backbone']}-{trial['variant']}-seed{trial['seed']}"] = epochs
    return out


def log_numbers(log: Path) -> dict[str, list[float]]:
    text = log.read_text()
    return {"mlflow_ms_per_epoch": [float(x) for x in re.findall(r"MLflow logging took ([\d.]+) ms", text)],
            "evaluate_predict_s": [float(x) for x in re.findall(r"predicted in ([\d.]+) s", text)],
            "evaluate_score_s": [float(x) for x in re.findall(r"scored in ([\d.]+) s", text)]}


def summarise(study: str, steps_per_epoch: int, graph_ms: dict[str, float], sampler: GpuSampler, log: Path,
              workspace: Path, tracking_uri: str) -> dict:
    trials = trial_epochs(study, workspace, tracking_uri)
    windows, later_windows, ratios = [], [], {}
    for name, epochs in trials.items():
        variant = name.split("-")[1]
        for epoch in epochs:  # the train steps come first in an epoch, which ends when the driver logs it
            start = epoch["logged_at"] - epoch["epoch_time_s"]
            windows.append((start, start + epoch["train_time_s"]))
            if epoch["epoch"] > 1:
                later_windows.append(windows[-1])
        if variant in graph_ms:
            timed = epochs[1:] or epochs[:1]
            later = [e["train_time_s"] for e in timed]
            ratios[name] = {"graph_step_ms": graph_ms[variant],
                            "train_steps_s_after_first_epoch": later,
                            "loader_wait_share": [e.get("loader_wait_s", float("nan")) / e["train_time_s"]
                                                  for e in timed],
                            "ratio_to_graph_steps": [t / (steps_per_epoch * graph_ms[variant] / 1e3) for t in later]}
    numbers = log_numbers(log)
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"trials": trials, "epoch_vs_graph_steps": ratios,
            "gpu_busy_fraction_training": sampler.busy_fraction(windows),
            "gpu_busy_fraction_training_after_first_epoch": sampler.busy_fraction(later_windows),
            "mlflow_ms_per_epoch": mean(numbers["mlflow_ms_per_epoch"]),
            "evaluate_s_per_case": mean([p + s for p, s in zip(numbers["evaluate_predict_s"],
                                                                numbers["evaluate_score_s"])]),
            "evaluate_predict_s_per_case": mean(numbers["evaluate_predict_s"]),
            "peak_gpu_memory_gib": max((m for *_, m in sampler.samples), default=None)}


def run_train_job(study: str, stage_command: list[str], log: Path, result: ResultFile, workspace: Path
                  ) -> tuple[float, int]:
    """The train stage through `ray job submit`; the stage's own command if the job fails. Records
    the head's start, the job's seconds and exit code in the stage's entry."""
    entry = result.payload["stages"][f"train@{study}"]
    entry["ray_start_s"] = start_head(log)
    try:
        seconds, code = run_stage(f"train@{study} (ray job submit)", train_job_command(study, workspace), log)
    finally:
        run_stage("ray stop", ray_cli("stop"), log)
    entry |= {"via": "ray job submit", "job_seconds": seconds, "job_exit_code": code}
    if code:
        print(f"pipeline_gpu: the train job failed (exit {code}); running the stage's command", flush=True)
        entry["via"] = "the stage's command, after the job failed"
        return run_stage(f"train@{study}", stage_command, log)
    return seconds, code


REPORT = re.compile(r"ray_results/(?P<run>[^/]+)/checkpoint_(?P<at>\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d\.\d+)\), "
                    r"metrics=(?P<metrics>\{[^}]*\})")


def busy_from_log(folder: Path) -> dict:
    """The GPU busy fraction inside each epoch's train steps, read from a call cut short before the
    train stage ended: the epochs from the workers' reports in `pipeline.log` (an epoch ends at its
    checkpoint, named by its UTC time), the samples from `gpu_samples.csv`."""
    import ast
    from datetime import datetime, timezone

    lines = (folder / "gpu_samples.csv").read_text().splitlines()[1:]
    samples = [(float(t), int(u), float(m)) for t, u, m in (line.split(",") for line in lines)]
    epochs = []
    for match in REPORT.finditer((folder / "pipeline.log").read_text()):
        metrics = ast.literal_eval(match["metrics"])
        ended = datetime.strptime(match["at"], "%Y-%m-%d_%H-%M-%S.%f").replace(tzinfo=timezone.utc).timestamp()
        start = ended - metrics["epoch_time_s"]
        epochs.append({"run": match["run"], "epoch": metrics["epoch"], "train_time_s": metrics["train_time_s"],
                       "loader_wait_s": metrics.get("loader_wait_s"),
                       "gpu_busy_fraction": busy_fraction(samples, [(start, start + metrics["train_time_s"])])})
    return {"benchmark": "pipeline_gpu busy_from_log", "folder": folder.name, "epochs": epochs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="gpu-smoke")
    parser.add_argument("--study", default="brats2023")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--busy-from-log", action="store_true", help="run nothing: summarise --out's pipeline.log "
                        "and gpu_samples.csv of a call cut short into busy_from_log.json")
    parser.add_argument("--speed", type=Path, help="model_speed.py JSON of the same card (graph steps)")
    parser.add_argument("--shape", default="brats", help="model_speed shape matching the study's input")
    parser.add_argument("--stages", nargs="+", help="only these stage names (e.g. evaluate@brats2023)")
    parser.add_argument("--report", action="store_true", help="also run the report stage")
    parser.add_argument("--variants", nargs="+", help="train only these variants (rewrites params.yaml)")
    parser.add_argument("--train-job", action="store_true", help="train through `ray job submit` to a local head")
    args = parser.parse_args()
    if args.busy_from_log:
        summary = busy_from_log(args.out)
        (args.out / "busy_from_log.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary["epochs"], indent=1))
        return

    set_profile(args.profile)
    if args.variants:
        set_variants(args.profile, args.study, args.variants)
    sys.path.insert(0, str(ROOT))
    from pipelines import workspace
    from pipelines.params import load_params
    from pipelines.tracking import tracking_uri

    params = load_params()
    root = workspace.root()   # NNMAMBA_WORKSPACE when set: outputs outside the checkout
    study = params.studies[args.study]
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "pipeline.log"
    result = ResultFile(args.out / "pipeline_gpu.json", {"benchmark": "pipeline_gpu", "profile": args.profile,
                                                         "study": args.study, "stages": {}})
    sampler = GpuSampler(args.out / "gpu_samples.csv")
    sampler.start()
    started = time.perf_counter()
    for name, command in stage_commands(args.study, study.dataset.synthetic, args.report):
        if args.stages and name not in args.stages:
            continue
        result.payload["stages"][name] = {"started_at": time.time()}   # a stage cut short still shows
        result.write()
        if args.train_job and name.startswith("train@"):
            seconds, code = run_train_job(args.study, command, log, result, root)
        else:
            seconds, code = run_stage(name, command, log)
        result.payload["stages"][name] |= {"seconds": seconds, "exit_code": code}
        result.write()
        if code:
            print(f"pipeline_gpu: {name} failed (exit {code}); see {log}", flush=True)
            break
    result.payload["wall_s"] = time.perf_counter() - started
    sampler.stopped.set()
    result.payload |= {"gpu_samples": sampler.samples}
    if (root / "models" / args.study / "trials.json").is_file():
        result.payload |= summarise(args.study, study.train.steps_per_epoch, graph_step_ms(args.speed, args.shape),
                                    sampler, log, root, tracking_uri(params.mlflow))
    result.write()
    print(json.dumps({k: v for k, v in result.payload.items() if k not in ("trials", "gpu_samples")}, indent=1,
                     default=str))


if __name__ == "__main__":
    main()
