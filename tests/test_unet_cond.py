"""The Flax UNetCondition against diffusers' UNet2DConditionModel: random-weight
equivalence (SD-like, cin256-like and a configuration exercising the other options),
DeepCache partial passes and the cached feature, full-size parameter counts, strict
conversion from (corrupted) diffusers folders, the class embedder, bfloat16 compute,
interception points and the config.

Compiled functions are module-level jits with the config as a static argument, so each
(config, dtype, mode) compiles once.
"""

import dataclasses
import functools
import inspect
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from diffusers import UNet2DConditionModel

from iec_jax.models import layers, unet_cond
from iec_jax.models.unet_cond import (
    CachePoint,
    ClassEmbedder,
    UNetCondition,
    UNetConditionConfig,
    cached_feature_shape,
    ldm_cache_point,
)

TOL = 1e-4  # max-abs ε difference allowed against PyTorch (float32)

CONFIGS = {
    # Stable Diffusion v1 reduced: cross-attention in the shallow levels and the middle
    # block, a plain deepest level, several heads, several context tokens; 2 resnets per
    # level as SD (the default cache point follows up_blocks[-1].attentions[-2]).
    "sd": UNetConditionConfig(
        sample_size=16,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ),
    # cin256 reduced: a plain shallowest level, cross-attention in the deeper level and the
    # middle block, ONE head of dim C, a one-token class context, a classifier-free
    # guidance batch (the default cache point follows up_blocks[-1].resnets[-2]).
    "cin": UNetConditionConfig(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=1,
        norm_num_groups=8,
    ),
    # The options the two real configs leave at one value: per-level head counts (the up
    # path reads them reversed: up_blocks_0 has level 1's 3 heads), linear
    # proj_in/proj_out, two transformer blocks per Transformer2D, upcast attention, 1
    # resnet per level, DDPM-style downsample padding, a separate time-embedding width,
    # flip/shift, mid-block scale, centred input, 2 -> 3 channels.
    "variant": UNetConditionConfig(
        sample_size=8,
        in_channels=2,
        out_channels=3,
        center_input_sample=True,
        flip_sin_to_cos=False,
        freq_shift=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 24),
        layers_per_block=1,
        downsample_padding=0,
        mid_block_scale_factor=2.0,
        norm_num_groups=4,
        norm_eps=1e-6,
        cross_attention_dim=8,
        transformer_layers_per_block=2,
        attention_head_dim=(2, 3),
        use_linear_projection=True,
        upcast_attention=True,
        time_embedding_dim=40,
    ),
}
BATCH = {"sd": 2, "cin": 4, "variant": 3}
TOKENS = {"sd": 7, "cin": 1, "variant": 3}
# The cache point each model is checked at: LDM's default for the two real layouts; for
# variant the input of up_blocks[1].resnets[0] (the upsampler output, 24 channels), whose
# partial pass stops inside down_blocks_0 (conv_in and resnets_0 + attentions_0 only).
CACHE_POINTS = {"sd": None, "cin": None, "variant": CachePoint(1, 0)}


@functools.partial(jax.jit, static_argnames=("config", "dtype", "cache_point"))
def full_with_feature(params, x, t, context, config, dtype=jnp.float32, cache_point=None):
    return UNetCondition(config, dtype).apply(
        {"params": params}, x, t, context, cache_point=cache_point, return_feature=True
    )


@functools.partial(jax.jit, static_argnames=("config", "cache_point"))
def partial_pass(params, x, t, context, feature, config, cache_point=None):
    return UNetCondition(config).apply(
        {"params": params}, x, t, context, cache_point=cache_point, cached_feature=feature
    )


def _randomize(model):
    """Random weights that make every parameter matter: GroupNorm/LayerNorm affine
    parameters away from (1, 0); q/k weights at std sqrt(3 / fan_in), so the attention
    logits have std ≈ 3 and attention is far from uniform (with the default init they
    have std ≈ 1/3 and a wrong head partition would change ε by little); conv_out,
    proj_out and the resnets' conv2 (zero-initialised in the original CompVis code) at
    std 1/sqrt(fan_in). Sharper attention (q/k std 0.5 at these widths: logit std 8-16)
    amplifies float32 rounding to ~1e-4 without any error in the model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            module = name.rsplit(".", 1)[0]
            if isinstance(model.get_submodule(module), (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif name.endswith((".to_q.weight", ".to_k.weight")):
                p.normal_(0.0, (3.0 / p.shape[1]) ** 0.5)
            elif name.endswith(".weight") and (
                name.startswith("conv_out.") or ".proj_out." in name or ".conv2." in name
            ):
                p.normal_(0.0, float(np.prod(p.shape[1:])) ** -0.5)


@pytest.fixture(scope="module")
def models():
    """Random diffusers models (seeded) of every config, and their converted params."""
    out = {}
    for name, config in CONFIGS.items():
        torch.manual_seed(0)
        model = UNet2DConditionModel(**config.to_diffusers()).eval()
        _randomize(model)
        out[name] = (model, unet_cond.params_from_diffusers_state_dict(model.state_dict(), config))
    return out


@pytest.fixture(scope="module")
def class_embedder():
    """A random torch nn.Embedding(1001, 16) in a CompVis-style state dict, converted."""
    torch.manual_seed(1)
    embedding = torch.nn.Embedding(1001, CONFIGS["cin"].cross_attention_dim)
    state = {"cond_stage_model.embedding.weight": embedding.weight.detach(), "model.other.weight": torch.zeros(3)}
    params = unet_cond.class_embedder_params_from_state_dict(state, 1001, CONFIGS["cin"].cross_attention_dim)
    return embedding, params


def _inputs(name, class_embedder=None, seed=0):
    config = CONFIGS[name]
    rng = np.random.default_rng(seed)
    b, size = BATCH[name], config.sample_size
    x = rng.standard_normal((b, size, size, config.in_channels)).astype(np.float32)
    t = rng.integers(0, 1000, size=b).astype(np.int32)
    if name == "cin":  # classifier-free guidance batch: [labels, null labels]
        embedding, params = class_embedder
        y = np.concatenate([rng.integers(0, 1000, size=b // 2), np.full(b // 2, unet_cond.NULL_CLASS)])
        context = np.asarray(ClassEmbedder(1001, config.cross_attention_dim).apply({"params": params}, y))
        with torch.no_grad():
            torch_context = embedding(torch.from_numpy(y)[:, None]).numpy()
        np.testing.assert_array_equal(context, torch_context)
    else:
        context = rng.standard_normal((b, TOKENS[name], config.cross_attention_dim)).astype(np.float32)
    return x, t, context


def _torch_eps(model, x, t, context, hooks=()):
    """diffusers ε (NHWC) and what ``hooks`` captured: (module, "pre") records the
    module's first input, (module, "out") its output (first element of a tuple)."""
    captured, handles = [], []
    for i, (module, kind) in enumerate(hooks):
        captured.append(None)
        if kind == "pre":
            handles.append(module.register_forward_pre_hook(lambda m, args, i=i: captured.__setitem__(i, args[0])))
        else:
            handles.append(
                module.register_forward_hook(
                    lambda m, args, out, i=i: captured.__setitem__(i, out[0] if isinstance(out, tuple) else out)
                )
            )
    try:
        with torch.no_grad():
            out = model(
                torch.from_numpy(x.transpose(0, 3, 1, 2)),
                torch.from_numpy(t).long(),
                encoder_hidden_states=torch.from_numpy(context),
            ).sample
    finally:
        for handle in handles:
            handle.remove()
    return out.numpy().transpose(0, 2, 3, 1), [c.numpy().transpose(0, 2, 3, 1) for c in captured]


def _max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("name", ["sd", "cin", "variant"])
def test_random_diffusers_models_match(models, class_embedder, name):
    # Measured (float32, CPU): max-abs ε differences to diffusers sd 1.5e-5, cin 2.4e-6,
    # variant 1.9e-6 (|ε| up to 3.5), features as close, partial passes bit-identical.
    config = CONFIGS[name]
    model, params = models[name]
    assert unet_cond.count_params(params) == sum(p.numel() for p in model.parameters())
    x, t, context = _inputs(name, class_embedder, seed=1)
    cp = CACHE_POINTS[name]
    up_block, resnet = ldm_cache_point(config) if cp is None else cp

    # The cached feature is the up-path part of the input of up_blocks[i].resnets[j]
    # (before the concatenation with the skip). At the default point that is the output
    # of up_blocks[-1].attentions[-2] (a cross-attention level) or .resnets[-2].
    hooks = [(model.up_blocks[up_block].resnets[resnet], "pre")]
    if cp is None:
        last_up = model.up_blocks[-1]
        cross = config.up_block_types[-1] == "CrossAttnUpBlock2D"
        hooks.append((last_up.attentions[-2] if cross else last_up.resnets[-2], "out"))
    ref, (ref_input, *ref_output) = _torch_eps(model, x, t, context, hooks)

    eps, feature = full_with_feature(params, x, t, context, config, cache_point=cp)
    assert eps.shape == x.shape[:3] + (config.out_channels,) and eps.dtype == jnp.float32
    assert feature.shape == cached_feature_shape(config, (up_block, resnet), x.shape)
    diff = _max_abs(eps, ref)
    feature_diff = _max_abs(feature, ref_input[..., : feature.shape[-1]])
    for out in ref_output:
        np.testing.assert_array_equal(out, ref_input[..., : feature.shape[-1]])
    partial_diff = _max_abs(partial_pass(params, x, t, context, feature, config, cp), eps)
    print(
        f"\n{name}: max-abs ε difference to diffusers {diff:.1e} (|ε| <= {np.abs(ref).max():.2f}),"
        f" feature at {(up_block, resnet)} {feature_diff:.1e}, partial vs full pass {partial_diff:.1e}"
    )
    assert diff < TOL and feature_diff < TOL
    assert partial_diff <= 1e-6


def test_head_partition_matters(models):
    # The random q/k weights make attention sharp enough that the head count shows: a
    # Transformer2D of the SD-like model (64 channels) matches diffusers' module with its
    # 4 heads and is far from it with 2 or 8 heads and the same parameters.
    model, params = models["sd"]
    torch_module = model.down_blocks[1].attentions[0]
    sub = params["down_blocks_1"]["attentions_0"]
    rng = np.random.default_rng(2)
    h = rng.standard_normal((2, 8, 8, 64)).astype(np.float32)
    context = rng.standard_normal((2, 7, 32)).astype(np.float32)
    with torch.no_grad():
        ref = torch_module(
            torch.from_numpy(h.transpose(0, 3, 1, 2)),
            encoder_hidden_states=torch.from_numpy(context),
            return_dict=False,
        )
    ref = ref[0].numpy().transpose(0, 2, 3, 1)

    @functools.partial(jax.jit, static_argnames=("heads",))
    def ours(sub, h, context, heads):
        return unet_cond.Transformer2D(64, heads, groups=8).apply({"params": sub}, h, context)

    diffs = {heads: _max_abs(ours(sub, h, context, heads), ref) for heads in (2, 4, 8)}
    print(f"\nTransformer2D max-abs difference by head count: {diffs}")
    assert diffs[4] < TOL and diffs[2] > 0.1 and diffs[8] > 0.1


def test_partial_pass_computes_only_what_it_needs(models):
    # At the default cache point only conv_in, the last up block's last resnet (+ its
    # transformer for SD) and the output layers run.
    config = CONFIGS["sd"]
    _, params = models["sd"]
    x, t, context = _inputs("sd", seed=4)
    seen = set()

    def record(next_fun, args, kwargs, context_):
        if isinstance(context_.module, (layers.Conv2d, layers.Dense)) and context_.method_name == "__call__":
            seen.add(context_.module.path[0] + ("/" + context_.module.path[1] if len(context_.module.path) > 2 else ""))
        return next_fun(*args, **kwargs)

    feature = jnp.zeros(cached_feature_shape(config, ldm_cache_point(config), x.shape))
    with nn.intercept_methods(record):
        jax.eval_shape(
            lambda p: UNetCondition(config).apply({"params": p}, x, t, context, cached_feature=feature), params
        )
    assert seen == {"time_embedding", "conv_in", "up_blocks_2/resnets_2", "up_blocks_2/attentions_2", "conv_out"}
    with pytest.raises(ValueError, match="cached_feature"):
        jax.eval_shape(
            lambda p: UNetCondition(config).apply({"params": p}, x, t, context, cached_feature=feature[:, :4]), params
        )


# ---------------------------------------------------------------- full size
def test_full_size_parameter_counts():
    for config, expected in ((UNetConditionConfig.sd_v1(), 859_520_964), (UNetConditionConfig.cin256(), None)):
        with torch.device("meta"):
            reference = sum(p.numel() for p in UNet2DConditionModel(**config.to_diffusers()).parameters())
        shapes = unet_cond.expected_param_shapes(config)
        ours = sum(int(np.prod(s)) for s in shapes.values())
        print(f"\n{config.block_out_channels}: {ours:,} parameters (diffusers {reference:,})")
        assert ours == reference
        if expected is not None:
            assert ours == expected
    shapes = unet_cond.expected_param_shapes(UNetConditionConfig.cin256())
    # One head of dim C: attn2 reads the 512-wide class token; the last up level is plain.
    assert shapes[("up_blocks_0", "attentions_0", "transformer_blocks_0", "attn2", "to_k", "kernel")] == (512, 960)
    assert not any(p[0] == "up_blocks_3" and p[1].startswith("attentions") for p in shapes)
    assert UNetConditionConfig.cin256().heads(960) == 1 and UNetConditionConfig.sd_v1().heads(320) == 8


# ---------------------------------------------------------------- conversion
def _save_folder(model, folder, safe=True):
    model.save_pretrained(folder, safe_serialization=safe)
    return folder


def test_load_folder_and_corrupted_checkpoints(models, tmp_path):
    model, params = models["sd"]
    folder = _save_folder(model, tmp_path / "ok")
    config, loaded = unet_cond.load_diffusers_unet_condition(folder)
    assert config == CONFIGS["sd"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
    _, from_bin = unet_cond.load_diffusers_unet_condition(_save_folder(model, tmp_path / "bin", safe=False))
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_bin, params)

    weights = folder / "diffusion_pytorch_model.safetensors"
    state = safetensors.numpy.load_file(str(weights))
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"

    def corrupt(name, state_):
        bad = tmp_path / name
        bad.mkdir()
        (bad / "config.json").write_text((folder / "config.json").read_text())
        safetensors.numpy.save_file(state_, str(bad / weights.name))
        return bad

    renamed = dict(state)
    renamed[key.replace("to_k", "to_kk")] = renamed.pop(key)
    with pytest.raises(ValueError, match=r"missing 1 key.*to_k\.weight[\s\S]*unexpected 1 key.*to_kk\.weight"):
        unet_cond.load_diffusers_unet_condition(corrupt("renamed", renamed))

    reshaped = dict(state)
    reshaped[key] = np.zeros((64, 16), np.float32)
    with pytest.raises(ValueError, match=re.escape(f"{key}: checkpoint shape (64, 16), expected (64, 32)")):
        unet_cond.load_diffusers_unet_condition(corrupt("reshaped", reshaped))

    truncated = corrupt("truncated", state)
    data = (truncated / weights.name).read_bytes()
    (truncated / weights.name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        unet_cond.load_diffusers_unet_condition(truncated)

    (truncated / weights.name).unlink()
    with pytest.raises(ValueError, match="neither diffusion_pytorch_model.safetensors nor .bin"):
        unet_cond.load_diffusers_unet_condition(truncated)

    unsupported = tmp_path / "unsupported"
    unsupported.mkdir()
    cfg = json.loads((folder / "config.json").read_text())
    (unsupported / "config.json").write_text(json.dumps({**cfg, "class_embed_type": "timestep"}))
    with pytest.raises(ValueError, match="class_embed_type"):
        unet_cond.load_diffusers_unet_condition(unsupported)


def test_class_embedder(class_embedder):
    embedding, params = class_embedder
    assert params["embedding"]["embedding"].shape == (1001, 16)
    np.testing.assert_array_equal(params["embedding"]["embedding"], embedding.weight.detach().numpy())
    default = jax.eval_shape(lambda k: ClassEmbedder().init(k, jnp.zeros((2,), jnp.int32)), jax.random.key(0))
    assert default["params"]["embedding"]["embedding"].shape == (1001, 512)
    out = ClassEmbedder(1001, 16).apply({"params": params}, jnp.array([0, unet_cond.NULL_CLASS]))
    assert out.shape == (2, 1, 16)
    weight = embedding.weight.detach()
    with pytest.raises(ValueError, match="cond_stage_model.embedding.weight"):
        unet_cond.class_embedder_params_from_state_dict({"embedding.weight": weight}, 1001, 16)
    with pytest.raises(ValueError, match=r"cond_stage_model\.embedding\.weight: checkpoint shape \(1001, 16\)"):
        unet_cond.class_embedder_params_from_state_dict({"cond_stage_model.embedding.weight": weight})
    assert unet_cond.class_embedder_params_from_state_dict({"embedding.weight": weight}, 1001, 16, prefix="")


# ------------------------------------------------------------------ bfloat16
def test_bfloat16_compute_stays_close(models):
    # Measured: max-abs difference 3e-2 at |ε| <= 2.9 (variant config, upcast attention).
    config = CONFIGS["variant"]
    _, params = models["variant"]
    x, t, context = _inputs("variant", seed=5)
    cp = CACHE_POINTS["variant"]  # the float32 pass compiled by test_random_diffusers_models_match
    ref, _ = full_with_feature(params, x, t, context, config, cache_point=cp)
    eps, feature = full_with_feature(params, x, t, context, config, jnp.bfloat16, cache_point=cp)
    assert eps.dtype == jnp.float32 and feature.dtype == jnp.bfloat16
    diff = _max_abs(eps, ref)
    print(f"\nbfloat16: max-abs ε difference {diff:.1e} (|ε| <= {np.abs(ref).max():.2f})")
    assert diff < 0.05 * float(np.abs(ref).max())


# ------------------------------------------------------------- interception
def test_interceptor_sees_every_layer(models):
    config = CONFIGS["sd"]
    model, params = models["sd"]
    weights = {k[: -len(".weight")]: v for k, v in model.state_dict().items() if k.endswith(".weight")}
    convs = {k for k, v in weights.items() if v.ndim == 4}
    linears = {k for k, v in weights.items() if v.ndim == 2}
    n_attention = sum(1 for k in weights if k.endswith(".to_q"))
    calls = {cls: [] for cls in layers.LEAF_LAYERS}
    splits = {}

    def record(next_fun, args, kwargs, context):
        m = context.module
        if isinstance(m, layers.LEAF_LAYERS) and context.method_name == "__call__":
            path = unet_cond.flax_path_to_diffusers_key(m.path + ("bias",))[: -len(".bias")]
            calls[type(m) if type(m) in calls else layers.Dense].append(path)
            if isinstance(m, layers.Conv2d) and m.input_split is not None:
                splits[path] = (m.input_split, args[0].shape[-1])
        return next_fun(*args, **kwargs)

    x, t, context = _inputs("sd")
    with nn.intercept_methods(record):
        jax.eval_shape(lambda p: UNetCondition(config).apply({"params": p}, x, t, context), params)
    assert sorted(calls[layers.Conv2d]) == sorted(convs)  # proj_in / proj_out included
    assert sorted(calls[layers.Dense]) == sorted(linears)  # bias-free q/k/v included
    assert len(calls[layers.MatMul]) == 2 * n_attention and len(calls[layers.Softmax]) == n_attention
    assert n_attention == 2 * (2 * 2 + 1 + 3 * 2)  # attn1 + attn2 per transformer
    assert set(splits) == {c for c in convs if re.match(r"up_blocks\.\d+\.resnets\.\d+\.(conv1|conv_shortcut)$", c)}

    def recompute(next_fun, args, kwargs, context):  # a quantizer-style identity
        m = context.module
        if isinstance(m, (layers.Conv2d, layers.Dense)) and context.method_name == "__call__":
            return m.compute(args[0], m.get_variable("params", "kernel"), m.get_variable("params", "bias"))
        return next_fun(*args, **kwargs)

    def intercepted(params):  # works for the bias-free DenseNoBias (bias None) too
        with nn.intercept_methods(recompute):
            return UNetCondition(config).apply({"params": params}, x, t, context)

    assert jax.eval_shape(intercepted, params).shape == x.shape[:3] + (config.out_channels,)


# ---------------------------------------------------------------- configs
def test_import_needs_no_torch(fresh_python):
    code = ("from iec_jax.models import unet_cond\n"
            "print(unet_cond.UNetConditionConfig.sd_v1().time_embed_dim)\n")
    assert fresh_python(code, block=("torch", "safetensors", "diffusers", "orbax")) == "1280"


def test_diffusers_defaults_table_is_current():
    sig = inspect.signature(UNet2DConditionModel.__init__)
    defaults = {k: p.default for k, p in sig.parameters.items() if k != "self"}
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in unet_cond.DIFFUSERS_COND_DEFAULTS.items()} == defaults


def test_published_sd_v1_config():
    # CompVis/stable-diffusion-v1-4 unet/config.json (diffusers keys as published).
    published = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.2.2",
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    }
    assert UNetConditionConfig.from_diffusers(published) == UNetConditionConfig.sd_v1()


def test_config_round_trips_and_rejects_unsupported():
    for config in (*CONFIGS.values(), UNetConditionConfig.sd_v1(), UNetConditionConfig.cin256()):
        assert UNetConditionConfig.from_json_dict(json.loads(json.dumps(config.to_json_dict()))) == config
        assert UNetConditionConfig.from_diffusers(config.to_diffusers()) == config
        hash(config)
    with pytest.raises(ValueError, match="_class_name"):
        UNetConditionConfig.from_diffusers({"_class_name": "UNet2DModel"})
    with pytest.raises(ValueError, match="unknown UNet2DConditionModel config key.*'bogus'"):
        UNetConditionConfig.from_diffusers({"bogus": 1})
    for key, value in (
        ("only_cross_attention", True),
        ("dual_cross_attention", True),
        ("resnet_time_scale_shift", "scale_shift"),
        ("addition_embed_type", "text_time"),
        ("time_cond_proj_dim", 256),
        ("conv_in_kernel", 7),
        ("num_attention_heads", 8),
        ("resnet_out_scale_factor", True),
        ("cross_attention_dim", [768, 768, 768, 768]),
        ("transformer_layers_per_block", [1, 2, 10, 10]),
    ):
        with pytest.raises(ValueError, match=key):
            UNetConditionConfig.from_diffusers({key: value})
    with pytest.raises(ValueError, match="unknown UNetConditionConfig field"):
        UNetConditionConfig.from_json_dict({"bogus": 1})
    base = CONFIGS["sd"]
    for field, value in (
        ("attention_head_dim", 3),  # 3 heads do not divide 32 channels
        ("attention_head_dim", (4, 4)),  # one per level, 3 levels
        ("norm_num_groups", 12),
        ("down_block_types", ("CrossAttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D")),
        ("up_block_types", ("UpBlock2D",)),
        ("cross_attention_dim", 0),
        ("transformer_layers_per_block", 0),
        ("use_linear_projection", "yes"),
        ("dropout", 1.0),
        ("freq_shift", 16),
    ):
        with pytest.raises(ValueError, match=f"UNetConditionConfig.{field}"):
            dataclasses.replace(base, **{field: value})
    per_level = dataclasses.replace(base, attention_head_dim=(2, 4, 8))
    assert per_level.heads(32) == 2 and per_level.level_heads(2) == 8
    with pytest.raises(ValueError, match="heads"):
        per_level.heads(64)  # levels 1 and 2 have 64 channels with 4 and 8 heads


def test_calling_convention_checks(models):
    config = CONFIGS["sd"]
    _, params = models["sd"]
    x, t, context = _inputs("sd")
    apply = functools.partial(UNetCondition(config).apply, {"params": params})
    for args, match in (
        ((x, t, context[..., :16]), "context must be"),
        ((x, t, context[0]), "context must be"),
        ((x[..., :3], t, context), "NHWC"),
        ((x[:, :10, :10], t, context), "divisible"),
        ((x, t[:1], context), "t must have shape"),
    ):
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(apply, *args)
    # A scalar t broadcasts over the batch.
    scalar = jax.eval_shape(lambda: apply(x, jnp.int32(5), context))
    assert scalar.shape == x.shape[:3] + (config.out_channels,)
    # Training mode with resnet dropout needs (only) a dropout rng.
    dropout = UNetCondition(dataclasses.replace(config, dropout=0.1))
    rngs = {"dropout": jax.random.key(0)}
    trained = jax.eval_shape(lambda: dropout.apply({"params": params}, x, t, context, train=True, rngs=rngs))
    assert trained.shape == scalar.shape
