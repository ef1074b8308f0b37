"""FID statistics, the Fréchet distance, Inception Score and precision/recall.

Each metric is checked against an independent computation: closed forms for the Fréchet
distance, NumPy brute force for the k-NN manifolds, the textbook formula for the IS.
No network here (see test_inception.py).
"""

import warnings

import numpy as np
import pytest

from iec_jax import metrics
from iec_jax.metrics import fid as fid_lib


# ------------------------------------------------------------ Fréchet distance
def _random_rotation(d, rng):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def test_frechet_distance_closed_form_for_commuting_covariances():
    # S1 = Q diag(a) Qᵀ, S2 = Q diag(b) Qᵀ commute: tr sqrt(S1 S2) = Σ sqrt(a_i b_i), so
    # the distance is |mu1 - mu2|² + Σ (sqrt(a_i) - sqrt(b_i))².
    rng = np.random.default_rng(0)
    d = 12
    q = _random_rotation(d, rng)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = metrics.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    # Diagonal covariances, and the 1-D case (scalars are promoted as in the evaluator).
    np.testing.assert_allclose(
        metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), want, rtol=1e-12
    )
    np.testing.assert_allclose(metrics.frechet_distance(1.0, 4.0, 3.0, 9.0), 4.0 + 1.0)
    assert metrics.frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-10)


def test_frechet_distance_eps_and_imaginary_handling(monkeypatch):
    calls = []
    real_sqrtm = fid_lib._sqrtm

    def first_call_not_finite(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(fid_lib, "_sqrtm", first_call_not_finite)
    s1, s2 = np.diag([1.0, 4.0]), np.diag([9.0, 16.0])
    with pytest.warns(UserWarning, match="adding 0.5 to diagonal"):
        got = metrics.frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=0.5)
    np.testing.assert_allclose(calls[1], (s1 + 0.5 * np.eye(2)) @ (s2 + 0.5 * np.eye(2)))
    want = 1 + 4 + 9 + 16 - 2 * (np.sqrt(1.5 * 9.5) + np.sqrt(4.5 * 16.5))
    np.testing.assert_allclose(got, want, rtol=1e-12)

    monkeypatch.setattr(fid_lib, "_sqrtm", lambda m: np.eye(2) * (1 + 1e-2j))
    with pytest.raises(ValueError, match="Imaginary component"):
        metrics.frechet_distance(np.zeros(2), s1, np.zeros(2), s2)
    monkeypatch.setattr(fid_lib, "_sqrtm", lambda m: np.eye(2) * (3 + 1e-4j))
    assert metrics.frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(30 - 12)


def test_frechet_distance_of_singular_sample_covariances_is_finite():
    # Fewer samples than dimensions, as in small FID runs: rank-deficient covariances.
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((20, 50)), rng.standard_normal((20, 50)) + 0.5
    sx, sy = metrics.FeatureStats.from_features(x), metrics.FeatureStats.from_features(y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sqrtm's singular-matrix warning stays silent
        value = sx.frechet_distance(sy)
    assert np.isfinite(value) and value > 0


@pytest.mark.parametrize("n", [200, 30])  # full-rank and singular (n < d) covariances
def test_frechet_distance_methods_agree(n):
    rng = np.random.default_rng(n)
    d = 64
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    y = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 0.3
    sx, sy = metrics.FeatureStats.from_features(x), metrics.FeatureStats.from_features(y)
    evaluator = sx.frechet_distance(sy)
    # sqrtm of a singular product is the less accurate of the two (~1e-8 relative here).
    np.testing.assert_allclose(sx.frechet_distance(sy, method="eigh"), evaluator, rtol=1e-6)
    with pytest.raises(ValueError, match="method"):
        sx.frechet_distance(sy, method="svd")


@pytest.mark.parametrize("n", [12, 64])  # fewer samples than dimensions (Gram form), more
def test_resampled_frechet_equals_recomputed_statistics(n):
    rng = np.random.default_rng(3)
    d = 24
    mix = rng.normal(size=(d, d))
    ref = metrics.FeatureStats.from_features(rng.normal(size=(200, d)) @ mix + 1.0)
    feats = rng.normal(size=(n, d)) @ (0.5 * mix) + rng.normal(size=d)
    resampled = metrics.ResampledFrechet(feats, ref)
    for k in range(4):
        idx = rng.integers(0, n, n if k else 5)  # repeats; a short resample too
        direct = metrics.FeatureStats.from_features(feats[idx])
        want = direct.frechet_distance(ref, method="sqrtm")
        assert resampled(idx) == pytest.approx(want, rel=1e-7)
        assert resampled(idx) == pytest.approx(direct.frechet_distance(ref, method="eigh"), rel=1e-7)
    with pytest.raises(ValueError, match="length >= 2"):
        resampled(np.array([0]))
    with pytest.raises(ValueError, match="dimension"):
        metrics.ResampledFrechet(feats[:, :3], ref)


def test_fid_infinity_removes_the_finite_sample_bias():
    """Gaussian oracle: features drawn from N(mu, S) against exact reference statistics,
    whose Fréchet distance is known in closed form. FID of n samples is biased upwards
    (~k/n); the 1/N extrapolation is not."""
    d, n = 32, 4000
    rng = np.random.default_rng(0)
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    b = a + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d)
    s_ref, s1 = a @ a.T + 0.5 * np.eye(d), b @ b.T + 0.5 * np.eye(d)
    mu1 = 0.2 * rng.normal(size=d)
    ref = metrics.FeatureStats(None, np.zeros(d), s_ref)  # exact: no estimation error
    truth = metrics.frechet_distance(mu1, s1, np.zeros(d), s_ref)
    finite, extrapolated, below = [], [], []
    for seed in range(20):
        x = np.random.default_rng(100 + seed).normal(size=(n, d)) @ np.linalg.cholesky(s1).T + mu1
        finite.append(metrics.FeatureStats.from_features(x).frechet_distance(ref, method="eigh"))
        fit = metrics.fid_infinity(x, ref, seed=seed)
        assert fit.sizes[0] == n // 4 and fit.sizes[-1] == n and len(fit.sizes) == 15
        # The last subset is the whole set: its FID is the plain one.
        assert fit.fids[-1] == pytest.approx(finite[-1], rel=1e-9)
        assert fit.at(n) == pytest.approx(fit.fid + fit.slope / n)
        extrapolated.append(fit.fid)
        # The same line through subsets smaller than the dimension (which fid_infinity
        # refuses): the covariance is singular there and FID is not linear in 1/N.
        small = metrics.ResampledFrechet(x[:30], ref)
        sizes = np.array([8, 12, 16, 20, 25, 30])
        perm = np.random.default_rng(seed).permutation(30)
        below.append(np.polyfit(1.0 / sizes, [small(perm[:m]) for m in sizes], 1)[1])
    bias, bias_inf = np.mean(finite) - truth, np.mean(extrapolated) - truth
    bias_below = np.mean(below) - truth
    se = [np.std(v, ddof=1) / np.sqrt(len(v)) for v in (finite, extrapolated, below)]
    print(f"\nGaussian oracle, d = {d}, true distance {truth:.3f}: bias of FID at n = {n}"
          f" {bias:+.3f} (standard error {se[0]:.3f}), of FID∞ {bias_inf:+.3f} ({se[1]:.3f});"
          f" of the same extrapolation from 8-30 samples {bias_below:+.3f} ({se[2]:.3f};"
          " 20 seeds)")
    assert bias > 0.05  # ~0.09: the finite-sample bias (standard error ~0.015)
    assert abs(bias_inf) < 0.04 and abs(bias_inf) < bias / 2
    assert bias_below > 1.0  # far off: why fid_infinity refuses sizes <= the dimension


def test_fid_infinity_input_errors():
    ref = metrics.FeatureStats(None, np.zeros(8), np.eye(8))
    x = np.random.default_rng(0).normal(size=(40, 8))
    with pytest.raises(ValueError, match="needs n > 32"):  # default n/4..n: 8 is not > dim 8
        metrics.fid_infinity(x[:32], ref)
    with pytest.raises(ValueError, match=r"must lie in \(8, 40\]"):
        metrics.fid_infinity(x, ref, sizes=[8, 20, 40])
    with pytest.raises(ValueError, match=r"must lie in"):
        metrics.fid_infinity(x, ref, sizes=[10, 20, 41])
    with pytest.raises(ValueError, match="3 distinct"):
        metrics.fid_infinity(x, ref, sizes=[20, 20, 40])
    with pytest.raises(ValueError, match="num_points"):
        metrics.fid_infinity(x, ref, num_points=2)
    fit = metrics.fid_infinity(x, ref, sizes=[12, 20, 40], seed=1)
    assert fit.sizes == (12, 20, 40) and len(fit.fids) == 3


def test_frechet_distance_shape_errors():
    with pytest.raises(ValueError, match="different lengths"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="covariances must be"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))


# --------------------------------------------------------- streaming statistics
def _features(n=257, d=16, seed=0):
    rng = np.random.default_rng(seed)
    # A large common offset makes naive sum-of-squares accumulation lose digits.
    return (rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 1e3).astype(np.float32)


def test_streaming_statistics_equal_batch_statistics():
    x = _features()
    stats = metrics.FeatureStats.empty(x.shape[1])
    for lo, hi in [(0, 1), (1, 2), (2, 64), (64, 65), (65, 200), (200, 257)]:
        stats = stats.update(x[lo:hi])
    x64 = x.astype(np.float64)
    assert stats.num == len(x)
    np.testing.assert_allclose(stats.mu, x64.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(stats.sigma, np.cov(x64, rowvar=False), rtol=1e-9, atol=1e-9)
    whole = metrics.FeatureStats.from_features(x)
    np.testing.assert_allclose(stats.sigma, whole.sigma, rtol=1e-9, atol=1e-9)


def test_merge():
    x = _features(n=100)
    parts = [metrics.FeatureStats.from_features(x[a:b]) for a, b in [(0, 30), (30, 31), (31, 100)]]
    whole = metrics.FeatureStats.from_features(x)
    left = parts[0].merge(parts[1]).merge(parts[2])
    right = parts[0].merge(parts[1].merge(parts[2]))
    for merged in (left, right, parts[2].merge(parts[0]).merge(parts[1])):
        assert merged.num == 100
        np.testing.assert_allclose(merged.mu, whole.mu, rtol=1e-13)
        np.testing.assert_allclose(merged.sigma, whole.sigma, rtol=1e-9, atol=1e-9)
    empty = metrics.FeatureStats.empty(x.shape[1])
    assert empty.merge(whole) is whole and whole.merge(empty) is whole
    with pytest.raises(ValueError, match="dim"):
        whole.merge(metrics.FeatureStats.empty(3))


def test_statistics_npz_round_trip(tmp_path):
    x, y = _features(n=40, d=8), _features(n=40, d=5, seed=1)
    pool, spatial = metrics.FeatureStats.from_features(x), metrics.FeatureStats.from_features(y)
    pool.save(tmp_path / "pool.npz")
    back = metrics.FeatureStats.load(tmp_path / "pool.npz")
    assert back.num == 40
    np.testing.assert_array_equal(back.mu, pool.mu)
    np.testing.assert_array_equal(back.sigma, pool.sigma)
    # Saved statistics stay mergeable: the count travels with them.
    more = back.update(x)
    np.testing.assert_allclose(
        more.sigma, metrics.FeatureStats.from_features(np.concatenate([x, x])).sigma, rtol=1e-9
    )

    metrics.save_statistics(tmp_path / "ref.npz", pool, spatial)
    with np.load(tmp_path / "ref.npz") as data:
        assert sorted(data.files) == ["mu", "mu_s", "num", "num_s", "sigma", "sigma_s"]
    p2, s2 = metrics.load_statistics(tmp_path / "ref.npz")
    np.testing.assert_array_equal(s2.sigma, spatial.sigma)
    assert p2.num == 40 and s2.num == 40
    assert sorted(f.name for f in tmp_path.iterdir()) == ["pool.npz", "ref.npz"]  # no debris


def test_reference_statistics_without_counts(tmp_path):
    # guided-diffusion's reference batches hold mu/sigma/mu_s/sigma_s and no counts.
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "adm.npz", mu=rng.standard_normal(4), sigma=np.eye(4),
             mu_s=np.zeros(3), sigma_s=2 * np.eye(3))
    pool, spatial = metrics.load_statistics(tmp_path / "adm.npz")
    assert pool.num is None and spatial.num is None
    other = metrics.FeatureStats.from_features(rng.standard_normal((50, 4)))
    assert np.isfinite(other.frechet_distance(pool))
    with pytest.raises(ValueError, match="without a count"):
        pool.merge(other)
    np.savez(tmp_path / "pool_only.npz", mu=np.zeros(4), sigma=np.eye(4))
    assert metrics.load_statistics(tmp_path / "pool_only.npz")[1] is None
    np.savez(tmp_path / "nothing.npz", arr_0=np.zeros(3))
    with pytest.raises(KeyError, match="mu"):
        metrics.load_statistics(tmp_path / "nothing.npz")


def test_statistics_input_errors():
    with pytest.raises(ValueError, match="2-D"):
        metrics.FeatureStats.from_features(np.zeros(5))
    with pytest.raises(TypeError, match="floating"):
        metrics.FeatureStats.from_features(np.zeros((5, 2), np.uint8))
    one = metrics.FeatureStats.from_features(np.ones((1, 3)))
    np.testing.assert_array_equal(one.sigma, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        one.frechet_distance(one)
    with pytest.raises(ValueError, match="mu .d,. and sigma"):
        metrics.FeatureStats(3, np.zeros(3), np.eye(2))


# ---------------------------------------------------------------- Inception Score
def _is_reference(logits, split_size):
    """Inception Score as written in improved-GAN / the evaluator, in float64."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return np.mean(scores)


def test_inception_score_matches_direct_computation():
    rng = np.random.default_rng(3)
    logits = 3.0 * rng.standard_normal((23, 10))
    for split_size in (5000, 10, 7, 1):
        np.testing.assert_allclose(
            metrics.inception_score(logits, split_size), _is_reference(logits, split_size),
            rtol=1e-12,
        )
    # Bounds: identical predictions give 1; confident, evenly spread classes give C.
    assert metrics.inception_score(np.tile(logits[:1], (50, 1))) == pytest.approx(1.0)
    confident = 100.0 * np.eye(10)[np.arange(50) % 10]
    assert metrics.inception_score(confident) == pytest.approx(10.0, rel=1e-9)
    # Underflowing probabilities stay finite (float32 softmax would give 0 * log 0).
    assert np.isfinite(metrics.inception_score(1e4 * rng.standard_normal((20, 10))))
    with pytest.raises(ValueError, match="num, classes"):
        metrics.inception_score(np.zeros(10))
    with pytest.raises(ValueError, match="split_size"):
        metrics.inception_score(logits, 0)


# ----------------------------------------------------------- precision and recall
def _sq_dist(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def _pr_brute_force(ref, sample, k, clamp=None):
    """The k-NN manifold definition, straight from pairwise float64 distances."""
    def radii(x):
        r = np.sort(_sq_dist(x, x), axis=1)[:, k]  # index 0 is the point itself
        if clamp is not None:
            r = np.where(r > np.percentile(r, clamp), 0.0, r)
        return r

    r_ref, r_sample = radii(ref), radii(sample)
    d = _sq_dist(sample, ref)  # (n_sample, n_ref)
    precision = np.mean(np.any(d <= r_ref[None, :], axis=1))
    recall = np.mean(np.any(d.T <= r_sample[None, :], axis=1))
    return precision, recall, r_ref


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("blocks", [(10000, 10000), (7, 11)])
def test_precision_recall_matches_brute_force(k, blocks):
    rng = np.random.default_rng(k)
    ref = rng.standard_normal((60, 6)).astype(np.float32)
    sample = (rng.standard_normal((45, 6)) + 0.8).astype(np.float32)
    kw = dict(row_batch_size=blocks[0], col_batch_size=blocks[1], mode="float32")
    want_p, want_r, want_radii = _pr_brute_force(ref, sample, k)
    np.testing.assert_allclose(metrics.manifold_radii(ref, k, **kw), want_radii, rtol=1e-5)
    got = metrics.precision_recall(ref, sample, k, **kw)
    assert got == (want_p, want_r)
    assert 0.0 < got[0] < 1.0 and 0.0 < got[1] < 1.0  # the check is not vacuous


def test_precision_recall_clamping_and_float16_mode():
    rng = np.random.default_rng(7)
    ref = rng.uniform(0.0, 2.0, (50, 8)).astype(np.float32)
    sample = rng.uniform(0.3, 2.5, (40, 8)).astype(np.float32)
    want_p, want_r, _ = _pr_brute_force(ref, sample, 3, clamp=80)
    got = metrics.precision_recall(ref, sample, clamp_to_percentile=80, mode="float32")
    assert got == (want_p, want_r)
    # The evaluator's default float16 distances agree here within one borderline point.
    p16, r16 = metrics.precision_recall(ref, sample)
    want_p, want_r, _ = _pr_brute_force(ref, sample, 3)
    assert abs(p16 - want_p) <= 1 / 40 and abs(r16 - want_r) <= 1 / 50


def _evaluator_float16_distances(u, v):
    """guided-diffusion's _batch_pairwise_distances on float16 inputs, in NumPy float16
    arithmetic (products accumulated in float32 and rounded, as GPU half GEMMs do)."""
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is what we test for
        u16, v16 = u.astype(np.float16), v.astype(np.float16)
        norm_u = np.square(u16).astype(np.float32).sum(1).astype(np.float16)[:, None]
        norm_v = np.square(v16).astype(np.float32).sum(1).astype(np.float16)[None, :]
        uv = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
        return np.maximum(norm_u - np.float16(2) * uv + norm_v, np.float16(0))


def test_float16_distances_emulate_the_evaluator():
    rng = np.random.default_rng(8)
    u = rng.uniform(0.1, 1.5, (30, 64)).astype(np.float32)
    v = rng.uniform(0.1, 1.5, (20, 64)).astype(np.float32)
    got = np.asarray(metrics.pairwise_sq_distances(u, v))
    want = _evaluator_float16_distances(u, v).astype(np.float32)
    assert got.dtype == np.float32
    # Same float16 roundings; summation order may move a result by one float16 ulp of
    # the norms (|x|² ≈ 50 here: ulp 2^-5).
    np.testing.assert_allclose(got, want, atol=2 * 2.0**-5)
    assert np.mean(got == want) > 0.9
    exact = _sq_dist(u, v)
    assert np.abs(got - exact).max() > 1e-3  # float16 really is coarser than float32

    # Norms beyond float16's range (65504): the block falls back to float32.
    big_u, big_v = 300 * u, 300 * v
    assert not np.isfinite(_evaluator_float16_distances(big_u, big_v)).all()
    np.testing.assert_array_equal(
        np.asarray(metrics.pairwise_sq_distances(big_u, big_v)),
        np.asarray(metrics.pairwise_sq_distances(big_u, big_v, mode="float32")),
    )
    np.testing.assert_allclose(
        np.asarray(metrics.pairwise_sq_distances(big_u, big_v, mode="float32")),
        _sq_dist(big_u, big_v), rtol=1e-4,
    )


def test_precision_recall_input_errors():
    x = np.zeros((10, 4), np.float32)
    with pytest.raises(ValueError, match="k must satisfy"):
        metrics.manifold_radii(x[:3], k=3)
    with pytest.raises(ValueError, match="non-empty"):
        metrics.precision_recall(np.zeros(4, np.float32), x)
    with pytest.raises(TypeError, match="floating"):
        metrics.precision_recall(x.astype(np.int32), x)
    with pytest.raises(ValueError, match="feature dims"):
        metrics.precision_recall(x, np.zeros((10, 5), np.float32))
    with pytest.raises(ValueError, match="mode"):
        metrics.pairwise_sq_distances(x, x, mode="float64")


# ------------------------------------------------------------------ image files
@pytest.mark.parametrize("compressed", [False, True])
def test_npz_batches_stream_the_image_array(tmp_path, compressed):
    rng = np.random.default_rng(9)
    images = rng.integers(0, 256, (23, 5, 4, 3), dtype=np.uint8)
    path = tmp_path / "batch.npz"
    (np.savez_compressed if compressed else np.savez)(path, arr_0=images, labels=np.arange(23))
    batches = list(metrics.iter_npz_batches(path, batch_size=10))
    assert [len(b) for b in batches] == [10, 10, 3]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    np.testing.assert_array_equal(
        np.concatenate(list(metrics.iter_npz_batches(path, 4, key="labels"))), np.arange(23)
    )
    np.testing.assert_array_equal(metrics.load_image_batch(path), images)
    with pytest.raises(KeyError, match="arr_1"):
        next(metrics.iter_npz_batches(path, key="arr_1"))


def test_image_batch_files(tmp_path):
    rng = np.random.default_rng(10)
    images = rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    metrics.save_image_batch(tmp_path / "s.npz", images, labels=np.arange(6))
    np.testing.assert_array_equal(metrics.load_image_batch(tmp_path / "s.npz"), images)
    np.testing.assert_array_equal(np.load(tmp_path / "s.npz")["labels"], np.arange(6))
    with pytest.raises(TypeError, match="uint8"):
        metrics.save_image_batch(tmp_path / "f.npz", images.astype(np.float32))
    with pytest.raises(ValueError, match="channels"):
        metrics.save_image_batch(tmp_path / "c.npz", np.zeros((2, 8, 8, 2), np.uint8))
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(TypeError, match="uint8"):
        metrics.load_image_batch(tmp_path / "floats.npz")
    assert not (tmp_path / "f.npz").exists()
