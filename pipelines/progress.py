"""The train stage's console: one line per trial event.

Tune's default output repeats a table of every trial each 30 s and a box per trial start and end;
in a grid of dozens of small trials that was most of a `dvc repro` log. A line per trial start,
epoch, end and failure, with the grid's progress on the start and end lines, says the same; Tune
runs at verbose=0 and Ray Train's per-epoch INFO lines are off (pipelines.train, train_worker).
"""

from __future__ import annotations

from collections import Counter

import ray.tune

from pipelines.params import TrialSpec
from pipelines.tasks import get_task


def grid_point(trial: TrialSpec) -> str:
    """`(variant, seed 0)`, `(variant, seed 0, fold 2)` in a k-fold study."""
    return f"({trial.variant}, seed {trial.seed}" + ("" if trial.fold is None else f", fold {trial.fold}") + ")"


def _selection_metric(trial: TrialSpec) -> str:
    return get_task(trial.study.task).selection(bool(trial.val_cases))[0]


class TrialProgress(ray.tune.Callback):
    """Prints `train <study>: <grid point> ...` lines from the driver as Tune reports trial events."""

    def on_trial_start(self, iteration, trials, trial, **info):
        print(f"{self._name(trial)} started {self._tally(trials, running=trial)}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "epoch" not in result:   # the trainable's final summary, not an epoch
            return
        spec: TrialSpec = trial.config["trial"]
        metric = _selection_metric(spec)
        parts = [f"train_loss {result['train_loss']:.4g}"]
        if metric != "epoch" and metric in result:
            parts.append(f"{metric} {result[metric]:.4g} (best {result[f'best_{metric}']:.4g})")
        print(f"{self._name(trial)} epoch {result['epoch']}/{spec.study.train.epochs}: {', '.join(parts)}, "
              f"{result.get('epoch_time_s', 0):.1f} s", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        metric = _selection_metric(trial.config["trial"])
        best = result.get(f"best_{metric}")
        summary = f": best {metric} {best:.4g} at epoch {result.get('best_epoch')}" if best is not None else ""
        print(f"{self._name(trial)} done{summary} {self._tally(trials, ended=trial)}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"{self._name(trial)} failed {self._tally(trials, ended=trial, failed=True)}", flush=True)

    @staticmethod
    def _name(trial) -> str:
        spec: TrialSpec = trial.config["trial"]
        return f"train {spec.study.name}: {grid_point(spec)}"

    @staticmethod
    def _tally(trials, running=None, ended=None, failed: bool = False) -> str:
        """`[k of n finished, f failed, r running]`; the trial of the event counts as in its new state
        (Tune may call back before it updates the trial's status)."""
        def state(other) -> str:
            if other is running:
                return "RUNNING"
            if other is ended:
                return "ERROR" if failed else "TERMINATED"
            return other.status

        states = Counter(map(state, trials))
        finished = states["TERMINATED"] + states["ERROR"]
        errors = f", {states['ERROR']} failed" if states["ERROR"] else ""
        return f"[{finished} of {len(trials)} finished{errors}, {states['RUNNING']} running]"
