"""The pipeline's stages, each run as `python -m pipelines.<stage>`.

A run that names no cluster keeps Ray on the loopback interface. Ray reads
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when it is imported: at 0 it treats the host as a single
machine (its default on macOS and Windows) and every process of a Ray it starts (GCS, raylet,
workers, agents, dashboard) listens on 127.0.0.1 only; on Linux they otherwise listen on every
interface. So it is set here, before any stage imports Ray, unless RAY_ADDRESS names a cluster to
join, Ray is imported already, or the variable is set (`=1` opts out).
"""

import os
import sys

SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

if not os.environ.get("RAY_ADDRESS") and "ray" not in sys.modules:
    os.environ.setdefault(SINGLE_MACHINE_ENV, "0")
