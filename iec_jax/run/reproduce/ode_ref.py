"""The exact probability-flow ODE solution as a table column (``config.ode_samples``).

For the first ``ode_samples`` samples of a table (their x_T, and for a latent model their
conditioning and guidance) the full-precision model's probability-flow ODE is solved by
:func:`iec_jax.ode.probability_flow` from the row's first to its last timestep (DDIM's own
last step after it) — once per distinct grid, cached in ``<workdir>/ode/``. Each row then
reports ``L2 to ODE``: the mean distance of its first ``ode_samples`` samples to that
solution, beside ``L2 to FP`` (the distance to the FP sampler's samples). The first
measures what the row's sampler and model leave of the exact solution (the sampler's
discretization error plus the efficient model's error), the second the efficient model's
error alone. The per-step distance of the row's trajectory to the ODE solution at the
row's timesteps is kept next to the error growth against the FP trajectory.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from iec_jax import pipeline
from iec_jax.io import write_npz
from iec_jax.run.reproduce.spec import RowSpec, table_settings
from iec_jax.run.settings import ConfigError

__all__ = ["ode_key", "ode_solution", "l2_to_ode", "ode_error_growth", "row_columns",
           "tolerance_settings", "tolerance_check"]


def ode_key(table, row: RowSpec) -> dict:
    """What the ODE reference of a row's grid depends on."""
    s = table.s
    ts = table.timesteps(row)
    return dict(model=dict(table.model_key), first=int(ts[0]), last=int(ts[-1]),
                final_alpha=float(table.schedule.final_alpha_cumprod), seed=s.seed,
                samples=s.ode_samples, trajectory_samples=s.trajectory_samples,
                solver=s.ode_solver, rtol=s.ode_rtol, atol=s.ode_atol,
                guidance=s.guidance, method="probability_flow")


def _path(table, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(table.workdir, "ode", f"ode_{digest}.npz")


def _eps_fn(table, indices):
    """The full-precision ε of the first samples (latent: with their conditioning and
    guidance), as ``eps_fn(x, t)`` with fractional t."""
    if table.latent:
        from iec_jax import latent as L

        from iec_jax.denoisers import Denoiser

        factory = L.guided(table.model, table.cond, scale=float(table.s.guidance["scale"]))
        eps = factory(table.all_params, indices)
        if isinstance(eps, Denoiser):  # guidance: a stateless denoiser of (x, t, step, state)
            den = eps
            return lambda x, t: den(x, t, 0, den.init_state(x))[0]
        return eps
    from iec_jax.models.loading import unet_denoiser

    return unet_denoiser(table.unet_config, table.model_key["dtype"])(table.params)


def _reference_problem(table, row: RowSpec) -> bool:
    """Whether the row's ODE problem is the reference row's (same first and last step)."""
    ts, ref = table.timesteps(row), table.timesteps(table.s.reference)
    return bool(ts[0] == ref[0] and ts[-1] == ref[-1])


def _solve(table, timesteps, rtol: float, atol: float, return_states: bool = False):
    """The ODE solution of the table's first ``ode_samples`` samples (their x_T and
    conditioning) from ``timesteps[0]``, by the table's solver at the given tolerances."""
    from iec_jax.ode import probability_flow

    s = table.s
    indices = jnp.arange(s.ode_samples, dtype=jnp.uint32)
    keys = pipeline.per_sample_keys(jax.random.key(s.seed), indices)
    x_T, _ = pipeline.initial_noise(keys, table.shape)
    return probability_flow(_eps_fn(table, indices), x_T, schedule=table.schedule,
                            timesteps=timesteps, solver=s.ode_solver, rtol=rtol, atol=atol,
                            return_states=return_states)


def ode_solution(table, row: RowSpec) -> Optional[dict]:
    """``{"x0": (n, ...), "trajectory": (S, m, ...)}``: the ODE solution of the first n
    samples and its states at the row's timesteps for the first m trajectory samples
    (cached; computed on first use)."""
    s = table.s
    if not s.ode_samples:
        return None
    key = ode_key(table, row)
    path = _path(table, key)
    if os.path.exists(path):
        with np.load(path) as f:
            if json.loads(str(f["key"])) == json.loads(json.dumps(key)):
                return dict(x0=f["x0"], trajectory=f["trajectory"])
    ts = table.timesteps(row)
    if _reference_problem(table, row):
        # The same ODE problem (the key): its states are kept at the reference row's grid,
        # whichever row solves it first, so that a row on another grid (DDIM-110) gets no
        # error-growth curve rather than taking the trajectory from the others.
        ts = table.timesteps(s.reference)
    m = min(s.trajectory_samples, s.ode_samples)
    # One solve: x_0 and, for the first m samples, the states at the row's timesteps (the
    # trajectory.npz layout); saving states does not change the solver's steps.
    x0, states = _solve(table, ts, s.ode_rtol, s.ode_atol, return_states=True)
    x0 = np.asarray(x0)
    trajectory = np.asarray(states[:, :m]) if m else np.zeros((0,))
    write_npz(path, x0=x0, trajectory=trajectory, key=json.dumps(key))
    return dict(x0=x0, trajectory=trajectory)


def l2_to_ode(samples: np.ndarray, solution: dict) -> float:
    """Mean L2 distance of the first samples to the ODE solution (float64)."""
    from iec_jax.run.reproduce.scores import mean_l2

    n = len(solution["x0"])
    return mean_l2(samples[:n], solution["x0"])


def ode_error_growth(trajectory_path: str, solution: dict) -> Optional[list]:
    """Per step, the mean distance of the row's trajectory to the ODE solution at the
    same timesteps (None without a trajectory or on another grid)."""
    if not os.path.exists(trajectory_path) or not len(solution["trajectory"]):
        return None
    with np.load(trajectory_path) as f:
        traj = f["trajectory"].astype(np.float64)
    ref = solution["trajectory"].astype(np.float64)
    m = min(traj.shape[1], ref.shape[1])
    if traj.shape[0] != ref.shape[0]:
        return None
    d = np.sqrt(((traj[:, :m] - ref[:, :m]) ** 2).reshape(traj.shape[0], m, -1).sum(-1))
    return [float(v) for v in d.mean(1)]


def _first_samples(rowdir: str, s) -> Optional[np.ndarray]:
    """The row's samples of the shards holding its first ``ode_samples`` (None unless all
    of those shards are here)."""
    from iec_jax.run.reproduce.sampling import float_shards

    shards = float_shards(rowdir, s)
    need = [k for k in range(shards.num_shards) if shards.indices(k)[0] < s.ode_samples]
    return shards.load(only=need) if all(shards.is_complete(k) for k in need) else None


def row_columns(table, row: RowSpec, rowdir: str) -> tuple[Optional[float], Optional[list]]:
    """``(L2 to ODE, error growth against the ODE trajectory)`` of a row, each cached in
    the row's directory with :func:`ode_key`; None where the row's samples (or its
    trajectory) are not here (a row assembled from small files)."""
    from iec_jax.run.reproduce.spec import cached

    s = table.s
    key = ode_key(table, row)

    def l2():
        samples = _first_samples(rowdir, s)
        return None if samples is None else l2_to_ode(samples, ode_solution(table, row))

    def curve():
        traj = os.path.join(rowdir, "trajectory.npz")
        return ode_error_growth(traj, ode_solution(table, row)) if os.path.exists(traj) else None

    return (cached(os.path.join(rowdir, "l2_ode.json"), key, l2),
            cached(os.path.join(rowdir, "error_growth_ode.json"), key, curve))


def tolerance_settings(config):
    """:func:`table_settings` for :func:`tolerance_check`: ``ode.samples`` must be >= 1."""
    s = table_settings(config)
    if not s.ode_samples:
        raise ConfigError("ode.samples", "must be >= 1 (the samples to solve) for the tolerance"
                          " check", 0)
    return s


def tolerance_check(config, workdir: str, factor: float = 100.0) -> dict:
    """How much of "L2 to ODE" is the reference's own error (``experiments/ode_tolerance.py``).

    Solves the reference row's probability-flow ODE for the table's first ``ode.samples``
    samples twice, in one batch each, by the table's solver: at the table's tolerances and
    at tolerances ``factor`` times tighter. Reports the mean L2 between the two solutions
    and, for each selected row on the reference row's interval whose samples of those
    indices are in ``workdir``, their mean L2 to each solution (``l2_to_solutions``): how
    far a row's "L2 to ODE", and a difference between two rows', moves with the
    reference's tolerance. An adaptive solver's batch shares one step-size controller, so
    a solution depends on the batch it was solved in: compare solutions of equal
    ``ode.samples``. Writes ``<workdir>/<table>_ode_tolerance.json``."""
    import time

    from iec_jax.io import write_json
    from iec_jax.run.reproduce.sampling import Table, say
    from iec_jax.run.reproduce.scores import mean_l2

    s = tolerance_settings(config)
    if not (np.isfinite(factor) and factor > 1):
        raise ValueError(f"factor must be a finite number > 1, got {factor}")
    table = Table(s, workdir)
    ts = table.timesteps(s.reference)
    tols = [(s.ode_rtol, s.ode_atol), (s.ode_rtol / factor, s.ode_atol / factor)]
    solutions, seconds = [], []
    for rtol, atol in tols:
        t0 = time.time()
        solutions.append(np.asarray(_solve(table, ts, rtol, atol)))
        seconds.append(time.time() - t0)
        say(f"ODE solution of {s.ode_samples} samples at rtol {rtol:g}, atol {atol:g}", t0)
    out = dict(table=s.table, samples=s.ode_samples, solver=s.ode_solver,
               tolerances=[list(t) for t in tols], seconds=seconds,
               l2_between_solutions=mean_l2(*solutions), l2_to_solutions={})
    for row in s.selected:
        if not _reference_problem(table, row):  # another ODE problem (DDIM-200's first step)
            continue
        samples = _first_samples(os.path.join(workdir, "rows", row.slug), s)
        if samples is not None:
            out["l2_to_solutions"][row.name] = [l2_to_ode(samples, dict(x0=x)) for x in solutions]
    write_json(os.path.join(workdir, f"{s.table}_ode_tolerance.json"), out)
    return out
