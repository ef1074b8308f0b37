"""The CPU speed-ups give the results of the computations they replace.

* Activation calibration: the pruned MSE search (approximate scores for all 40 candidates,
  exact scores only near the best) returns the full search's (delta, zero point) bit for
  bit, on hard inputs (ties, flat, one-signed, on-grid, heavy-tailed, odd sizes, NaN),
  and ``calibrate_activations`` gives the full search's tables bit for bit on a small
  UNet (full steps, a DeepCache partial pass, several EMA batches in one step).
  ``prune=False`` is the search as it was (the same code path, unchanged).
* Inception features: the CPU layout (stem image by image, two stem convolutions in
  bands of output rows, the blocks in chunks, 1 x 1 convolutions as matrix products)
  equals the plain batched network.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iec_jax.efficient import quant as Q
from iec_jax.metrics import features as F
from iec_jax.metrics import inception as I
from iec_jax.models.unet import CachePoint, UNet, UNetConfig


# ------------------------------------------------------------------ the search
def _hard_cases():
    rng = np.random.default_rng(0)
    grid = np.round(rng.uniform(0, 255, 3000)) / 255.0  # already on an 8-bit grid
    return {
        "normal": rng.standard_normal(5000),
        "normal_odd_size": rng.standard_normal(1025) * 3.0 + 0.5,
        "tiny": rng.standard_normal(7),
        "one": np.array([0.3]),
        "softmax_like": rng.dirichlet(np.ones(64), size=40).ravel(),
        "negative_only": -rng.uniform(0.01, 2.0, 2048),
        "heavy_tails": rng.standard_t(1.5, 4096),
        "relu_zeros": np.maximum(rng.standard_normal(3000), 0.0),
        "mostly_zero": np.where(rng.uniform(size=2048) < 0.98, 0.0, rng.standard_normal(2048)),
        "on_grid": grid,
        "on_grid_signed": grid - 0.5,
        "two_values": np.where(rng.uniform(size=1000) < 0.5, -1.0, 1.0),
        "two_values_zero": np.where(rng.uniform(size=1000) < 0.3, 0.0, 0.75),
        "integers": rng.integers(-3, 4, 4096).astype(np.float64),
        "constant": np.full(300, 0.7),
        "zeros": np.zeros(300),
        "tiny_values": rng.standard_normal(2000) * 1e-20,
        "large_values": rng.standard_normal(2000) * 1e20,
        "time_embedding_like": np.tile(np.sin(np.arange(128) * 0.37), 8),
    }


@pytest.mark.parametrize("bits", [8, 4])
def test_pruned_search_equals_full_search(bits):
    for name, x in _hard_cases().items():
        x = jnp.asarray(x, jnp.float32)
        full = Q.mse_search(x, bits)
        pruned = Q.mse_search(x, bits, prune=True)
        for a, b in zip(full, pruned):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), (name, full, pruned)
    # per channel (rows of different ranges), and a NaN row: both give NaN at row 0 only
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 333)) * np.array([1e-3, 0.1, 1, 10, 1e3, 1e5])[:, None]
    x[2, :] = np.round(x[2, :] * 4) / 4  # a row of few distinct values
    for data in (x, np.concatenate([np.full((1, 333), np.nan), x])):
        data = jnp.asarray(data.T, jnp.float32)
        full = Q.mse_search(data, bits, channel_axis=-1)
        pruned = Q.mse_search(data, bits, channel_axis=-1, prune=True)
        for a, b in zip(full, pruned):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_approximate_scores_are_close_to_the_exact_ones():
    """The pruning margin (0.1%) against the approximate scores' actual error."""
    rng = np.random.default_rng(2)
    for x in (rng.standard_normal((1, 70000)), rng.standard_t(2.0, (1, 3000)), rng.uniform(0, 1, (1, 4096))):
        x = jnp.asarray(x, jnp.float32)
        n = jnp.full((1,), 255.0, jnp.float32)
        approx = np.asarray(Q._approx_scores(x, x.max(1), x.min(1), n))[0]
        xs = np.asarray(x, np.float64)[0]
        exact = []
        for f in Q._SHRINK.astype(np.float64):
            hi, lo = max(xs.max() * f, 0.0), min(xs.min() * f, 0.0)
            s = max((hi - lo) / 255.0, 1e-8)
            z = np.clip(-np.round(lo / s), 0, 255)
            xq = (np.clip(np.round(xs / s) + z, 0, 255) - z) * s
            exact.append(np.mean(np.abs(xs - xq) ** 2.4))
        rel = np.abs(approx - np.array(exact)) / np.array(exact)
        assert rel.max() < 1e-5 < Q._PRUNE_MARGIN / 10, rel.max()


# ------------------------------------------------------------- the calibration
CFG = UNetConfig(
    sample_size=8, in_channels=2, out_channels=2, center_input_sample=True, time_embedding_dim=24,
    freq_shift=0, flip_sin_to_cos=True, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"), block_out_channels=(8, 16), layers_per_block=1,
    mid_block_scale_factor=1.0, downsample_padding=1, dropout=0.0, attention_head_dim=8,
    norm_num_groups=4, attn_norm_num_groups=2, norm_eps=1e-5,
)
UNET = UNet(CFG)
CP = CachePoint(1, 1)


@pytest.fixture(scope="module")
def unet_params():
    rng = np.random.default_rng(3)
    shapes = jax.eval_shape(lambda k: UNET.init_params(k), jax.random.key(0))
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.uniform(-0.5, 0.5, s.shape) + (s.shape == (s.shape[0],)) * 0.5, jnp.float32),
        shapes)


def test_calibration_tables_bit_identical(unet_params):
    """Steps: full, a DeepCache partial pass, full with 5 samples (batch size 2: two EMA
    batches, the fifth sample dropped); A8 with 8-bit softmax, and A4."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 2, 8, 8, 2)).astype(np.float32)
    x5 = 1.5 * rng.standard_normal((5, 8, 8, 2)).astype(np.float32)
    _, feat = jax.jit(lambda p, x, t: UNET.apply({"params": p}, x, t, cache_point=CP, return_feature=True))(
        unet_params, x[0], np.array([900, 800]))
    calib = [(x[0], np.array([900, 800]), None), dict(x=x[1], t=np.array([700, 600]), cached_feature=feat),
             (x5, np.array([300, 250, 200, 150, 100]), None)]
    for config in (Q.QuantConfig(weight_bits=32), Q.QuantConfig(weight_bits=32, act_bits=4)):
        tables = {prune: Q.calibrate_activations(UNET, unet_params, calib, config, cache_point=CP, batch_size=2,
                                                 progress=False, prune=prune) for prune in (False, True)}
        assert tables[True].keys() == tables[False].keys() and len(tables[True]) > 40
        for key, r in tables[False].items():
            for a, b in zip(r, tables[True][key]):
                assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), (config.act_bits, key, a, b)


# ------------------------------------------------------------------- Inception
def test_row_bands_and_pointwise_matmul_equal_the_convolution():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 23, 19, 5)), jnp.float32)
    cases = (((3, 3), (0, 0)), ((3, 3), (1, 1)), ((1, 7), (0, 3)), ((5, 5), (2, 2)), ((1, 1), (0, 0)))
    for kernel, padding in cases:
        whole = I.ConvBN(6, kernel, 1, padding)
        params = whole.init(jax.random.key(0), x)
        params = jax.tree_util.tree_map(lambda a: a + 0.1, params)  # non-trivial norm statistics
        want = whole.apply(params, x)
        for blocks in (2, 4, 7, 40):
            for pointwise in (False, True):  # a matrix product for 1 x 1 kernels only
                got = I.ConvBN(6, kernel, 1, padding, pointwise_as_matmul=pointwise, row_blocks=blocks).apply(params, x)
                assert got.shape == want.shape
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def inception_params():
    return F.default_params()


def test_cpu_layout_features_equal_batched_network(inception_params):
    """Grayscale 28 x 28 (the project's evaluation images), 3 images in batches of 2: the
    padded last batch too. The layouts agree to float32 rounding (identical here)."""
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, size=(3, 28, 28, 1), dtype=np.uint8)
    images[0] = 0
    got = {lay: F.compute_features(images, 2, params=inception_params, cpu_layout=lay) for lay in (False, True)}
    for k in ("pool", "spatial"):
        a, b = got[True][k], got[False][k]
        assert a.shape == b.shape
        rel = float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())
        print(f"{k}: relative difference {rel:.1e}, identical: {np.array_equal(a, b)}")
        assert rel < 1e-6


def test_stem_and_head_compose_to_the_network():
    model = F.cpu_model(I.InceptionV3(stem_row_blocks=(3, 2, 5)))
    assert model.stem_row_blocks == (3, 2, 5) and model.pointwise_as_matmul
    assert F.cpu_model(I.InceptionV3()).stem_row_blocks == I.CPU_STEM_ROW_BLOCKS
    x = jax.ShapeDtypeStruct((1, I.INPUT_SIZE, I.INPUT_SIZE, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(
        jax.eval_shape(I.InceptionV3().init, jax.random.key(0), x))
    h = jax.eval_shape(lambda p: model.apply(p, jnp.zeros(x.shape), method=I.InceptionV3.stem), shapes)
    assert h.shape == (1, 35, 35, 192)
    with pytest.raises(ValueError, match="preprocess"):
        jax.eval_shape(lambda p: model.apply(p, jnp.zeros((1, 32, 32, 3))), shapes)
    assert hash(model) == hash(F.cpu_model(I.InceptionV3(stem_row_blocks=(3, 2, 5))))  # a jit cache key
