"""The exact oracle and the analysis tools against independent references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import iec_jax
from iec_jax import analysis, oracle

SCHEDULE = iec_jax.NoiseSchedule.linear()


@pytest.fixture(scope="module")
def gm():
    return oracle.GaussianMixture.random(2, 3, (2, 2))


def _scipy_log_prob(gm, x, a):
    d = gm.dim
    dens = sum(
        w * scipy.stats.multivariate_normal(np.sqrt(a) * mu, a * cov + (1 - a) * np.eye(d)).pdf(x)
        for w, mu, cov in zip(gm.weights, gm.means, gm.covs)
    )
    return np.log(dens)


@pytest.mark.parametrize("a", [1.0, 0.9, 0.3, 0.01])
def test_log_prob_matches_scipy(gm, a):
    x = np.random.default_rng(0).normal(size=(20, 4))
    ours = gm.log_prob(jnp.asarray(x.reshape(20, 2, 2), jnp.float32), a)
    np.testing.assert_allclose(ours, _scipy_log_prob(gm, x, a), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("a", [0.999, 0.7, 0.1])
def test_eps_is_minus_scaled_score(gm, a):
    """E[ε | x_t] = -sqrt(1 - ᾱ) ∇ log p_t (Tweedie), checked with autodiff of log_prob."""
    x = jax.random.normal(jax.random.key(0), (16, 2, 2))
    score = jax.grad(lambda v: gm.log_prob(v, a).sum())(x)
    np.testing.assert_allclose(gm.eps(x, a), -np.sqrt(1 - a) * score, rtol=1e-4, atol=1e-5)


def test_eps_is_the_posterior_mean_noise_by_monte_carlo():
    """An independent check of E[ε | x_t] by rejection-free importance weighting: for a
    fixed x_t, E[ε | x_t] = E_{x_0}[w(x_0) ε(x_0)] / E[w] with ε(x_0) = (x_t - sqrt(ᾱ)x_0)/sqrt(1-ᾱ)
    and w = N(x_t; sqrt(ᾱ)x_0, (1-ᾱ)I)."""
    gm = oracle.GaussianMixture.random(4, 2, (2,), std_range=(0.3, 0.5))
    a = 0.5
    x_t = np.array([[0.3, -0.2]])
    x0 = np.asarray(gm.sample(jax.random.key(3), 400_000), np.float64)
    eps = (x_t - np.sqrt(a) * x0) / np.sqrt(1 - a)
    logw = -0.5 * np.sum(eps**2, 1)
    w = np.exp(logw - logw.max())
    mc = (w[:, None] * eps).sum(0) / w.sum()
    np.testing.assert_allclose(np.asarray(gm.eps(jnp.asarray(x_t, jnp.float32), a))[0], mc, atol=0.01)


def test_samples_have_the_mixture_moments():
    gm = oracle.GaussianMixture.random(1, 2, (3,))
    x = np.asarray(gm.sample(jax.random.key(0), 200_000), np.float64)
    mean = gm.weights @ gm.means
    second = sum(w * (c + np.outer(m, m)) for w, m, c in zip(gm.weights, gm.means, gm.covs))
    np.testing.assert_allclose(x.mean(0), mean, atol=0.01)
    np.testing.assert_allclose(np.cov(x.T), second - np.outer(mean, mean), atol=0.01)


def test_mixture_validation():
    with pytest.raises(ValueError, match="inconsistent shapes"):
        oracle.GaussianMixture(np.ones(2) / 2, np.zeros((2, 3)), np.stack([np.eye(3)] * 2), (4,))
    with pytest.raises(ValueError, match="positive definite"):
        oracle.GaussianMixture(np.ones(1), np.zeros((1, 2)), -np.eye(2)[None], (2,))
    with pytest.raises(ValueError, match="sum to 1"):
        oracle.GaussianMixture(np.ones(2), np.zeros((2, 2)), np.stack([np.eye(2)] * 2), (2,))


def test_perturbations(gm):
    eps_fn = gm.eps_fn(SCHEDULE)
    x = jax.random.normal(jax.random.key(1), (4, 2, 2))
    t = jnp.full((4,), 300, jnp.int32)
    e = eps_fn(x, t)
    np.testing.assert_allclose(oracle.perturb(eps_fn, "scale", 1.1)(x, t), 1.1 * e, rtol=1e-6)
    np.testing.assert_allclose(oracle.perturb(eps_fn, "bias", 0.05)(x, t), e + 0.05, rtol=1e-6)
    q = oracle.perturb(eps_fn, "quantize", 0.25)(x, t)
    np.testing.assert_allclose(q / 0.25, np.round(q / 0.25), atol=1e-5)
    assert np.abs(np.asarray(q - e)).max() <= 0.125 + 1e-6
    cache = oracle.perturb(eps_fn, "stale_cache", 4)
    state = cache.init_state(x)
    e0, state = cache(x, t, jnp.int32(0), state)
    e1, state = cache(x + 1.0, t, jnp.int32(1), state)  # cached step: the stored ε, not ε(x+1)
    np.testing.assert_array_equal(e1, e0)
    e4, _ = cache(x + 1.0, t, jnp.int32(4), state)
    np.testing.assert_allclose(e4, eps_fn(x + 1.0, t), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown perturbation 'noise'"):
        oracle.perturb(eps_fn, "noise", 1)
    with pytest.raises(ValueError, match="interval"):
        oracle.stale_eps_cache(eps_fn, 0)


# ------------------------------------------------------------------ analysis
@pytest.mark.parametrize("a, b", [(1.05, -0.1), (0.5, -0.05)])
def test_spectral_norm_matches_dense_jacobian(gm, a, b):
    eps_fn = gm.eps_fn(SCHEDULE)
    x = jax.random.normal(jax.random.key(2), (3, 2, 2))
    t = jnp.array([50, 400, 900], jnp.int32)
    run = jax.jit(lambda x, n: analysis.spectral_norm(eps_fn, x, t, a, b, jax.random.key(0),
                                                      num_iters=n), static_argnums=1)
    sigma, change = run(x, 400)
    rough, _ = run(x, 5)
    for i in range(3):
        jac = jax.jacfwd(lambda v: eps_fn(v[None], t[i : i + 1])[0])(x[i]).reshape(4, 4)
        dense = np.linalg.norm(a * np.eye(4) + b * np.asarray(jac), 2)
        np.testing.assert_allclose(sigma[i], dense, rtol=1e-5)
        # Power iteration approaches σ_max from below.
        assert rough[i] <= dense * (1 + 1e-6)
    assert np.all(np.asarray(change) < 1e-6)


def test_the_official_detached_helper_would_be_degenerate(gm):
    """docs/semantics.md §7 item 16: with ε detached, the 'Jacobian' of x0_hat(x) - x is
    (1/sqrt(ᾱ) - 1) I. Ours sees ε's Jacobian: the two differ."""
    eps_fn = gm.eps_fn(SCHEDULE)
    x = jax.random.normal(jax.random.key(5), (2, 2, 2))
    t = jnp.full((2,), 500, jnp.int32)
    a_t = float(SCHEDULE.alphas_cumprod[500])
    # x0_hat(x) - x = x / sqrt(a) - sqrt(1-a)/sqrt(a) ε(x) - x  ->  a·I + b·J
    sigma, _ = analysis.spectral_norm(eps_fn, x, t, 1 / np.sqrt(a_t) - 1, -np.sqrt((1 - a_t) / a_t),
                                      jax.random.key(0), num_iters=100)
    assert np.all(np.abs(np.asarray(sigma) - (1 / np.sqrt(a_t) - 1)) > 1e-2)


def test_fit_growth_identifies_exponential_and_linear_curves():
    k = np.arange(1, 101)
    exp = analysis.fit_growth(0.01 * np.exp(0.04 * k))
    assert exp["exp_r2"] > 0.9999 and abs(exp["exp_rate"] - 0.04) < 1e-6
    assert exp["lin_r2"] < exp["exp_r2"]
    lin = analysis.fit_growth(0.5 + 0.02 * k)
    assert lin["lin_r2"] > 0.9999 and abs(lin["lin_slope"] - 0.02) < 1e-9
    assert lin["exp_r2"] < lin["lin_r2"]
    with pytest.raises(ValueError):
        analysis.fit_growth([1.0, 2.0])


def test_paired_trajectories_and_profile(gm):
    eps_fn = gm.eps_fn(SCHEDULE)
    ts = iec_jax.make_timesteps(1000, 20, "uniform")
    keys = iec_jax.per_sample_keys(jax.random.key(0), np.arange(6))
    x_T, keys = iec_jax.initial_noise(keys, (2, 2))
    eff = oracle.perturb(eps_fn, "scale", 1.05)
    runs = analysis.paired_trajectories(eps_fn, eff, x_T, keys, schedule=SCHEDULE, timesteps=ts,
                                        iec=iec_jax.IECConfig.paper())
    assert set(runs) == {"ref", "ref_iec", "eff", "eff_iec"}
    ref = runs["ref"][0]
    assert ref.shape == (21, 6, 2, 2)
    np.testing.assert_array_equal(ref[0], x_T)
    x0, _ = iec_jax.sample(eps_fn, x_T, keys, schedule=SCHEDULE, timesteps=ts)
    np.testing.assert_allclose(ref[-1], x0, rtol=1e-6, atol=1e-6)
    err = analysis.trajectory_errors(runs["eff"][0], ref)
    assert err.shape == (21, 6) and np.all(err[0] == 0) and np.all(err[-1] > 0)
    stats = analysis.error_statistics(err)
    assert np.all(stats["q10"] <= stats["median"]) and np.all(stats["median"] <= stats["q90"])
    prof = analysis.spectral_profile(eps_fn, ref, jax.random.key(1), schedule=SCHEDULE,
                                     timesteps=ts, num_iters=10)
    assert prof["propagation"].shape == (20, 6) and prof["contraction"].shape == (20, 6)
    # Step 0 from t = 950: ε is nearly x-independent noise, so ‖A + BJ‖ ≈ A.
    np.testing.assert_allclose(prof["propagation"][0], prof["A"][0] + prof["B"][0], atol=0.05)
