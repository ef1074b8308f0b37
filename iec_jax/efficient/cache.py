"""DeepCache / CacheQuant feature caching: schedules, cache-DEC and the cached denoiser.

Model functions. A *UNet function* is ``unet_fn(x, t, step, *context, **kw)`` returning
what the network returns (kw: ``cache_point``, ``cached_feature``, ``return_feature``);
``step`` lets a quantized model pick its per-step quantizer tables; a conditional model
(``UNetCondition``) takes its context as the one extra positional argument or has it
bound (:mod:`iec_jax.efficient.adapter`). :func:`float_unet_fn` is the float model of a
``UNet``, a ``UNetCondition`` or a :class:`~iec_jax.efficient.adapter.ModelSpec`. Keep
parameters jit arguments: build denoisers inside jit, e.g. ``make_batch_sampler(lambda p:
cached_denoiser(float_unet_fn(unet, p), ...), params=params, ...)``.

Latent models (docs/semantics.md §4.2): the cache point is the shallowest branch
``CachePoint(levels - 1, layers_per_block)`` (``ModelSpec(module).resolve_cache_point()``
for a UNetCondition, ``ModelSpec(unet, family="ldm")`` for the LSUN UNets); a cached step
then runs conv_in, ``up_blocks[-1].resnets[-1]`` (+ its attention, with the context where
it is a cross-attention transformer) and the output head. With classifier-free guidance,
wrap the cached denoiser in :func:`iec_jax.guided_denoiser`: its state, the cached
feature, is the whole 2B batch [uncond ; cond], carried in the sampler's scan carry and
overwritten by every full pass (IEC evaluations included, docs/semantics.md §3).

Schedules are bool masks of length S (True = full-compute "slow" step; step 0 is always
full). Official sources (docs/semantics.md §4.2-§4.4):

* :func:`uniform_schedule`: ``interval_seq = range(0, S, N)`` (DeepCache
  ``generalized_steps``, IEC/CacheQuant ``ddim_cifar_cali.get_interval_seq``).
* :func:`nonuniform_schedule`: DeepCache's ``sample_from_quad_center`` (see there).
* :func:`dps_schedule`: CacheQuant's ``Fisher.feature_to_interval_seq_optimal``
  (``quant/utils.py``), a DP over contiguous groups.
* :class:`CacheDEC` / :func:`fit_cache_dec`: CacheQuant's cache error correction,
  ``calculate_abCov`` and ``cache_pred_cacheerr_abCov_statistic`` in
  ``error_dec/cifar/cifar_dec.py``; applied as ``h <- a[time] h + b[time]`` on the cached
  feature in the partial pass (``deepcache_diffusion.py`` ``forward``). Here the index is
  the sampling step, never a call counter (docs/semantics.md §3, §7 items 6, 17).
* :func:`cached_denoiser`: the DeepCache sampler loop (``prv_f`` refreshed at slow steps)
  as a stateful :class:`~iec_jax.denoisers.Denoiser`; with IEC every evaluation at a full
  step is a full pass and the carried cache is the last evaluation's feature, as in
  ``adaptive_generalized_steps_3`` (docs/semantics.md §3, §7 item 5).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from iec_jax.denoisers import Denoiser
from iec_jax.efficient.adapter import UNetFunction, as_model

__all__ = [
    "float_unet_fn",
    "uniform_schedule",
    "nonuniform_steps",
    "nonuniform_schedule",
    "dps_schedule",
    "SCHEDULE_KINDS",
    "make_schedule",
    "schedule_steps",
    "last_full_index",
    "CacheDEC",
    "identity_dec",
    "fit_cache_dec",
    "CachedDenoiser",
    "cached_denoiser",
]

UNetFn = Callable[..., Any]


def float_unet_fn(unet, params, *, context=None) -> UNetFunction:
    """The float model as a UNet function (``step`` is ignored). ``unet``: a UNet, a
    UNetCondition or a ModelSpec; ``context``: bind a context (conditional models)."""
    model = as_model(unet)

    def run(x, t, step, ctx, **kw):
        del step
        return model.apply(params, x, t, ctx, **kw)

    return UNetFunction(model, run, context)


# ----------------------------------------------------------------------- schedules
def _check_steps_interval(num_steps: int, interval: int) -> tuple[int, int]:
    for name, v in (("num_steps", num_steps), ("interval", interval)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    return int(num_steps), int(interval)


def _mask(num_steps: int, steps) -> np.ndarray:
    mask = np.zeros(num_steps, bool)
    mask[np.asarray(list(steps), np.int64)] = True
    return mask


def schedule_steps(full_steps) -> np.ndarray:
    """The full-compute step indices of a mask (the official ``interval_seq``)."""
    return np.flatnonzero(np.asarray(full_steps, bool))


def uniform_schedule(num_steps: int, interval: int) -> np.ndarray:
    """Full at 0, N, 2N, ... (``interval_seq = list(range(0, S, N))``)."""
    S, N = _check_steps_interval(num_steps, interval)
    return _mask(S, range(0, S, N))


def nonuniform_steps(num_steps: int, interval: int, center: int, pow: float = 1.2):
    """DeepCache's non-uniform slow steps (``sample_from_quad_center``), exactly.

    n = ceil(S / N) slow steps. With p = ``pow``: x = linspace((-c)^(1/p), (S-c)^(1/p),
    n + 1), where (-c)^(1/p) is Python's principal (complex) root for c > 0; the steps
    are 0 and c + int32(Re(x^p)) for the sorted unique values of int32(Re(x^p)) without
    the smallest and the largest. If that gives other than n steps, p -= 0.02 and retry
    while p > 1 (DeepCache's SD pipelines then raise; its DDPM copy silently returns the
    wrong count: here it raises). Steps crowd around ``center``. Interval 1 = every step
    (the SD pipelines' special case). Returns (sorted steps, the p used).
    """
    S, N = _check_steps_interval(num_steps, interval)
    if N == 1:
        return list(range(S)), float(pow)
    if int(center) != center or not 0 <= center < S:
        raise ValueError(f"center must be an integer in [0, {S}), got {center!r}")
    n, c, p = math.ceil(S / N), int(center), float(pow)
    while p > 1:
        x = np.linspace((-c) ** (1 / p), (S - c) ** (1 / p), n + 1)
        vals = np.unique(np.real(x**p).astype(np.int32))[1:-1]
        steps = [0] + [int(v) + c for v in vals]
        if len(steps) == n:
            if min(steps) < 0 or max(steps) >= S or len(set(steps)) != n:
                raise ValueError(f"non-uniform rule gave steps outside [0, {S}): {steps}")
            return sorted(steps), p
        p -= 0.02
    raise ValueError(f"no pow in (1, {pow}] gives {n} distinct slow steps for S={S}, center={c}")


def nonuniform_schedule(num_steps: int, interval: int, center: int, pow: float = 1.2) -> np.ndarray:
    """Mask of :func:`nonuniform_steps`."""
    return _mask(int(num_steps), nonuniform_steps(num_steps, interval, center, pow)[0])


def _lag_l1(features, max_lag: int) -> np.ndarray:
    """d[j, l] = ||f_{j+l} - f_j||_1 for l < max_lag (inf past the end), float64 on the
    host. One compiled function for all lags; device memory about twice the features."""
    f = jnp.asarray(features)
    S = f.shape[0]
    padded = jnp.concatenate([f, jnp.zeros((max_lag,) + f.shape[1:], f.dtype)])
    axes = tuple(range(1, f.ndim))
    l1 = jax.jit(lambda p, f, lag: jnp.sum(jnp.abs(jax.lax.dynamic_slice_in_dim(p, lag, S) - f), axis=axes))
    d = np.stack([np.asarray(l1(padded, f, lag), np.float64) for lag in range(max_lag)], axis=1)
    d[np.arange(S)[:, None] + np.arange(max_lag)[None] >= S] = np.inf
    return d


def dps_schedule(features, interval: int) -> np.ndarray:
    """CacheQuant's DPS (``Fisher.feature_to_interval_seq_optimal``).

    ``features`` (S, ...): the cache-point feature at every step of a small FP no-cache
    batch (the official code hooks the whole batch, so the L1 norm runs over samples
    too). Splits the S steps into K = ceil(S/N) contiguous groups of length in
    [ceil(N/2), 2N] (official ``min_itval = int(N/2) + N % 2``, ``max_itval = 2N``)
    minimising sum_groups sum_{i in group} ||f_i - f_first||_1; the group starts are the
    full steps. Ties go to the earliest split point (``torch.min``'s first index).
    Unlike the official loop, lengths past S are clamped (it indexes past the end when
    2N > S) and an infeasible (S, N) raises.
    """
    f = jnp.asarray(features)
    S = int(f.shape[0])
    _, N = _check_steps_interval(S, interval)
    K, lo, hi = math.ceil(S / N), (N + 1) // 2, 2 * N
    if not K * lo <= S <= K * hi:
        raise ValueError(f"cannot split {S} steps into {K} groups of length [{lo}, {hi}]")
    d = _lag_l1(f, hi)
    # cost[j, L] = sum_{l < L} d[j, l]: the group [j, j + L).
    cost = np.concatenate([np.zeros((S, 1)), np.cumsum(d, axis=1)], axis=1)
    best = np.full((K + 1, S + 1), np.inf)
    best[0, 0] = 0.0
    arg = np.zeros((K + 1, S + 1), np.int64)
    for k in range(1, K + 1):
        for n in range(1, S + 1):
            js = np.arange(max(n - hi, 0), n - lo + 1)  # ascending: first minimum wins
            if js.size == 0:
                continue
            tot = best[k - 1, js] + cost[js, n - js]
            i = int(np.argmin(tot))
            best[k, n], arg[k, n] = tot[i], js[i]
    starts, n = [], S
    for k in range(K, 0, -1):
        n = int(arg[k, n])
        starts.append(n)
    return _mask(S, starts)


SCHEDULE_KINDS = ("uniform", "nonuniform", "dps")


def make_schedule(kind: str, num_steps: int, interval: int, *, features=None, center: Optional[int] = None,
                  pow: float = 1.2) -> np.ndarray:
    """One of :data:`SCHEDULE_KINDS` by name (``features`` for DPS, ``center``/``pow`` for
    the non-uniform rule; the official scripts default to uniform, ImageNet to DPS)."""
    if kind == "uniform":
        return uniform_schedule(num_steps, interval)
    if kind == "nonuniform":
        if center is None:
            raise ValueError("the non-uniform schedule needs center (DeepCache --center)")
        return nonuniform_schedule(num_steps, interval, center, pow)
    if kind == "dps":
        if features is None or len(features) != num_steps:
            raise ValueError(f"the DPS schedule needs features of shape ({num_steps}, ...)")
        return dps_schedule(features, interval)
    raise ValueError(f"schedule kind must be one of {SCHEDULE_KINDS}, got {kind!r}")


def last_full_index(full_steps) -> np.ndarray:
    """For each step, the index of the last full step at or before it."""
    full = np.asarray(full_steps, bool)
    _check_mask(full)
    return np.maximum.accumulate(np.where(full, np.arange(full.size), 0))


def _check_mask(full: np.ndarray) -> None:
    if full.ndim != 1 or full.size == 0 or not full[0]:
        raise ValueError(f"full_steps must be a non-empty 1-D bool mask with step 0 full, got {full}")


# ----------------------------------------------------------------------- cache-DEC
class CacheDEC(NamedTuple):
    """Per-step, per-channel affine correction of the cached feature (a pytree).

    ``a``, ``b``: (S, C) float32. On cached step i the partial pass uses
    ``a[i] * cache + b[i]`` (channel last); full steps have a = 1, b = 0.
    """

    a: jax.Array
    b: jax.Array

    def apply(self, feature, step):
        a = jnp.asarray(self.a)[step]
        b = jnp.asarray(self.b)[step]
        return (a * feature.astype(jnp.float32) + b).astype(feature.dtype)


def identity_dec(num_steps: int, channels: int) -> CacheDEC:
    """a = 1, b = 0 (DeepCache without DEC; cf. docs/semantics.md §7 items 12, 23: the official
    FP scripts use b = 1 by mistake)."""
    return CacheDEC(np.ones((num_steps, channels), np.float32), np.zeros((num_steps, channels), np.float32))


def fit_cache_dec(true_features, cached_features, full_steps, *, ddof: int = 1) -> CacheDEC:
    """Least-squares a, b per step and channel: true ~ a * cached + b.

    ``true_features`` (S, N, h, w, C): the FP no-cache feature at each step (official
    ``*_predadd.py``: one FP DDIM run, the hooked feature at every step).
    ``cached_features`` (S, N, h, w, C) or None: the feature each step reuses; None takes
    the FP feature of the last full step (``cache_c`` in the official loop). Per step i
    and channel c over samples and positions (``calculate_abCov``):
    a = mean((X - mX)(Y - mY)) / var(X, ddof), b = mY - a mX, no epsilon. The official
    ``torch.var`` is unbiased (ddof=1), so its a is (n-1)/n of the LS slope; ddof=0 gives
    the exact LS fit. Deviation: a channel with var(X) = 0 gets a = 1, b = mY - mX (the
    official code divides by zero). Full steps get a = 1, b = 0. Float64 on the host,
    one step at a time.
    """
    full = np.asarray(full_steps, bool)
    _check_mask(full)
    S = full.size
    if true_features.shape[0] != S or (cached_features is not None and cached_features.shape != true_features.shape):
        raise ValueError(f"features must be (S={S}, N, h, w, C) and of equal shapes")
    src = last_full_index(full)
    C = true_features.shape[-1]
    a, b = np.ones((S, C), np.float32), np.zeros((S, C), np.float32)
    for i in np.flatnonzero(~full):
        x = np.asarray(true_features[src[i]] if cached_features is None else cached_features[i], np.float64)
        y = np.asarray(true_features[i], np.float64)
        x, y = x.reshape(-1, C), y.reshape(-1, C)
        mx, my = x.mean(0), y.mean(0)
        cov = ((x - mx) * (y - my)).mean(0)
        var = ((x - mx) ** 2).sum(0) / (x.shape[0] - ddof)
        ai = np.where(var > 0, cov / np.where(var > 0, var, 1.0), 1.0)
        a[i], b[i] = ai, my - ai * mx
    return CacheDEC(a, b)


# ----------------------------------------------------------------- the denoiser
@dataclasses.dataclass(frozen=True, eq=False)
class CachedDenoiser(Denoiser):
    """DeepCache as a stateful denoiser; the state is the cached feature (B, h, w, c).

    Full step: a full pass with ``return_feature=True``; the feature becomes the state.
    Cached step: a partial pass from ``dec.apply(state, step)``; the state is unchanged.
    One ``lax.cond`` on ``full_steps[step]`` runs only the needed branch. A context given
    after the state (``den(x, t, step, state, context)``, as :func:`iec_jax.guided_denoiser`
    passes it) goes to the UNet function unchanged; under guidance x, t, the context and
    the state all have the 2B batch.
    """

    unet_fn: UNetFn
    full_steps: np.ndarray
    cache_point: Any
    dec: Optional[CacheDEC] = None

    def init_state(self, x_T):
        fn = self.unet_fn
        if isinstance(fn, UNetFunction) and fn.model.conditional and fn.context is None:
            # The context comes per call: the feature's shape is known without one.
            return jnp.zeros(fn.model.feature_shape(x_T.shape, self.cache_point), fn.model.dtype)
        t = jnp.zeros(x_T.shape[:1], jnp.int32)
        fn = lambda x: self.unet_fn(x, t, jnp.int32(0), cache_point=self.cache_point, return_feature=True)  # noqa: E731
        spec = jax.eval_shape(fn, x_T)[1]
        return jnp.zeros(spec.shape, spec.dtype)

    def __call__(self, x, t, step, state, *context):
        def full(cache):
            eps, feat = self.unet_fn(x, t, step, *context, cache_point=self.cache_point, return_feature=True)
            return eps, feat.astype(cache.dtype)

        def partial(cache):
            h = cache if self.dec is None else self.dec.apply(cache, step)
            return self.unet_fn(x, t, step, *context, cache_point=self.cache_point, cached_feature=h), cache

        return jax.lax.cond(jnp.asarray(self.full_steps)[step], full, partial, state)

    def select_state(self, keep_new, new, old):
        return jnp.where(keep_new.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

    def full_pass_mask(self, num_steps):
        if num_steps != self.full_steps.size:
            raise ValueError(f"cache schedule has {self.full_steps.size} steps, the sampler {num_steps}")
        return self.full_steps.copy()


def cached_denoiser(unet_fn: UNetFn, *, full_steps, cache_point, dec: Optional[CacheDEC] = None) -> CachedDenoiser:
    """A :class:`CachedDenoiser` (validates the schedule and the DEC shape)."""
    full = np.asarray(full_steps, bool)
    _check_mask(full)
    if dec is not None and (np.shape(dec.a) != np.shape(dec.b) or np.shape(dec.a)[0] != full.size):
        raise ValueError(f"dec must have a, b of shape (S={full.size}, C), got {np.shape(dec.a)}, {np.shape(dec.b)}")
    return CachedDenoiser(unet_fn, full, cache_point, dec)
