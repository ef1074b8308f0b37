"""The exact oracle: a Gaussian mixture whose posterior-mean noise E[ε | x_t] is closed form.

If x_0 ~ Σ_k π_k N(μ_k, Σ_k) and x_t = sqrt(ᾱ) x_0 + sqrt(1-ᾱ) ε, then
x_t ~ Σ_k π_k N(sqrt(ᾱ) μ_k, C_k) with C_k = ᾱ Σ_k + (1-ᾱ) I, and

    E[ε | x_t] = -sqrt(1-ᾱ) ∇ log p_t(x_t) = sqrt(1-ᾱ) Σ_k r_k(x_t) C_k⁻¹ (x_t - sqrt(ᾱ) μ_k)

with r_k the component responsibilities. This holds for every ᾱ, so the oracle is the
exact ε-predictor of *any* schedule: a sampler driven by it has no approximation error,
only discretization error. The perturbations below add a controlled approximation error
("efficient model") on top, which is what IEC is meant to repair.

Each Σ_k is stored by its eigendecomposition U diag(s) Uᵀ, so C_k⁻¹ and log|C_k| cost
O(d²) per component at any ᾱ.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from iec_jax.denoisers import StatefulDenoiser
from iec_jax.schedule import NoiseSchedule

__all__ = [
    "GaussianMixture",
    "scale_output",
    "bias_output",
    "quantize_output",
    "stale_eps_cache",
    "PERTURBATIONS",
    "perturb",
]


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianMixture:
    """A Gaussian mixture on arrays of shape ``event_shape`` (flattened to d).

    Attributes:
      weights: (K,) mixture weights (sum to 1).
      means: (K, d).
      covs: (K, d, d) symmetric positive definite.
      event_shape: the shape of one sample, prod = d (e.g. (4, 4, 1) for an "image").
    """

    weights: np.ndarray
    means: np.ndarray
    covs: np.ndarray
    event_shape: tuple

    def __post_init__(self):
        w = np.asarray(self.weights, np.float64)
        m = np.asarray(self.means, np.float64)
        c = np.asarray(self.covs, np.float64)
        shape = tuple(int(s) for s in self.event_shape)
        d = int(np.prod(shape))
        if w.ndim != 1 or m.shape != (w.size, d) or c.shape != (w.size, d, d):
            raise ValueError(
                f"GaussianMixture: inconsistent shapes weights {w.shape}, means {m.shape},"
                f" covs {c.shape} for event_shape {shape} (d = {d})"
            )
        if np.any(w <= 0) or abs(w.sum() - 1) > 1e-8:
            raise ValueError("GaussianMixture: weights must be positive and sum to 1")
        if not np.allclose(c, np.swapaxes(c, 1, 2)):
            raise ValueError("GaussianMixture: covariances must be symmetric")
        evals, evecs = np.linalg.eigh(c)
        if np.any(evals <= 0):
            raise ValueError("GaussianMixture: covariances must be positive definite")
        for name, v in (("weights", w), ("means", m), ("covs", c), ("_evals", evals),
                        ("_evecs", evecs), ("event_shape", shape)):
            object.__setattr__(self, name, v)

    # ------------------------------------------------------------------ basics
    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def num_components(self) -> int:
        return int(self.weights.shape[0])

    @classmethod
    def random(
        cls,
        seed: int,
        num_components: int = 4,
        event_shape: Sequence[int] = (2,),
        *,
        mean_scale: float = 0.6,
        std_range: tuple = (0.05, 0.25),
    ) -> "GaussianMixture":
        """A random mixture: means uniform in [-mean_scale, mean_scale]^d, covariances
        with random orientation and standard deviations log-uniform in ``std_range``,
        weights from a Dirichlet(5) draw."""
        rng = np.random.default_rng(seed)
        d = int(np.prod(event_shape))
        w = rng.dirichlet(np.full(num_components, 5.0))
        means = rng.uniform(-mean_scale, mean_scale, (num_components, d))
        lo, hi = np.log(std_range[0]), np.log(std_range[1])
        covs = []
        for _ in range(num_components):
            q, r = np.linalg.qr(rng.normal(size=(d, d)))
            q = q * np.sign(np.diag(r))
            s = np.exp(rng.uniform(lo, hi, d))
            covs.append((q * s**2) @ q.T)
        covs = np.stack(covs)
        covs = 0.5 * (covs + np.swapaxes(covs, 1, 2))
        return cls(w, means, covs, tuple(event_shape))

    # ---------------------------------------------------------- densities at t
    def _terms(self, x, alpha):
        """Per-component log N(x; sqrt(ᾱ)μ_k, C_k) and C_k⁻¹(x - sqrt(ᾱ)μ_k).

        x: (n, d); alpha: (n,) ᾱ per row. Returns (log_n (n, K), cinv_diff (n, K, d)).
        """
        dtype = x.dtype
        evecs = jnp.asarray(self._evecs, dtype)  # (K, d, d)
        evals = jnp.asarray(self._evals, dtype)  # (K, d)
        means = jnp.asarray(self.means, dtype)  # (K, d)
        a = alpha[:, None, None]
        diff = x[:, None, :] - jnp.sqrt(a) * means[None]  # (n, K, d)
        lam = a * evals[None] + (1 - a)  # (n, K, d) eigenvalues of C_k
        proj = jnp.einsum("nkd,kde->nke", diff, evecs)  # Uᵀ diff
        maha = jnp.sum(proj**2 / lam, axis=-1)
        logdet = jnp.sum(jnp.log(lam), axis=-1)
        log_n = -0.5 * (maha + logdet + self.dim * math.log(2 * math.pi))
        cinv_diff = jnp.einsum("nke,kde->nkd", proj / lam, evecs)
        return log_n, cinv_diff

    def _flat(self, x):
        x = jnp.asarray(x)
        if x.shape[1:] != self.event_shape:
            raise ValueError(
                f"GaussianMixture: expected arrays of shape (n, *{self.event_shape}),"
                f" got {x.shape}"
            )
        return x.reshape(x.shape[0], self.dim)

    def _alpha(self, alpha, n, dtype):
        return jnp.broadcast_to(jnp.asarray(alpha, dtype), (n,))

    def log_prob(self, x, alpha=1.0):
        """log p_t(x) of the noised mixture at level ᾱ (1.0: the data), shape (n,)."""
        xf = self._flat(x)
        log_n, _ = self._terms(xf, self._alpha(alpha, xf.shape[0], xf.dtype))
        return jax.scipy.special.logsumexp(
            log_n + jnp.log(jnp.asarray(self.weights, xf.dtype)), axis=-1
        )

    def responsibilities(self, x, alpha=1.0):
        """p(component k | x_t) at level ᾱ, shape (n, K)."""
        xf = self._flat(x)
        log_n, _ = self._terms(xf, self._alpha(alpha, xf.shape[0], xf.dtype))
        return jax.nn.softmax(log_n + jnp.log(jnp.asarray(self.weights, xf.dtype)), axis=-1)

    def eps(self, x, alpha):
        """Exact E[ε | x_t] at level ᾱ (scalar or per-row), same shape as x."""
        xf = self._flat(x)
        a = self._alpha(alpha, xf.shape[0], xf.dtype)
        log_n, cinv_diff = self._terms(xf, a)
        r = jax.nn.softmax(log_n + jnp.log(jnp.asarray(self.weights, xf.dtype)), axis=-1)
        e = jnp.sqrt(1 - a)[:, None] * jnp.einsum("nk,nkd->nd", r, cinv_diff)
        return e.reshape(x.shape)

    def eps_fn(self, schedule: NoiseSchedule) -> Callable:
        """The exact ε-predictor of ``schedule``: ``eps_fn(x, t)``, t of shape (batch,)."""
        ac = schedule.alphas_cumprod

        def eps_fn(x, t):
            return self.eps(x, jnp.asarray(ac, x.dtype)[t])

        return eps_fn

    def sample(self, key, n: int, dtype=jnp.float32):
        """n samples of the data distribution, shape (n, *event_shape)."""
        k_c, k_z = jax.random.split(key)
        comp = jax.random.choice(k_c, self.num_components, (n,), p=jnp.asarray(self.weights))
        z = jax.random.normal(k_z, (n, self.dim), dtype)
        scale = jnp.asarray(self._evecs * np.sqrt(self._evals)[:, None, :], dtype)
        x = jnp.asarray(self.means, dtype)[comp] + jnp.einsum("nij,nj->ni", scale[comp], z)
        return x.reshape((n,) + self.event_shape)


# --------------------------------------------------------------- perturbations
def scale_output(eps_fn, factor: float):
    """ε̃ = factor · ε (a systematic gain error)."""
    return lambda x, t: factor * eps_fn(x, t)


def bias_output(eps_fn, bias: float):
    """ε̃ = ε + bias (a constant offset on every element)."""
    return lambda x, t: eps_fn(x, t) + bias


def quantize_output(eps_fn, step: float):
    """ε̃ = round(ε / step) · step (uniform output quantization to a grid)."""
    if not step > 0:
        raise ValueError(f"quantize_output: step must be > 0, got {step}")
    return lambda x, t: jnp.round(eps_fn(x, t) / step) * step


def stale_eps_cache(eps_fn, interval: int) -> StatefulDenoiser:
    """Reuse of a stale ε, as a feature cache would: steps 0, N, 2N, ... evaluate ε and
    store it; the steps between return the stored ε without evaluating the network.

    The state is the stored ε (batch, ...). IEC corrections at a full step evaluate again
    and, as in the official code, the last evaluation's ε is what later steps reuse.
    """
    if int(interval) != interval or interval < 1:
        raise ValueError(f"stale_eps_cache: interval must be an integer >= 1, got {interval}")
    interval = int(interval)

    def apply_fn(x, t, step, cached):
        is_full = step % interval == 0
        eps = jax.lax.cond(is_full, lambda: eps_fn(x, t), lambda: cached)
        return eps, eps

    def select_fn(keep_new, new, old):
        return jnp.where(keep_new.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

    return StatefulDenoiser(
        apply_fn=apply_fn,
        init_fn=jnp.zeros_like,
        select_fn=select_fn,
        full_pass=lambda n: np.arange(n) % interval == 0,
    )


PERTURBATIONS = {
    "scale": scale_output,
    "bias": bias_output,
    "quantize": quantize_output,
    "stale_cache": stale_eps_cache,
}


def perturb(eps_fn, kind: str, value):
    """The perturbation ``kind`` (one of PERTURBATIONS) with its parameter ``value``."""
    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {kind!r}; choose one of {tuple(PERTURBATIONS)}")
    return PERTURBATIONS[kind](eps_fn, value)
