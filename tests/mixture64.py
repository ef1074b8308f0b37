"""The float64 reference the sampler and IEC tests share: E[ε | x_t] of a Gaussian mixture
(``iec_jax.oracle.GaussianMixture``) by dense linear algebra, independent of the JAX
oracle it checks (not a test file: pytest does not collect it)."""

import math

import numpy as np


def np_eps(gm, x, a):
    """E[ε | x_t = x] under the mixture at ᾱ = ``a``, float64; x: (n, d)."""
    d = x.shape[1]
    logs, sols = [], []
    for w, mu, cov in zip(gm.weights, gm.means, gm.covs):
        c = a * cov + (1 - a) * np.eye(d)
        diff = x - math.sqrt(a) * mu
        sol = np.linalg.solve(c, diff.T).T
        logs.append(math.log(w) - 0.5 * (np.sum(diff * sol, 1) + np.linalg.slogdet(c)[1]))
        sols.append(sol)
    logs = np.stack(logs, 1)
    r = np.exp(logs - logs.max(1, keepdims=True))
    r /= r.sum(1, keepdims=True)
    return math.sqrt(1 - a) * np.einsum("nk,knd->nd", r, np.stack(sols))
