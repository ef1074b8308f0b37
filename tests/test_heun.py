"""Heun's method in the DDIM parametrization, as the compute-matched control of IEC
(``IECConfig.heun()``: one correction of λ = 0.5 evaluating ε at (y, s)).

* against a float64 plain-Python Heun loop on the exact oracle;
* one "IEC correction at s" is Heun's step exactly (float64);
* orders of convergence on the oracle: DDIM ≈ 1, Heun ≈ 2 (float64);
* state and step indices under a cache: the second evaluation uses step i + 1.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import iec_jax
from iec_jax import oracle
from iec_jax.sampling import ddim_step, step_coefficients
from mixture64 import np_eps

SHAPE = (2, 2)


def reference_heun(gm, schedule, ts, x_T):
    """Heun (trapezoidal predictor-corrector) on x̄ = x/√ᾱ against σ = √((1-ᾱ)/ᾱ):
    x̄_s = x̄_t + (σ_s - σ_t) (ε(x_t, t) + ε(x'_s, s)) / 2, x'_s the Euler (DDIM)
    predictor; the last step (to the final level, no timestep) is Euler."""
    ac, final = schedule.alphas_cumprod, schedule.final_alpha_cumprod
    x = np.asarray(x_T, np.float64).reshape(len(x_T), -1)
    for i, t in enumerate(ts):
        a_t = ac[t]
        a_s = ac[ts[i + 1]] if i + 1 < len(ts) else final
        sig_t, sig_s = math.sqrt((1 - a_t) / a_t), math.sqrt((1 - a_s) / a_s)
        xbar = x / math.sqrt(a_t)
        e = np_eps(gm, x, a_t)
        pred = math.sqrt(a_s) * (xbar + (sig_s - sig_t) * e)
        if i + 1 < len(ts):
            e = (e + np_eps(gm, pred, a_s)) / 2
        x = math.sqrt(a_s) * (xbar + (sig_s - sig_t) * e)
    return x.reshape(x_T.shape)


@pytest.fixture(scope="module")
def gm():
    return oracle.GaussianMixture.random(31, 3, SHAPE, std_range=(0.15, 0.4))


def _x_T(n=16, seed=0, dtype=jnp.float32):
    keys = iec_jax.per_sample_keys(jax.random.key(seed), np.arange(n))
    return iec_jax.initial_noise(keys, SHAPE, dtype)[0]


def test_heun_matches_the_float64_reference(gm):
    schedule = iec_jax.NoiseSchedule.linear()
    ts = iec_jax.make_timesteps(1000, 50, "uniform")
    x_T = _x_T()
    x0, info = jax.jit(lambda x: iec_jax.sample(gm.eps_fn(schedule), x, None, schedule=schedule,
                                                timesteps=ts, iec=iec_jax.IECConfig.heun()))(x_T)
    ref = reference_heun(gm, schedule, ts, np.asarray(x_T))
    err = np.abs(np.asarray(x0, np.float64) - ref).max() / np.abs(ref).max()
    assert err < 1e-4, err
    np.testing.assert_array_equal(info["nfe"], [2] * 49 + [1])
    np.testing.assert_array_equal(np.asarray(info["corrections"])[:, 0], [1] * 49 + [0])
    np.testing.assert_array_equal(info["iec_steps"], np.arange(50) < 49)
    plain, _ = iec_jax.sample(gm.eps_fn(schedule), x_T, None, schedule=schedule, timesteps=ts)
    assert np.abs(np.asarray(plain) - np.asarray(x0)).max() > 1e-3


def test_one_correction_evaluated_at_s_is_heuns_step_exactly(gm):
    """y₀ + ½(D_t(x_t, ε(y₀, s)) - y₀) = D_t(x_t, (ε(x_t, t) + ε(y₀, s))/2), in float64."""
    with jax.enable_x64(True):
        schedule = iec_jax.NoiseSchedule.linear()
        ts = iec_jax.make_timesteps(1000, 20, "uniform")
        eps_fn = gm.eps_fn(schedule)
        x_T = _x_T(dtype=jnp.float64)
        x0, _ = iec_jax.sample(eps_fn, x_T, None, schedule=schedule, timesteps=ts,
                               iec=iec_jax.IECConfig.heun())
        c = step_coefficients(schedule, ts)
        x = x_T
        for i in range(len(ts)):
            coef = {k: c[k][i] for k in ("alpha", "alpha_prev", "sigma", "c_dir")}
            e = eps_fn(x, jnp.full((len(x),), ts[i], jnp.int32))
            if i + 1 < len(ts):
                pred = ddim_step(x, e, coef)[0]
                e = (e + eps_fn(pred, jnp.full((len(x),), ts[i + 1], jnp.int32))) / 2
            x = ddim_step(x, e, coef)[0]
        assert x0.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(x0), np.asarray(x), rtol=0, atol=1e-12)


def test_orders_of_convergence_on_the_oracle():
    """Errors against a fine solution at 10, 20, 40, 80 steps: slope ≈ 1 for DDIM and
    ≈ 2 for Heun on log-log. The schedule has σ = √((1-ᾱ)/ᾱ) = 5 ((t + 1)/T)² and the
    final level σ = 0 at t = -1, so that the "trailing" grids (uniform in t from T - 1 to
    -1) are nested and smooth in σ; the fine solution is Richardson's extrapolation
    2·DDIM(T) - DDIM(T/2), independent of the Heun code."""
    with jax.enable_x64(True):
        gm = oracle.GaussianMixture.random(3, 3, (2,), std_range=(0.3, 0.6))
        T = 1600
        sigma = 5.0 * (np.arange(1, T + 1) / T) ** 2
        schedule = iec_jax.NoiseSchedule.from_alphas_cumprod(1 / (1 + sigma**2))
        x_T = jax.random.normal(jax.random.key(0), (64, 2), jnp.float64)
        eps_fn = gm.eps_fn(schedule)

        def run(n, iec=None):
            ts = iec_jax.make_timesteps(T, n, "trailing")
            return np.asarray(jax.jit(lambda x: iec_jax.sample(
                eps_fn, x, None, schedule=schedule, timesteps=ts, iec=iec)[0])(x_T))

        fine = 2 * run(T) - run(T // 2)
        assert np.abs(run(T, iec_jax.IECConfig.heun()) - fine).max() < 2e-5
        steps = np.array([10, 20, 40, 80])
        slopes, errors = {}, {}
        for name, cfg in (("ddim", None), ("heun", iec_jax.IECConfig.heun())):
            errors[name] = [np.sqrt(np.mean((run(n, cfg) - fine) ** 2)) for n in steps]
            slopes[name] = -np.polyfit(np.log(steps), np.log(errors[name]), 1)[0]
    assert 0.85 < slopes["ddim"] < 1.15, slopes
    assert 1.8 < slopes["heun"] < 2.2, slopes
    assert errors["heun"][-1] < errors["ddim"][-1] / 10


def test_step_indices_and_state_of_the_second_evaluation(gm):
    """The evaluation at (y, t_{i+1}) uses step index i + 1 and the state left by step i's
    ordinary evaluation; the carried state is the last evaluation's."""
    schedule = iec_jax.NoiseSchedule.linear()
    ts = np.array([900, 600, 300])
    log = []

    def apply_fn(x, t, step, state):
        jax.debug.callback(lambda tt, s, st: log.append((int(tt), int(s), tuple(int(v) for v in st))),
                           t[0], step, state, ordered=True)
        return gm.eps_fn(schedule)(x, t), jnp.stack([t[0], step])

    den = iec_jax.StatefulDenoiser(apply_fn, init_fn=lambda x: jnp.full((2,), -1, jnp.int32))
    iec_jax.sample(den, _x_T(2), None, schedule=schedule, timesteps=ts, iec=iec_jax.IECConfig.heun())
    jax.effects_barrier()
    assert log == [(900, 0, (-1, -1)), (600, 1, (900, 0)),
                   (600, 1, (600, 1)), (300, 2, (600, 1)),
                   (300, 2, (300, 2))]


def test_heun_under_a_cache_schedule(gm):
    """Under a stale-ε cache of interval 2, Heun runs at the full steps only, and its
    second evaluation falls on a cached step (i + 1 odd): a partial pass that returns the
    stored ε, so the run equals cached DDIM; it is counted as a partial pass."""
    schedule = iec_jax.NoiseSchedule.linear()
    ts = iec_jax.make_timesteps(1000, 50, "uniform")
    x_T = _x_T(4)
    eps_fn = gm.eps_fn(schedule)
    cached = oracle.stale_eps_cache(eps_fn, 2)
    run = lambda den, iec: jax.jit(lambda x: iec_jax.sample(  # noqa: E731
        den, x, None, schedule=schedule, timesteps=ts, iec=iec))(x_T)
    x0, info = run(cached, iec_jax.IECConfig.heun())
    plain, _ = run(cached, None)
    np.testing.assert_allclose(x0, plain, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(info["iec_steps"], np.arange(50) % 2 == 0)
    assert iec_jax.nfe_summary(info) == dict(nfe=75, nfe_full=25, nfe_partial=50,
                                             corrections_per_sample=25.0)
    # Full passes everywhere (interval 1): Heun itself, every second evaluation full.
    x1, info1 = run(oracle.stale_eps_cache(eps_fn, 1), iec_jax.IECConfig.heun())
    heun, _ = run(eps_fn, iec_jax.IECConfig.heun())
    np.testing.assert_allclose(x1, heun, rtol=0, atol=1e-6)
    assert iec_jax.nfe_summary(info1)["nfe_partial"] == 0


def test_heun_options_are_validated(gm):
    cfg = iec_jax.IECConfig.heun()
    assert cfg.eval_at == "next" and cfg.step_sizes == (0.5,) and cfg.tolerance == 0.0
    assert iec_jax.IECConfig.from_config({"preset": "heun", "steps": "first", "first_k": 3}).first_k == 3
    np.testing.assert_array_equal(cfg.step_mask(4), [True, True, True, False])
    with pytest.raises(ValueError, match="IECConfig.eval_at must be one of"):
        iec_jax.IECConfig(eval_at="s")
