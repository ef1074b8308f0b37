"""Each IEC preset against a plain-Python float64 loop written from docs/semantics.md §2.1-§2.4.

The references below are deliberately literal transcriptions of the official loops
(``adaptive_generalized_steps_3`` for DDPM, ``p_sample_ddim_implicit_2`` for LDM) and of
the paper's Algorithm 1, on an independent float64 NumPy implementation of the oracle
(dense solves, no eigendecompositions). The JAX sampler runs in float32.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import iec_jax
from iec_jax import oracle
from mixture64 import np_eps

SHAPE = (4, 4, 1)
N = 24


# --------------------------------------------------------- float64 references
def frob(v):
    return math.sqrt(float(np.sum(v * v)))


def ddim_coeffs(ac, final, t, s, eta):
    at = ac[t]
    an = final if s < 0 else ac[s]
    c1 = eta * math.sqrt((1 - at / an) * (1 - an) / (1 - at))
    c2 = math.sqrt(1 - an - c1**2)
    return at, an, c1, c2


def reference_official_ddpm(gm, schedule, ts, x_T, eta=0.0, noise=None, interval=None,
                            tol=1e-3, gamma=0.5):
    """``adaptive_generalized_steps_3`` (docs/semantics.md §2.2): max_iter 2 on the steps of
    interval_seq, relative Frobenius test on the whole batch before the update, cache
    overwritten by every full evaluation."""
    ac, final = schedule.alphas_cumprod, schedule.final_alpha_cumprod
    seq = list(ts[::-1])
    seq_next = [-1] + seq[:-1]
    x = np.asarray(x_T, np.float64).reshape(len(x_T), -1)
    interval_seq = set(range(0, len(ts), interval or 1))
    cache = None
    taken = []
    for cur_i, (i, j) in enumerate(zip(reversed(seq), reversed(seq_next))):
        at, at_next, c1, c2 = ddim_coeffs(ac, final, i, j, eta)
        xt = x
        enable = cur_i in interval_seq
        max_iter = 2 if enable else 1
        n_taken = 0
        y = None  # set at it == 0
        for it in range(max_iter):
            if it == 0:
                if enable:
                    e = np_eps(gm, xt, at)
                    cache = e
                else:
                    e = cache  # stale ε on cached steps
            else:
                e = np_eps(gm, y, at)  # ε at the estimate of x_{t-1}, timestep t
                cache = e  # the official cache overwrite
            x0_t = (xt - e * math.sqrt(1 - at)) / math.sqrt(at)
            z = noise[cur_i][it] if noise is not None else 0.0
            y_new = math.sqrt(at_next) * x0_t + c1 * z + c2 * e
            if it == 0:
                y = y_new
            else:
                rel = frob(y_new - y) / (frob(y) + 1e-6)
                if rel < tol:
                    break
                y = y + gamma**it * (y_new - y)
                n_taken += 1
        taken.append(n_taken)
        x = y
    return x.reshape(x_T.shape), np.array(taken)


def reference_official_ldm(gm, schedule, ts, x_T, max_iter=3, tol=1e-6, gamma=0.5):
    """``p_sample_ddim_implicit_2`` (docs/semantics.md §2.3) at η = 0 on every step."""
    ac, final = schedule.alphas_cumprod, schedule.final_alpha_cumprod
    x = np.asarray(x_T, np.float64).reshape(len(x_T), -1)
    taken = []
    for idx, t in enumerate(ts):
        s = ts[idx + 1] if idx + 1 < len(ts) else -1
        a_t, a_prev, _, _ = ddim_coeffs(ac, final, t, s, 0.0)

        def ddim(e):
            pred_x0 = (x - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)
            return math.sqrt(a_prev) * pred_x0 + math.sqrt(1 - a_prev) * e

        y = ddim(np_eps(gm, x, a_t))
        n_taken = 0
        for k in range(max_iter - 1):
            e = np_eps(gm, y, a_t)
            y_new = ddim(e)
            rel = frob(y_new - y) / (frob(y) + 1e-6)
            if rel < tol:
                break
            y = y + gamma**k * (y_new - y)
            n_taken += 1
        taken.append(n_taken)
        x = y
    return x.reshape(x_T.shape), np.array(taken)


def reference_paper(gm, schedule, ts, x_T, lam=0.5, K=1, tau=1e-5):
    """Algorithm 1 in the paper's A_t/B_t form: x ← x + λ(A x_t + B ε(x, t) - x),
    absolute test after the update (Frobenius norm over the batch)."""
    ac, final = schedule.alphas_cumprod, schedule.final_alpha_cumprod
    x = np.asarray(x_T, np.float64).reshape(len(x_T), -1)
    taken = []
    for idx, t in enumerate(ts):
        s = ts[idx + 1] if idx + 1 < len(ts) else -1
        a_t, a_prev = ac[t], (final if s < 0 else ac[s])
        A = math.sqrt(a_prev) / math.sqrt(a_t)
        B = math.sqrt(1 - a_prev) - math.sqrt(a_prev) * math.sqrt(1 - a_t) / math.sqrt(a_t)
        y = A * x + B * np_eps(gm, x, a_t)  # Eq. 6
        k = 0
        while k < K:
            y_next = y + lam * (A * x + B * np_eps(gm, y, a_t) - y)  # Eq. 10
            k += 1
            done = frob(y_next - y) < tau
            y = y_next
            if done:
                break
        taken.append(k)
        x = y
    return x.reshape(x_T.shape), np.array(taken)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def gm():
    return oracle.GaussianMixture.random(11, 4, SHAPE)


def _x_T(seed=0, n=N):
    keys = iec_jax.per_sample_keys(jax.random.key(seed), np.arange(n))
    x_T, skeys = iec_jax.initial_noise(keys, SHAPE)
    return x_T, skeys


def _assert_rel(ours, ref, rtol=1e-4):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < rtol, f"max relative deviation {err:.2e} >= {rtol:.0e}"


# --------------------------------------------------------------------- tests
def test_official_ddpm_preset_matches_reference(gm):
    schedule = iec_jax.NoiseSchedule.linear()
    ts = iec_jax.make_timesteps(1000, 100, "quad")  # the CIFAR setting, duplicates included
    x_T, keys = _x_T()
    x0, info = iec_jax.sample(gm.eps_fn(schedule), x_T, keys, schedule=schedule, timesteps=ts,
                              iec=iec_jax.IECConfig.official_ddpm())
    ref, taken = reference_official_ddpm(gm, schedule, ts, np.asarray(x_T))
    _assert_rel(x0, ref)
    np.testing.assert_array_equal(np.asarray(info["corrections"])[:, 0], taken)
    assert 0 < taken.sum() < 100  # the 1e-3 test fires on some steps and not on others
    np.testing.assert_array_equal(info["nfe"], 2)


def test_official_ddpm_with_a_stale_cache_matches_reference(gm):
    """IEC only at the full-compute steps, and the cache keeps the correction's ε."""
    schedule = iec_jax.NoiseSchedule.linear()
    ts = iec_jax.make_timesteps(1000, 100, "uniform")
    x_T, keys = _x_T(1)
    den = oracle.stale_eps_cache(gm.eps_fn(schedule), 10)
    x0, info = iec_jax.sample(den, x_T, keys, schedule=schedule, timesteps=ts,
                              iec=iec_jax.IECConfig.official_ddpm())
    ref, taken = reference_official_ddpm(gm, schedule, ts, np.asarray(x_T), interval=10)
    _assert_rel(x0, ref)
    np.testing.assert_array_equal(np.asarray(info["corrections"])[:, 0], taken)
    np.testing.assert_array_equal(info["iec_steps"], np.arange(100) % 10 == 0)
    summary = iec_jax.nfe_summary(info)
    assert summary["nfe_full"] == 20 and summary["nfe_partial"] == 90

    # Keeping the first pass's cache instead is a different, also well-defined sampler.
    x0_first, _ = iec_jax.sample(den, x_T, keys, schedule=schedule, timesteps=ts,
                                 iec=iec_jax.IECConfig.official_ddpm(keep_first_pass_state=True))
    assert np.abs(np.asarray(x0_first) - np.asarray(x0)).max() > 1e-4


def test_official_ddpm_with_eta_matches_reference(gm):
    """η > 0: fresh noise for the ordinary step (pass 0) and for the correction (pass 1)."""
    schedule = iec_jax.NoiseSchedule.linear()
    ts = iec_jax.make_timesteps(1000, 50, "uniform")
    x_T, keys = _x_T(2)
    x0, info = iec_jax.sample(gm.eps_fn(schedule), x_T, keys, schedule=schedule, timesteps=ts,
                              eta=0.5, iec=iec_jax.IECConfig.official_ddpm())

    def z(step, k):
        f = lambda kb: jax.random.normal(jax.random.fold_in(jax.random.fold_in(kb, step), k), SHAPE)
        return np.asarray(jax.vmap(f)(keys), np.float64).reshape(N, -1)

    noise = [[z(i, 0), z(i, 1)] for i in range(len(ts))]
    ref, taken = reference_official_ddpm(gm, schedule, ts, np.asarray(x_T), eta=0.5, noise=noise)
    _assert_rel(x0, ref)
    np.testing.assert_array_equal(np.asarray(info["corrections"])[:, 0], taken)


def test_official_ldm_preset_matches_reference(gm):
    schedule = iec_jax.NoiseSchedule.scaled_linear(0.0015, 0.0195, 1000, final_alpha="first")
    ts = iec_jax.make_timesteps(1000, 100, "ldm")
    x_T, keys = _x_T(3)
    x0, info = iec_jax.sample(gm.eps_fn(schedule), x_T, keys, schedule=schedule, timesteps=ts,
                              iec=iec_jax.IECConfig.official_ldm())
    ref, taken = reference_official_ldm(gm, schedule, ts, np.asarray(x_T))
    _assert_rel(x0, ref)
    np.testing.assert_array_equal(np.asarray(info["corrections"])[:, 0], taken)
    assert taken.sum() == 200  # tol 1e-6 never fires: two corrections at every step


@pytest.mark.parametrize("K", [1, 3])
def test_paper_preset_matches_reference(gm, K):
    schedule = iec_jax.NoiseSchedule.linear()
    ts = iec_jax.make_timesteps(1000, 100, "uniform")
    x_T, keys = _x_T(4)
    x0, info = iec_jax.sample(gm.eps_fn(schedule), x_T, keys, schedule=schedule, timesteps=ts,
                              iec=iec_jax.IECConfig.paper(num_corrections=K))
    ref, taken = reference_paper(gm, schedule, ts, np.asarray(x_T), K=K)
    _assert_rel(x0, ref)
    np.testing.assert_array_equal(np.asarray(info["corrections"])[:, 0], taken)


def test_per_sample_convergence_equals_the_reference_run_on_each_sample_alone(gm):
    """Per-sample mode is the batch-global official loop applied to each sample alone."""
    schedule = iec_jax.NoiseSchedule.linear()
    ts = iec_jax.make_timesteps(1000, 100, "quad")
    x_T, keys = _x_T(5, n=8)
    cfg = iec_jax.IECConfig.official_ddpm(convergence="per_sample", tolerance=4e-4,
                                          step_sizes=(0.5, 0.5, 0.5))
    x0, info = iec_jax.sample(gm.eps_fn(schedule), x_T, keys, schedule=schedule, timesteps=ts,
                              iec=cfg)
    corrections = np.asarray(info["corrections"])
    assert len({tuple(c) for c in corrections.T}) > 1, "samples should stop at different steps"
    for b in range(8):
        ref, taken = _ldm_like_reference(gm, schedule, ts, np.asarray(x_T[b : b + 1]))
        _assert_rel(x0[b : b + 1], ref)
        np.testing.assert_array_equal(corrections[:, b], taken)


def _ldm_like_reference(gm, schedule, ts, x_T):
    """Three corrections of step 0.5 with the official relative test, tol 4e-4."""
    ac, final = schedule.alphas_cumprod, schedule.final_alpha_cumprod
    x = x_T.reshape(len(x_T), -1).astype(np.float64)
    taken = []
    for idx, t in enumerate(ts):
        s = ts[idx + 1] if idx + 1 < len(ts) else -1
        a_t, a_prev, _, c2 = ddim_coeffs(ac, final, t, s, 0.0)

        def ddim(e):
            return math.sqrt(a_prev) * (x - math.sqrt(1 - a_t) * e) / math.sqrt(a_t) + c2 * e

        y = ddim(np_eps(gm, x, a_t))
        n = 0
        for _ in range(3):
            y_new = ddim(np_eps(gm, y, a_t))
            if frob(y_new - y) / (frob(y) + 1e-6) < 4e-4:
                break
            y = y + 0.5 * (y_new - y)
            n += 1
        taken.append(n)
        x = y
    return x.reshape(x_T.shape), np.array(taken)


def test_reference_oracle_agrees_with_the_library_oracle(gm):
    x = np.random.default_rng(0).standard_normal((16, 16))
    for a in (0.999, 0.5, 0.01):
        ours = jax.jit(gm.eps)(jnp.asarray(x.reshape(16, *SHAPE), jnp.float32), a)
        _assert_rel(np.asarray(ours).reshape(16, -1), np_eps(gm, x, a), rtol=1e-5)
