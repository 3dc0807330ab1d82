"""Trial failures that a retry would only repeat, and the one line that names a failure.

Ray Train's `FailureConfig(max_failures)` restarts a run's workers from its last checkpoint after
any worker error. That is right for a crashed or killed worker, and wasted on an error our code
raises about the run itself (a diverged loss, a bad setting, bad data), which every restart meets
again. This module is kept light (Ray only): Ray Train's controller process loads it.
"""

from __future__ import annotations

import ray.train

# Raised by our code about the run itself: bad settings and bad data (ParamsError and DataError are
# ValueErrors) and a diverged loss (TrialDiverged; the engine's non-finite loss is a FloatingPointError).
DETERMINISTIC = (ValueError, FloatingPointError)


class TrialDiverged(FloatingPointError):
    """A trial's training loss became non-finite, or rose above `train.divergence_factor` x its first step's."""


class FailFast(ray.train.UserCallback):
    """End a Ray Train run at once, unretried, when a worker raised a deterministic error.

    Called on the Ray Train controller with each worker's own exception. An exception raised here
    ends the run as a `ray.train.ControllerError`, which Ray Train's failure policy does not retry
    (it retries worker-group errors and failed worker-group starts only), so `max_failures` stays
    for crashes. Ray Train offers no public way to choose the failure policy itself.
    """

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        for error in worker_exceptions.values():
            if isinstance(error, DETERMINISTIC):
                raise error


def root_cause(error: BaseException) -> BaseException:
    """The exception a worker or our code raised, unwrapped from Ray's: a task's `RayTaskError.cause`,
    a `ControllerError.controller_failure`, a `WorkerGroupError`'s first worker failure."""
    while True:
        inner = (getattr(error, "cause", None) or getattr(error, "controller_failure", None)
                 or next(iter((getattr(error, "worker_failures", None) or {}).values()), None))
        if not isinstance(inner, BaseException) or inner is error:
            return error
        error = inner


def cause_line(error: BaseException) -> str:
    """`Type: first line of the message` of the error's root cause."""
    cause = root_cause(error)
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__
