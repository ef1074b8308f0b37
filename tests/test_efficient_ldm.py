"""The efficiency transforms on the latent models (iec_jax.efficient with ModelSpec):
PTQ, DeepCache at the shallowest branch, CacheQuant's DPS / DEC and the calibration
pipeline on reduced random versions of the four latent UNets — SD-like (cross-attention
transformers, several context tokens), cin256-like (one-token class context), LSUN
Bedroom-like (legacy attention) and Church-like (scale-shift, resnet up/down samplers) —
with the guided 2B batch for the conditional ones."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import iec_jax
from iec_jax.efficient import cache as C
from iec_jax.efficient import calibration as K
from iec_jax.efficient import methods as M
from iec_jax.efficient import quant as Q
from iec_jax.efficient.adapter import ModelSpec
from iec_jax.models.unet import UNet, UNetConfig, timestep_embedding
from iec_jax.models.unet_cond import UNetCondition, UNetConditionConfig

COMMON = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
SD = ModelSpec(UNetCondition(UNetConditionConfig(
    in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=2, **COMMON)))
CIN = ModelSpec(UNetCondition(UNetConditionConfig(  # one transformer (mid block), as cin256 none at the top
    in_channels=3, out_channels=3, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
    cross_attention_dim=16, attention_head_dim=1, **COMMON)))
BEDROOM = ModelSpec(UNet(UNetConfig(
    in_channels=3, out_channels=3, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=16, **COMMON)), family="ldm")
CHURCH = ModelSpec(UNet(UNetConfig(
    in_channels=4, out_channels=4, down_block_types=("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("ResnetUpsampleBlock2D", "AttnUpBlock2D"), attn_norm_num_groups=8,
    resnet_time_scale_shift="scale_shift", downsample_type="resnet", upsample_type="resnet",
    num_attention_heads=2, **COMMON)), family="ldm")
MODELS = dict(sd=SD, cin=CIN, bedroom=BEDROOM, church=CHURCH)
TOKENS = dict(sd=3, cin=1)
B = 2
ALL32 = Q.QuantConfig(weight_bits=32, act_bits=32, first_last_bits=32, softmax_bits=32)
PC32 = Q.QuantConfig.bedroom_per_channel(weight_bits=32, act_bits=32, first_last_bits=32, softmax_bits=32)


def draw_params(model, seed):
    """PyTorch-style random kernels, random biases and norm affines (NumPy: no init compile)."""
    cfg = model.config
    x = jnp.zeros((1, 8, 8, cfg.in_channels))
    args = (x, jnp.zeros((1,), jnp.int32)) + ((model.tracing_context(1),) if model.conditional else ())
    shapes = jax.eval_shape(lambda k: model.module.init(k, *args)["params"], jax.random.key(0))
    rng = np.random.default_rng(seed)
    flat = {}
    for k, s in traverse_util.flatten_dict(shapes, sep="/").items():
        if k.endswith("kernel"):
            bound = 1 / np.sqrt(np.prod(s.shape[:-1]))
            flat[k] = rng.uniform(-bound, bound, s.shape)
        else:
            flat[k] = k.endswith("scale") + 0.1 * rng.standard_normal(s.shape)
    return traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()}, sep="/")


PARAMS = {name: draw_params(m, i) for i, (name, m) in enumerate(MODELS.items())}


def inputs(name, seed=0):
    """x, t, context of one evaluation: for the conditional models the guided 2B batch
    [x ; x] with [uncond ; cond]."""
    model = MODELS[name]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, 8, 8, model.config.in_channels)).astype(np.float32)
    t = np.array([900, 400], np.int32)
    if not model.conditional:
        return jnp.asarray(x), jnp.asarray(t), None
    cond = rng.standard_normal((B, TOKENS[name], 16)).astype(np.float32)
    uncond = np.broadcast_to(rng.standard_normal((1, TOKENS[name], 16)), cond.shape).astype(np.float32)
    return (jnp.asarray(np.concatenate([x, x])), jnp.asarray(np.concatenate([t, t])),
            jnp.asarray(np.concatenate([uncond, cond])))


@functools.partial(jax.jit, static_argnames=("model",))
def float_passes(model, params, x, t, ctx):
    """(eps, feature) of the full pass and eps of the partial pass fed that feature (the
    context bound; :func:`quant_passes` passes it per call)."""
    fn = C.float_unet_fn(model, params, context=ctx)
    eps, feat = fn(x, t, 0, cache_point=model.resolve_cache_point(), return_feature=True)
    return eps, feat, fn(x, t, 0, cache_point=model.resolve_cache_point(), cached_feature=feat)


@functools.partial(jax.jit, static_argnames=("model",))
def quant_passes(model, qs, x, t, ctx, step):
    fn = Q.quantized_unet(model, qs)
    eps, feat = fn(x, t, step, ctx, cache_point=model.resolve_cache_point(), return_feature=True)
    return eps, feat, fn(x, t, step, ctx, cache_point=model.resolve_cache_point(), cached_feature=feat)


def rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# ------------------------------------------------------------------- identity
@pytest.mark.parametrize("name", list(MODELS))
def test_32_bits_is_the_float_model_bit_for_bit(name):
    model, params = MODELS[name], PARAMS[name]
    x, t, ctx = inputs(name)
    ref = float_passes(model, params, x, t, ctx)
    # A partial pass fed the full pass's feature is the full pass (guided 2B batch).
    np.testing.assert_array_equal(ref[2], ref[0])
    assert ref[1].shape == (x.shape[0], 8, 8, 32)
    for config in ((ALL32, PC32) if name == "bedroom" else (ALL32,)):
        qs = Q.QuantState(Q.quantize_params(model, params, config), {}, None, config)
        for got, want in zip(quant_passes(model, qs, x, t, ctx, 0), ref):
            np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------- coverage
def test_quantizer_table_covers_the_sd_unet():
    cfg = Q.QuantConfig(weight_bits=4, act_bits=6, softmax_bits=7)
    table = Q.quantizer_table(SD, cfg)
    weights, acts = table["weights"], table["acts"]
    kernels = {k[: -len("/kernel")] for k in traverse_util.flatten_dict(PARAMS["sd"], sep="/") if k.endswith("/kernel")}
    assert set(weights) == kernels  # every conv and linear, DenseNoBias included
    assert {p for p, b in weights.items() if b == 8} == {"conv_in", "conv_out"}
    assert all(b == 4 for p, b in weights.items() if p not in ("conv_in", "conv_out"))
    block = "down_blocks_0/attentions_0/transformer_blocks_0"
    names = ["time_embedding/linear_1", "time_embedding/linear_2", "down_blocks_0/resnets_0/time_emb_proj",
             "down_blocks_0/attentions_0/proj_in", "down_blocks_0/attentions_0/proj_out",
             f"{block}/ff/net_0/proj", f"{block}/ff/net_2"]
    names += [f"{block}/{a}/{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out_0")]
    for path in names:
        assert path in weights and acts[f"{path}:x"] == 6, path
    for a in ("attn1", "attn2"):  # q, k, softmax output (softmax_bits), v of both attentions
        assert acts[f"{block}/{a}/matmul_qk:a"] == acts[f"{block}/{a}/matmul_qk:b"] == 6
        assert acts[f"{block}/{a}/matmul_av:a"] == 7 and acts[f"{block}/{a}/matmul_av:b"] == 6
    assert acts["conv_in:x"] == acts["conv_out:x"] == 8
    # Every layer input once: split convs (up path) by part, all others whole.
    for path, split in SD.layer_table().items():
        keys = {k for k in acts if k.rsplit(":", 1)[0] == path}
        assert keys == ({f"{path}:x0", f"{path}:x1"} if split else {f"{path}:x"}), path
    blocks = [p[: -len("/attn1/to_q")] for p in weights if p.endswith("attn1/to_q")]
    assert len(blocks) == 4  # transformers: down 1, mid 1, up 2
    assert {k for k in acts if "matmul" in k} == {f"{b}/{a}/{m}:{o}" for b in blocks for a in ("attn1", "attn2")
                                                for m in ("matmul_qk", "matmul_av") for o in "ab"}
    # Layers not in the table stay float: norms, activations, the softmax itself.
    assert not any("norm" in k or "softmax" in k for k in acts)


# --------------------------------------------------------------- cache + DEC
_SAMPLERS = {}


def _sample(name, params, x_T, full, dec, iec=None, qs=None):
    """Jitted DDIM over S = 4 steps (guided for the conditional models)."""
    model = MODELS[name]
    key = (name, None if full is None else tuple(full), dec is None, iec, qs is None)
    if key not in _SAMPLERS:
        def run(p, x_T, d, q, c, u):
            fn = C.float_unet_fn(model, p) if q is None else Q.quantized_unet(model, q)
            if full is None:
                den = iec_jax.StatefulDenoiser(lambda x, t, step, s, *cc: (fn(x, t, step, *cc), s))
            else:
                den = C.cached_denoiser(fn, full_steps=full, cache_point=model.resolve_cache_point(), dec=d)
            if model.conditional:
                den = iec_jax.guided_denoiser(den, c, u, 2.0)
            return iec_jax.sample(den, x_T, None, schedule=iec_jax.NoiseSchedule.scaled_linear(),
                                  timesteps=iec_jax.make_timesteps(1000, 4, "ldm"), iec=iec)
        _SAMPLERS[key] = jax.jit(run)
    _, _, ctx = inputs(name, seed=7)
    c, u = (None, None) if ctx is None else (ctx[B:], ctx[:B])
    return _SAMPLERS[key](params, x_T, dec, qs, c, u)


def test_cache_refreshed_every_step_is_the_plain_sampler_and_identity_dec_is_a_no_op():
    name, model, params = "cin", CIN, PARAMS["cin"]
    x_T = jax.random.normal(jax.random.key(1), (B, 8, 8, model.config.in_channels))
    plain, _ = _sample(name, params, x_T, None, None)
    every, info = _sample(name, params, x_T, C.uniform_schedule(4, 1), None)
    np.testing.assert_array_equal(every, plain)  # guided: the 2B cache is refreshed every step
    assert np.asarray(info["full_pass"]).all()
    # Cache-DEC a = 1, b = 0 on a cached step: the partial pass is unchanged, bit for bit.
    x, t, ctx = inputs(name)
    _, feat, partial = float_passes(model, params, x, t, ctx)
    h = C.identity_dec(4, 32).apply(feat, 1)
    np.testing.assert_array_equal(h, feat)
    np.testing.assert_array_equal(float_passes_from(model, params, x, t, ctx, h), partial)


@functools.partial(jax.jit, static_argnames=("model",))
def float_passes_from(model, params, x, t, ctx, feature):
    return C.float_unet_fn(model, params)(x, t, 0, ctx, cache_point=model.resolve_cache_point(),
                                          cached_feature=feature)


# ------------------------------------------------- the pipeline, conditional
CIN_S, CIN_N = 4, 2


def cin_builder(artifact_dir, seed=3):
    emb = np.random.default_rng(5).standard_normal((1001, 16)).astype(np.float32)
    cond = M.class_contexts(lambda y: emb[y][:, None, :], 4, seed=seed, guidance_scale=1.5)
    calib = M.CalibrationConfig(num_samples=4, batch_size=4, per_step_full=4, per_step_cached=2,
                                dps_samples=4, act_batch_size=2, seed=1)
    builder = M.MethodBuilder(CIN.config, PARAMS["cin"], schedule=iec_jax.NoiseSchedule.scaled_linear(),
                              shape=(8, 8, 3), cache_point=CIN.resolve_cache_point(), model_name="tiny-cin",
                              calibration=calib, artifact_dir=artifact_dir, spacing="ldm", contexts=cond)
    return builder, emb


CIN_ROW = dict(num_steps=CIN_S, bits=(8, 8), cache_interval=2, cache_schedule="dps", dec=True)


@pytest.fixture(scope="module")
def cin_pipeline(tmp_path_factory):
    """MethodBuilder on the cin-like model: random classes, guidance 1.5, DDIM-4, DPS with
    N = 2, DEC, W8A8 (all artifacts calibrated once)."""
    builder, emb = cin_builder(str(tmp_path_factory.mktemp("art")))
    factory, fparams = builder.build(**CIN_ROW)
    return builder, factory, fparams, emb


def test_artifacts_are_reused_and_other_contexts_refused(cin_pipeline):
    builder, _, fparams, _ = cin_pipeline
    again, _ = cin_builder(builder.artifact_dir)
    _, loaded = again.build(**CIN_ROW)  # from the files: no trajectories are recomputed
    assert again._traj == {}
    assert loaded["q"].dec_layer == fparams["q"].dec_layer and loaded["q"].config == fparams["q"].config
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(fparams)):
        np.testing.assert_array_equal(a, b)
    other, _ = cin_builder(builder.artifact_dir, seed=4)  # other calibration classes
    with pytest.raises(ValueError, match="contexts"):
        other.build(**CIN_ROW)


def test_calibration_trajectories_are_guided(cin_pipeline):
    builder, *_ = cin_pipeline
    traj = builder.trajectories(CIN_S)
    assert traj["x"].shape == (CIN_S, 4, 8, 8, 3) and traj["feature"].shape == (CIN_S, 4, 2, 8, 8, 32)
    assert traj["context"].shape == (4, 1, 16) and traj["uncond"].shape == (4, 1, 16)
    # Step i: one 2B pass [uncond ; cond] at x_i gives the recorded feature, and the guided
    # eps moves x_i to x_{i+1} (samples 0, 1: the shapes compiled above).
    coefs = iec_jax.step_coefficients(builder.schedule, builder.timesteps(CIN_S))
    for i in range(CIN_S):
        x, t = traj["x"][i][:B], np.full(B, traj["t"][i], np.int32)
        ctx = np.concatenate([traj["uncond"][:B], traj["context"][:B]])
        eps2, feat, _ = float_passes(CIN, PARAMS["cin"], jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                                     jnp.asarray(ctx))
        np.testing.assert_allclose(traj["feature"][i][:B, 0], feat[:B], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(traj["feature"][i][:B, 1], feat[B:], rtol=1e-5, atol=1e-5)
        eps = eps2[:B] + 1.5 * (eps2[B:] - eps2[:B])
        x_next, _ = iec_jax.ddim_step(jnp.asarray(x), eps, {k: jnp.float32(coefs[k][i]) for k in
                                                            ("alpha", "alpha_prev", "sigma", "c_dir")})
        np.testing.assert_allclose(x_next, traj["x"][i + 1][:B] if i + 1 < CIN_S else traj["x0"][:B],
                                   rtol=1e-5, atol=1e-5)


def test_plms_calibration_trajectories_are_the_guided_plms_sampler():
    """Stable Diffusion's calibration sampler: guided PLMS (Heun's pair at step 0)."""
    schedule = iec_jax.NoiseSchedule.scaled_linear(final_alpha="first")
    ts = iec_jax.make_timesteps(1000, 4, "ldm")
    rng = np.random.default_rng(4)
    cond, uncond = rng.standard_normal((B, 1, 16)).astype(np.float32), rng.standard_normal((1, 16)).astype(np.float32)
    traj = K.fp_trajectories(lambda p: C.float_unet_fn(CIN, p), B, B, 9, schedule, ts, (8, 8, 3),
                             CIN.resolve_cache_point(), params=PARAMS["cin"], context=cond, uncond=uncond,
                             guidance_scale=3.0, method="plms")
    assert traj["feature"].shape == (4, B, 2, 8, 8, 32) and traj["guidance_scale"] == 3.0
    # By hand: the guided eps (one 2B pass), Heun's pair at step 0, Adams–Bashforth 2, 3
    # after (iec_jax.sample(method="plms")'s arithmetic), the eta = 0 DDIM map.
    coefs = iec_jax.step_coefficients(schedule, ts)
    ctx = jnp.asarray(np.concatenate([np.broadcast_to(uncond, cond.shape), cond]))

    def guided(x, t):
        e, f, _ = float_passes(CIN, PARAMS["cin"], jnp.concatenate([x, x]), jnp.full((2 * B,), t, jnp.int32), ctx)
        return e[:B] + 3.0 * (e[B:] - e[:B]), f

    ddim = lambda x, e, i: iec_jax.ddim_step(x, e, {k: jnp.float32(coefs[k][i]) for k in  # noqa: E731
                                                    ("alpha", "alpha_prev", "sigma", "c_dir")})[0]
    x, hist = jnp.asarray(traj["x"][0]), []
    for i in range(4):
        np.testing.assert_allclose(traj["x"][i], x, rtol=1e-5, atol=1e-5)
        e, f = guided(x, ts[i])
        np.testing.assert_allclose(traj["feature"][i][:, 1], f[B:], rtol=1e-5, atol=1e-5)
        if i == 0:
            e_step = (e + guided(ddim(x, e, 0), ts[1])[0]) / 2
        else:
            w = [(3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24)][i - 1]
            e_step = sum(wk * ek for wk, ek in zip(w, [e] + hist[::-1]))
        hist.append(e)
        x = ddim(x, e_step, i)
    np.testing.assert_allclose(traj["x0"], x, rtol=1e-5, atol=1e-5)


def test_w8a8_cachequant_with_guidance_and_iec(cin_pipeline):
    builder, factory, fparams, emb = cin_pipeline
    qs, full = fparams["q"], fparams["dec"]
    assert full is not None and np.asarray(full.a).shape == (CIN_S, 32)
    # Tables per step: the range of every operand changes along the (full) steps but those
    # that depend on the one-token context alone (the same samples at both full steps):
    # attn2's k and v, its softmax over one key (all ones) and its output.
    attn2 = "mid_block/attentions_0/transformer_blocks_0/attn2"
    context_keys = {f"{attn2}/{k}" for k in ("to_k:x", "to_v:x", "matmul_qk:b", "matmul_av:a",
                                              "matmul_av:b", "to_out_0:x")}
    assert context_keys <= set(qs.act)
    full_steps = np.flatnonzero(builder.cache_artifacts(CIN_S, 2, "dps", True)[0])
    assert full_steps[0] == 0 and len(full_steps) == 2
    d = np.stack([np.asarray(r.delta) for k, r in qs.act.items() if k not in context_keys])
    assert d.shape[1] == CIN_S and (np.abs(d[:, 0] - d[:, full_steps[1]]) > 1e-4 * np.abs(d[:, 0])).all()
    # The context at attn2.to_k / to_v is quantized at those inputs: the float 2B context
    # of the step's calibration batches (one batch per 2 samples, averaged 0.1 / 0.9).
    traj = builder.trajectories(CIN_S)
    ctx = np.concatenate([traj["uncond"][:2], traj["context"][:2]])
    r0 = Q.mse_search(ctx, 8)
    ctx = np.concatenate([traj["uncond"][2:], traj["context"][2:]])
    r1 = Q.mse_search(ctx, 8)
    want = 0.1 * r1[0] + 0.9 * (0.1 * r0[0] + 0.9 * r0[0])
    np.testing.assert_allclose(qs.act[f"{attn2}/to_k:x"].delta[0], want, rtol=1e-6)
    np.testing.assert_array_equal(qs.act[f"{attn2}/to_k:x"].delta[0], qs.act[f"{attn2}/to_v:x"].delta[0])
    # Quant-DEC on both convs that consume the cached feature, per step and channel.
    res = "up_blocks_1/resnets_1"
    assert qs.dec_layer == (f"{res}/conv_shortcut", f"{res}/conv1")
    for dec in qs.dec.values():
        assert np.asarray(dec.a).shape == (CIN_S, 32) and not np.allclose(dec.a, 1)
    # Quantized eps: close to the float one, not equal.
    x, t, ctx = inputs("cin")
    f_eps = float_passes(CIN, PARAMS["cin"], x, t, ctx)[0]
    q_eps = quant_passes(CIN, qs, x, t, ctx, 0)[0]
    err = rel(q_eps, f_eps)
    assert 1e-4 < err < 0.2, err
    # The whole sampler: DPS cache + DEC + W8A8, guidance in one 2B batch, IEC at the full
    # steps, jitted; the cache in the scan carry is the 2B feature.
    labels = np.array([3, 7])
    c, u = jnp.asarray(emb[labels][:, None]), jnp.asarray(np.broadcast_to(emb[1000], (2, 1, 16)))
    iec = iec_jax.IECConfig.official_ldm(steps="full_compute")

    @jax.jit
    def run(p, x_T):
        den = iec_jax.guided_denoiser(factory(p), c, u, 1.5)
        assert den.init_state(x_T).shape == (4, 8, 8, 32)
        return iec_jax.sample(den, x_T, None, schedule=builder.schedule, timesteps=builder.timesteps(CIN_S), iec=iec)

    x0, info = run(fparams, jax.random.normal(jax.random.key(2), (2, 8, 8, 3)))
    full_steps = np.asarray(info["full_pass"])
    assert bool(jnp.isfinite(x0).all()) and full_steps[0] and not full_steps.all()
    summary = iec_jax.nfe_summary(info)
    assert summary["nfe_full"] == full_steps.sum() * 3 and summary["nfe_partial"] == (~full_steps).sum()


def test_quant_dec_identity_and_the_norm_input(cin_pipeline):
    builder, _, fparams, _ = cin_pipeline
    qs = fparams["q"]
    x, t, ctx = inputs("cin")
    S, split = CIN_S, 32
    ident = qs.replace(dec={k: Q.QuantDEC(jnp.ones((S, split)), jnp.zeros((S, split))) for k in qs.dec_layer})
    none = qs.replace(dec=None, dec_layer=None)
    for got, want in zip(quant_passes(CIN, ident, x, t, ctx, 1), quant_passes(CIN, none, x, t, ctx, 1)):
        np.testing.assert_array_equal(got, want)
    # conv1's quant-DEC input rebuilt from the cached feature alone = the network's.
    res = "up_blocks_1/resnets_1"
    feat = float_passes(CIN, PARAMS["cin"], x, t, ctx)[1]

    @jax.jit
    def conv1_input(p, x, t, ctx, feat):
        rec = {}

        def record(next_fun, args, kwargs, c):
            if c.method_name == "__call__" and "/".join(c.module.path) == f"{res}/conv1":
                rec["x"] = args[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            CIN.apply(p, x, t, ctx, cache_point=CIN.resolve_cache_point(), cached_feature=feat)
        return rec["x"]

    rebuilt = Q._norm_silu_part(CIN, PARAMS["cin"], res, feat, 64)
    np.testing.assert_allclose(rebuilt, conv1_input(PARAMS["cin"], x, t, ctx, feat)[..., :split], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------ Bedroom per-channel
def np_max_quant(x, bits, axis):
    """The IEC fork's per-channel 'max' quantizer, float64: per channel, delta from the raw
    range, zero point from the range widened to contain 0."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, 0)
    out = np.empty_like(x)
    deltas, zps = [], []
    for c in range(x.shape[0]):
        lo, hi = x[c].min(), x[c].max()
        delta = max((hi - lo) / (2**bits - 1), 1e-8)
        zp = round(-min(lo, 0.0) / delta)
        out[c] = (np.clip(np.round(x[c] / delta) + zp, 0, 2**bits - 1) - zp) * delta
        deltas.append(delta)
        zps.append(zp)
    return np.moveaxis(out, 0, axis), np.array(deltas), np.array(zps)


def test_per_channel_variant_matches_its_float64_transcription():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 5, 5, 6)) * rng.uniform(0.1, 3, 6) + rng.uniform(-1, 2, 6)).astype(np.float32)
    x[..., 2] = np.abs(x[..., 2]) + 0.5  # a one-signed channel: zero point 0, top values clip
    for bits, axis in ((8, -1), (4, -1), (8, 1)):
        want, d_np, z_np = np_max_quant(x, bits, axis)
        d, z = Q.max_search(x, bits, axis)
        np.testing.assert_allclose(d, d_np, rtol=1e-6)
        np.testing.assert_array_equal(z, z_np)
        got = Q._fake_quant_table(jnp.asarray(x), d, z, bits, "conv_in:x") if axis == -1 else None
        if got is not None:
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-3 * d_np.min())
    # Weights: per output channel (last axis of HWIO), each split group on its own.
    w = rng.standard_normal((3, 3, 8, 5)).astype(np.float32)
    for split in (None, 3):
        groups = [slice(None)] if split is None else [slice(0, split), slice(split, None)]
        expect = np.concatenate([np_max_quant(w[:, :, g].reshape(-1, 5), 8, -1)[0].reshape(3, 3, -1, 5)
                                 for g in groups], axis=2)
        np.testing.assert_allclose(Q.quantize_weight(jnp.asarray(w), 8, split, scale_method="max"), expect,
                                   rtol=1e-6, atol=1e-6)


def test_per_channel_calibration_on_the_bedroom_unet():
    """Channel-wise tables, the last batch of a step wins (no averaging), quant-DEC on
    both convs with per-channel tables, and W8A8 stays close to float."""
    model, params = BEDROOM, PARAMS["bedroom"]
    rng = np.random.default_rng(3)
    x0 = rng.standard_normal((4, 8, 8, 3)).astype(np.float32)
    x1 = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
    t0, t1 = np.array([900, 900, 900, 900]), np.array([500, 500])
    f0 = float_passes(model, params, jnp.asarray(x0[:2]), jnp.asarray(t0[:2]), None)[1]
    calib = [(x0, t0, None), (x1, t1, None)]  # two full steps (the partial pass: as per tensor)
    cfg = Q.QuantConfig.bedroom_per_channel()
    act = Q.calibrate_activations(model, params, calib, cfg, batch_size=2, progress=False)
    np.testing.assert_allclose(act["conv_in:x"].delta[0], np_max_quant(x0[2:], 8, -1)[1], rtol=1e-6)
    assert act["conv_in:x"].delta.shape == (2, 3)
    attn = "down_blocks_1/attentions_0"  # 4x4 tokens, 64 channels in 4 heads of 16
    assert act[f"{attn}/matmul_qk:a"].delta.shape == act[f"{attn}/matmul_qk:b"].delta.shape == (2, 16)
    assert act[f"{attn}/matmul_av:a"].delta.shape == (2, 16) and act[f"{attn}/matmul_av:b"].delta.shape == (2, 16)
    res = "up_blocks_1/resnets_1"
    assert act[f"{res}/conv1:x0"].delta.shape == (2, 32)
    qs = Q.QuantState(Q.quantize_params(model, params, cfg), act, None, cfg)
    fitted = Q.fit_quant_dec(model, params, qs, [f0, f0])
    assert fitted.dec_layer == (f"{res}/conv_shortcut", f"{res}/conv1")
    # Official quirk kept: a channel constant over the batch (the time-embedding features:
    # one t per step) gets delta 1e-8 and, when positive, zero point 0, so it quantizes to
    # 255e-8 ~ 0; a negative one is kept.
    cfg_m = model.config
    emb = np.asarray(timestep_embedding(jnp.asarray(t0[:1]), 32, cfg_m.flip_sin_to_cos, cfg_m.freq_shift))[0]
    r = act["time_embedding/linear_1:x"]
    np.testing.assert_array_equal(r.delta[0], np.full(32, 1e-8, np.float32))
    assert (emb > 0).any() and (emb < 0).any()
    np.testing.assert_array_equal(r.zero_point[0][emb > 0], 0)
    assert (np.asarray(r.zero_point[0])[emb < 0] > 1e5).all()
    # On the step's last calibration batch (max-based ranges have no headroom: other
    # inputs clip), W8A8 per channel: within 30% of float for this random network
    # (W8A8 per tensor MSE: 3.5%; the zeroed time-embedding channels cost the rest).
    x, t = jnp.asarray(x0[2:]), jnp.asarray(t0[2:], jnp.int32)
    ref = float_passes(model, params, x, t, None)
    got = quant_passes(model, fitted, x, t, None, 0)
    assert 1e-3 < rel(got[0], ref[0]) < 0.3, rel(got[0], ref[0])
    for dec in fitted.dec.values():
        assert np.all(np.isfinite(dec.a)) and not np.allclose(dec.a, 1)
