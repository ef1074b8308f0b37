"""The Flax UNet on the two unconditional LSUN latent-diffusion UNet layouts against
diffusers' UNet2DModel: LDM-4 Bedroom (plain + attention blocks, conv resampling, head
dim 32) and LDM-8 Church (scale-shift time conditioning, resnet down/upsamplers,
ResnetUpsampleBlock2D, mid attention with its GroupNorm, 8 heads everywhere).

Reduced widths keep every block type of the real configs; the full-size configs are
checked by parameter count only (traced, no arrays). Attention is made peaky (q/k weights
with std 0.25, GroupNorm affines randomized) so that a wrong head partition or scale shows
up in ε. (With std 0.5 at these widths the network itself is ill-conditioned in float32:
diffusers' float32 ε then differs from its own float64 ε by 3e-3.)
"""

import dataclasses
import functools

import jax
import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention as TorchAttention

from iec_jax.models import convert, unet
from iec_jax.models.unet import UNet, UNetConfig, deepcache_ldm_cache_point
from lsun_small import BEDROOM_SMALL, CHURCH_SMALL, QK_STD

TOL = 1e-4  # max-abs ε difference allowed against PyTorch (float32)

# The other resnet-resampling blocks (not in the LSUN nets): ResnetDownsampleBlock2D and
# ResnetUpsampleBlock2D with the default (additive) time conditioning, next to conv ones.
MIXED_SMALL = UNetConfig(
    sample_size=8,
    in_channels=2,
    out_channels=2,
    down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "ResnetUpsampleBlock2D", "AttnUpBlock2D"),
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    dropout=0.0,
    attention_head_dim=8,
    norm_num_groups=4,
)
CONFIGS = {"bedroom": BEDROOM_SMALL, "church": CHURCH_SMALL, "mixed": MIXED_SMALL}


def diffusers_model(config: UNetConfig, seed: int = 0) -> UNet2DModel:
    """A random diffusers UNet2DModel of ``config`` (fixed head count applied), with
    randomized GroupNorm affines and peaky attention (q, k weights with std QK_STD)."""
    torch.manual_seed(seed)
    model = UNet2DModel(**config.to_diffusers()).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TorchAttention):
                if config.num_attention_heads is not None:
                    m.heads = config.num_attention_heads
                m.to_q.weight.normal_(0.0, QK_STD)
                m.to_k.weight.normal_(0.0, QK_STD)
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return model


def torch_eps(model, x, t):
    with torch.no_grad():
        out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t).long()).sample
    return out.numpy().transpose(0, 2, 3, 1)


def inputs(config, batch, seed=0):
    rng = np.random.default_rng(seed)
    size = config.sample_size
    x = rng.standard_normal((batch, size, size, config.in_channels)).astype(np.float32)
    t = np.array([0, 999, 371][:batch], np.int32)
    return x, t


def max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@functools.partial(jax.jit, static_argnames=("config",))
def eps_fn(params, x, t, config):
    return UNet(config).apply({"params": params}, x, t)


@functools.partial(jax.jit, static_argnames=("config", "cache_point"))
def full_with_feature(params, x, t, config, cache_point):
    return UNet(config).apply({"params": params}, x, t, cache_point=cache_point, return_feature=True)


@functools.partial(jax.jit, static_argnames=("config", "cache_point"))
def partial_pass(params, x, t, feature, config, cache_point):
    return UNet(config).apply({"params": params}, x, t, cache_point=cache_point, cached_feature=feature)


@pytest.fixture(scope="module")
def models():
    out = {}
    for name, config in CONFIGS.items():
        model = diffusers_model(config)
        out[name] = (model, convert.params_from_diffusers_state_dict(model.state_dict(), config))
    return out


@pytest.mark.parametrize("name", ["bedroom", "church", "mixed"])
def test_matches_diffusers(models, name):
    # Measured max-abs ε differences (float32, CPU): bedroom 8.5e-6, church 3.2e-6,
    # mixed 1.1e-6 (|ε| up to 1.2, 1.6 and 1.1).
    config = CONFIGS[name]
    model, params = models[name]
    assert unet.count_params(params) == sum(p.numel() for p in model.parameters())
    x, t = inputs(config, 2, seed=1)
    ref = torch_eps(model, x, t)
    diff = max_abs(eps_fn(params, x, t, config), ref)
    print(f"\n{name}: max-abs ε difference to diffusers {diff:.1e} (|ε| up to {np.abs(ref).max():.1f})")
    assert diff < TOL


def test_church_head_count_matters(models):
    # diffusers' own head partition of the same weights (C / 8 heads of width 8) gives
    # another ε (measured max-abs difference 0.57 with |ε| up to 1.1), so matching the
    # 8-head model to 1e-4 above pins the head partition down.
    model, params = models["church"]
    config = CHURCH_SMALL
    x, t = inputs(config, 2, seed=2)
    ours = eps_fn(params, x, t, config)
    attentions = [m for m in model.modules() if isinstance(m, TorchAttention)]
    try:
        for m in attentions:
            m.heads = m.inner_dim // config.attention_head_dim
        assert max_abs(torch_eps(model, x, t), ours) > 1e-2
    finally:
        for m in attentions:
            m.heads = config.num_attention_heads
    assert max_abs(torch_eps(model, x, t), ours) < TOL
    other = dataclasses.replace(config, num_attention_heads=None)
    assert config.attention_heads(64) == 8 and other.attention_heads(64) == 8 and other.attention_heads(32) == 4


@pytest.mark.parametrize("name", ["bedroom", "church"])
def test_partial_pass_at_ldm_cache_point(models, name):
    # Measured: the partial pass reproduces the full pass bit for bit on CPU.
    config = CONFIGS[name]
    _, params = models[name]
    cp = deepcache_ldm_cache_point(config)
    assert cp == (config.num_levels - 1, config.layers_per_block)
    assert unet.num_skips_needed(config, cp) == 1  # conv_in only
    x, t = inputs(config, 2, seed=3)
    eps_full, feature = full_with_feature(params, x, t, config, cp)
    assert feature.shape == unet.cached_feature_shape(config, cp, x.shape) == (2, 16, 16, 32)
    np.testing.assert_allclose(eps_full, eps_fn(params, x, t, config), rtol=0, atol=1e-6)
    np.testing.assert_allclose(partial_pass(params, x, t, feature, config, cp), eps_full, rtol=0, atol=1e-6)
    assert max_abs(partial_pass(params, x, t, 0.5 * feature, config, cp), eps_full) > 1e-2


def test_partial_pass_through_resnet_resamplers(models):
    # A deeper cache point of the Church-like net: the partial pass recomputes a resnet
    # downsampler (down_blocks[0].downsamplers[0]) and runs the resnet upsampler of
    # up_blocks[2]; the cache point is the output of up_blocks[2].attentions[0].
    config = CHURCH_SMALL
    _, params = models["church"]
    cp = unet.CachePoint(2, 1)
    x, t = inputs(config, 2, seed=4)
    eps_full, feature = full_with_feature(params, x, t, config, cp)
    assert feature.shape == (2, 8, 8, 64)
    np.testing.assert_allclose(partial_pass(params, x, t, feature, config, cp), eps_full, rtol=0, atol=1e-6)


def test_parameter_names_and_layers():
    # Resnet resamplers are ResnetBlock2Ds named downsamplers_0 / upsamplers_0, time_emb_proj
    # is 2C wide under scale-shift, and the mid attention keeps its GroupNorm.
    shapes = convert.expected_param_shapes(CHURCH_SMALL)
    assert shapes[("down_blocks_0", "downsamplers_0", "conv1", "kernel")] == (3, 3, 32, 32)
    assert ("down_blocks_0", "downsamplers_0", "conv_shortcut", "kernel") not in shapes
    assert shapes[("up_blocks_0", "upsamplers_0", "conv2", "kernel")] == (3, 3, 128, 128)
    assert shapes[("up_blocks_0", "resnets_0", "time_emb_proj", "kernel")] == (128, 256)
    assert shapes[("mid_block", "attentions_0", "group_norm", "scale")] == (128,)
    assert not any(p[0] == "up_blocks_0" and p[1].startswith("attentions") for p in shapes)
    shapes = convert.expected_param_shapes(BEDROOM_SMALL)
    assert shapes[("down_blocks_0", "downsamplers_0", "conv", "kernel")] == (3, 3, 32, 32)
    assert shapes[("up_blocks_0", "resnets_0", "time_emb_proj", "kernel")] == (128, 96)


def test_full_size_parameter_counts():
    # The exact LSUN configs, traced on both sides (torch meta device: no memory).
    for config, expected in ((UNetConfig.ldm_lsun_bedroom(), 274_056_163), (UNetConfig.ldm_lsun_church(), 294_966_916)):
        params = jax.eval_shape(lambda k, c=config: UNet(c).init_params(k), jax.random.key(0))
        with torch.device("meta"):
            model = UNet2DModel(**config.to_diffusers())
        assert unet.count_params(params) == sum(p.numel() for p in model.parameters()) == expected
        assert UNetConfig.from_diffusers(config.to_diffusers()) == dataclasses.replace(config, num_attention_heads=None)


def test_config_checks():
    base = CHURCH_SMALL.to_json_dict()
    assert UNetConfig.from_json_dict(base) == CHURCH_SMALL
    for changes, match in [
        ({"resnet_time_scale_shift": "spatial"}, "resnet_time_scale_shift"),
        ({"attn_norm_num_groups": None}, "resnet_time_scale_shift"),  # mid attention w/o GroupNorm
        ({"downsample_type": "fir"}, "downsample_type"),
        ({"down_block_types": ["DownBlock2D"] * 4}, "downsample_type"),  # resnet would be ignored
        ({"up_block_types": ["UpBlock2D"] * 4}, "upsample_type"),
        ({"num_attention_heads": 3}, "num_attention_heads"),
        ({"num_attention_heads": 0}, "num_attention_heads"),
    ]:
        with pytest.raises(ValueError, match=match):
            UNetConfig.from_json_dict({**base, **changes})
    # ResnetDownsampleBlock2D / ResnetUpsampleBlock2D carry resnet resamplers whatever the option.
    cfg = dataclasses.replace(
        BEDROOM_SMALL,
        down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D", "UpBlock2D"),
    )
    assert [cfg.downsampler_type(i) for i in range(3)] == ["resnet", "conv", None]
    assert [cfg.upsampler_type(i) for i in range(3)] == ["conv", "resnet", None]
