"""The Flax latent-diffusion autoencoders (VQ-f4 / KL-f8) against diffusers' VQModel and
AutoencoderKL: encode/decode equality on reduced-width models with random weights,
full-size parameter counts, conversion from diffusers folders and from the CompVis layout
(checked against diffusers' own ``convert_ldm_vae_checkpoint``), and strict failures.

Each kind compiles one jitted function (all methods in one call) for speed.
"""

import dataclasses
import functools
import inspect
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, VQModel
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from flax import traverse_util

from iec_jax.models import autoencoder as ae
from iec_jax.models.autoencoder import Autoencoder, AutoencoderConfig

TOL = 1e-4  # max-abs difference allowed against PyTorch (float32)
LSUN_CHURCH_LIKE_SCALE = 0.22765929  # a scale_factor buffer value to store and read back

# Reduced widths that keep every block type: a width change on the first resnet of the
# second encoder level / of the last decoder block (conv_shortcut), down/upsamplers, the
# mid-block attention. VQ: latent_channels != vq_embed_dim exercises both quant convs.
CONFIGS = {
    "vq": AutoencoderConfig(
        kind="vq",
        latent_channels=4,
        vq_embed_dim=3,
        num_vq_embeddings=32,
        block_out_channels=(32, 64),
        layers_per_block=2,
        norm_num_groups=8,
        scaling_factor=1.0,
        sample_size=16,
    ),
    "kl": AutoencoderConfig(
        kind="kl",
        latent_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=16,
        scaling_factor=0.5,
        sample_size=16,
    ),
}
CLASSES = {"vq": VQModel, "kl": AutoencoderKL}
IMAGE_HW = (16, 24)  # non-square: catches h/w mix-ups


# ------------------------------------------------------------------------ helpers
def _nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


def _nhwc(t):
    return jnp.asarray(t.detach().permute(0, 2, 3, 1).numpy())


def _max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere: GroupNorm affine params (initialised 1 / 0) and the
    codebook (initialised tiny) re-drawn, q/k scaled up so attention is not uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "quantize.embedding.weight":
                p.copy_(torch.randn(p.shape, generator=g))
            elif "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "norm" in name and name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif (".to_q." in name or ".to_k." in name) and name.endswith(".weight"):
                p.mul_(2.5)


@functools.partial(jax.jit, static_argnames=("config",))
def _vq_outputs(params, x, z, config):
    m, v = Autoencoder(config), {"params": params}
    return {
        "encode": m.apply(v, x, method="encode"),
        "encode_scaled": m.apply(v, x, method="encode_scaled"),
        "decode": m.apply(v, z, method="decode"),
        "decode_raw": m.apply(v, z, force_not_quantize=True, method="decode"),
        "snapped": m.apply(v, z, method="quantize_latent"),
        "indices": m.apply(v, z, method="codebook_indices"),
    }


@functools.partial(jax.jit, static_argnames=("config",))
def _kl_outputs(params, x, z, key, config):
    m, v = Autoencoder(config), {"params": params}
    return {
        "encode": m.apply(v, x, method="encode"),
        "moments": m.apply(v, x, method="encode_moments"),
        "sample": m.apply(v, x, key, method="encode"),
        "encode_scaled": m.apply(v, x, method="encode_scaled"),
        "decode": m.apply(v, z, method="decode"),
        "decode_scaled": m.apply(v, z * config.scaling_factor, method="decode_scaled"),
    }


def _compvis_name(key: str, levels: int) -> str:
    """This test's own diffusers -> CompVis key mapping (token walk, independent of the
    module's regexes)."""
    parts = key.split(".")
    if parts[0] not in ("encoder", "decoder"):
        return key
    head, p = parts[0], parts[1:]
    resnet = {"conv_shortcut": "nin_shortcut"}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
    if p[0] in ("down_blocks", "up_blocks"):
        direction = p[0].split("_")[0]
        level = int(p[1]) if direction == "down" else levels - 1 - int(p[1])
        if p[2] == "resnets":
            body = [direction, str(level), "block", p[3], resnet.get(p[4], p[4]), *p[5:]]
        else:  # downsamplers.0.conv / upsamplers.0.conv
            body = [direction, str(level), f"{direction}sample", *p[4:]]
    elif p[0] == "mid_block" and p[1] == "resnets":
        body = ["mid", f"block_{int(p[2]) + 1}", resnet.get(p[3], p[3]), *p[4:]]
    elif p[0] == "mid_block":  # attentions.0.<name>[.0].<leaf>
        rest = p[3:] if p[3] != "to_out" else ["to_out", *p[5:]]
        body = ["mid", "attn_1", attn[rest[0]], *rest[1:]]
    elif p[0] == "conv_norm_out":
        body = ["norm_out", *p[1:]]
    else:
        body = p
    return ".".join([head, *body])


def _compvis_state_dict(state_dict, config, prefix):
    """The diffusers state dict in CompVis names (attention weights as 1×1 convs)."""
    out = {}
    for key, value in state_dict.items():
        if ".attentions." in key and key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[prefix + _compvis_name(key, config.num_levels)] = value.clone()
    return out


def _ldm_checkpoint(state_dict, config):
    """A whole-LDM-like state dict: the autoencoder under first_stage_model., its training
    loss, unrelated models and the scale_factor buffer."""
    sd = _compvis_state_dict(state_dict, config, "first_stage_model.")
    sd.update(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3),
            "model_ema.decay": torch.tensor(0.9999),
            "cond_stage_model.embedding.weight": torch.randn(10, 4),
            "first_stage_model.loss.logvar": torch.zeros(()),
            "first_stage_model.loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4),
            "scale_factor": torch.tensor(LSUN_CHURCH_LIKE_SCALE),
            "betas": torch.linspace(1e-4, 2e-2, 10, dtype=torch.float64),
        }
    )
    return sd


def _assert_trees_identical(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert fa.keys() == fb.keys()
    for path in fa:
        assert fa[path].dtype == fb[path].dtype == jnp.float32, path
        np.testing.assert_array_equal(np.asarray(fa[path]), np.asarray(fb[path]), err_msg=str(path))


def _listing(folder: Path):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*"))


# ------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Per kind: the random diffusers model, its folder (save_pretrained) and converted params."""
    out = {}
    for seed, (kind, config) in enumerate(CONFIGS.items()):
        torch.manual_seed(seed)
        model = CLASSES[kind](**config.to_diffusers()).eval()
        _randomize(model, seed + 10)
        folder = tmp_path_factory.mktemp(f"{kind}_folder")
        model.save_pretrained(folder)
        loaded_config, params = ae.load_diffusers_autoencoder(folder)
        out[kind] = dict(config=loaded_config, model=model, folder=folder, params=params,
                         state_dict={k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


def _image(seed):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, (2, *IMAGE_HW, 3)).astype(np.float32)


# --------------------------------------------------------------------- equality
def test_vq_matches_diffusers(cases):
    case = cases["vq"]
    config, model = case["config"], case["model"]
    assert config == CONFIGS["vq"]
    x = _image(0)
    codebook = case["state_dict"]["quantize.embedding.weight"].numpy().astype(np.float64)
    # Latents near codebook vectors: the nearest vector is unambiguous (checked below).
    rng = np.random.default_rng(1)
    latent_shape = config.latent_shape(x.shape)
    assert latent_shape == (2, 8, 12, 3)
    idx = rng.integers(0, config.num_vq_embeddings, latent_shape[:3])
    z = (codebook[idx] + 0.03 * rng.standard_normal(latent_shape)).astype(np.float32)
    d2 = ((z[..., None, :].astype(np.float64) - codebook) ** 2).sum(-1)
    d2.sort(axis=-1)
    assert (d2[..., 1] - d2[..., 0]).min() > 1e-2  # margin: no near-ties
    assert (np.argmin(((z[..., None, :] - codebook) ** 2).sum(-1), -1) == idx).all()

    out = jax.device_get(_vq_outputs(case["params"], jnp.asarray(x), jnp.asarray(z), config))
    with torch.no_grad():
        xt, zt = torch.from_numpy(_nchw(x)), torch.from_numpy(_nchw(z))
        enc = model.encode(xt).latents
        dec = model.decode(zt).sample
        dec_raw = model.decode(zt, force_not_quantize=True).sample
        t_idx = torch.argmin(torch.cdist(zt.permute(0, 2, 3, 1).reshape(-1, 3), model.quantize.embedding.weight), 1)

    diffs = {
        "encode": _max_abs(out["encode"], _nhwc(enc)),
        "decode (snap)": _max_abs(out["decode"], _nhwc(dec)),
        "decode (force_not_quantize)": _max_abs(out["decode_raw"], _nhwc(dec_raw)),
    }
    print("VQ max-abs vs diffusers:", diffs)
    assert max(diffs.values()) < TOL, diffs
    assert out["encode"].shape == latent_shape
    assert out["decode"].shape == (2, *IMAGE_HW, 3)
    np.testing.assert_array_equal(out["indices"], idx)
    np.testing.assert_array_equal(out["indices"].reshape(-1), t_idx.numpy())
    np.testing.assert_allclose(out["snapped"], codebook[idx], atol=1e-6)
    # The snap matters: without it the image differs well beyond the tolerance.
    assert _max_abs(out["decode"], out["decode_raw"]) > 100 * TOL
    # Scaling factor 1.0: the scaled latent is the latent.
    np.testing.assert_array_equal(out["encode_scaled"], out["encode"])


def test_kl_matches_diffusers(cases):
    case = cases["kl"]
    config, model = case["config"], case["model"]
    assert config == CONFIGS["kl"]
    x = _image(2)
    z = np.random.default_rng(3).standard_normal(config.latent_shape(x.shape)).astype(np.float32)
    key = jax.random.key(7)
    out = jax.device_get(_kl_outputs(case["params"], jnp.asarray(x), jnp.asarray(z), key, config))
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(_nchw(x))).latent_dist
        dec = model.decode(torch.from_numpy(_nchw(z))).sample

    mean, logvar = out["moments"]
    diffs = {
        "encode (posterior mean)": _max_abs(out["encode"], _nhwc(posterior.mean)),
        "log-variance": _max_abs(logvar, _nhwc(posterior.logvar)),
        "decode": _max_abs(out["decode"], _nhwc(dec)),
    }
    print("KL max-abs vs diffusers:", diffs)
    assert max(diffs.values()) < TOL, diffs
    assert out["encode"].shape == (2, 4, 6, 4) and out["decode"].shape == (2, *IMAGE_HW, 3)
    np.testing.assert_array_equal(out["encode"], mean)
    # A sample is mean + std * N(0, 1) drawn from the given key.
    noise = jax.random.normal(key, mean.shape, jnp.float32)
    np.testing.assert_allclose(out["sample"], mean + np.exp(0.5 * logvar) * noise, atol=1e-5)
    assert _max_abs(out["sample"], mean) > 1e-3
    # Scaling in the LDM direction: z_diffusion = scaling_factor * latent; decode divides.
    np.testing.assert_allclose(out["encode_scaled"], config.scaling_factor * out["encode"], rtol=1e-6)
    np.testing.assert_allclose(out["decode_scaled"], out["decode"], atol=1e-5)
    z_small = jnp.ones((1, 2, 2, 4))
    np.testing.assert_allclose(ae.latent_to_diffusion(z_small, config), 0.5 * z_small)
    np.testing.assert_allclose(ae.diffusion_to_latent(z_small, config), 2.0 * z_small)


def test_kind_specific_methods_refuse_the_other_kind(cases):
    vq, kl = cases["vq"], cases["kl"]
    x = jnp.zeros((1, 4, 4, 3))
    with pytest.raises(ValueError, match="deterministic"):
        Autoencoder(vq["config"]).apply({"params": vq["params"]}, x, jax.random.key(0), method="encode")
    with pytest.raises(ValueError, match="no posterior"):
        Autoencoder(vq["config"]).apply({"params": vq["params"]}, x, method="encode_moments")
    with pytest.raises(ValueError, match="no codebook"):
        Autoencoder(kl["config"]).apply({"params": kl["params"]}, jnp.zeros((1, 1, 1, 4)), method="quantize_latent")
    with pytest.raises(ValueError, match="VQ autoencoders only"):
        Autoencoder(kl["config"]).apply(
            {"params": kl["params"]}, jnp.zeros((1, 1, 1, 4)), force_not_quantize=True, method="decode"
        )
    with pytest.raises(ValueError, match=r"\(b, h, w, 3\)"):
        Autoencoder(vq["config"]).apply({"params": vq["params"]}, jnp.zeros((1, 1, 1, 4)), method="decode")


# ------------------------------------------------------------------ full size
@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_full_size_parameter_counts(kind):
    config = AutoencoderConfig.vq_f4() if kind == "vq" else AutoencoderConfig.kl_f8(scaling_factor=0.18215)
    abstract = jax.eval_shape(lambda k: Autoencoder(config).init_params(k), jax.random.key(0))
    flat = traverse_util.flatten_dict(abstract)
    ours = {ae.param_path_to_diffusers_key(p): int(np.prod(v.shape)) for p, v in flat.items()}
    with torch.device("meta"):
        reference = CLASSES[kind](**config.to_diffusers())
    theirs = {k: v.numel() for k, v in reference.state_dict().items()}
    assert ours == theirs
    count = sum(ours.values())
    print(f"{kind} full-size parameters: {count:,}")
    assert count == ae.count_params(abstract)
    assert count == {"vq": 55_322_782, "kl": 83_653_863}[kind]
    assert config.latent_shape((1, 256, 256, 3)) == ((1, 64, 64, 3) if kind == "vq" else (1, 32, 32, 4))
    codebook = flat[("quantize", "embedding", "embedding")].shape if kind == "vq" else None
    assert codebook == ((8192, 3) if kind == "vq" else None)


# ---------------------------------------------------------------- CompVis layout
def test_compvis_names_agree_with_diffusers_converter(cases):
    case = cases["kl"]
    config, sd = case["config"], case["state_dict"]
    for key in sd:  # the module's inverse and forward maps agree with this test's mapping
        name = _compvis_name(key, config.num_levels)
        assert ae.diffusers_key_to_compvis(key, config.num_levels) == name
        assert ae.compvis_key_to_diffusers(name, config.num_levels) == key
    ldm = _ldm_checkpoint(sd, config)
    converted = convert_ldm_vae_checkpoint(ldm, config.to_diffusers())
    assert converted.keys() == sd.keys()
    for key, value in sd.items():
        assert torch.equal(converted[key], value), key


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_compvis_state_dict_gives_the_same_params(cases, kind, tmp_path):
    case = cases[kind]
    config, sd = case["config"], case["state_dict"]
    ldm = _ldm_checkpoint(sd, config)
    _assert_trees_identical(ae.params_from_compvis_state_dict(ldm, config), case["params"])
    scale = ae.read_scale_factor(ldm)
    assert isinstance(scale, float) and scale == float(np.float32(LSUN_CHURCH_LIKE_SCALE))
    assert ae.read_scale_factor({"first_stage_model.quant_conv.bias": torch.zeros(2)}) is None
    # A standalone autoencoder state dict (prefix ""), with its training-loss keys.
    standalone = _compvis_state_dict(sd, config, "")
    standalone["loss.logvar"] = torch.zeros(())
    _assert_trees_identical(ae.params_from_compvis_state_dict(standalone, config, prefix=""), case["params"])
    # A Lightning checkpoint file {"state_dict": ..., "global_step": ...}.
    torch.save({"state_dict": ldm, "global_step": 3}, tmp_path / "model.ckpt")
    read = ae.read_compvis_checkpoint(tmp_path / "model.ckpt")
    assert ae.read_scale_factor(read) == scale
    cfg = dataclasses.replace(config, scaling_factor=ae.read_scale_factor(read))
    _assert_trees_identical(ae.params_from_compvis_state_dict(read, cfg), case["params"])


# ------------------------------------------------------------------- failures
def test_corrupted_state_dicts_fail_with_one_clear_error(cases):
    case = cases["vq"]
    config, sd = case["config"], dict(case["state_dict"])
    sd["decoder.conv_out.kernel"] = sd.pop("decoder.conv_out.weight")  # renamed
    sd["encoder.conv_in.weight"] = torch.zeros(32, 3, 5, 5)  # wrong shape
    sd["quantize.embedding.weight"] = sd["quantize.embedding.weight"].T  # transposed codebook
    with pytest.raises(ValueError) as err:
        ae.params_from_diffusers_state_dict(sd, config)
    msg = str(err.value)
    assert "missing 1 key(s) (diffusers names): decoder.conv_out.weight" in msg
    assert "unexpected 1 key(s): decoder.conv_out.kernel" in msg
    assert "encoder.conv_in.weight: checkpoint shape (32, 3, 5, 5), expected (32, 3, 3, 3)" in msg
    assert "quantize.embedding.weight: checkpoint shape (3, 32), expected (32, 3)" in msg
    assert "2 shape mismatch(es)" in msg

    ldm = _ldm_checkpoint(case["state_dict"], config)
    ldm["first_stage_model.encoder.mid.attn_1.query.weight"] = ldm.pop("first_stage_model.encoder.mid.attn_1.q.weight")
    ldm["first_stage_model.decoder.up.5.block.0.conv1.weight"] = torch.zeros(1)  # no such level
    with pytest.raises(ValueError) as err:
        ae.params_from_compvis_state_dict(ldm, config)
    msg = str(err.value)
    assert "missing 1 key(s) (CompVis names): first_stage_model.encoder.mid.attn_1.q.weight" in msg
    assert "first_stage_model.decoder.up.5.block.0.conv1.weight" in msg
    assert "first_stage_model.encoder.mid.attn_1.query.weight" in msg
    with pytest.raises(ValueError, match="no key of the state dict starts with 'vae.'"):
        ae.params_from_compvis_state_dict(ldm, config, prefix="vae.")
    # A KL checkpoint is not a VQ one: the codebook is missing, the quant convs mis-shaped.
    mismatch = r"(?s)missing 35 key.*quant_conv\.weight: checkpoint shape \(8, 8, 1, 1\), expected \(3, 4, 1, 1\)"
    with pytest.raises(ValueError, match=mismatch):
        ae.params_from_diffusers_state_dict(cases["kl"]["state_dict"], config)


def test_corrupted_files_fail_clearly_and_write_nothing(cases, tmp_path):
    def fails(call, match):
        before = _listing(tmp_path)
        with pytest.raises(ValueError, match=match):
            call()
        assert _listing(tmp_path) == before  # nothing written, nothing removed

    folder = tmp_path / "vae"
    shutil.copytree(cases["vq"]["folder"], folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    fails(lambda: ae.load_diffusers_autoencoder(folder), "truncated")
    weights.unlink()
    fails(lambda: ae.load_diffusers_autoencoder(folder), "neither diffusion_pytorch_model.safetensors nor .bin")
    fails(lambda: ae.load_diffusers_autoencoder(tmp_path / "missing"), "not a directory")
    # A .bin file with a renamed key.
    sd = dict(cases["vq"]["state_dict"])
    sd["post_quant_conv.weights"] = sd.pop("post_quant_conv.weight")
    torch.save(sd, folder / "diffusion_pytorch_model.bin")
    fails(
        lambda: ae.load_diffusers_autoencoder(folder),
        r"(?s)missing 1 key.*post_quant_conv\.weight.*unexpected 1 key.*post_quant_conv\.weights",
    )
    (folder / "config.json").write_text("{not json")
    fails(lambda: ae.load_diffusers_autoencoder(folder), "could not read the diffusers config")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x02 truncated")
    fails(lambda: ae.read_compvis_checkpoint(ckpt), "could not read the PyTorch checkpoint")
    fails(lambda: ae.read_compvis_checkpoint(tmp_path / "none.ckpt"), "is not a file")
    # A .bin state dict that loads is converted like the safetensors one.
    good = tmp_path / "good"
    cases["vq"]["model"].save_pretrained(good, safe_serialization=False)
    assert (good / "diffusion_pytorch_model.bin").is_file()
    _assert_trees_identical(ae.load_diffusers_autoencoder(good)[1], cases["vq"]["params"])


# ----------------------------------------------------------------------- config
@pytest.mark.parametrize("class_name", ["VQModel", "AutoencoderKL"])
def test_diffusers_defaults_table_is_current(class_name):
    cls = {"VQModel": VQModel, "AutoencoderKL": AutoencoderKL}[class_name]
    sig = inspect.signature(cls.__init__)
    defaults = {k: p.default for k, p in sig.parameters.items() if k != "self"}
    assert dict(ae.DIFFUSERS_DEFAULTS[class_name]) == defaults


def test_config_round_trips_and_constructors(cases):
    for kind, case in cases.items():
        saved = json.loads((case["folder"] / "config.json").read_text())
        assert saved["_class_name"] == CLASSES[kind].__name__
        assert AutoencoderConfig.from_diffusers(saved) == CONFIGS[kind]
        assert AutoencoderConfig.from_json_dict(json.loads(json.dumps(CONFIGS[kind].to_json_dict()))) == CONFIGS[kind]
    vq, kl = AutoencoderConfig.vq_f4(), AutoencoderConfig.kl_f8(scaling_factor=ae.SD_V1_SCALING_FACTOR)
    assert (vq.kind, vq.scaling_factor, vq.embed_dim, vq.num_vq_embeddings, vq.downsampling_factor) == (
        "vq", 1.0, 3, 8192, 4,
    )
    assert (kl.kind, kl.scaling_factor, kl.embed_dim, kl.block_out_channels, kl.downsampling_factor) == (
        "kl", 0.18215, 4, (128, 256, 512, 512), 8,
    )
    with pytest.raises(TypeError):
        AutoencoderConfig.kl_f8()  # the scaling factor is never defaulted
    # Stable Diffusion v1-4's vae/config.json (no scaling_factor key: diffusers' 0.18215).
    sd14 = {
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.2.2", "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "out_channels": 3,
        "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
    }
    assert AutoencoderConfig.from_diffusers(sd14) == dataclasses.replace(kl, sample_size=512)
    # VQModel configs get diffusers' default when the key is absent (documented).
    vq_json = {"_class_name": "VQModel", **vq.to_diffusers()}
    del vq_json["scaling_factor"]
    assert AutoencoderConfig.from_diffusers(vq_json).scaling_factor == 0.18215


@pytest.mark.parametrize(
    "change, match",
    [
        ({"_class_name": "UNet2DModel"}, "_class_name"),
        ({"_class_name": None}, "_class_name"),
        ({"upcast_vae": True}, r"unknown VQModel config key\(s\) \['upcast_vae'\]"),
        ({"norm_type": "spatial"}, "norm_type='spatial' is not supported"),
        ({"lookup_from_codebook": True}, "lookup_from_codebook"),
        ({"act_fn": "gelu"}, "act_fn"),
        ({"mid_block_add_attention": False}, "mid_block_add_attention"),
        ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, "down_block_types"),
        ({"up_block_types": ["UpDecoderBlock2D"]}, "up_block_types has 1 entries"),
        ({"norm_num_groups": 12}, "AutoencoderConfig.norm_num_groups: 12 does not divide 32"),
        ({"num_vq_embeddings": 0}, "AutoencoderConfig.num_vq_embeddings"),
        ({"scaling_factor": -1.0}, "AutoencoderConfig.scaling_factor"),
        ({"layers_per_block": 1.5}, "AutoencoderConfig.layers_per_block"),
    ],
)
def test_bad_vq_configs_raise(change, match):
    cfg = {"_class_name": "VQModel", **CONFIGS["vq"].to_diffusers(), **change}
    with pytest.raises(ValueError, match=match):
        AutoencoderConfig.from_diffusers(cfg)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"shift_factor": 0.1159}, "shift_factor"),
        ({"latents_mean": [0.0] * 4}, "latents_mean"),
        ({"use_quant_conv": False}, "use_quant_conv"),
        ({"num_vq_embeddings": 16}, r"unknown AutoencoderKL config key"),
    ],
)
def test_bad_kl_configs_raise(change, match):
    cfg = {"_class_name": "AutoencoderKL", **CONFIGS["kl"].to_diffusers(), **change}
    with pytest.raises(ValueError, match=match):
        AutoencoderConfig.from_diffusers(cfg)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(kind="ae", latent_channels=4, scaling_factor=1.0), "AutoencoderConfig.kind"),
        (dict(kind="kl", latent_channels=4, scaling_factor=1.0, num_vq_embeddings=8), "must be None for kind 'kl'"),
        (dict(kind="vq", latent_channels=3, scaling_factor=1.0), "num_vq_embeddings: must be a positive integer"),
        (dict(kind="kl", latent_channels=0, scaling_factor=1.0), "latent_channels"),
        (dict(kind="kl", latent_channels=4, scaling_factor=float("nan")), "scaling_factor"),
        (dict(kind="kl", latent_channels=4, scaling_factor=1.0, block_out_channels=()), "block_out_channels"),
        (dict(kind="kl", latent_channels=4, scaling_factor=1.0, sample_size=(1, 2, 3)), "sample_size"),
    ],
)
def test_config_validation(fields, match):
    with pytest.raises(ValueError, match=match):
        AutoencoderConfig(**fields)


def test_import_needs_no_torch(fresh_python):
    code = ("import iec_jax.models.autoencoder as ae\n"
            "assert 'torch' not in sys.modules and 'safetensors' not in sys.modules, 'imported torch'\n"
            "print(ae.AutoencoderConfig.vq_f4().embed_dim)\n")
    assert fresh_python(code) == "3"
