"""Multi-controller start-up and host gathers.

`maybe_initialize()` calls `jax.distributed.initialize` once, when the
environment asks for it, before anything touches a device.

It initialises when `UNIJAX_DISTRIBUTED=1`, when `JAX_COORDINATOR_ADDRESS` is set, or when a
cluster JAX detects by itself runs several tasks (SLURM with `SLURM_NTASKS > 1`, a multi-host TPU
VM pod: `TPU_WORKER_HOSTNAMES` naming several workers); `UNIJAX_DISTRIBUTED=0` turns it off.
Explicit settings (any cluster, or N processes on one machine): `JAX_COORDINATOR_ADDRESS=host:port`,
`JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`. On CPU the collectives go through gloo.

`to_host(tree)` is the one way results come back to the host: numpy copies, all-gathered over
processes when an array spans several.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils

_done = False


def wanted(env=os.environ) -> bool:
    flag = env.get("UNIJAX_DISTRIBUTED", "")
    if flag in ("0", "false"):
        return False
    if flag in ("1", "true") or env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def maybe_initialize(env=os.environ) -> bool:
    """Initialises the JAX distributed runtime if `wanted`; returns whether it did (once per process)."""
    global _done
    if _done or not wanted(env):
        return _done
    kwargs = {}
    if env.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if env.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
    if env.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    _done = True
    return True


def shutdown() -> None:
    """Barrier, then `jax.distributed.shutdown()`: every process leaves together (a coordinator that
    exits first makes the others' error polling abort them)."""
    global _done
    if not _done:
        return
    multihost_utils.sync_global_devices("unijax_shutdown")
    jax.distributed.shutdown()
    _done = False


def to_host(tree):
    """numpy copies of a tree of (possibly multi-process) arrays. With several processes every one
    must call it: arrays spread over other hosts are all-gathered (whole global arrays come back)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def any_process(flag: bool) -> bool:
    """`flag` or-ed over every process (each must call it)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
