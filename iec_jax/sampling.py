"""DDIM/DDPM sampling as one pure ``lax.scan``, with IEC as a ``lax.while_loop`` inside.

Notation (code -> paper / official code), one step from t to its predecessor s:

    alpha       ᾱ_t              alpha_prev  ᾱ_s
    sigma       σ_t = η sqrt((1-ᾱ_s)/(1-ᾱ_t)) sqrt(1-ᾱ_t/ᾱ_s)          (official c1)
    c_dir       sqrt(1 - ᾱ_s - σ_t²)                                     (official c2)
    x0          x̂_0 = (x_t - sqrt(1-ᾱ_t) ε) / sqrt(ᾱ_t)
    x_prev      x_s = sqrt(ᾱ_s) x̂_0 + c_dir ε + σ_t z
    A, B        x_s = A x_t + B ε + σ_t z with A = sqrt(ᾱ_s/ᾱ_t),
                B = c_dir - sqrt(ᾱ_s (1-ᾱ_t)/ᾱ_t)

η = 0 is DDIM; η = 1 on the full grid (T, T-1, ..., 0) is DDPM ancestral sampling with
σ_t² = β̃_t (the "fixed_small" posterior variance).

Randomness: every sample has its own key; the noise of sampling step i and evaluation
pass k (0: the ordinary step, k ≥ 1: IEC correction k) is
``normal(fold_in(fold_in(key_b, i), k))``. Sample b therefore depends only on its own key,
whatever the batch size or device count, and pass-0 noise is the same with and without
IEC, so with/without comparisons are paired.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from iec_jax.denoisers import Denoiser, as_denoiser
from iec_jax.iec import IECConfig, run_corrections
from iec_jax.schedule import NoiseSchedule

__all__ = [
    "step_coefficients",
    "ddim_step",
    "sample",
    "make_sampler",
    "per_sample_keys",
    "initial_noise",
    "nfe_summary",
]

_COEF_NAMES = ("alpha", "alpha_prev", "sigma", "c_dir")


def _check_timesteps(timesteps, schedule: NoiseSchedule) -> np.ndarray:
    if isinstance(timesteps, jax.core.Tracer):
        raise TypeError(
            "timesteps must be concrete (a NumPy array): build the grid outside jit and"
            " close over it, e.g. jax.jit(functools.partial(sample, ..., timesteps=ts))"
        )
    ts = np.asarray(timesteps)
    if ts.ndim != 1 or ts.size == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D array, got shape {ts.shape}")
    if not np.issubdtype(ts.dtype, np.integer):
        if not np.all(ts == np.round(ts)):
            raise ValueError("timesteps must be integers")
    ts = ts.astype(np.int64)
    if ts.min() < 0 or ts.max() >= schedule.num_timesteps:
        raise ValueError(
            f"timesteps must lie in [0, {schedule.num_timesteps - 1}] for this schedule,"
            f" got [{ts.min()}, {ts.max()}]"
        )
    if np.any(np.diff(ts) > 0):
        raise ValueError("timesteps must be in sampling order (non-increasing)")
    return ts


def _check_eta(eta) -> float:
    if isinstance(eta, jax.core.Tracer):
        raise TypeError("eta must be a Python float (it is static), not a traced value")
    eta = float(eta)
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    return eta


def step_coefficients(schedule: NoiseSchedule, timesteps, eta: float = 0.0) -> dict:
    """Per-step float64 coefficients of the grid (host NumPy arrays of length S).

    Keys: ``t``, ``t_prev`` (-1 for the final level), ``alpha``, ``alpha_prev``,
    ``sigma``, ``c_dir``, ``A``, ``B`` (see the module docstring).
    """
    ts = _check_timesteps(timesteps, schedule)
    eta = _check_eta(eta)
    t_prev = np.concatenate([ts[1:], [-1]])
    a_t = schedule.alpha_at(ts)
    a_s = schedule.alpha_at(t_prev)
    sigma = eta * np.sqrt((1 - a_s) / (1 - a_t)) * np.sqrt(np.maximum(1 - a_t / a_s, 0.0))
    c_dir = np.sqrt(np.maximum(1 - a_s - sigma**2, 0.0))
    return dict(
        t=ts,
        t_prev=t_prev,
        alpha=a_t,
        alpha_prev=a_s,
        sigma=sigma,
        c_dir=c_dir,
        A=np.sqrt(a_s / a_t),
        B=c_dir - np.sqrt(a_s * (1 - a_t) / a_t),
    )


def ddim_step(x_t, eps, coef, noise=None):
    """One DDIM update, in the official code's (and diffusers') arithmetic order.

    ``coef`` maps ``alpha``, ``alpha_prev``, ``sigma``, ``c_dir`` to scalars. Returns
    ``(x_prev, x0)``.
    """
    a_t, a_s = coef["alpha"], coef["alpha_prev"]
    x0 = (x_t - jnp.sqrt(1 - a_t) * eps) / jnp.sqrt(a_t)
    x_prev = jnp.sqrt(a_s) * x0 + coef["c_dir"] * eps
    if noise is not None:
        x_prev = x_prev + coef["sigma"] * noise
    return x_prev, x0


# ------------------------------------------------------------------------- keys
def _is_typed_key(key) -> bool:
    return jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)


def per_sample_keys(key, sample_indices) -> jax.Array:
    """Key of sample i = ``fold_in(key, i)`` (typed keys, shape (n,))."""
    key = jnp.asarray(key) if not hasattr(key, "dtype") else key
    if not _is_typed_key(key):
        key = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
    idx = jnp.asarray(sample_indices, jnp.uint32)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)


def initial_noise(keys, shape, dtype=jnp.float32):
    """x_T and the sampler keys of each sample, from its key alone.

    Returns ``(x_T, sampler_keys)`` with x_T[b] = normal(fold_in(keys[b], 0), shape) and
    sampler_keys[b] = fold_in(keys[b], 1).
    """
    keys = _batch_keys(keys, None)
    x_T = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape, dtype))(keys)
    return x_T, jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)


def _batch_keys(key, batch: Optional[int]):
    """Normalise ``key`` to typed per-sample keys of shape (batch,)."""
    if not hasattr(key, "dtype"):
        key = jnp.asarray(key)
    if not _is_typed_key(key):
        if key.dtype != jnp.uint32 or key.shape[-1:] != (2,):
            raise ValueError(
                "key must be a PRNG key (jax.random.key / PRNGKey) or a batch of them,"
                f" got dtype {key.dtype} and shape {key.shape}"
            )
        key = jax.random.wrap_key_data(key)
    if key.ndim == 0:
        if batch is None:
            raise ValueError("a single key needs a batch size")
        return per_sample_keys(key, np.arange(batch))
    if key.ndim != 1 or (batch is not None and key.shape[0] != batch):
        raise ValueError(
            f"key must be one key or one key per sample (shape ({batch},)), got shape"
            f" {key.shape}"
        )
    return key


# ---------------------------------------------------------------------- sampler
def sample(
    eps_fn,
    x_T: jax.Array,
    key: Optional[jax.Array],
    *,
    schedule: NoiseSchedule,
    timesteps,
    eta: float = 0.0,
    iec: Optional[IECConfig] = None,
    return_trajectory: bool = False,
) -> tuple[jax.Array, dict[str, Any]]:
    """Sample with DDIM (any η), optionally with IEC corrections.

    Args:
      eps_fn: ``eps_fn(x, t) -> eps`` with ``t`` int32 of shape (batch,), or a
        :class:`~iec_jax.denoisers.Denoiser`.
      x_T: the initial noise, shape (batch, ...).
      key: one PRNG key (sample b uses ``fold_in(key, b)``) or one key per sample
        (shape (batch,)). Only used when η > 0; may be None at η = 0.
      schedule: the noise schedule.
      timesteps: the descending grid from :func:`iec_jax.make_timesteps` (concrete).
      eta: DDIM η (static).
      iec: IEC options, or None for plain sampling.
      return_trajectory: also return every x_s in ``info["trajectory"]`` (S, batch, ...).

    Returns:
      ``(x_0, info)``; ``info`` holds per-step arrays: ``nfe`` (S,) evaluations,
      ``corrections`` (S, batch) updates applied, ``residual`` (S, batch) last stop
      quantity (NaN if none), ``iec_steps`` (S,), ``full_pass`` (S,), ``timesteps`` (S,).
    """
    den: Denoiser = as_denoiser(eps_fn)
    if iec is not None and not isinstance(iec, IECConfig):
        raise TypeError(f"iec must be an IECConfig or None, got {type(iec).__name__}")
    x_T = jnp.asarray(x_T)
    if x_T.ndim < 2:
        raise ValueError(f"x_T must have shape (batch, ...), got {x_T.shape}")
    if not jnp.issubdtype(x_T.dtype, jnp.floating):
        raise ValueError(f"x_T must be floating point, got {x_T.dtype}")
    coefs = step_coefficients(schedule, timesteps, eta)
    num_steps, batch = len(coefs["t"]), x_T.shape[0]
    stochastic = bool(np.any(coefs["sigma"] > 0))

    full_pass = den.full_pass_mask(num_steps)
    if full_pass is not None and np.shape(full_pass) != (num_steps,):
        raise ValueError(
            f"the denoiser's full_pass_mask has shape {np.shape(full_pass)}, expected"
            f" ({num_steps},)"
        )
    iec_mask = (
        iec.step_mask(num_steps, full_pass) if iec is not None else np.zeros(num_steps, bool)
    )
    num_corrections = iec.num_corrections if iec is not None else 0

    keys = None
    if key is not None:
        keys = _batch_keys(key, batch)
    elif stochastic:
        raise ValueError("key is required when eta > 0")

    dtype = x_T.dtype
    xs = {name: jnp.asarray(coefs[name], dtype) for name in _COEF_NAMES}
    xs["t"] = jnp.asarray(coefs["t"], jnp.int32)
    xs["step"] = jnp.arange(num_steps, dtype=jnp.int32)
    xs["iec_on"] = jnp.asarray(iec_mask)

    def noise(step, k):
        if not stochastic:
            return None
        sub = jax.vmap(lambda kb: jax.random.fold_in(jax.random.fold_in(kb, step), k))(keys)
        return jax.vmap(lambda kb: jax.random.normal(kb, x_T.shape[1:], dtype))(sub)

    def evaluate(x, t_b, step, state):
        eps, new_state = den(x, t_b, step, state)
        if eps.shape != x.shape:
            raise ValueError(
                f"eps_fn returned shape {eps.shape} for input shape {x.shape}"
            )
        return eps.astype(dtype), new_state

    def body(carry, per_step):
        x_t, state_in = carry
        coef = {name: per_step[name] for name in _COEF_NAMES}
        step = per_step["step"]
        t_b = jnp.full((batch,), per_step["t"], jnp.int32)

        eps, state = evaluate(x_t, t_b, step, state_in)
        y, _ = ddim_step(x_t, eps, coef, noise(step, 0))
        out = {}
        if num_corrections:
            y, state, taken, resid, n_eval = run_corrections(
                iec,
                evaluate=lambda v: evaluate(v, t_b, step, state_in),
                propose=lambda e, k: ddim_step(x_t, e, coef, noise(step, k + 1))[0],
                y0=y,
                state0=state,
                enabled=per_step["iec_on"],
                select_state=den.select_state,
            )
        else:
            taken = jnp.zeros((batch,), jnp.int32)
            resid = jnp.full((batch,), jnp.nan, jnp.float32)
            n_eval = jnp.int32(0)
        out["nfe"] = 1 + n_eval
        out["corrections"] = taken
        out["residual"] = resid
        if return_trajectory:
            out["trajectory"] = y
        return (y, state), out

    (x_0, _), per_step = jax.lax.scan(body, (x_T, den.init_state(x_T)), xs)
    info = dict(per_step)
    info["timesteps"] = jnp.asarray(coefs["t"], jnp.int32)
    info["iec_steps"] = jnp.asarray(iec_mask)
    info["full_pass"] = jnp.asarray(
        np.ones(num_steps, bool) if full_pass is None else np.asarray(full_pass, bool)
    )
    return x_0, info


def make_sampler(eps_fn, *, schedule, timesteps, eta=0.0, iec=None, return_trajectory=False):
    """A jitted ``(x_T, key) -> (x_0, info)`` with everything else fixed."""
    # Validate eagerly so that bad options fail here, not at first call.
    ts = _check_timesteps(timesteps, schedule)
    _check_eta(eta)
    fn = functools.partial(
        sample,
        eps_fn,
        schedule=schedule,
        timesteps=ts,
        eta=eta,
        iec=iec,
        return_trajectory=return_trajectory,
    )
    return jax.jit(fn)


def nfe_summary(info) -> dict:
    """Totals of a run's ``info``: network evaluations, split into full and partial
    passes, and the number of IEC updates per sample (mean)."""
    nfe = np.asarray(info["nfe"])
    full = np.asarray(info["full_pass"], bool)
    return dict(
        nfe=int(nfe.sum()),
        nfe_full=int(nfe[full].sum()),
        nfe_partial=int(nfe[~full].sum()),
        corrections_per_sample=float(np.asarray(info["corrections"]).sum(0).mean()),
    )
