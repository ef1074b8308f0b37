"""Multi-process runs through JAX's own multi-controller runtime (``jax.distributed``).

A job launched as P processes (on a GPU cluster, a TPU pod slice, or several local CPU
processes) works on one work directory that every process sees (a shared filesystem):

* process p samples and featurizes the shards k with k % P == p, on its own devices
  (a local data mesh: no collectives inside sampling, so sample i is the same whatever P);
* small files (row keys, progress, metrics, tables, plots) are written by process 0 only,
  after a barrier at which every process has finished its shards;
* a killed process relaunched with the same command resumes: finished shards are kept.

Launch (every process runs the same command, its own process id):

    python -m experiments.evaluate --config ... --workdir /cluster/run \\
        --distributed --coordinator_address=host0:12355 --num_processes=2 --process_id=0

With ``--distributed`` and no addresses, ``jax.distributed.initialize()`` detects the
cluster itself (SLURM, TPU pods, ...). :func:`check_same` makes every process fail at the
start, with one line and nothing written, when their configs or work directories differ.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

import jax
import numpy as np

__all__ = ["initialize", "index", "count", "is_main", "barrier", "my_shards", "check_same",
           "broadcast_flag"]


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
    """``jax.distributed.initialize`` (before anything else uses JAX). Explicit
    arguments must be given together; none: the cluster's environment decides."""
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("--coordinator_address, --num_processes and --process_id go together"
                         " (or none of them: detected from the cluster's environment)")
    if all(given):
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id must lie in [0, {num_processes - 1}], got {process_id}")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()


def index() -> int:
    return jax.process_index()


def count() -> int:
    return jax.process_count()


def is_main() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op in one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def my_shards(num_shards: int) -> list[int]:
    """The shard numbers this process works on (every P-th, from its index)."""
    return [k for k in range(num_shards) if k % jax.process_count() == jax.process_index()]


def _digest(value: Any) -> np.ndarray:
    text = json.dumps(value, sort_keys=True, default=str).encode()
    return np.frombuffer(hashlib.sha256(text).digest()[:16], np.uint8).astype(np.int32)


def check_same(what: str, value: Any) -> None:
    """Raises ValueError on every process when ``value`` (JSON-able) differs between the
    processes (e.g. their configs or work directories)."""
    if jax.process_count() < 2:
        return
    from jax.experimental import multihost_utils

    got = np.asarray(multihost_utils.process_allgather(_digest(value)))
    differs = [p for p in range(len(got)) if not np.array_equal(got[p], got[0])]
    if differs:
        raise ValueError(f"the processes of this run were launched with different {what}"
                         f" (process {differs[0]} differs from process 0); launch every"
                         " process with the same command")


def broadcast_flag(flag: bool) -> bool:
    """Process 0's ``flag`` on every process (decisions that must agree, e.g. whether a
    time budget is spent)."""
    if jax.process_count() < 2:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32)))
