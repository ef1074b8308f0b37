"""DDIM/DDPM and PLMS sampling as one pure ``lax.scan``, with IEC as a ``lax.while_loop``
inside.

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

PLMS (``method="plms"``, the CompVis PLMS sampler = diffusers' ``PNDMScheduler(
skip_prk_steps=True)``): step i applies the same η = 0 map D_i(x_i, ·) to a multistep ε̃_i
— Heun's pair (ε(x_0, t_0) + ε(D_0(x_0, ε(x_0, t_0)), t_1)) / 2 at step 0, then
Adams–Bashforth of order 2, 3, 4 on the history of ε(x_j, t_j), which lives in the scan
carry (the last three ε); a ``lax.cond`` on the step picks Heun's branch, so S steps cost
S + 1 evaluations. PNDM's ``_get_prev_sample`` is this DDIM map rewritten: its
coefficient of x_t is √(ᾱ_s/ᾱ_t) = A and that of ε is -(ᾱ_s - ᾱ_t)/(ᾱ_t √(1-ᾱ_s) +
√(ᾱ_t (1-ᾱ_t) ᾱ_s)) = B.

Step indices: every evaluation with the timestep t_i of step i is passed ``step = i``;
Heun's second evaluation (PLMS step 0, ``IECConfig(eval_at="next")``) uses the timestep
t_{i+1} and is passed ``step = i + 1`` with the state of the evaluation before it, and is
counted in step i's ``nfe`` (full or partial by step i + 1's schedule, ``nfe_full``).

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
    "plms_weights",
    "METHODS",
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
METHODS = ("ddim", "plms")

# Adams–Bashforth weights of the PLMS step (the CompVis/diffusers PLMS arithmetic), for
# [ε(x_i, t_i), ε_{i-1}, ε_{i-2}, ε_{i-3}], by the number of history entries used.
_AB_WEIGHTS = np.array(
    [
        [1.0, 0.0, 0.0, 0.0],
        [3 / 2, -1 / 2, 0.0, 0.0],
        [23 / 12, -16 / 12, 5 / 12, 0.0],
        [55 / 24, -59 / 24, 37 / 24, -9 / 24],
    ]
)


def plms_weights(num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The PLMS schedule of S steps: ``(heun, weights)``.

    ``heun`` (S,) bool marks the step that uses Heun's pair (step 0, when S ≥ 2: with one
    step there is no second timestep to evaluate at, and diffusers takes one Euler/DDIM
    step); ``weights`` (S, 4) are the Adams–Bashforth weights of the other steps applied
    to [ε(x_i, t_i), ε_{i-1}, ε_{i-2}, ε_{i-3}]: order 2 at step 1, 3 at step 2, 4 after.
    """
    S = int(num_steps)
    idx = np.arange(S)
    return (idx == 0) & (S >= 2), _AB_WEIGHTS[np.minimum(idx, 3)]


def _check_method(method) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


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
    method: str = "ddim",
) -> tuple[jax.Array, dict[str, Any]]:
    """Sample with DDIM (any η) or PLMS, optionally with IEC corrections.

    Args:
      eps_fn: ``eps_fn(x, t) -> eps`` with ``t`` int32 of shape (batch,), or a
        :class:`~iec_jax.denoisers.Denoiser` (e.g. :func:`~iec_jax.guided_denoiser`).
      x_T: the initial noise, shape (batch, ...).
      key: one PRNG key (sample b uses ``fold_in(key, b)``) or one key per sample
        (shape (batch,)). Only used when η > 0; may be None at η = 0.
      schedule: the noise schedule.
      timesteps: the descending grid from :func:`iec_jax.make_timesteps` (concrete).
      eta: DDIM η (static). Must be 0 with PLMS.
      iec: IEC options, or None for plain sampling.
      return_trajectory: also return every x_s in ``info["trajectory"]`` (S, batch, ...).
      method: ``"ddim"`` or ``"plms"``. PLMS is diffusers' ``PNDMScheduler(
        skip_prk_steps=True)`` (the CompVis PLMS sampler) step for step: step i maps
        x_i to x_{i+1} = D_i(x_i, ε̃_i) with D_i the η = 0 DDIM map t_i → t_{i+1} (the
        last step to the schedule's final ᾱ) and ε̃_i = (ε(x_0, t_0) + ε(D_0(x_0,
        ε(x_0, t_0)), t_1)) / 2 at step 0 (Heun's pair: 2 evaluations; step 0's ``nfe``
        is 2, so S steps cost S + 1), then Adams–Bashforth of order 2, 3, 4 on the
        history of ε(x_j, t_j) (Heun's second evaluation is not in the history). Heun's
        second evaluation uses ``step = 1`` and the state left by step 0's first
        evaluation (see :mod:`iec_jax.iec`). IEC on PLMS: docs/semantics.md §2.6 and
        ``IECConfig.plms_mode`` / ``history``.

    Returns:
      ``(x_0, info)``; ``info`` holds per-step arrays: ``nfe`` (S,) evaluations,
      ``nfe_full`` (S,) of which full passes (by the step index each evaluation used),
      ``corrections`` (S, batch) updates applied, ``residual`` (S, batch) last stop
      quantity (NaN if none), ``iec_steps`` (S,), ``full_pass`` (S,), ``timesteps`` (S,).
    """
    den: Denoiser = as_denoiser(eps_fn)
    method = _check_method(method)
    plms = method == "plms"
    if iec is not None and not isinstance(iec, IECConfig):
        raise TypeError(f"iec must be an IECConfig or None, got {type(iec).__name__}")
    x_T = jnp.asarray(x_T)
    if x_T.ndim < 2:
        raise ValueError(f"x_T must have shape (batch, ...), got {x_T.shape}")
    if not jnp.issubdtype(x_T.dtype, jnp.floating):
        raise ValueError(f"x_T must be floating point, got {x_T.dtype}")
    coefs = step_coefficients(schedule, timesteps, eta)
    if plms and eta != 0:
        raise ValueError(f"eta must be 0 with method='plms' (PLMS is deterministic), got {eta}")
    if iec is not None:
        iec.check_method(method)
    num_steps, batch = len(coefs["t"]), x_T.shape[0]
    stochastic = bool(np.any(coefs["sigma"] > 0))

    full_pass = den.full_pass_mask(num_steps)
    if full_pass is not None and np.shape(full_pass) != (num_steps,):
        raise ValueError(
            f"the denoiser's full_pass_mask has shape {np.shape(full_pass)}, expected"
            f" ({num_steps},)"
        )
    full = np.ones(num_steps, bool) if full_pass is None else np.asarray(full_pass, bool)
    iec_mask = (
        iec.step_mask(num_steps, full_pass) if iec is not None else np.zeros(num_steps, bool)
    )
    num_corrections = iec.num_corrections if iec is not None else 0
    eval_next = iec is not None and iec.eval_at == "next"
    plms_corrections = plms and iec is not None and iec.plms_mode == "plms"
    track_history = plms and iec is not None and iec.history == "last_correction"

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
    # The successor's timestep, step index and schedule entry (for evaluations at t_{i+1};
    # the last step has none: its entries are placeholders that are never used).
    xs["t_next"] = jnp.asarray(np.append(coefs["t"][1:], coefs["t"][-1]), jnp.int32)
    xs["step_next"] = jnp.asarray(np.minimum(np.arange(num_steps) + 1, num_steps - 1), jnp.int32)
    xs["full"] = jnp.asarray(full)
    xs["full_next"] = jnp.asarray(np.append(full[1:], False))
    heun_mask, ab_weights = plms_weights(num_steps)
    has_heun = plms and bool(heun_mask.any())
    if plms:
        xs["heun"] = jnp.asarray(heun_mask)
        xs["ab"] = jnp.asarray(ab_weights, dtype)

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
        x_t, state_in, hist = carry
        coef = {name: per_step[name] for name in _COEF_NAMES}
        step, step_next = per_step["step"], per_step["step_next"]
        t_b = jnp.full((batch,), per_step["t"], jnp.int32)
        t_next_b = jnp.full((batch,), per_step["t_next"], jnp.int32)

        def combine(e, st):
            """PLMS: the step's multistep ε̃ from ε(·, t_i) = e, and the state after it."""
            if not plms:
                return e, st

            def adams_bashforth(e, st):
                w = per_step["ab"]
                return w[0] * e + w[1] * hist[0] + w[2] * hist[1] + w[3] * hist[2], st

            def heun(e, st):
                # Heun's second evaluation: at the DDIM predictor, timestep t_{i+1},
                # step index i + 1, state of the evaluation just made.
                e1, st1 = evaluate(ddim_step(x_t, e, coef)[0], t_next_b, step_next, st)
                return (e1 + e) / 2, st1

            if not has_heun:
                return adams_bashforth(e, st)
            return jax.lax.cond(per_step["heun"], heun, adams_bashforth, e, st)

        eps, state = evaluate(x_t, t_b, step, state_in)
        eps_step, state = combine(eps, state)
        y, _ = ddim_step(x_t, eps_step, coef, noise(step, 0))
        heun_on = per_step["heun"].astype(jnp.int32) if has_heun else jnp.int32(0)
        out = {}
        last = eps
        if num_corrections:
            state0 = state
            if eval_next:
                def correction_eval(v):
                    return evaluate(v, t_next_b, step_next, state0)
            else:
                def correction_eval(v):
                    e, st = evaluate(v, t_b, step, state_in)
                    if plms_corrections:
                        e_comb, st = combine(e, st)
                        return e_comb, st, e
                    return e, st, e

            res = run_corrections(
                iec,
                evaluate=correction_eval,
                propose=lambda e, k: ddim_step(x_t, e, coef, noise(step, k + 1))[0],
                y0=y,
                state0=state0,
                enabled=per_step["iec_on"],
                select_state=den.select_state,
                aux0=eps if track_history else None,
            )
            y, state, taken, resid, k = res.y, res.state, res.taken, res.residual, res.iterations
            if track_history:
                last = res.last
            if eval_next:
                at_t, at_next = jnp.int32(0), k
            elif plms_corrections:
                at_t, at_next = k, k * heun_on
            else:
                at_t, at_next = k, jnp.int32(0)
        else:
            taken = jnp.zeros((batch,), jnp.int32)
            resid = jnp.full((batch,), jnp.nan, jnp.float32)
            at_t = at_next = jnp.int32(0)
        if plms:
            hist = (last, hist[0], hist[1])
        out["nfe"] = 1 + heun_on + at_t + at_next
        out["nfe_full"] = (
            jnp.where(per_step["full"], 1 + at_t, 0)
            + jnp.where(per_step["full_next"], heun_on + at_next, 0)
        ).astype(jnp.int32)
        out["corrections"] = taken
        out["residual"] = resid
        if return_trajectory:
            out["trajectory"] = y
        return (y, state, hist), out

    hist0 = (jnp.zeros_like(x_T),) * 3 if plms else ()
    (x_0, _, _), per_step = jax.lax.scan(body, (x_T, den.init_state(x_T), hist0), xs)
    info = dict(per_step)
    info["timesteps"] = jnp.asarray(coefs["t"], jnp.int32)
    info["iec_steps"] = jnp.asarray(iec_mask)
    info["full_pass"] = jnp.asarray(full)
    return x_0, info


def make_sampler(eps_fn, *, schedule, timesteps, eta=0.0, iec=None, return_trajectory=False,
                 method="ddim"):
    """A jitted ``(x_T, key) -> (x_0, info)`` with everything else fixed."""
    # Validate eagerly so that bad options fail here, not at first call.
    ts = _check_timesteps(timesteps, schedule)
    eta = _check_eta(eta)
    _check_method(method)
    if method == "plms" and eta != 0:
        raise ValueError(f"eta must be 0 with method='plms' (PLMS is deterministic), got {eta}")
    if iec is not None and isinstance(iec, IECConfig):
        iec.check_method(method)
    fn = functools.partial(
        sample,
        eps_fn,
        schedule=schedule,
        timesteps=ts,
        eta=eta,
        iec=iec,
        return_trajectory=return_trajectory,
        method=method,
    )
    return jax.jit(fn)


def nfe_summary(info) -> dict:
    """Totals of a run's ``info``: network evaluations, split into full and partial
    passes, and the number of IEC updates per sample (mean)."""
    nfe = np.asarray(info["nfe"])
    if "nfe_full" in info:
        nfe_full = int(np.asarray(info["nfe_full"]).sum())
    else:  # infos written before the per-evaluation count: every pass of a step is its kind
        nfe_full = int(nfe[np.asarray(info["full_pass"], bool)].sum())
    return dict(
        nfe=int(nfe.sum()),
        nfe_full=nfe_full,
        nfe_partial=int(nfe.sum()) - nfe_full,
        corrections_per_sample=float(np.asarray(info["corrections"]).sum(0).mean()),
    )
