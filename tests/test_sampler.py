"""Properties of the scan sampler and the IEC loop, on the exact oracle."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import iec_jax
from iec_jax import oracle
from iec_jax.sampling import ddim_step, step_coefficients

SHAPE = (3, 2)
SCHEDULE = iec_jax.NoiseSchedule.linear()
TS = iec_jax.make_timesteps(1000, 50, "uniform")


@pytest.fixture(scope="module")
def gm():
    return oracle.GaussianMixture.random(5, 3, SHAPE)


def _inputs(n=8, seed=0):
    keys = iec_jax.per_sample_keys(jax.random.key(seed), np.arange(n))
    return iec_jax.initial_noise(keys, SHAPE)


# ------------------------------------------------------- zero corrections
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_zero_corrections_equal_plain_ddim_bit_for_bit(gm, eta):
    eps_fn = gm.eps_fn(SCHEDULE)
    x_T, keys = _inputs()
    kw = dict(schedule=SCHEDULE, timesteps=TS, eta=eta)
    plain, info = jax.jit(lambda x, k: iec_jax.sample(eps_fn, x, k, **kw))(x_T, keys)
    variants = {
        "no steps": iec_jax.IECConfig.official_ddpm(steps="mask", mask=(False,) * len(TS)),
        "no step sizes": iec_jax.IECConfig(step_sizes=()),
        "stop at once": iec_jax.IECConfig.official_ddpm(tolerance=np.inf),
    }
    for name, cfg in variants.items():
        x0, info_c = jax.jit(lambda x, k: iec_jax.sample(eps_fn, x, k, iec=cfg, **kw))(x_T, keys)
        np.testing.assert_array_equal(np.asarray(x0), np.asarray(plain), err_msg=name)
        assert int(np.asarray(info_c["corrections"]).sum()) == 0, name
    # "stop at once" still pays one evaluation per step (the official test needs F(y)).
    assert int(info_c["nfe"].sum()) == 2 * len(TS)
    assert int(info["nfe"].sum()) == len(TS)


# ----------------------------------------------------------- jit / no jit
@pytest.mark.parametrize("preset", ["official_ddpm", "official_ldm", "paper"])
def test_jit_and_no_jit_agree(gm, preset):
    eps_fn = gm.eps_fn(SCHEDULE)
    x_T, keys = _inputs()
    fn = lambda x, k: iec_jax.sample(eps_fn, x, k, schedule=SCHEDULE, timesteps=TS, eta=0.3,  # noqa: E731
                                     iec=iec_jax.IECConfig.preset(preset))
    x_jit, info_jit = jax.jit(fn)(x_T, keys)
    x_eager, info_eager = fn(x_T, keys)
    chex.assert_trees_all_close(x_jit, x_eager, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(info_jit["corrections"], info_eager["corrections"])
    np.testing.assert_array_equal(info_jit["nfe"], info_eager["nfe"])


# -------------------------------------------------------- batch invariance
@pytest.mark.parametrize(
    "cfg",
    [
        # At η = 0.2 every pass draws fresh noise, so the stop quantities are ~0.1: these
        # tolerances make samples stop after different numbers of corrections.
        iec_jax.IECConfig.official_ddpm(convergence="per_sample", tolerance=0.1,
                                        step_sizes=(0.5, 0.5, 0.5)),
        iec_jax.IECConfig.paper(num_corrections=4, convergence="per_sample", tolerance=0.1),
    ],
    ids=["official-test", "paper-test"],
)
@pytest.mark.parametrize("cached", [False, True])
def test_per_sample_mode_is_batch_invariant(gm, cfg, cached):
    eps_fn = gm.eps_fn(SCHEDULE)
    den = oracle.stale_eps_cache(eps_fn, 3) if cached else eps_fn
    x_T, keys = _inputs(n=8, seed=3)
    run = lambda x, k: iec_jax.sample(den, x, k, schedule=SCHEDULE, timesteps=TS, eta=0.2, iec=cfg)  # noqa: E731
    full, info = jax.jit(run)(x_T, keys)
    corr = np.asarray(info["corrections"])
    assert len({tuple(c) for c in corr.T}) > 1, "test needs samples that stop differently"
    for idx in ([5], [0, 1, 2], [7, 3]):
        part, info_p = jax.jit(run)(x_T[np.array(idx)], keys[np.array(idx)])
        np.testing.assert_allclose(part, full[np.array(idx)], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(info_p["corrections"]), corr[:, idx])


def test_a_single_key_means_fold_in_by_batch_position(gm):
    eps_fn = gm.eps_fn(SCHEDULE)
    x_T, _ = _inputs()
    key = jax.random.key(42)
    a, _ = iec_jax.sample(eps_fn, x_T, key, schedule=SCHEDULE, timesteps=TS, eta=1.0)
    b, _ = iec_jax.sample(eps_fn, x_T, iec_jax.per_sample_keys(key, np.arange(8)),
                          schedule=SCHEDULE, timesteps=TS, eta=1.0)
    np.testing.assert_array_equal(a, b)
    raw, _ = iec_jax.sample(eps_fn, x_T, jax.random.PRNGKey(42), schedule=SCHEDULE, timesteps=TS,
                            eta=1.0)
    np.testing.assert_array_equal(raw, a)


def test_initial_noise_depends_only_on_the_sample_index():
    keys = iec_jax.per_sample_keys(jax.random.key(0), np.arange(10))
    x_all, k_all = iec_jax.initial_noise(keys, SHAPE)
    x_part, k_part = iec_jax.initial_noise(iec_jax.per_sample_keys(jax.random.key(0), [7, 2]), SHAPE)
    np.testing.assert_array_equal(x_part, x_all[np.array([7, 2])])
    np.testing.assert_array_equal(jax.random.key_data(k_part), jax.random.key_data(k_all[np.array([7, 2])]))


# --------------------------------------------------------------- solver
def test_many_corrections_reach_the_implicit_fixed_point(gm):
    """With K large and tolerance 0, one corrected step solves
    y = A x_t + B ε(y, t) (the implicit equation) to float32 precision."""
    eps_fn = gm.eps_fn(SCHEDULE)
    x_T, keys = _inputs()
    ts = np.array([600, 500], np.int32)
    cfg = iec_jax.IECConfig.paper(num_corrections=60, tolerance=0.0,
                                  steps="mask", mask=(True, False))
    x0, info = iec_jax.sample(eps_fn, x_T, keys, schedule=SCHEDULE, timesteps=ts, iec=cfg,
                              return_trajectory=True)
    y = info["trajectory"][0]
    c = step_coefficients(SCHEDULE, ts)
    implicit = c["A"][0] * x_T + c["B"][0] * eps_fn(y, jnp.full((8,), 600, jnp.int32))
    np.testing.assert_allclose(y, implicit, atol=2e-6)
    plain = ddim_step(x_T, eps_fn(x_T, jnp.full((8,), 600, jnp.int32)),
                      {k: c[k][0] for k in ("alpha", "alpha_prev", "sigma", "c_dir")})[0]
    assert np.abs(np.asarray(y - plain)).max() > 1e-3  # the fixed point is not the DDIM step
    np.testing.assert_array_equal(info["nfe"], [61, 1])


def test_batch_mode_stops_all_samples_together(gm):
    eps_fn = gm.eps_fn(SCHEDULE)
    x_T, keys = _inputs()
    _, info = iec_jax.sample(eps_fn, x_T, keys, schedule=SCHEDULE, timesteps=TS,
                             iec=iec_jax.IECConfig.official_ddpm(step_sizes=(0.5,) * 3,
                                                                 tolerance=3e-4))
    corr = np.asarray(info["corrections"])
    assert (corr == corr[:, :1]).all()
    assert len(np.unique(corr)) > 1
    resid = np.asarray(info["residual"])
    assert (resid == resid[:, :1]).all()


# ------------------------------------------------------------ selections
def test_step_selections_and_the_cache_intersection(gm):
    eps_fn = gm.eps_fn(SCHEDULE)
    cached = oracle.stale_eps_cache(eps_fn, 10)
    ts = iec_jax.make_timesteps(1000, 100, "uniform")
    x_T, keys = _inputs(n=2)

    def steps(den, **kw):
        _, info = iec_jax.sample(den, x_T, keys, schedule=SCHEDULE, timesteps=ts,
                                 iec=iec_jax.IECConfig.official_ddpm(tolerance=0.0, **kw))
        return np.flatnonzero(np.asarray(info["iec_steps"])), info

    # Without a cache: the paper's ±1/10 and ±1/20 schedules.
    s, _ = steps(eps_fn, steps="head_tail", fraction=0.1)
    np.testing.assert_array_equal(s, list(range(10)) + list(range(90, 100)))
    s, _ = steps(eps_fn, steps="head_tail", fraction=0.05)
    np.testing.assert_array_equal(s, list(range(5)) + list(range(95, 100)))
    s, _ = steps(eps_fn, steps="first", first_k=3)
    np.testing.assert_array_equal(s, [0, 1, 2])
    # With a cache of interval 10: only the full-compute steps get IEC (Table 5's costs:
    # all = 10 extra passes, ±1/10 = 2, ±1/20 = 1).
    s, info = steps(cached, steps="all")
    np.testing.assert_array_equal(s, np.arange(0, 100, 10))
    assert iec_jax.nfe_summary(info)["nfe_full"] == 20
    s, _ = steps(cached, steps="head_tail", fraction=0.1)
    np.testing.assert_array_equal(s, [0, 90])
    s, _ = steps(cached, steps="head_tail", fraction=0.05)
    np.testing.assert_array_equal(s, [0])
    # Corrections on cached steps, when asked for, are cached (partial) evaluations.
    s, info = steps(cached, steps="first", first_k=2, full_compute_only=False)
    np.testing.assert_array_equal(s, [0, 1])
    summary = iec_jax.nfe_summary(info)
    assert summary["nfe_full"] == 10 + 1 and summary["nfe_partial"] == 90 + 1


# ------------------------------------------------------- the mixture itself
@pytest.mark.parametrize("eta", [0.0, 1.0], ids=["DDIM", "DDPM"])
def test_exact_oracle_with_1000_steps_reproduces_the_mixture(eta):
    """DDIM (η = 0) and DDPM (η = 1) on the full grid with the exact ε reproduce the
    mixture: weights within 4 binomial standard errors, means within 4 standard errors,
    covariance entries within 5 standard errors (plus 0.01 of discretization slack)."""
    gm = oracle.GaussianMixture(
        weights=np.array([0.5, 0.3, 0.2]),
        means=np.array([[-1.0, 0.0], [1.0, 0.8], [0.6, -1.0]]),
        covs=np.array([[[0.04, 0.01], [0.01, 0.02]], [[0.02, 0.0], [0.0, 0.05]],
                       [[0.03, -0.012], [-0.012, 0.03]]]),
        event_shape=(2,),
    )
    n = 6000
    ts = iec_jax.make_timesteps(1000, 1000, "uniform")
    x_T, keys = iec_jax.initial_noise(iec_jax.per_sample_keys(jax.random.key(9), np.arange(n)), (2,))
    x0, _ = jax.jit(lambda x, k: iec_jax.sample(gm.eps_fn(SCHEDULE), x, k, schedule=SCHEDULE,
                                                timesteps=ts, eta=eta))(x_T, keys)
    x0 = np.asarray(x0, np.float64)
    comp = np.asarray(gm.responsibilities(x0)).argmax(1)
    for k in range(3):
        p = gm.weights[k]
        members = x0[comp == k]
        assert abs(len(members) / n - p) < 4 * np.sqrt(p * (1 - p) / n)
        cov = gm.covs[k]
        se_mean = np.sqrt(np.diag(cov) / len(members))
        np.testing.assert_array_less(np.abs(members.mean(0) - gm.means[k]), 4 * se_mean + 0.01)
        se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / len(members))
        np.testing.assert_array_less(np.abs(np.cov(members.T) - cov), 5 * se_cov + 0.01 * np.abs(cov).max())


# ----------------------------------------------------- adapters, guidance
def test_x0_and_v_prediction_adapters(gm):
    eps_fn = gm.eps_fn(SCHEDULE)
    ac = jnp.asarray(SCHEDULE.alphas_cumprod, jnp.float32)
    x = jax.random.normal(jax.random.key(1), (5,) + SHAPE)
    t = jnp.array([0, 10, 500, 900, 999], jnp.int32)
    a = ac[t][:, None, None]
    x0_fn = lambda x, t: (x - jnp.sqrt(1 - ac[t][:, None, None]) * eps_fn(x, t)) / jnp.sqrt(ac[t][:, None, None])  # noqa: E731
    v_fn = lambda x, t: (jnp.sqrt(ac[t][:, None, None]) * eps_fn(x, t)  # noqa: E731
                         - jnp.sqrt(1 - ac[t][:, None, None]) * x0_fn(x, t))
    np.testing.assert_allclose(iec_jax.from_x0_prediction(x0_fn, SCHEDULE)(x, t), eps_fn(x, t), atol=2e-4)
    np.testing.assert_allclose(iec_jax.from_v_prediction(v_fn, SCHEDULE)(x, t), eps_fn(x, t), atol=1e-5)
    del a
    # Adapters keep a stateful denoiser's protocol.
    den = iec_jax.from_v_prediction(oracle.stale_eps_cache(v_fn, 2), SCHEDULE)
    assert isinstance(den, iec_jax.Denoiser)
    np.testing.assert_array_equal(den.full_pass_mask(4), [True, False, True, False])


def test_classifier_free_guidance():
    def model_fn(x, t, c):
        return x * c[:, None] + t[:, None].astype(x.dtype)

    x = jnp.ones((3, 2))
    t = jnp.array([1, 2, 3], jnp.int32)
    cond, uncond = jnp.array([2.0, 3.0, 4.0]), jnp.zeros(3)
    guided = iec_jax.classifier_free_guidance(model_fn, cond, uncond, scale=1.5)
    e_u, e_c = model_fn(x, t, uncond), model_fn(x, t, cond)
    np.testing.assert_allclose(guided(x, t), e_u + 1.5 * (e_c - e_u))
    with pytest.raises(ValueError, match="cond must have batch size 3"):
        iec_jax.classifier_free_guidance(model_fn, cond[:2], uncond, 1.5)(x, t)


# ------------------------------------------------------------- bad input
def test_bad_input_fails_early_naming_the_field(gm):
    eps_fn = gm.eps_fn(SCHEDULE)
    x_T, keys = _inputs()
    kw = dict(schedule=SCHEDULE, timesteps=TS)
    with pytest.raises(ValueError, match="unknown IEC preset 'fast'"):
        iec_jax.IECConfig.preset("fast")
    with pytest.raises(ValueError, match="IECConfig.tolerance must be >= 0"):
        iec_jax.IECConfig.official_ddpm(tolerance=-1e-3)
    with pytest.raises(ValueError, match="IECConfig.step_sizes"):
        iec_jax.IECConfig(step_sizes=(0.5, -1.0))
    with pytest.raises(ValueError, match="IECConfig.steps"):
        iec_jax.IECConfig(steps="middle")
    with pytest.raises(ValueError, match="IECConfig.convergence"):
        iec_jax.IECConfig(convergence="sample")
    with pytest.raises(ValueError, match="IECConfig.mask"):
        iec_jax.IECConfig(mask=(True,))
    with pytest.raises(ValueError, match="IECConfig.mask has 3 entries for 50"):
        iec_jax.sample(eps_fn, x_T, keys, iec=iec_jax.IECConfig(steps="mask", mask=(1, 0, 1)), **kw)
    with pytest.raises(ValueError, match=r"unknown IEC config field\(s\) \['tol'\]"):
        iec_jax.IECConfig.from_config({"preset": "paper", "tol": 1e-3})
    with pytest.raises(ValueError, match="eta must be >= 0"):
        iec_jax.sample(eps_fn, x_T, keys, eta=-0.1, **kw)
    with pytest.raises(ValueError, match="key is required"):
        iec_jax.sample(eps_fn, x_T, None, eta=0.5, **kw)
    with pytest.raises(ValueError, match=r"key must be one key or one key per sample \(shape \(8,\)\)"):
        iec_jax.sample(eps_fn, x_T, keys[:3], eta=0.5, **kw)
    with pytest.raises(ValueError, match="timesteps must lie in"):
        iec_jax.sample(eps_fn, x_T, keys, schedule=SCHEDULE, timesteps=[1000, 500])
    with pytest.raises(ValueError, match="non-increasing"):
        iec_jax.sample(eps_fn, x_T, keys, schedule=SCHEDULE, timesteps=[10, 500])
    with pytest.raises(ValueError, match="x_T must have shape"):
        iec_jax.sample(eps_fn, jnp.ones(4), keys, **kw)
    with pytest.raises(ValueError, match=r"eps_fn returned shape \(8, 6\)"):
        iec_jax.sample(lambda x, t: x.reshape(8, 6), x_T, keys, **kw)
    with pytest.raises(TypeError, match="timesteps must be concrete"):
        jax.jit(lambda ts: iec_jax.sample(eps_fn, x_T, keys, schedule=SCHEDULE, timesteps=ts))(TS)
    with pytest.raises(ValueError, match="num_steps=101 is more steps than the schedule has"):
        iec_jax.make_timesteps(100, 101)


def test_from_config_overrides_presets():
    cfg = iec_jax.IECConfig.from_config({"preset": "official_ldm", "steps": "first", "first_k": 3})
    assert cfg.step_sizes == (1.0, 0.5) and cfg.steps == "first" and cfg.first_k == 3
    assert iec_jax.IECConfig.from_config({"preset": "none"}) is None
    cfg = iec_jax.IECConfig.from_config({"preset": "paper", "num_corrections": 3, "step_size": 0.3})
    assert cfg.step_sizes == (0.3, 0.3, 0.3) and cfg.tolerance_check == "after_update"
    assert dataclasses.replace(cfg, tolerance=0.1).tolerance == 0.1
    hash(cfg)  # static data for jit


def test_stateful_denoiser_passes_an_inner_all_full_mask_through():
    """A wrapper whose ``full_pass`` is an inner denoiser's ``full_pass_mask`` returning
    None (every step full) samples like the plain function (the conditional latent model
    at guidance scale 1.0 is built so)."""
    schedule = iec_jax.NoiseSchedule.linear(1e-4, 0.02, 1000)
    ts = iec_jax.make_timesteps(1000, 5)
    inner = iec_jax.as_denoiser(lambda x, t: 0.1 * x)
    wrapped = iec_jax.StatefulDenoiser(inner, inner.init_state, inner.select_state, inner.full_pass_mask)
    assert wrapped.full_pass_mask(5) is None
    x_T = jnp.ones((2, 4, 4, 1))
    keys = jax.random.split(jax.random.key(0), 2)
    a, _ = iec_jax.sample(inner, x_T, keys, schedule=schedule, timesteps=ts)
    b, _ = iec_jax.sample(wrapped, x_T, keys, schedule=schedule, timesteps=ts)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
