"""DeepCache / CacheQuant caching: schedules, DPS, cache-DEC, the cached denoiser with
IEC, calibration data and artifacts (iec_jax.efficient.cache / .calibration)."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import iec_jax
from iec_jax.efficient import cache as C
from iec_jax.efficient import calibration as K
from iec_jax.models.unet import CachePoint, UNet, UNetConfig, cached_feature_shape
from iec_jax.sampling import ddim_step, step_coefficients

# Two levels with attention on both paths; cache point = input of the outer up block's
# first resnet (needs conv_in and down_blocks[0].resnets[0] in the partial pass).
CFG = UNetConfig(
    sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
    norm_num_groups=4, dropout=0.0, time_embedding_dim=16, freq_shift=1,
)
CP = CachePoint(1, 0)
SHAPE = (8, 8, 1)
S = 10
SCHEDULE = iec_jax.NoiseSchedule.linear()
TS = iec_jax.make_timesteps(1000, S, "uniform")
UNET = UNet(CFG)
FEAT_C = cached_feature_shape(CFG, CP, (1,) + SHAPE)[-1]


@pytest.fixture(scope="module")
def params():
    # Random parameters without compiling Flax's init (eval_shape + NumPy draws).
    abstract = jax.eval_shape(UNET.init_params, jax.random.key(0))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        if path[-1].key == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 100
        return jnp.asarray(rng.normal(0, fan_in**-0.5, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _x_T(n, seed=0):
    return iec_jax.initial_noise(iec_jax.per_sample_keys(jax.random.key(seed), np.arange(n)), SHAPE)[0]


_SAMPLERS = {}


def _sample(params, x_T, full=None, dec=None, iec=None):
    """Jitted sampling with params (and DEC) as arguments, cached if ``full`` is given.
    Compiled once per (schedule, DEC or not, IEC, batch) to keep the file fast."""
    key = (None if full is None else tuple(full), dec is None, iec)
    if key not in _SAMPLERS:

        def run(p, x, d):
            if full is None:
                den = lambda x, t: UNET.apply({"params": p}, x, t)  # noqa: E731
            else:
                den = C.cached_denoiser(C.float_unet_fn(UNET, p), full_steps=full, cache_point=CP, dec=d)
            return iec_jax.sample(den, x, None, schedule=SCHEDULE, timesteps=TS, iec=iec, return_trajectory=True)

        _SAMPLERS[key] = jax.jit(run)
    return _SAMPLERS[key](params, x_T, dec)


@jax.jit
def _full(p, x, t):
    return UNET.apply({"params": p}, x, jnp.full(x.shape[:1], t, jnp.int32), cache_point=CP, return_feature=True)


@jax.jit
def _partial(p, x, t, f):
    return UNET.apply({"params": p}, x, jnp.full(x.shape[:1], t, jnp.int32), cache_point=CP, cached_feature=f)


def _random_dec(seed=1):
    rng = np.random.default_rng(seed)
    return C.CacheDEC(rng.uniform(0.5, 1.5, (S, FEAT_C)).astype(np.float32),
                      rng.normal(0, 0.3, (S, FEAT_C)).astype(np.float32))


def _reference(params, x_T, full, dec=None, step_size=None, keep_first=False):
    """Plain-Python DeepCache loop (+ one IEC correction at full steps, no stop test)."""
    coefs = step_coefficients(SCHEDULE, TS)
    x, cache = x_T, None
    for i in range(S):
        coef = {k: jnp.float32(coefs[k][i]) for k in ("alpha", "alpha_prev", "sigma", "c_dir")}
        t = int(coefs["t"][i])
        if full[i]:
            eps, cache = _full(params, x, t)
            y, _ = ddim_step(x, eps, coef)
            if step_size is not None:
                eps1, f1 = _full(params, y, t)
                y = y + step_size * (ddim_step(x, eps1, coef)[0] - y)
                cache = cache if keep_first else f1
        else:
            h = cache if dec is None else jnp.asarray(dec.a[i]) * cache + jnp.asarray(dec.b[i])
            y, _ = ddim_step(x, _partial(params, x, t, h), coef)
        x = y
    return x


# ------------------------------------------------------------------ the denoiser
def test_refresh_every_step_equals_the_no_cache_sampler(params):
    x_T = _x_T(3)
    plain, _ = _sample(params, x_T)
    cached, info = _sample(params, x_T, full=C.uniform_schedule(S, 1))
    # Measured bitwise equal on XLA:CPU (the lax.cond branch computes the same ops).
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(plain))
    assert np.asarray(info["full_pass"]).all()


def test_identity_dec_is_a_no_op(params):
    x_T, full = _x_T(3), C.uniform_schedule(S, 3)
    a, _ = _sample(params, x_T, full=full)
    b, _ = _sample(params, x_T, full=full, dec=C.identity_dec(S, FEAT_C))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_schedule_passes_and_partial_pass_on_the_stored_feature(params):
    x_T, full, dec = _x_T(3), C.uniform_schedule(S, 3), _random_dec()
    x0, info = _sample(params, x_T, full=full, dec=dec)
    np.testing.assert_array_equal(np.asarray(info["full_pass"]), full)
    assert iec_jax.nfe_summary(info) == dict(nfe=10, nfe_full=4, nfe_partial=6, corrections_per_sample=0.0)
    # Step 4 reuses the feature of step 3, corrected with DEC row 4 (indexed by step).
    xs = np.concatenate([np.asarray(x_T)[None], np.asarray(info["trajectory"])])
    _, f3 = _full(params, xs[3], int(TS[3]))
    den = C.cached_denoiser(C.float_unet_fn(UNET, params), full_steps=full, cache_point=CP, dec=dec)
    t4 = jnp.full((3,), TS[4], jnp.int32)
    eps, state = jax.jit(den.__call__, static_argnums=2)(xs[4], t4, 4, f3)
    direct = _partial(params, xs[4], int(TS[4]), dec.a[4] * f3 + dec.b[4])
    np.testing.assert_allclose(eps, direct, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(state, f3)
    np.testing.assert_allclose(x0, _reference(params, x_T, full, dec), rtol=1e-5, atol=1e-5)
    # The stateful protocol pieces.
    assert den.init_state(jnp.zeros((2,) + SHAPE)).shape == (2, 8, 8, FEAT_C)
    keep = jnp.array([True, False])
    new, old = jnp.ones((2, 8, 8, FEAT_C)), jnp.zeros((2, 8, 8, FEAT_C))
    np.testing.assert_array_equal(den.select_state(keep, new, old)[:, 0, 0, 0], [1, 0])
    with pytest.raises(ValueError, match="steps"):
        den.full_pass_mask(S + 1)


@pytest.mark.parametrize("keep_first", [False, True])
def test_iec_at_full_steps_overwrites_the_cache(params, keep_first):
    x_T, full, dec = _x_T(3), C.uniform_schedule(S, 4), _random_dec()
    cfg = iec_jax.IECConfig.official_ddpm(steps="full_compute", tolerance=0.0, keep_first_pass_state=keep_first)
    x0, info = _sample(params, x_T, full=full, dec=dec, iec=cfg)
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(info["iec_steps"])), [0, 4, 8])
    summary = iec_jax.nfe_summary(info)
    assert (summary["nfe_full"], summary["nfe_partial"]) == (6, 7)
    ref = _reference(params, x_T, full, dec, step_size=0.5, keep_first=keep_first)
    other = _reference(params, x_T, full, dec, step_size=0.5, keep_first=not keep_first)
    np.testing.assert_allclose(x0, ref, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(other) - np.asarray(ref)).max() > 1e-3  # the choice matters


def test_per_sample_convergence_with_the_cache_is_batch_invariant(params):
    x_T, full = _x_T(3, seed=5), C.uniform_schedule(S, 3)
    cfg = iec_jax.IECConfig.official_ddpm(steps="full_compute", convergence="per_sample",
                                          step_sizes=(0.5, 0.5, 0.5), tolerance=0.14)
    # Step 0's first relative residuals are 0.114, 0.228, 0.158: sample 0 stops at once.
    x3, info3 = _sample(params, x_T, full=full, iec=cfg)
    corr = np.asarray(info3["corrections"])
    assert len({tuple(c) for c in corr.T}) > 1, "test needs samples that stop differently"
    x1, info1 = _sample(params, x_T[:1], full=full, iec=cfg)
    np.testing.assert_allclose(x1, x3[:1], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(info1["corrections"]), corr[:, :1])


def test_bad_schedules_and_dec_fail_early(params):
    fn = C.float_unet_fn(UNET, params)
    with pytest.raises(ValueError, match="step 0"):
        C.cached_denoiser(fn, full_steps=np.arange(S) == 1, cache_point=CP)
    with pytest.raises(ValueError, match="dec"):
        C.cached_denoiser(fn, full_steps=C.uniform_schedule(S, 2), cache_point=CP, dec=C.identity_dec(S - 1, FEAT_C))


# -------------------------------------------------------------------- schedules
def test_uniform_and_nonuniform_schedules():
    np.testing.assert_array_equal(C.schedule_steps(C.uniform_schedule(10, 3)), [0, 3, 6, 9])
    np.testing.assert_array_equal(C.schedule_steps(C.uniform_schedule(100, 10)), np.arange(0, 100, 10))
    assert C.uniform_schedule(7, 1).all()
    # By hand, center 0: 50 (k/10)^1.2 = 0, 3.15, 7.25, 11.8, 16.7, 21.8, 27.1, 32.6, 38.3, 44.1, 50;
    # int, unique, drop the smallest and largest, prepend 0.
    assert C.nonuniform_steps(50, 5, center=0, pow=1.2) == ([0, 3, 7, 11, 16, 21, 27, 32, 38, 44], 1.2)
    # By hand, pow backs off: at 1.6, 10 (k/5)^1.6 -> 0, 0.76, 2.3, 4.4, 7.0, 10 gives 4 steps;
    # first success at 1.42: 0, 1.02, 2.7, 4.8, 7.3, 10 -> [0, 1, 2, 4, 7].
    steps, p = C.nonuniform_steps(10, 2, center=0, pow=1.6)
    assert steps == [0, 1, 2, 4, 7] and p == pytest.approx(1.42)
    # center > 0 (complex principal root below the center), values of DeepCache's
    # sample_from_quad_center run on NumPy 2: steps crowd around the center.
    assert C.nonuniform_steps(50, 5, center=15, pow=1.4)[0] == [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]
    assert C.nonuniform_steps(100, 10, center=50, pow=1.4)[0] == [0, 12, 22, 32, 41, 50, 59, 68, 78, 88]
    np.testing.assert_array_equal(C.schedule_steps(C.nonuniform_schedule(50, 5, 15, 1.4)),
                                  [0, 5, 9, 13, 17, 21, 26, 31, 37, 43])
    assert C.nonuniform_steps(6, 1, center=0)[0] == list(range(6))


def _brute_force_dps(f, interval):
    S = len(f)
    k, lo, hi = math.ceil(S / interval), math.ceil(interval / 2), 2 * interval
    best = None
    for lengths in itertools.product(range(lo, hi + 1), repeat=k):
        if sum(lengths) != S:
            continue
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        cost = sum(np.abs(f[s:s + n] - f[s]).sum() for s, n in zip(starts, lengths))
        if best is None or cost < best[0]:
            best = (cost, tuple(starts))
    return best


@pytest.mark.parametrize("S_, N_", [(9, 3), (10, 4), (11, 3), (8, 2), (12, 5)])
def test_dps_equals_brute_force(S_, N_):
    f = np.random.default_rng(S_ * N_).normal(size=(S_, 3, 2)).cumsum(0).astype(np.float32)
    cost, starts = _brute_force_dps(f, N_)
    np.testing.assert_array_equal(C.schedule_steps(C.dps_schedule(f, N_)), starts)


def test_dps_hand_examples():
    # Two plateaus: the split at the jump costs nothing.
    np.testing.assert_array_equal(C.schedule_steps(C.dps_schedule(np.array([0, 0, 5, 5.0]), 2)), [0, 2])
    # Constant features: ties go to the earliest split point at every stage (torch.min):
    # K = 3 groups of length [2, 8] -> [0, 2, 4].
    np.testing.assert_array_equal(C.schedule_steps(C.dps_schedule(np.zeros((10, 2)), 4)), [0, 2, 4])
    with pytest.raises(ValueError, match="cannot split"):
        C.dps_schedule(np.zeros((3, 1)), 7)


# ---------------------------------------------------------------------- cache-DEC
def test_fit_cache_dec_recovers_an_affine_map():
    rng = np.random.default_rng(0)
    full = C.uniform_schedule(6, 3)
    a_true, b_true = rng.uniform(0.5, 2, (6, 4)), rng.normal(size=(6, 4))
    base = rng.normal(size=(6, 5, 3, 3, 4))
    true = base.copy()
    src = C.last_full_index(full)
    for i in np.flatnonzero(~full):
        true[i] = a_true[i] * base[src[i]] + b_true[i]
    for cached in (None, base[src]):  # explicit caches, or the last full step's feature
        dec = C.fit_cache_dec(true, cached, full, ddof=0)
        np.testing.assert_allclose(dec.a[~full], a_true[~full], rtol=1e-5)
        np.testing.assert_allclose(dec.b[~full], b_true[~full], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(dec.a[full], 1)
        np.testing.assert_array_equal(dec.b[full], 0)
    # The official reduction: population covariance over the unbiased torch.var.
    n = 5 * 3 * 3
    official = C.fit_cache_dec(true, None, full)
    np.testing.assert_allclose(official.a[~full], a_true[~full] * (n - 1) / n, rtol=1e-5)
    const = true.copy()
    const[0, ..., 0] = 2.0  # zero-variance channel: a = 1, b = mean_Y - mean_X
    dec = C.fit_cache_dec(const, None, full)
    assert dec.a[1, 0] == 1 and np.isclose(dec.b[1, 0], const[1, ..., 0].mean() - 2.0)


@pytest.fixture(scope="module")
def traj(params):
    return K.fp_trajectories(functools.partial(C.float_unet_fn, UNET), 5, 3, 11, SCHEDULE, TS, SHAPE, CP, params=params)


def test_fp_trajectories_match_the_sampler(params, traj):
    # 5 samples in batches of 3 (the last one padded): sample i depends only on (seed, i).
    assert traj["x"].shape == (S, 5) + SHAPE and traj["feature"].shape == (S, 5, 8, 8, FEAT_C)
    np.testing.assert_array_equal(traj["t"], TS)
    np.testing.assert_array_equal(traj["indices"], np.arange(5))
    x_T = iec_jax.initial_noise(iec_jax.per_sample_keys(jax.random.key(11), np.arange(5)), SHAPE)[0]
    np.testing.assert_array_equal(traj["x"][0], x_T)
    for idx in (np.arange(3), np.array([2, 3, 4])):
        x0, info = _sample(params, x_T[idx])
        np.testing.assert_allclose(traj["x"][1:, idx], np.asarray(info["trajectory"])[:-1], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(traj["x0"][idx], x0, rtol=1e-6, atol=1e-6)
    _, f5 = _full(params, traj["x"][5, :3], int(TS[5]))
    np.testing.assert_allclose(traj["feature"][5, :3], f5, rtol=1e-6, atol=1e-6)


def test_cache_dec_reduces_the_error_on_real_trajectories(traj):
    full = C.uniform_schedule(S, 4)
    src = C.last_full_index(full)
    dec = C.fit_cache_dec(traj["feature"], None, full)
    f, stale = traj["feature"], traj["feature"][src]
    corrected = dec.a[:, None, None, None] * stale + dec.b[:, None, None, None]
    for i in np.flatnonzero(~full):
        before, after = np.square(f[i] - stale[i]).sum(), np.square(f[i] - corrected[i]).sum()
        assert after < before, i


# -------------------------------------------------------------------- calibration
def test_calibration_set_counts_determinism_and_caches():
    rng = np.random.default_rng(0)
    N = 80
    traj = dict(x=rng.normal(size=(S, N, 2, 2, 1)), t=TS, feature=rng.normal(size=(S, N, 1, 1, 3)).astype(np.float32))
    full = C.uniform_schedule(S, 4)
    dec = C.CacheDEC(rng.uniform(size=(S, 3)).astype(np.float32), rng.normal(size=(S, 3)).astype(np.float32))
    calib = K.calibration_set(traj, full, seed=3)
    again = K.calibration_set(traj, full, seed=3, dec=dec)
    other = K.calibration_set(traj, full, seed=4)
    assert [len(c.x) for c in calib] == [64 if f else 32 for f in full]
    for c, d, o in zip(calib, again, other):
        np.testing.assert_array_equal(c.indices, d.indices)
        np.testing.assert_array_equal(c.x, traj["x"][c.step][c.indices])
        np.testing.assert_array_equal(c.t, np.full(len(c.x), TS[c.step]))
        if full[c.step]:
            assert c.cached_feature is None and d.cached_feature is None
        else:
            last = C.last_full_index(full)[c.step]
            np.testing.assert_array_equal(c.cached_feature, traj["feature"][last][c.indices])
            np.testing.assert_allclose(d.cached_feature, dec.a[c.step] * c.cached_feature + dec.b[c.step], rtol=1e-6)
    assert any(not np.array_equal(c.indices, o.indices) for c, o in zip(calib, other))
    small = K.calibration_set({k: (v[:, :10] if k != "t" else v) for k, v in traj.items()}, full, seed=0)
    assert [len(c.x) for c in small] == [10] * S


def test_artifacts_round_trip_and_refuse_other_settings(tmp_path):
    key = K.artifact_key("fmnist-ddpm", 100, 10, "uniform", 8, 8)
    assert key == "fmnist-ddpm_S100_N10_uniform_W8A8"
    assert K.artifact_key("org/model", 50, 5, "dps") == "org-model_S50_N5_dps"
    with pytest.raises(ValueError, match="both"):
        K.artifact_key("m", 10, 2, "uniform", weight_bits=8)
    full, dec = C.uniform_schedule(S, 3), _random_dec()
    meta = dict(key=key, num_steps=S, interval=3, schedule="uniform", cache_point=list(CP))
    path = tmp_path / f"{key}.npz"
    K.save_cache_artifacts(path, full, dec, meta)
    full2, dec2, meta2 = K.load_cache_artifacts(path, dict(interval=3, cache_point=(1, 0)))
    np.testing.assert_array_equal(full2, full)
    np.testing.assert_array_equal(dec2.a, dec.a)
    np.testing.assert_array_equal(dec2.b, dec.b)
    assert meta2 == meta
    with pytest.raises(ValueError, match="interval: stored 3, expected 5"):
        K.load_cache_artifacts(path, dict(interval=5))
    with pytest.raises(ValueError, match="missing"):
        K.load_cache_artifacts(path, dict(weight_bits=8))
    K.save_cache_artifacts(tmp_path / "nodec.npz", full, None, meta)
    assert K.load_cache_artifacts(tmp_path / "nodec.npz", meta)[1] is None


def test_make_schedule_by_name():
    np.testing.assert_array_equal(C.make_schedule("uniform", 10, 3), C.uniform_schedule(10, 3))
    np.testing.assert_array_equal(C.make_schedule("nonuniform", 50, 5, center=15, pow=1.4),
                                  C.nonuniform_schedule(50, 5, 15, 1.4))
    f = np.random.default_rng(0).normal(size=(9, 2)).cumsum(0)
    np.testing.assert_array_equal(C.make_schedule("dps", 9, 3, features=f), C.dps_schedule(f, 3))
    for kind, kw in (("nonuniform", {}), ("dps", {}), ("quad", {})):
        with pytest.raises(ValueError):
            C.make_schedule(kind, 9, 3, **kw)
