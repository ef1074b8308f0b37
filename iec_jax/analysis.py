"""Error-propagation analysis (docs/semantics.md §8).

* :func:`paired_trajectories` runs a reference and an efficient denoiser, each with and
  without IEC, from the same x_T and keys, and returns the four trajectories.
* :func:`trajectory_errors` / :func:`error_statistics` give per-step ‖δ_t‖ statistics;
  :func:`fit_growth` fits exponential and linear growth and reports both R² on the same
  (linear) scale, so that they can be compared.
* :func:`spectral_norm` estimates σ_max(a·I + b·J) per sample by power iteration on
  MᵀM with one ``jax.jvp`` (through ``jax.linearize``) and one ``jax.vjp`` per
  iteration, where J = ∂ε/∂x at (x, t). With (a, b) = (A_t, B_t) this is the paper's
  propagation factor ‖A_t + B_t J_t‖; with (1-λ, λB_t) it is the IEC contraction factor
  ‖∇G‖ = ‖(1-λ)I + λB_t J_t‖. (The official helper ``compute_spectral_radius`` detaches
  ε, so its "Jacobian" is (1/sqrt(ᾱ_t) - 1)·I; see docs/semantics.md §7 item 16.)

J is the Jacobian of each sample's ε with respect to that sample's input, so the network
must treat samples independently (true of UNets with GroupNorm and of the oracle).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from iec_jax.denoisers import Denoiser
from iec_jax.iec import IECConfig
from iec_jax.sampling import sample, step_coefficients
from iec_jax.schedule import NoiseSchedule

__all__ = [
    "paired_trajectories",
    "trajectory_errors",
    "error_statistics",
    "fit_growth",
    "spectral_norm",
    "spectral_profile",
]


def _trajectory(eps_fn, x_T, key, **kw):
    x_0, info = sample(eps_fn, x_T, key, return_trajectory=True, **kw)
    traj = jnp.concatenate([x_T[None], info.pop("trajectory")], axis=0)
    return traj, info


def paired_trajectories(
    reference,
    efficient,
    x_T,
    key,
    *,
    schedule: NoiseSchedule,
    timesteps,
    iec: IECConfig,
    eta: float = 0.0,
) -> dict:
    """The four paired runs: ``ref``, ``ref_iec``, ``eff``, ``eff_iec``.

    Returns a dict mapping each name to ``(trajectory, info)``, the trajectory of shape
    (S + 1, batch, ...) starting with x_T. All four share x_T and noise keys.
    """
    if iec is None:
        raise ValueError("paired_trajectories needs an IECConfig (iec=None given)")
    kw = dict(schedule=schedule, timesteps=timesteps, eta=eta)

    @jax.jit
    def run(x_T, key):
        return {
            "ref": _trajectory(reference, x_T, key, iec=None, **kw),
            "ref_iec": _trajectory(reference, x_T, key, iec=iec, **kw),
            "eff": _trajectory(efficient, x_T, key, iec=None, **kw),
            "eff_iec": _trajectory(efficient, x_T, key, iec=iec, **kw),
        }

    return run(x_T, key)


def trajectory_errors(traj, base) -> np.ndarray:
    """Per-step, per-sample L2 distance ‖traj - base‖, shape (S + 1, batch)."""
    d = jnp.asarray(traj, jnp.float32) - jnp.asarray(base, jnp.float32)
    return np.asarray(jnp.sqrt(jnp.sum(d**2, axis=tuple(range(2, d.ndim)))))


def error_statistics(errors) -> dict:
    """Mean, median, 10% / 90% quantiles and max over samples of an (S + 1, batch) array."""
    e = np.asarray(errors, np.float64)
    return dict(
        mean=e.mean(1),
        median=np.median(e, 1),
        q10=np.quantile(e, 0.1, axis=1),
        q90=np.quantile(e, 0.9, axis=1),
        max=e.max(1),
    )


def _r2(y, fit):
    ss_res = np.sum((y - fit) ** 2)
    ss_tot = np.sum((y - y.mean()) ** 2)
    return float(1 - ss_res / ss_tot) if ss_tot > 0 else float("nan")


def fit_growth(values, steps: Optional[np.ndarray] = None) -> dict:
    """Fit y ≈ c·exp(r·k) and y ≈ a + b·k by least squares on the linear scale.

    Args:
      values: the error curve, e.g. ``error_statistics(err)["mean"][1:]`` (positive).
      steps: the abscissa k (default 1, 2, ...).

    Returns:
      ``exp_rate`` r (per step), ``exp_scale`` c, ``exp_r2``, ``lin_slope`` b,
      ``lin_intercept`` a, ``lin_r2``. Both R² are on the same scale.
    """
    y = np.asarray(values, np.float64)
    k = np.arange(1, y.size + 1, dtype=np.float64) if steps is None else np.asarray(steps, float)
    if y.ndim != 1 or y.size < 3 or k.shape != y.shape:
        raise ValueError("fit_growth needs a 1-D curve of at least 3 points")
    b, a = np.polyfit(k, y, 1)
    lin = a + b * k
    pos = y > 0
    if pos.sum() >= 2:
        r0, logc0 = np.polyfit(k[pos], np.log(y[pos]), 1)
    else:
        r0, logc0 = 0.0, np.log(max(y.mean(), 1e-30))

    def model(kk, logc, r):
        return np.exp(logc + r * kk)

    try:
        (logc, r), _ = scipy.optimize.curve_fit(model, k, y, p0=(logc0, r0), maxfev=20000)
    except (RuntimeError, ValueError):  # no convergence: keep the log-linear fit
        logc, r = logc0, r0
    return dict(
        exp_rate=float(r),
        exp_scale=float(np.exp(logc)),
        exp_r2=_r2(y, model(k, logc, r)),
        lin_slope=float(b),
        lin_intercept=float(a),
        lin_r2=_r2(y, lin),
    )


def _per_sample_norm(v):
    return jnp.sqrt(jnp.sum(v**2, axis=tuple(range(1, v.ndim))))


def _bcast(s, v):
    return s.reshape((-1,) + (1,) * (v.ndim - 1))


def spectral_norm(eps_fn, x, t, a, b, key, *, num_iters: int = 30):
    """σ_max(a·I + b·J) per sample, J = ∂ε/∂x at (x, t), by power iteration on MᵀM.

    Args:
      eps_fn: a plain ``eps_fn(x, t)`` (stateless).
      x: (batch, ...) points; t: int32 (batch,) timesteps; a, b: scalars.
      key: PRNG key of the random start vector.
      num_iters: power iterations (one jvp and one vjp each).

    Returns:
      ``(sigma, rel_change)``, both (batch,): the estimate and its relative change over
      the last iteration. The estimate approaches σ_max from below; its error after n
      iterations shrinks like (σ₂/σ₁)^(2n), so when the two largest singular values are
      close the error can be much larger than ``rel_change`` (e.g. σ₂/σ₁ = 0.994 gives a
      3e-4 error at n = 100 while the last change is 8e-6): use more iterations there.
    """
    if isinstance(eps_fn, Denoiser):
        raise TypeError("spectral_norm needs a plain eps_fn(x, t), not a stateful Denoiser")
    f = lambda v: eps_fn(v, t)  # noqa: E731
    _, jvp = jax.linearize(f, x)
    _, vjp = jax.vjp(f, x)

    def m(v):
        return a * v + b * jvp(v)

    def mt(u):
        return a * u + b * vjp(u)[0]

    def normalize(v):
        return v / _bcast(_per_sample_norm(v) + 1e-30, v)

    v0 = normalize(jax.random.normal(key, x.shape, x.dtype))

    def body(_, carry):
        v, _ = carry
        mv = m(v)
        return normalize(mt(mv)), _per_sample_norm(mv)

    v, sigma_prev = jax.lax.fori_loop(0, num_iters, body, (v0, jnp.zeros(x.shape[:1], x.dtype)))
    sigma = _per_sample_norm(m(v))
    return sigma, jnp.abs(sigma - sigma_prev) / (sigma + 1e-30)


def spectral_profile(
    eps_fn,
    trajectory,
    key,
    *,
    schedule: NoiseSchedule,
    timesteps,
    step_size: float = 0.5,
    eta: float = 0.0,
    num_iters: int = 50,
) -> dict:
    """Per-step ‖A_t + B_t J_t‖ and ‖(1-λ)I + λ B_t J‖ along a trajectory.

    Args:
      trajectory: (S + 1, batch, ...) from :func:`paired_trajectories` (x_T first).
      step_size: λ of the contraction factor.

    Returns (NumPy, shape (S, batch)): ``propagation`` = ‖A_t + B_t J_t‖ with J_t at
    (x_t, t); ``contraction`` = ‖(1-λ)I + λB_t J‖ with J at (x_{t-1}, t), the Jacobian of
    the IEC map near its fixed point; ``A``, ``B`` (S,) coefficients.
    """
    coefs = step_coefficients(schedule, timesteps, eta)
    S = len(coefs["t"])
    traj = jnp.asarray(trajectory)
    if traj.shape[0] != S + 1:
        raise ValueError(f"trajectory has {traj.shape[0]} states, expected S + 1 = {S + 1}")
    dtype = traj.dtype
    xs = dict(
        x_in=traj[:-1],
        x_out=traj[1:],
        t=jnp.asarray(coefs["t"], jnp.int32),
        A=jnp.asarray(coefs["A"], dtype),
        B=jnp.asarray(coefs["B"], dtype),
        key=jax.random.split(key, S),
    )
    batch = traj.shape[1]

    @jax.jit
    def run(xs):
        def one(s):
            t_b = jnp.full((batch,), s["t"], jnp.int32)
            k1, k2 = jax.random.split(s["key"])
            prop, _ = spectral_norm(eps_fn, s["x_in"], t_b, s["A"], s["B"], k1,
                                    num_iters=num_iters)
            contr, _ = spectral_norm(eps_fn, s["x_out"], t_b, 1 - step_size,
                                     step_size * s["B"], k2, num_iters=num_iters)
            return prop, contr

        return jax.lax.map(one, xs)

    prop, contr = run(xs)
    return dict(
        propagation=np.asarray(prop),
        contraction=np.asarray(contr),
        A=coefs["A"],
        B=coefs["B"],
    )

