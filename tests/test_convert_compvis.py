"""CompVis latent-diffusion UNet state dicts -> diffusers names -> Flax params.

A test-local inverse mapping (diffusers -> CompVis names, fusing q/k/v per head into the
legacy ``qkv``) builds CompVis-layout state dicts from random diffusers models. It is
validated independently: diffusers' own ``convert_ldm_unet_checkpoint`` maps the
SpatialTransformer layouts (reduced SD-v1-like and cin256-like UNet2DConditionModels)
back to exactly the original, and a test-local reference of the legacy attention computed
from the fused qkv (heads-first layout) equals diffusers' attention on the original
weights. The converter under test must then reproduce the originals exactly and, for the
LSUN layouts, give the same Flax params and ε as the diffusers route.
"""

import functools
import math
import re

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.models.attention_processor import Attention as TorchAttention

from iec_jax.models import convert
from iec_jax.models.convert_compvis import compvis_unet_to_diffusers, params_from_compvis_unet
from iec_jax.models.unet import UNet
from lsun_small import BEDROOM_SMALL, CHURCH_SMALL, QK_STD

PREFIX = "model.diffusion_model."
TOL = 1e-4

LSUN = {"bedroom": BEDROOM_SMALL, "church": CHURCH_SMALL}

# Reduced SpatialTransformer UNets: SD v1 (attention on all but the deepest level) and
# cin256 (attention on all but the shallowest level), 2 res blocks as both.
COND = {
    "sd": dict(
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
    "cin": dict(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    ),
}


# --------------------------------------------------------------- test helpers
def lsun_model(config, seed=0):
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


def cond_model(name, seed=0):
    torch.manual_seed(seed)
    model = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
        **COND[name],
    )
    with torch.no_grad():
        for p in model.parameters():  # nothing left at 0 / 1: every tensor distinguishable
            p.normal_(0.0, 0.1)
    return model


def numpy_state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


_TO_RESBLOCK = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TO_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def to_compvis(state, layers_per_block, heads=None):
    """Test-local inverse: a diffusers UNet state dict in the CompVis layout (prefixed).

    ``heads(channels)`` is the head count of the legacy attention layers (UNet2DModel);
    for them q/k/v are fused per head into ``qkv`` (3C, C, 1), channel axis (H, 3, d).
    """
    per = layers_per_block + 1
    has_up_attention = {int(m[1]) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out, fused = {}, {}
    for key, value in state.items():
        module, leaf = key.rsplit(".", 1)
        if module in _TO_TOP:
            out[f"{_TO_TOP[module]}.{leaf}"] = value
            continue
        m = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$", module)
        if m:
            path, b, kind, l, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            if kind in ("downsamplers", "upsamplers"):
                l = layers_per_block
            if path == "down_blocks":
                base = f"input_blocks.{1 + b * per + l}"
                sub = {"resnets": 0, "attentions": 1, "downsamplers": 0}[kind]
            else:
                base = f"output_blocks.{b * per + l}"
                sub = {"resnets": 0, "attentions": 1, "upsamplers": 2 if b in has_up_attention else 1}[kind]
        else:
            m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", module)
            assert m, key
            kind, rest = m[1], m[3]
            base, sub = "middle_block", {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(m[1], int(m[2]))]
        if kind in ("downsamplers", "upsamplers") and rest == "conv":
            out[f"{base}.{sub}.{'op' if kind == 'downsamplers' else 'conv'}.{leaf}"] = value
        elif kind != "attentions":
            out[f"{base}.{sub}.{_TO_RESBLOCK[rest]}.{leaf}"] = value
        elif heads is None:  # SpatialTransformer: names kept
            out[f"{base}.{sub}.{rest}.{leaf}"] = value
        elif rest == "group_norm":
            out[f"{base}.{sub}.norm.{leaf}"] = value
        elif rest == "to_out.0":
            out[f"{base}.{sub}.proj_out.{leaf}"] = value[..., None] if leaf == "weight" else value
        else:
            fused.setdefault((f"{base}.{sub}.qkv", leaf), {})[rest] = value
    for (name, leaf), parts in fused.items():
        q, k, v = parts["to_q"], parts["to_k"], parts["to_v"]
        c = q.shape[0]
        h = heads(c)
        stacked = np.stack([a.reshape(h, c // h, *a.shape[1:]) for a in (q, k, v)], axis=1)  # (H, 3, d, ...)
        fused_value = stacked.reshape(3 * c, *q.shape[1:])
        out[f"{name}.{leaf}"] = fused_value[..., None] if leaf == "weight" else fused_value
    return {PREFIX + k: v for k, v in out.items()}


def assert_same_state(got, expected):
    assert sorted(got) == sorted(expected)
    for key in expected:
        a, b = np.asarray(got[key]), np.asarray(expected[key])
        assert a.shape == b.shape and np.array_equal(a, b), key


def lsun_heads(config):
    return lambda c: config.attention_heads(c)


@functools.partial(jax.jit, static_argnames=("config",))
def eps_fn(params, x, t, config):
    return UNet(config).apply({"params": params}, x, t)


def _max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ------------------------------------------------------------------------ tests
@pytest.mark.parametrize("name", ["sd", "cin"])
def test_spatial_transformer_layouts(name):
    model = cond_model(name)
    state = numpy_state(model)
    compvis = to_compvis(state, layers_per_block=2)
    assert not any(".qkv." in k for k in compvis) and PREFIX + "input_blocks.3.0.op.weight" in compvis
    # The inverse mapping is right: diffusers' own converter undoes it exactly.
    reference = convert_ldm_unet_checkpoint(
        {k: torch.from_numpy(v) for k, v in compvis.items()}, dict(model.config)
    )
    assert_same_state({k: v.numpy() for k, v in reference.items()}, state)
    # And the converter under test, from torch tensors and from arrays, plus keys outside
    # the prefix (ignored).
    extra = {"first_stage_model.decoder.conv_in.weight": np.zeros(3), "model_ema.num_updates": np.int64(7)}
    for source in (compvis, {k: torch.from_numpy(v) for k, v in compvis.items()}):
        ours, names = compvis_unet_to_diffusers({**source, **extra}, layers_per_block=2)
        assert_same_state(ours, state)
        assert set(names.values()) == set(compvis)


@pytest.mark.parametrize("name", ["bedroom", "church"])
def test_legacy_attention_fuse_is_compvis_layout(name):
    # The fused qkv of the inverse mapping, read the CompVis way (channel axis (heads,
    # q/k/v, d); attention per head; 1-d convs), gives diffusers' attention output.
    config = LSUN[name]
    model = lsun_model(config)
    compvis = to_compvis(numpy_state(model), 2, lsun_heads(config))
    attn_name = "down_blocks.1.attentions.0"
    attn = model.get_submodule(attn_name)
    src = PREFIX + "input_blocks.4.1."  # b = 1, l = 0
    g = {k[len(src):]: torch.from_numpy(v) for k, v in compvis.items() if k.startswith(src)}
    assert sorted(g) == ["norm.bias", "norm.weight", "proj_out.bias", "proj_out.weight", "qkv.bias", "qkv.weight"]
    c = config.block_out_channels[1]
    heads, d = config.attention_heads(c), c // config.attention_heads(c)
    x = torch.randn(2, c, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = F.group_norm(x, attn.group_norm.num_groups, g["norm.weight"], g["norm.bias"], attn.group_norm.eps)
        qkv = F.conv1d(y.reshape(2, c, 64), g["qkv.weight"], g["qkv.bias"])  # (b, 3C, T)
        q, k, v = qkv.reshape(2 * heads, 3 * d, 64).split(d, dim=1)
        w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(d), dim=-1)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(2, c, 64)
        ref = x + F.conv1d(a, g["proj_out.weight"], g["proj_out.bias"]).reshape(x.shape)
        got = attn(x)
    assert w.max() > 0.9  # peaky
    assert _max_abs(got, ref) < 1e-5


@pytest.fixture(scope="module")
def lsun():
    out = {}
    for name, config in LSUN.items():
        model = lsun_model(config)
        state = numpy_state(model)
        out[name] = (model, state, to_compvis(state, config.layers_per_block, lsun_heads(config)))
    return out


@pytest.mark.parametrize("name", ["bedroom", "church"])
def test_lsun_layouts(lsun, name):
    # Measured max-abs ε differences to diffusers (float32, CPU): bedroom 8.5e-6,
    # church 3.2e-6.
    config = LSUN[name]
    model, state, compvis = lsun[name]
    if name == "church":  # ResBlock(down=True) / ResBlock(up=True) resamplers, 2C time_emb_proj
        assert PREFIX + "input_blocks.3.0.in_layers.0.weight" in compvis
        assert PREFIX + "output_blocks.2.1.emb_layers.1.weight" in compvis  # ResnetUpsampleBlock2D
        assert PREFIX + "output_blocks.5.2.out_layers.3.weight" in compvis  # after an attention
        assert compvis[PREFIX + "input_blocks.1.0.emb_layers.1.weight"].shape == (64, 128)
    else:
        assert PREFIX + "input_blocks.3.0.op.weight" in compvis
        assert PREFIX + "output_blocks.2.2.conv.weight" in compvis
    heads = dict(num_heads=8) if name == "church" else dict(num_head_channels=16)
    ours, names = compvis_unet_to_diffusers(compvis, layers_per_block=2, **heads)
    assert_same_state(ours, state)
    assert names["mid_block.attentions.0.to_k.weight"] == PREFIX + "middle_block.1.qkv.weight"

    params = params_from_compvis_unet({k: torch.from_numpy(v) for k, v in compvis.items()}, config)
    expected = convert.params_from_diffusers_state_dict(state, config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 16, 16, config.in_channels)).astype(np.float32)
    t = np.array([0, 999], np.int32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t).long()).sample
    diff = _max_abs(eps_fn(params, x, t, config), ref.numpy().transpose(0, 2, 3, 1))
    print(f"\n{name}: CompVis layout -> Flax, max-abs ε difference to diffusers {diff:.1e}")
    assert diff < TOL


def test_wrong_head_count_is_detected(lsun):
    # Splitting the Church-like qkv into 4 instead of 8 heads gives other q/k/v weights.
    _, state, compvis = lsun["church"]
    ours, _ = compvis_unet_to_diffusers(compvis, layers_per_block=2, num_heads=4)
    key = "down_blocks.1.attentions.0.to_q.weight"
    assert ours[key].shape == state[key].shape and not np.array_equal(ours[key], state[key])


def test_corrupted_state_dicts(lsun):
    _, _, compvis = lsun["bedroom"]
    bad = dict(compvis)
    bad[PREFIX + "input_blocks.1.0.in_layers.0.weights"] = bad.pop(PREFIX + "input_blocks.1.0.in_layers.0.weight")
    shortcut = PREFIX + "output_blocks.2.0.skip_connection.weight"
    assert compvis[shortcut].shape == (96, 160, 1, 1)
    bad[shortcut] = np.zeros((96, 160, 3, 3), np.float32)
    bad[PREFIX + "input_blocks.2.2.conv.weight"] = np.zeros((32, 32, 3, 3), np.float32)  # no such module
    bad[PREFIX + "time_embed.1.weight"] = np.zeros((128, 128), np.float32)
    bad["first_stage_model.encoder.conv_in.weight"] = np.zeros((3,), np.float32)  # outside: ignored
    with pytest.raises(ValueError) as info:
        params_from_compvis_unet(bad, BEDROOM_SMALL)
    msg = str(info.value)
    for pattern in [
        r"unmappable 3 key\(s\) \(CompVis names\): .*input_blocks\.1\.0\.in_layers\.0\.weights",
        r"model\.diffusion_model\.input_blocks\.2\.2\.conv\.weight",
        r"model\.diffusion_model\.time_embed\.1\.weight",
        r"missing 1 key\(s\) \(diffusers names\): down_blocks\.0\.resnets\.0\.norm1\.weight",
        r"model\.diffusion_model\.output_blocks\.2\.0\.skip_connection\.weight: checkpoint shape"
        r" \(96, 160, 3, 3\), expected \(96, 160, 1, 1\)",
    ]:
        assert re.search(pattern, msg), (pattern, msg)
    assert "first_stage_model" not in msg

    # The renaming step alone: unmappable keys and malformed fused qkv in one ValueError.
    bad = dict(compvis)
    bad[PREFIX + "middle_block.1.qkv.weight"] = np.zeros((96 * 3 + 1, 96, 1), np.float32)
    bad[PREFIX + "out.1.weight"] = np.zeros((3,), np.float32)
    with pytest.raises(ValueError, match=r"(?s)unmappable 1 key.*out\.1\.weight.*middle_block\.1\.qkv\.weight: qkv"):
        compvis_unet_to_diffusers(bad, layers_per_block=2, num_head_channels=16)
    with pytest.raises(ValueError, match="needs num_heads or num_head_channels"):
        compvis_unet_to_diffusers(compvis, layers_per_block=2)
    with pytest.raises(ValueError, match="cannot be split into 5 heads"):
        compvis_unet_to_diffusers(compvis, layers_per_block=2, num_heads=5)
