"""The exact probability-flow ODE in the DDIM parametrization, solved with diffrax.

With σ = √((1 − ᾱ)/ᾱ) and x̄ = x / √ᾱ, deterministic DDIM is the explicit Euler method
for

    dx̄/dσ = ε(x̄ √ᾱ(σ), t(σ)),      ᾱ(σ) = 1 / (1 + σ²),

stepping from σ_t to σ_s with ε frozen at the start of each step (docs/semantics.md §1).
:func:`probability_flow` solves this ODE with an adaptive high-order solver (Tsit5 by
default, Dopri5/Dopri8 as options) and a PID step-size controller, so its answer is the
sampler's *discretization-free* reference: what DDIM converges to as its steps shrink.
The distance of a sampler's x_0 to it measures the sampler's discretization error (for
an exact ε, the only error), next to the efficient model's error (distance to the FP
samples).

Continuous time. A model knows ε at the integer training timesteps; between them the ODE
needs ε(x, t) at fractional t. The map σ ↔ t is the piecewise-linear interpolation of the
schedule's discrete σ_k (k = 0 … T−1), so at integer t the ODE sees exactly the ᾱ_t the
sampler uses; the UNet's sinusoidal timestep embedding accepts fractional t, and
:func:`oracle_eps_fn` gives the exact Gaussian-mixture ε at ᾱ(t) on the same map.

Range. The solve runs from timesteps[0] down to timesteps[-1]; the last sampling step,
from timesteps[-1] to the grid's final ᾱ (1 for DDPM/DDIM, ᾱ_0 for the LDM grids), has no
ε below t = 0 to integrate, so it is DDIM's own final step with ε(x, timesteps[-1]) in
both the reference and the samplers it is compared with.

Everything is jitted and batched (one solve for the batch; the step-size controller uses
the RMS norm over the whole state, so a batch is solved to the stated tolerance). Run it
in float64 (``with jax.enable_x64(True):``) where the model allows it on CPU.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from iec_jax.schedule import NoiseSchedule

__all__ = ["SOLVERS", "sigma_table", "timestep_of_sigma", "alpha_of_timestep",
           "oracle_eps_fn", "probability_flow"]

SOLVERS = ("tsit5", "dopri5", "dopri8")


def sigma_table(schedule: NoiseSchedule) -> np.ndarray:
    """σ_k = √((1 − ᾱ_k)/ᾱ_k) for k = 0 … T−1 (float64, increasing)."""
    ac = np.asarray(schedule.alphas_cumprod, np.float64)
    return np.sqrt((1.0 - ac) / ac)


def timestep_of_sigma(sigma, schedule: NoiseSchedule):
    """The fractional timestep whose interpolated σ is ``sigma``."""
    table = sigma_table(schedule)
    s = jnp.asarray(sigma)
    return jnp.interp(s, jnp.asarray(table, s.dtype), jnp.arange(len(table), dtype=s.dtype))


def alpha_of_timestep(t, schedule: NoiseSchedule):
    """ᾱ at a fractional timestep, through the interpolated σ (exact at integers)."""
    table = sigma_table(schedule)
    t = jnp.asarray(t)
    dtype = t.dtype if jnp.issubdtype(t.dtype, jnp.floating) else jnp.float32
    sigma = jnp.interp(t.astype(dtype), jnp.arange(len(table), dtype=dtype),
                       jnp.asarray(table, dtype))
    return 1.0 / (1.0 + sigma ** 2)


def oracle_eps_fn(mixture, schedule: NoiseSchedule) -> Callable:
    """The exact ε of a :class:`iec_jax.oracle.GaussianMixture` at fractional timesteps
    (``eps_fn(x, t)``, t of shape (batch,)), on the same σ ↔ t map as the solver."""
    def eps_fn(x, t):
        return mixture.eps(x, alpha_of_timestep(jnp.asarray(t, x.dtype), schedule))

    return eps_fn


def _check(rtol, atol, solver, max_steps) -> None:
    for name, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) \
                or value <= 0:
            raise ValueError(f"probability_flow: {name} must be a finite number > 0, got {value!r}")
    if solver not in SOLVERS:
        raise ValueError(f"probability_flow: solver must be one of {SOLVERS}, got {solver!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"probability_flow: max_steps must be an integer >= 1, got {max_steps!r}")


def probability_flow(eps_fn: Callable, x_T, *, schedule: NoiseSchedule, timesteps,
                     solver: str = "tsit5", rtol: float = 1e-5, atol: float = 1e-5,
                     max_steps: int = 4096, with_stats: bool = False,
                     return_states: bool = False):
    """x_0 of the probability-flow ODE from ``x_T`` at ``timesteps[0]`` (see the module
    docstring for the range and the last step).

    Args:
      eps_fn: ``eps_fn(x, t)`` with ``t`` a float array (batch,) of fractional timesteps
        (a UNet's ``apply`` works as is; the oracle: :func:`oracle_eps_fn`).
      x_T: the starting state, (batch, ...).
      schedule, timesteps: the sampler's schedule and grid (only the first and the last
        timestep and the final ᾱ are used).
      solver: ``"tsit5"`` (5th order, default), ``"dopri5"`` or ``"dopri8"``.
      rtol, atol: the PID controller's tolerances (> 0), on the state x̄ = x/√ᾱ.
      max_steps: the solver's step budget; exceeding it is an error (diffrax raises).
      with_stats: also return diffrax's statistics (number of steps, rejected steps).
      return_states: also return the solution at the grid's later timesteps, as a
        sampler's trajectory holds them: (S, batch, ...) with entry i the state at
        ``timesteps[i + 1]`` and the last entry x_0 (one solve, saved at those points).

    Returns:
      x_0 (same shape and dtype as x_T), or a tuple ``(x_0, [states], [stats])``.
    """
    import diffrax

    _check(rtol, atol, solver, max_steps)
    ts = np.asarray(timesteps)
    if ts.ndim != 1 or ts.size < 1 or np.any(np.diff(ts) > 0):
        raise ValueError("probability_flow: timesteps must be a non-empty, non-increasing 1-D grid")
    table = sigma_table(schedule)
    t_first, t_last = int(ts[0]), int(ts[-1])
    if not 0 <= t_last <= t_first < len(table):
        raise ValueError(f"probability_flow: timesteps must lie in [0, {len(table) - 1}]")
    dtype = jnp.asarray(x_T).dtype
    batch = x_T.shape[0]
    a_first = float(schedule.alphas_cumprod[t_first])
    a_last = float(schedule.alphas_cumprod[t_last])
    a_final = float(schedule.final_alpha_cumprod)
    solver_obj = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5, "dopri8": diffrax.Dopri8}[solver]()

    def drift(sigma, xbar, args):
        del args
        alpha = 1.0 / (1.0 + sigma ** 2)
        t = timestep_of_sigma(sigma, schedule).astype(dtype)
        return eps_fn(xbar * jnp.sqrt(alpha).astype(dtype), jnp.full((batch,), t, dtype))

    later = ts[1:]
    uniq = np.unique(later)[::-1] if return_states else np.array([t_last])  # decreasing t
    save_sigmas = [float(table[t]) for t in uniq]
    alphas = jnp.asarray([float(schedule.alphas_cumprod[t]) for t in uniq], dtype)

    @jax.jit
    def run(x):
        xbar = x / jnp.sqrt(jnp.asarray(a_first, dtype))
        if t_first != t_last:
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(drift), solver_obj, t0=float(table[t_first]),
                t1=float(table[t_last]), dt0=None, y0=xbar,
                stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
                max_steps=max_steps, saveat=diffrax.SaveAt(ts=jnp.asarray(save_sigmas)))
            xbars, stats = sol.ys, sol.stats
        else:
            xbars, stats = jnp.broadcast_to(xbar, (len(save_sigmas),) + xbar.shape), {}
        states = xbars * jnp.sqrt(alphas).reshape((-1,) + (1,) * xbar.ndim)
        xbar = xbars[-1]
        x_last = xbar * jnp.sqrt(jnp.asarray(a_last, dtype))
        # DDIM's own last step (η = 0) from t_last to the grid's final ᾱ.
        eps = eps_fn(x_last, jnp.full((batch,), t_last, dtype))
        x0 = (x_last - jnp.sqrt(1.0 - a_last) * eps) / jnp.sqrt(a_last)
        out = jnp.sqrt(a_final) * x0 + jnp.sqrt(1.0 - a_final) * eps
        return out.astype(dtype), states.astype(dtype), stats

    out, states, stats = run(jnp.asarray(x_T))
    result = [out]
    if return_states:
        index = {int(t): i for i, t in enumerate(uniq)}
        per_step = [states[index[int(t)]] for t in later] + [out]
        result.append(jnp.stack(per_step))
    if with_stats:
        result.append(jax.device_get(stats))
    return result[0] if len(result) == 1 else tuple(result)
