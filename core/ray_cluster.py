"""Connecting a job to Ray: the cluster it was submitted to (`ray job submit` sets RAY_ADDRESS), a
configured address, or else a local cluster on this machine."""

import os


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"])
        return
    # A local cluster: more logical CPUs than cores, so that actors (encoders, train workers) never
    # starve the Ray Data read and decode tasks on a small machine.
    ray.init(num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False)
