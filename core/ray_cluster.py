"""Connecting a job to Ray: the cluster it was submitted to (`ray job submit` sets RAY_ADDRESS), a
configured address, or else a local cluster on this machine; and what of Ray a job's console shows.

A job's console shows its own lines (stage headers, the funnel, step lines, its summary), Ray's
warnings and errors, and Ray's progress bars where they are live (on a terminal). Ray's INFO lines,
its progress reports to a file or pipe and the internal warnings listed below stay in Ray's log
files, under the session's logs/ folder (/tmp/ray/session_latest/logs: worker-*.out/err,
ray-data.log, train/).
"""

import logging
import os
import re
import sys
import warnings
from pathlib import Path

# Lines of Ray's own processes that tell a job's user nothing; Ray's driver drops them instead of
# forwarding them from the workers (each stays in its worker's log file).
RAY_INTERNAL_LINES = (
    # Train V2's placement-group cleaner asks the state API, which needs the dashboard (off in a
    # local cluster, see connect), every second of a run.
    "Failed to query Ray Train Controller actor state",
    # Ray's own use of a deprecated option (its Train data config), a warning and its source line.
    "exclude_resources",
    # Ray core about its own actors (Train's), logged at error level for every one (the driver's own
    # copies come from Ray's C++ core, straight to stderr: those stay).
    "has constructor arguments in the object store and max_restarts > 0",
)

# Read by Ray when it is imported (so set before that) and inherited by the workers of a local
# cluster; a value already in the environment wins.
RAY_CONSOLE_ENV = {
    "RAY_DEDUP_LOGS_SKIP_REGEX": "|".join(map(re.escape, RAY_INTERNAL_LINES)),
    # Ray Data's console at WARNING; its file keeps every line.
    "RAY_DATA_LOGGING_CONFIG": str(Path(__file__).with_name("ray_data_logging.yaml")),
    # A Train worker's print() stays one line of its output: Train V2 would also log it, and both
    # reached the driver (every step line twice).
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


def quiet_console() -> None:
    """Keeps Ray's internal lines off this process's console (see the module's doc). Call it before
    Ray is imported: the command line of every job does (pipelines.cli.run_job)."""
    for key, value in RAY_CONSOLE_ENV.items():
        os.environ.setdefault(key, value)


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray
    from ray.data import DataContext

    # The driver's own copy of Ray's internal deprecation warning (after Ray's import, which puts its
    # own filter for RayDeprecationWarning first).
    warnings.filterwarnings("ignore", message=".*exclude_resources")
    # Ray Data's progress bars where they are live: drawn in place on a terminal (a worker's bars
    # through the driver). Otherwise its progress goes to its log file, and the job prints its own.
    DataContext.get_current().use_ray_tqdm = sys.stdout.isatty()
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"], logging_level=logging.WARNING)
        return
    # A local cluster: more logical CPUs than cores, so that actors (encoders, train workers) never
    # starve the Ray Data read and decode tasks on a small machine.
    ray.init(num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False, logging_level=logging.WARNING)
