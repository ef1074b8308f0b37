"""Fake quantization of the UNet (iec_jax.efficient.quant) against an independent float64
NumPy transcription of the official Q-Diffusion / CacheQuant quantizer, plus the
interception machinery: identity at 32 bits, per-step tables, split quantizers,
first/last 8-bit layers, quant-DEC, artifacts and the quant-only denoiser.

One tiny UNet (2 levels, 8x8 inputs, two-head attention in the mid block, split convs in
the up path) and one 3-step calibration set (step 1 a DeepCache partial pass)
are shared by all tests; compiled functions are module level.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import iec_jax
from iec_jax.efficient import quant as Q
from iec_jax.models.unet import CachePoint, UNet, UNetConfig, timestep_embedding

CFG = UNetConfig(
    sample_size=8, in_channels=2, out_channels=2, center_input_sample=True, time_embedding_dim=24,
    freq_shift=0, flip_sin_to_cos=True, down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"), block_out_channels=(8, 16), layers_per_block=1,
    mid_block_scale_factor=2.0, downsample_padding=1, dropout=0.0, attention_head_dim=8,
    norm_num_groups=4, attn_norm_num_groups=2, norm_eps=1e-5,
)
UNET = UNet(CFG)
CP = CachePoint(1, 1)  # feature entering up_blocks_1/resnets_1 (8 ch, 8x8); its convs split at 8
SPLIT = 8
SHORTCUT = "up_blocks_1/resnets_1/conv_shortcut"
ALL32 = Q.QuantConfig(weight_bits=32, act_bits=32, first_last_bits=32, softmax_bits=32)
W8A8, W4A8 = Q.QuantConfig(), Q.QuantConfig(weight_bits=4)


# ------------------------------------------------------- the official algorithm, float64
def np_mse_search(x, bits):
    """``UniformAffineQuantizer.init_quantization_scale_2`` (scale_method 'mse', per tensor)."""
    x = np.asarray(x, np.float64).ravel()
    x_max, x_min = x.max(), x.min()
    if x_max == x_min:
        return x_max, 0.0
    levels, best = 2**bits, 1e10
    for i in range(0, 80, 2):
        new_max, new_min = x_max * (1.0 - i * 0.01), x_min * (1.0 - i * 0.01)
        # calculate_qparams + quantize
        lo, hi = min(new_min, 0.0), max(new_max, 0.0)
        scale = max((hi - lo) / float(levels - 1), 1e-8)
        zp = np.clip(0 - np.round(lo / scale), 0, levels - 1)
        x_q = (np.clip(np.round(x / scale) + zp, 0, levels - 1) - zp) * scale
        score = np.mean(np.abs(x - x_q) ** 2.4)
        if score < best:
            best = score
            delta = (new_max - new_min) / (2**bits - 1)
            zero_point = np.round(-new_min / delta)
    return delta, zero_point


def np_fake_quant(x, delta, zero_point, bits):
    """``UniformAffineQuantizer.forward``."""
    z = np.round(zero_point)
    x_int = np.round(np.asarray(x, np.float64) / delta) + z
    return (np.clip(x_int, 0, 2**bits - 1) - z) * delta


# --------------------------------------------------------------------- shared data
@jax.jit
def f_eps(params, x, t, feature=None):
    """Float model: (eps, feature) of a full pass, eps of a partial pass from ``feature``."""
    if feature is None:
        return UNET.apply({"params": params}, x, t, cache_point=CP, return_feature=True)
    return UNET.apply({"params": params}, x, t, cache_point=CP, cached_feature=feature)


@jax.jit
def q_eps(qs, x, t, step):
    return Q.quant_apply(UNET, qs, x, t, step)


@jax.jit
def q_partial(qs, x, t, step, feature):
    """Quantized partial pass: (eps, raw input of the cache-point shortcut, its output)."""
    rec = {}

    def record(next_fun, args, kwargs, ctx):
        y = next_fun(*args, **kwargs)
        if ctx.method_name == "__call__" and "/".join(ctx.module.path) == SHORTCUT:
            rec["x"], rec["y"] = args[0], y
        return y

    with nn.intercept_methods(record):  # outside the quantizing interceptor: sees raw inputs
        eps = Q.quant_apply(UNET, qs, x, t, step, cached_feature=feature, cache_point=CP)
    return eps, rec["x"], rec["y"]


@pytest.fixture(scope="module")
def params():
    """PyTorch-style random kernels U(+-1/sqrt(fan_in)), random biases and norm affines
    (NumPy: no init compile)."""
    rng = np.random.default_rng(1)
    shapes = jax.eval_shape(lambda k: UNET.init_params(k), jax.random.key(0))
    flat = {}
    for k, s in traverse_util.flatten_dict(shapes, sep="/").items():
        if k.endswith("kernel"):
            bound = 1 / np.sqrt(np.prod(s.shape[:-1]))
            flat[k] = rng.uniform(-bound, bound, s.shape)
        else:
            flat[k] = (k.endswith("scale") + 0.05 * rng.standard_normal(s.shape))
    return traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()}, sep="/")


@pytest.fixture(scope="module")
def data(params):
    """3 steps: full (2 samples), cached (2 samples + the step-0 feature), full (5 samples:
    the sticky batch size 2 gives two EMA batches and drops the fifth sample)."""
    rng = np.random.default_rng(0)
    x0, x1 = rng.standard_normal((2, 2, 8, 8, 2), dtype=np.float32)
    x2 = 1.5 * rng.standard_normal((5, 8, 8, 2), dtype=np.float32)
    t0, t1, t2 = np.array([800, 600]), np.array([700, 500]), np.array([300, 250, 200, 150, 100])
    eps0, f0 = f_eps(params, x0, t0)
    _, f2 = f_eps(params, x2[:2], t2[:2])
    calib = [(x0, t0, None), dict(x=x1, t=t1, cached_feature=f0), (x2, t2, None)]
    return dict(calib=calib, features=[f0, f0, f2], f0=f0, eps0=eps0)


def calibrate(params, calib, config):
    return Q.calibrate_activations(UNET, params, calib, config, cache_point=CP, progress=False)


@pytest.fixture(scope="module")
def act8(params, data):
    return calibrate(params, data["calib"], W8A8)


@pytest.fixture(scope="module")
def qs8(params, act8):
    return Q.QuantState(Q.quantize_params(UNET, params, W8A8), act8, None, W8A8)


@pytest.fixture(scope="module")
def qs4(params, act8):  # activation tables do not depend on the weight bits (float weights)
    return Q.QuantState(Q.quantize_params(UNET, params, W4A8), act8, None, W4A8)


def rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("bits", [8, 4])
def test_primitive_and_mse_search_match_official(bits):
    rng = np.random.default_rng(bits)
    cases = [
        rng.standard_normal(3000).astype(np.float32),  # straddles 0
        rng.uniform(0.002, 0.9, (4, 300)).astype(np.float32),  # one-signed (softmax-like): z < 0
        (rng.standard_t(2.5, (2, 8, 8, 3)) - 1.0).astype(np.float32),  # heavy tails
    ]
    for x in cases:
        d, z = Q.mse_search(x, bits)
        d_np, z_np = np_mse_search(x, bits)
        np.testing.assert_allclose(float(d), d_np, rtol=2e-6)
        assert float(z) == z_np
        out = np.asarray(Q.fake_quant(jnp.asarray(x), d, z, bits))
        # float32 rounding only: a flipped grid point would be off by a whole delta
        np.testing.assert_allclose(out, np_fake_quant(x, d_np, z_np, bits), rtol=1e-6, atol=1e-3 * d_np)
    # Weights: per output channel (last axis), each split group on its own.
    w = rng.standard_normal((3, 3, 6, 5)).astype(np.float32) * rng.uniform(0.1, 2, 5).astype(np.float32)
    for split in (None, 4):
        groups = [slice(None)] if split is None else [slice(0, split), slice(split, None)]
        expect = np.empty_like(w, np.float64)
        for g in groups:
            for c in range(w.shape[-1]):
                part = w[:, :, g, c]
                expect[:, :, g, c] = np_fake_quant(part, *np_mse_search(part, bits), bits)
        np.testing.assert_allclose(Q.quantize_weight(jnp.asarray(w), bits, split), expect, rtol=1e-6, atol=1e-6)
    # bits >= 32: exact passthrough
    np.testing.assert_array_equal(Q.fake_quant(jnp.asarray(cases[0]), 0.1, 3.0, 32), cases[0])


@pytest.mark.parametrize("bits", [8, 4])
def test_pruned_mse_search_matches_official(bits):
    """The activation calibration's search (prune=True: exact scores only for the candidates
    near the best approximate one) against the same float64 transcription, per tensor and
    per channel."""
    rng = np.random.default_rng(bits + 10)
    cases = [
        rng.standard_normal(3000).astype(np.float32),
        rng.uniform(0.002, 0.9, (4, 300)).astype(np.float32),
        (rng.standard_t(2.5, (2, 8, 8, 3)) - 1.0).astype(np.float32),
        np.maximum(rng.standard_normal((3, 700)), 0).astype(np.float32),  # ReLU-like: many zeros
    ]
    for x in cases:
        d, z = Q.mse_search(x, bits, prune=True)
        d_np, z_np = np_mse_search(x, bits)
        np.testing.assert_allclose(float(d), d_np, rtol=2e-6)
        assert float(z) == z_np
        if x.ndim > 1:
            dc, zc = Q.mse_search(x, bits, channel_axis=0, prune=True)
            for c in range(x.shape[0]):
                dc_np, zc_np = np_mse_search(x[c], bits)
                np.testing.assert_allclose(float(dc[c]), dc_np, rtol=2e-6)
                assert float(zc[c]) == zc_np


def test_activation_tables_follow_official_calibration(params, act8, data):
    """Per-step tables, EMA 0.1/0.9 over a step's batches (the first blends with itself),
    sticky batch size, dropped remainder; checked on the two inputs computable without
    the network: the time embedding (linear_1) and conv_in's input 2x - 1."""
    calib = data["calib"]

    def ema(values):
        run = None
        for d, z in values:
            d, z = np.float32(d), np.float32(z)
            run = (d, z) if run is None else run
            run = (np.float32(0.1) * d + np.float32(0.9) * run[0], np.float32(0.1) * z + np.float32(0.9) * run[1])
        return run

    emb = lambda t: np.asarray(timestep_embedding(jnp.asarray(t), CFG.block_out_channels[0], True, 0))  # noqa: E731
    batches = [[slice(0, 2)], [slice(0, 2)], [slice(0, 2), slice(2, 4)]]  # step 2: bs stays 2, sample 5 dropped
    for step, (entry, sl) in enumerate(zip(calib, batches)):
        x, t = (entry["x"], entry["t"]) if isinstance(entry, dict) else entry[:2]
        for key, inp in (("time_embedding/linear_1:x", emb), ("conv_in:x", lambda x: 2 * x - 1)):
            arg = t if key.startswith("time") else x
            d, z = ema([np_mse_search(inp(arg[s]), 8) for s in sl])
            np.testing.assert_allclose(act8[key].delta[step], d, rtol=2e-6)
            np.testing.assert_allclose(act8[key].zero_point[step], z, rtol=1e-6, atol=1e-5)
    # Layers a partial pass skips keep their first calibration at the cached step.
    for key in ("mid_block/resnets_0/conv1:x", "down_blocks_1/resnets_0/conv_shortcut:x"):
        assert act8[key].delta[1] == act8[key].delta[0]
    # Attention: q, k at matmul_qk; softmax probabilities (softmax_bits) and v at matmul_av.
    block = "mid_block/attentions_0"
    assert {f"{block}/matmul_qk:a", f"{block}/matmul_qk:b", f"{block}/matmul_av:a", f"{block}/matmul_av:b"} <= set(act8)
    assert float(act8[f"{block}/matmul_av:a"].zero_point[0]) <= 0  # one-signed probabilities: official z <= 0
    # Which bit width each operand uses: 32 bits = no quantizer, no table.
    cfg = Q.QuantConfig(softmax_bits=32, first_last_bits=32)
    keys = set(jax.eval_shape(lambda p: calibrate(p, calib[:1], cfg), params))
    assert keys == set(act8) - {f"{block}/matmul_av:a", "conv_in:x", "conv_out:x"}


def test_identity_at_32_bits_is_bitwise(params, data):
    no_tables = jax.eval_shape(lambda p: calibrate(p, data["calib"], ALL32), params)
    assert no_tables == {}
    qs = Q.QuantState(Q.quantize_params(UNET, params, ALL32), {}, None, ALL32)
    x, t, _ = data["calib"][0]
    np.testing.assert_array_equal(q_eps(qs, x, t, 0), data["eps0"])
    x1, t1 = data["calib"][1]["x"], data["calib"][1]["t"]
    np.testing.assert_array_equal(q_partial(qs, x1, t1, 1, data["f0"])[0], f_eps(params, x1, t1, data["f0"]))


def test_quantization_error_and_first_last_8bit(qs8, qs4, data):
    x, t, _ = data["calib"][0]
    err8, err4 = rel(q_eps(qs8, x, t, 0), data["eps0"]), rel(q_eps(qs4, x, t, 0), data["eps0"])
    assert 1e-4 < err8 < 0.1 and err4 > 2 * err8, (err8, err4)
    table = Q._layer_table(UNET)
    flat = traverse_util.flatten_dict(qs4.params, sep="/")
    for path, split in table.items():
        k = np.asarray(flat[f"{path}/kernel"])
        if path in ("conv_in", "conv_out"):  # 8 bits: more than 16 levels in some channel
            assert 16 < max(len(np.unique(k[..., c])) for c in range(k.shape[-1])) <= 256, path
        else:
            parts = [k] if split is None else [k[..., :split, :], k[..., split:, :]]
            assert all(len(np.unique(p[..., c])) <= 16 for p in parts for c in range(k.shape[-1])), path


def test_tables_are_indexed_by_step(qs8, data):
    x, t, _ = data["calib"][0]
    e0, e2 = q_eps(qs8, x, t, 0), q_eps(qs8, x, t, 2)
    assert float(jnp.abs(e0 - e2).max()) > 1e-3
    # Step 2 with step 0's tables reproduces step 0 bit for bit.
    swapped = {k: Q.ActRange(r.delta.at[2].set(r.delta[0]), r.zero_point.at[2].set(r.zero_point[0])) for k, r in qs8.act.items()}
    np.testing.assert_array_equal(q_eps(qs8.replace(act=swapped), x, t, 2), e0)


def test_non_jitted_call_agrees(qs4, data):
    """Eager vs compiled partial pass: equal up to the rounding flips that XLA's ~1e-7
    float differences (fusion order) cause in a few quantized activations."""
    x, t, f = data["calib"][1]["x"], data["calib"][1]["t"], data["f0"]
    jitted = q_partial(qs4, x, t, 1, f)[0]
    eager = Q.quantized_unet(UNET, qs4)(x, t, 1, cached_feature=f, cache_point=CP)
    assert rel(eager, jitted) < 1e-2, rel(eager, jitted)
    assert rel(eager, jitted) < 0.1 * rel(jitted, q_partial(qs4, x, t, 0, f)[0]) + 1e-6


def test_split_quantizers(params, qs4, data):
    act = qs4.act
    a0, a1 = act[f"{SHORTCUT}:x0"], act[f"{SHORTCUT}:x1"]
    assert f"{SHORTCUT}:x" not in act and not np.allclose(a0.delta, a1.delta)
    x, t, f = data["calib"][1]["x"], data["calib"][1]["t"], data["f0"]
    _, xin, y = q_partial(qs4, x, t, 1, f)
    kernel = traverse_util.flatten_dict(qs4.params, sep="/")[f"{SHORTCUT}/kernel"]
    bias = traverse_util.flatten_dict(params, sep="/")[f"{SHORTCUT}/bias"]
    xq = jnp.concatenate([Q.fake_quant(xin[..., :SPLIT], a0.delta[1], a0.zero_point[1], 8),
                          Q.fake_quant(xin[..., SPLIT:], a1.delta[1], a1.zero_point[1], 8)], -1)
    np.testing.assert_allclose(y, jnp.einsum("bhwc,co->bhwo", xq, kernel[0, 0], precision="highest") + bias, atol=1e-5)
    # Weights: the two input groups are quantized independently (== two separate kernels).
    w = traverse_util.flatten_dict(params, sep="/")[f"{SHORTCUT}/kernel"]
    groups = [Q.quantize_weight(w[..., :SPLIT, :], 4), Q.quantize_weight(w[..., SPLIT:, :], 4)]
    np.testing.assert_array_equal(kernel, jnp.concatenate(groups, -2))
    assert not np.array_equal(Q.quantize_weight(w, 4), kernel)
    keys = jax.eval_shape(lambda p: calibrate(p, data["calib"][:1], Q.QuantConfig(split=False)), params)
    assert f"{SHORTCUT}:x" in keys and f"{SHORTCUT}:x0" not in keys


def test_quant_dec(params, qs4, data, tmp_path):
    S = 3
    ident = qs4.replace(dec=Q.QuantDEC(jnp.ones((S, SPLIT)), jnp.zeros((S, SPLIT))), dec_layer=SHORTCUT)
    x, t, f = data["calib"][1]["x"], data["calib"][1]["t"], data["f0"]
    base = q_partial(qs4, x, t, 1, f)
    np.testing.assert_array_equal(q_partial(ident, x, t, 1, f)[0], base[0])
    fitted = Q.fit_quant_dec(UNET, params, qs4, data["features"], cache_point=CP)
    assert fitted.dec_layer == SHORTCUT and fitted.dec.a.shape == (S, SPLIT)
    assert not np.allclose(fitted.dec.a, 1) and not np.allclose(fitted.dec.b, 0)
    # The shortcut's output error (vs the float conv on the same input) at the cached step:
    # its cached-feature part (total minus the skip part, which quant-DEC leaves alone) shrinks.
    flat, qflat = (traverse_util.flatten_dict(p, sep="/") for p in (params, qs4.params))
    w, wq, bias = flat[f"{SHORTCUT}/kernel"][0, 0], qflat[f"{SHORTCUT}/kernel"][0, 0], flat[f"{SHORTCUT}/bias"]
    a1 = qs4.act[f"{SHORTCUT}:x1"]
    mm = functools.partial(jnp.einsum, "bhwc,co->bhwo", precision="highest")
    errs = []
    for eps, xin, y in (base, q_partial(fitted, x, t, 1, f)):
        err = y - (mm(xin, w) + bias)
        skip = xin[..., SPLIT:]
        err_skip = mm(Q.fake_quant(skip, a1.delta[1], a1.zero_point[1], 8), wq[SPLIT:]) - mm(skip, w[SPLIT:])
        errs.append((float(jnp.linalg.norm(err - err_skip)), float(jnp.linalg.norm(err))))
    assert errs[1][0] < 0.97 * errs[0][0] and errs[1][1] < errs[0][1], errs
    # (a, b) at the cached step == calculate_abCov (float64; torch.var is unbiased).
    a0 = qs4.act[f"{SHORTCUT}:x0"]
    f64 = np.asarray(f, np.float64).reshape(-1, SPLIT)
    Y = f64 @ np.asarray(w[:SPLIT], np.float64) + np.asarray(bias, np.float64)
    fq = np.asarray(Q.fake_quant(f, a0.delta[1], a0.zero_point[1], 8), np.float64).reshape(-1, SPLIT)
    X = fq @ np.asarray(wq[:SPLIT], np.float64) + np.asarray(bias, np.float64)
    a_np = ((X - X.mean(0)) * (Y - Y.mean(0))).mean(0) / X.var(0, ddof=1)
    np.testing.assert_allclose(fitted.dec.a[1], a_np, rtol=1e-4)
    np.testing.assert_allclose(fitted.dec.b[1], Y.mean(0) - a_np * X.mean(0), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="split"):
        no_split = qs4.replace(config=Q.QuantConfig(weight_bits=4, split=False))
        Q.fit_quant_dec(UNET, params, no_split, data["features"], cache_point=CP)
    with pytest.raises(ValueError, match="feature steps"):
        Q.fit_quant_dec(UNET, params, qs4, data["features"][:2], cache_point=CP)
    # Artifacts round trip; the stored configs are checked.
    path = tmp_path / "quant.npz"
    Q.save_quant_state(path, fitted, unet_config=CFG)
    loaded = Q.load_quant_state(path, config=W4A8, unet_config=CFG)
    np.testing.assert_array_equal(q_partial(loaded, x, t, 1, f)[0], q_partial(fitted, x, t, 1, f)[0])
    with pytest.raises(ValueError, match="QuantConfig"):
        Q.load_quant_state(path, config=W8A8)
    with pytest.raises(ValueError, match="UNetConfig"):
        Q.load_quant_state(path, unet_config=UNetConfig.ddpm_cifar10())


def test_quant_denoiser_samples_with_iec(qs8):
    x_T = jax.random.normal(jax.random.key(3), (2, 8, 8, 2))
    run = jax.jit(lambda qs, x_T: iec_jax.sample(
        Q.quant_denoiser(UNET, qs), x_T, None, schedule=iec_jax.NoiseSchedule.linear(),
        timesteps=iec_jax.make_timesteps(999, 3), iec=iec_jax.IECConfig()))
    x0, info = run(qs8, x_T)
    assert x0.shape == x_T.shape and bool(jnp.isfinite(x0).all())
    assert int(np.asarray(info["nfe"]).sum()) == 6


@pytest.mark.parametrize("field,value", [
    ("weight_bits", 1), ("act_bits", 20), ("first_last_bits", True), ("softmax_bits", "8"),
    ("split", 1), ("scale_method", "max"), ("symmetric", True), ("first_last_layers", "conv_in"),
    ("act_per_channel", 1), ("scale_method", "percentile"),
])
def test_bad_config_raises(field, value):
    with pytest.raises(ValueError, match=f"QuantConfig.{field}"):
        Q.QuantConfig(**{field: value})
