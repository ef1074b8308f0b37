"""Whole latent-diffusion models from their checkpoints (iec_jax.models.ldm).

For each of the four settings (reduced random models: LSUN-Bedroom-like UNet2DModel +
VQ, LSUN-Church-like scale-shift / resnet-resampling / 8-head UNet2DModel + KL with a
``scale_factor`` buffer, cin256-like UNet2DConditionModel + VQ + class embedder, SD-like
UNet2DConditionModel + KL + CLIP text encoder + tokenizer) the same PyTorch weights are
written (a) as a diffusers pipeline folder (``save_pretrained``) and (b) as an original
single-file CompVis checkpoint (``torch.save({"state_dict": ...})`` with the CompVis key
names, EMA weights, the training loss and the DDPM buffers). Both must give identical
Flax parameters and configs; ``experiments.convert`` (run in this process) must turn
both into the project's folder (the single file with ``--architecture`` naming the
reduced configs), which loads back identical; ε (with the conditioning computed by the
converted class embedder / CLIP text encoder and tokenizer) and decodes must equal
PyTorch's. Corrupted inputs must fail with one clear error and write nothing.

Measured max-abs differences to PyTorch (float32, CPU): ε 2.7e-6 (bedroom), 1.7e-6
(church), 2.1e-7 (imagenet), 2.2e-7 (sd); decodes 1.9e-6 to 2.6e-6.
"""

import dataclasses
import functools
import json
import re
import shutil
import string
import warnings

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from diffusers import (AutoencoderKL, DDIMScheduler, LDMPipeline, StableDiffusionPipeline, UNet2DConditionModel,
                       VQModel)
from flax import traverse_util
from test_convert_compvis import lsun_model, to_compvis

from iec_jax.models import autoencoder as ae
from iec_jax.models import checkpoint, ldm
from iec_jax.models.autoencoder import Autoencoder, AutoencoderConfig
from iec_jax.models.clip import CLIPTextConfig, CLIPTextModel
from iec_jax.models.unet import UNet, UNetConfig
from iec_jax.models.unet_cond import ClassEmbedder, UNetCondition, UNetConditionConfig

TOL = 1e-4
CHURCH_SCALE = float(np.float32(0.22765929))  # a fitted-looking factor, exact in float32

BEDROOM_UNET = UNetConfig(
    sample_size=8, in_channels=3, out_channels=3, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64), layers_per_block=1, downsample_padding=1, dropout=0.0,
    attention_head_dim=16, norm_num_groups=8, norm_eps=1e-5,
)  # fmt: skip
CHURCH_UNET = UNetConfig(
    sample_size=8, in_channels=4, out_channels=4, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("ResnetUpsampleBlock2D", "AttnUpBlock2D"),
    block_out_channels=(32, 64), layers_per_block=1, downsample_padding=1, dropout=0.0,
    attention_head_dim=8, norm_num_groups=8, attn_norm_num_groups=16, norm_eps=1e-5,
    resnet_time_scale_shift="scale_shift", downsample_type="resnet", upsample_type="resnet", num_attention_heads=8,
)  # fmt: skip
IMAGENET_UNET = UNetConditionConfig(
    sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8, cross_attention_dim=16, attention_head_dim=1,
)  # fmt: skip
SD_UNET = UNetConditionConfig(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
)  # fmt: skip
VQ = AutoencoderConfig(kind="vq", latent_channels=3, vq_embed_dim=3, num_vq_embeddings=16, block_out_channels=(32, 64),
                       layers_per_block=1, norm_num_groups=8, scaling_factor=1.0, sample_size=16)


def kl(scale):
    return AutoencoderConfig(kind="kl", latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                             norm_num_groups=16, scaling_factor=scale, sample_size=16)


CLASSES = ldm.ClassEmbedderConfig(n_classes=11, embed_dim=16)
VOCAB, BOS, EOS = 1000, 998, 999
CLIP_KW = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=BOS, eos_token_id=EOS,
               pad_token_id=EOS)
SETTINGS = {
    "lsun_bedroom": dict(unet=BEDROOM_UNET, autoencoder=VQ),
    "lsun_church": dict(unet=CHURCH_UNET, autoencoder=kl(CHURCH_SCALE)),
    "imagenet": dict(unet=IMAGENET_UNET, autoencoder=VQ),
    "sd": dict(unet=SD_UNET, autoencoder=kl(ae.SD_V1_SCALING_FACTOR)),
}
PREFIX = "model.diffusion_model."


# ------------------------------------------------------------------------ builders
def _randomize(model, seed, std=None):
    """Distinguishable random weights: every tensor N(0, std) (std given), or norms and
    codebooks re-drawn and q/k scaled up (peaky attention) on top of the default init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if std is not None:
                p.copy_(std * torch.randn(p.shape, generator=g))
            elif name.endswith("embedding.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
            elif (".to_q." in name or ".to_k." in name) and name.endswith(".weight"):
                p.mul_(2.5)
    return model.eval()


def _tokenizer_files(folder):
    letters = list(string.ascii_lowercase) + list("!,.'")
    merges = [("c", "a"), ("ca", "t</w>"), ("p", "h"), ("ph", "o"), ("t", "o</w>"), ("pho", "to</w>"), ("o", "f</w>")]
    tokens = [*letters, *(c + "</w>" for c in letters), *("".join(m) for m in merges)]
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab.update({"<|startoftext|>": BOS, "<|endoftext|>": EOS})
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return folder


def _scheduler(setting):
    s = ldm.SETTING_SPECS[setting].schedule
    return DDIMScheduler(beta_start=s.beta_start, beta_end=s.beta_end, beta_schedule="scaled_linear",
                         num_train_timesteps=s.num_train_timesteps, clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _compvis_autoencoder(state, config):
    out = {}
    for key, value in state.items():
        if ".attentions." in key and key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # CompVis 1×1 conv
        out["first_stage_model." + ae.diffusers_key_to_compvis(key, config.num_levels)] = value
    return out


def _compvis_checkpoint(setting, models):
    """The CompVis single-file state dict of the setting's torch models, plus keys to ignore."""
    unet_cfg = SETTINGS[setting]["unet"]
    heads = unet_cfg.attention_heads if isinstance(unet_cfg, UNetConfig) else None
    sd = {k: torch.from_numpy(np.ascontiguousarray(v))
          for k, v in to_compvis({k: v.numpy() for k, v in _state(models["unet"]).items()},
                                 unet_cfg.layers_per_block, heads).items()}
    sd.update(_compvis_autoencoder(_state(models["autoencoder"]), SETTINGS[setting]["autoencoder"]))
    if setting == "imagenet":
        sd["cond_stage_model.embedding.weight"] = models["class_embedding"].clone()
    if setting == "sd":
        for k, v in _state(models["text_encoder"]).items():
            sd["cond_stage_model.transformer.text_model." + k] = v
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    if setting == "lsun_church":
        sd["scale_factor"] = torch.tensor(CHURCH_SCALE)
    betas = ldm.SETTING_SPECS[setting].schedule.betas()
    alphas_cumprod = np.cumprod(1 - betas)
    sd.update({
        "betas": torch.tensor(betas, dtype=torch.float32),
        "alphas_cumprod": torch.tensor(alphas_cumprod, dtype=torch.float32),
        "sqrt_one_minus_alphas_cumprod": torch.tensor(np.sqrt(1 - alphas_cumprod), dtype=torch.float32),
        "posterior_mean_coef1": torch.rand(1000),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(1234, dtype=torch.int32),
        "model_ema.diffusion_modelinput_blocks00weight": torch.randn(8, 3, 3, 3),  # EMA copy: not read
        "first_stage_model.loss.logvar": torch.zeros(()),
        "loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4),
    })  # fmt: skip
    return sd


def _build(setting, root):
    """Torch models of a setting, its pipeline folder and its CompVis checkpoint file."""
    cfg = SETTINGS[setting]
    seed = list(SETTINGS).index(setting) * 10
    models = {}
    if isinstance(cfg["unet"], UNetConfig):
        models["unet"] = lsun_model(cfg["unet"], seed=seed)
    else:
        torch.manual_seed(seed)
        models["unet"] = _randomize(UNet2DConditionModel(**cfg["unet"].to_diffusers()), seed, std=0.1)
    torch.manual_seed(seed + 1)
    ae_class = VQModel if cfg["autoencoder"].kind == "vq" else AutoencoderKL
    models["autoencoder"] = _randomize(ae_class(**cfg["autoencoder"].to_diffusers()), seed + 1)
    folder = root / f"{setting}_pipeline"
    if setting in ("lsun_bedroom", "lsun_church"):
        LDMPipeline(vqvae=models["autoencoder"], unet=models["unet"], scheduler=_scheduler(setting)).save_pretrained(folder)
    elif setting == "sd":
        torch.manual_seed(seed + 2)
        text = transformers.CLIPTextModel._from_config(transformers.CLIPTextConfig(**CLIP_KW), attn_implementation="eager")
        models["text_encoder"] = _randomize(text, seed + 2)
        vocab = _tokenizer_files(root / "sd_tokenizer")
        models["tokenizer_folder"] = vocab
        tokenizer = transformers.CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"))
        StableDiffusionPipeline(vae=models["autoencoder"], text_encoder=models["text_encoder"], tokenizer=tokenizer,
                                unet=models["unet"], scheduler=_scheduler(setting), safety_checker=None,
                                feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    else:  # no diffusers pipeline class: the components, and this project's class_embedder/ convention
        models["class_embedding"] = torch.randn(CLASSES.n_classes, CLASSES.embed_dim, generator=torch.Generator().manual_seed(seed + 3))
        models["unet"].save_pretrained(folder / "unet")
        models["autoencoder"].save_pretrained(folder / "vqvae")
        _scheduler(setting).save_pretrained(folder / "scheduler")
        (folder / "class_embedder").mkdir()
        (folder / "class_embedder" / "config.json").write_text(json.dumps({"_class_name": "ClassEmbedder", **CLASSES.to_json_dict()}))
        safetensors.torch.save_file({"embedding.weight": models["class_embedding"]},
                                    str(folder / "class_embedder" / "diffusion_pytorch_model.safetensors"))
        (folder / "model_index.json").write_text(json.dumps({
            "_class_name": "LDMClassConditionalPipeline", "_diffusers_version": diffusers.__version__,
            "unet": ["diffusers", "UNet2DConditionModel"], "vqvae": ["diffusers", "VQModel"],
            "scheduler": ["diffusers", "DDIMScheduler"], "class_embedder": ["iec_jax", "ClassEmbedder"]}))  # fmt: skip
    ckpt = root / f"{setting}.ckpt"
    state = _compvis_checkpoint(setting, models)
    torch.save({"state_dict": state, "epoch": 3, "global_step": 1000}, ckpt)
    return dict(models=models, folder=folder, ckpt=ckpt, state=state)


def _overrides(setting):
    cfg = SETTINGS[setting]
    out = dict(unet_config=cfg["unet"], autoencoder_config=cfg["autoencoder"])
    if setting == "imagenet":
        out["class_embedder_config"] = CLASSES
    if setting == "sd":
        out["text_config"] = CLIPTextConfig(**CLIP_KW)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("ldm")
    return {setting: _build(setting, root) for setting in SETTINGS}


# ----------------------------------------------------------------------- helpers
def _assert_same_model(a: ldm.LatentModel, b: ldm.LatentModel):
    assert a.setting == b.setting and a.schedule == b.schedule and a.scaling_factor == b.scaling_factor
    ca, cb = a.components(), b.components()
    assert ca.keys() == cb.keys()
    for name in ca:
        assert ca[name].config == cb[name].config, name
        fa, fb = traverse_util.flatten_dict(ca[name].params), traverse_util.flatten_dict(cb[name].params)
        assert fa.keys() == fb.keys(), name
        for path in fa:
            assert fa[path].dtype == fb[path].dtype == jnp.float32
            np.testing.assert_array_equal(np.asarray(fa[path]), np.asarray(fb[path]), err_msg=f"{name} {path}")


def _convert_cli(argv, capsys):
    """``python -m experiments.convert <argv>`` in this process: (exit code, stdout, stderr)."""
    from absl import flags

    from experiments import convert as cli
    from iec_jax.run.cli import flags_parser

    try:
        rest = flags_parser("convert", ("src", "dst"))(["convert", *argv])
        cli.main(rest)
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        flags.FLAGS.unparse_flags()
    out = capsys.readouterr()
    return code, out.out, out.err


def _max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@functools.partial(jax.jit, static_argnames=("config",))
def _eps(params, x, t, context, config):
    if isinstance(config, UNetConfig):
        return UNet(config).apply({"params": params}, x, t)
    return UNetCondition(config).apply({"params": params}, x, t, context)


def _decode(params, z, config):
    return _decode_jit(params, z, dataclasses.replace(config, scaling_factor=1.0))  # one compile per architecture


@functools.partial(jax.jit, static_argnames=("config",))
def _decode_jit(params, z, config):
    return Autoencoder(config).apply({"params": params}, z, method="decode")


@functools.partial(jax.jit, static_argnames=("config",))
def _clip(params, ids, config):
    return CLIPTextModel(config).apply({"params": params}, ids)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


# ------------------------------------------------------------------------- tests
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_pipeline_and_compvis_give_identical_params(built, setting):
    b = built[setting]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from_pipeline = ldm.load_pipeline_folder(b["folder"])
    assert not [w for w in caught if "scaling_factor" in str(w.message)]
    from_ckpt = ldm.load_compvis_checkpoint(b["ckpt"], setting, **_overrides(setting),
                                            tokenizer=b["models"].get("tokenizer_folder"))
    assert from_pipeline.setting == setting  # inferred from the components
    assert from_pipeline.unet.config == SETTINGS[setting]["unet"]  # Church: 8 heads restored
    assert from_pipeline.autoencoder.config == SETTINGS[setting]["autoencoder"]
    assert from_pipeline.schedule == ldm.SETTING_SPECS[setting].schedule
    _assert_same_model(from_pipeline, from_ckpt)
    assert (from_pipeline.tokenizer is None) == (setting != "sd") == (from_ckpt.tokenizer is None)
    # The same through the source-dispatching loader, with the setting checked.
    _assert_same_model(ldm.load_latent_model(b["ckpt"], setting, **_overrides(setting),
                                             tokenizer=b["models"].get("tokenizer_folder")), from_pipeline)
    if setting == "imagenet":
        with pytest.raises(ValueError, match="its components make a 'imagenet' model, not 'sd'"):
            ldm.load_latent_model(b["folder"], "sd")


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_convert_cli_round_trip_and_pytorch_equality(built, setting, tmp_path, capsys):
    b, models = built[setting], built[setting]["models"]
    dst_a, dst_b = tmp_path / "from_pipeline", tmp_path / "from_ckpt"
    code, out, err = _convert_cli([f"--src={b['folder']}", f"--dst={dst_a}", "--layout=diffusers_pipeline"], capsys)
    assert code == 0, err
    assert f"setting {setting}" in out
    # The CompVis route, with the reduced architecture instead of the setting's full-size one.
    arch = tmp_path.parent / f"{tmp_path.name}_architecture.json"
    names = {"unet_config": "unet", "autoencoder_config": "autoencoder", "text_config": "text_encoder",
             "class_embedder_config": "class_embedder"}
    arch.write_text(json.dumps({names[k]: v.to_json_dict() for k, v in _overrides(setting).items()}))
    argv = [f"--src={b['ckpt']}", f"--dst={dst_b}", "--layout=compvis", f"--setting={setting}", f"--architecture={arch}"]
    if setting == "sd":
        argv.append(f"--tokenizer={models['tokenizer_folder']}")
    code, out, err = _convert_cli(argv, capsys)
    assert code == 0, err
    a, c = ldm.load_latent_model(dst_a), ldm.load_latent_model(dst_b, setting)
    _assert_same_model(a, c)  # and both equal the sources (test above):
    _assert_same_model(c, ldm.load_compvis_checkpoint(b["ckpt"], setting, **_overrides(setting)))
    info = json.loads((dst_a / "latent_model.json").read_text())
    assert info["setting"] == setting and info["scaling_factor"] == SETTINGS[setting]["autoencoder"].scaling_factor
    assert json.loads((dst_b / "unet" / "checkpoint.json").read_text())["kind"] == checkpoint.config_kind(a.unet.config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["from_ckpt", "from_pipeline"]  # no leftovers

    # ε of the UNet (with the conditioning computed by the converted components) and the
    # decode of the autoencoder against PyTorch.
    rng = np.random.default_rng(0)
    cfg = a.unet.config
    x = rng.standard_normal((2, 8, 8, cfg.in_channels)).astype(np.float32)
    t = np.array([3, 977], np.int32)
    context, torch_context = None, None
    if setting == "imagenet":
        y = np.array([2, CLASSES.null_class], np.int32)
        context = ClassEmbedder(CLASSES.n_classes, CLASSES.embed_dim).apply({"params": a.class_embedder.params}, y)
        torch_context = models["class_embedding"][torch.from_numpy(y).long()][:, None, :]
    if setting == "sd":
        ids = a.load_tokenizer()(["a photo of a cat", ""])
        assert ids[0, 0] == BOS and EOS in ids[0] and ids[1, 1] == EOS
        np.testing.assert_array_equal(ids, ldm._open_tokenizer(b["folder"] / "tokenizer")(["a photo of a cat", ""]))
        hf = transformers.CLIPTokenizer.from_pretrained(str(b["folder"] / "tokenizer"))
        np.testing.assert_array_equal(ids, hf(["a photo of a cat", ""], padding="max_length", max_length=77).input_ids)
        context = _clip(a.text_encoder.params, jnp.asarray(ids), a.text_encoder.config)
        with torch.no_grad():
            torch_context = models["text_encoder"](torch.from_numpy(ids).long()).last_hidden_state
        assert _max_abs(context, torch_context) < TOL
    eps = _eps(a.unet.params, x, t, context, cfg)
    with torch.no_grad():
        kwargs = {} if torch_context is None else {"encoder_hidden_states": torch_context}
        ref = models["unet"](_nchw(x), torch.from_numpy(t).long(), **kwargs).sample
    d_eps = _max_abs(eps, _nhwc(ref))
    z = rng.standard_normal((2, 4, 4, a.autoencoder.config.embed_dim)).astype(np.float32)
    with torch.no_grad():
        ref_img = models["autoencoder"].decode(_nchw(z)).sample
    d_img = _max_abs(_decode(a.autoencoder.params, z, a.autoencoder.config), _nhwc(ref_img))
    print(f"\n{setting}: max-abs ε difference {d_eps:.1e}, decode difference {d_img:.1e}")
    assert d_eps < TOL and d_img < TOL


def test_vq_scaling_factor_rule(built, tmp_path):
    # A VQ autoencoder's config.json without scaling_factor means 1.0 (the LDM VQ latent is
    # unscaled), not diffusers' 0.18215 default; a stated value is taken as stated (the
    # diffusers default, stated, draws a warning).
    folder = tmp_path / "bedroom"
    shutil.copytree(built["lsun_bedroom"]["folder"], folder)
    cfg_file = folder / "vqvae" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["scaling_factor"] = 0.5
    cfg_file.write_text(json.dumps(cfg))
    assert ldm.load_pipeline_folder(folder).scaling_factor == 0.5
    del cfg["scaling_factor"]
    cfg_file.write_text(json.dumps(cfg))
    assert ldm.load_pipeline_folder(folder).scaling_factor == 1.0
    cfg["scaling_factor"] = ae.SD_V1_SCALING_FACTOR
    cfg_file.write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="VQ autoencoder"):
        assert ldm.load_pipeline_folder(folder).scaling_factor == ae.SD_V1_SCALING_FACTOR
    # Church's KL autoencoder must state its factor.
    church = tmp_path / "church"
    shutil.copytree(built["lsun_church"]["folder"], church)
    cfg = json.loads((church / "vqvae" / "config.json").read_text())
    del cfg["scaling_factor"]
    (church / "vqvae" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no scaling_factor"):
        ldm.load_pipeline_folder(church)


def test_single_model_folders_convert_through_load_diffusers(built, tmp_path, capsys):
    # --layout diffusers takes any model folder: UNet2DConditionModel, VQModel,
    # AutoencoderKL, CLIPTextModel, each saved as a checkpoint of its kind.
    sd = built["sd"]["folder"]
    for sub, kind in (("unet", "unet_condition"), ("vae", "autoencoder"), ("text_encoder", "clip_text")):
        code, out, err = _convert_cli([f"--src={sd / sub}", f"--dst={tmp_path / sub}"], capsys)
        assert code == 0, err
        config, params = checkpoint.load_checkpoint(tmp_path / sub, kind=kind)
        from iec_jax.models.loading import load_diffusers

        ref_config, ref_params = load_diffusers(sd / sub)
        assert config == ref_config
        jax.tree_util.tree_map(np.testing.assert_array_equal, params, ref_params)
    with pytest.raises(ValueError, match="holds a 'clip_text' checkpoint, expected 'unet'"):
        checkpoint.load_checkpoint(tmp_path / "text_encoder", kind="unet")
    with pytest.raises(ValueError, match="latent_model.json"):
        dst = tmp_path / "whole"
        ldm.convert_latent_model(built["lsun_bedroom"]["folder"], dst, layout="diffusers_pipeline")
        checkpoint.load_checkpoint(dst)


def test_legacy_unet_checkpoints_still_load():
    from iec_jax.models import load_unet

    config, params = load_unet("fmnist-small")
    assert isinstance(config, UNetConfig) and config.block_out_channels == (16, 32, 64)
    kind, _, info = checkpoint.read_checkpoint_info(ldm.Path(checkpoint.__file__).parents[1] / "assets" / "fmnist-small")
    assert kind == "unet" and "kind" not in info  # written before kinds existed


# ------------------------------------------------------------------ corrupted inputs
def _fails(capsys, argv, dst, *patterns):
    code, _, err = _convert_cli([*argv, f"--dst={dst}"], capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: convert"), err
    for pattern in patterns:
        assert re.search(pattern, lines[0]), (pattern, lines[0])
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}")]  # no temporary folder left
    return lines[0]


def test_corrupted_compvis_checkpoints(built, tmp_path, capsys):
    state = built["lsun_bedroom"]["state"]
    dst = tmp_path / "out"

    def save(name, sd, wrap=True):
        path = tmp_path / name
        torch.save({"state_dict": sd} if wrap else sd, path)
        return path

    # A renamed key and a wrong shape (reported together, with CompVis names) -- through
    # the library with the reduced architecture, then the CLI, which reports them too.
    bad = dict(state)
    renamed = PREFIX + "input_blocks.1.0.in_layers.0.weight"
    bad[renamed + "s"] = bad.pop(renamed)
    bad["first_stage_model.decoder.conv_in.weight"] = torch.zeros(64, 3, 1, 1)
    bad["mystery.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as info:
        ldm.load_compvis_checkpoint(save("bad.ckpt", bad, wrap=False), "lsun_bedroom", **_overrides("lsun_bedroom"))
    msg = str(info.value)
    for pattern in (r"input_blocks\.1\.0\.in_layers\.0\.weights", r"missing 1 key",
                    r"first_stage_model\.decoder\.conv_in\.weight: checkpoint shape \(64, 3, 1, 1\)",
                    r"unexpected 1 top-level key.*mystery\.weight"):
        assert re.search(pattern, msg), (pattern, msg)
    _fails(capsys, [f"--src={tmp_path / 'bad.ckpt'}", "--layout=compvis", "--setting=lsun_bedroom"], dst,
           r"in_layers\.0\.weights")

    # A truncated file.
    raw = built["lsun_bedroom"]["ckpt"].read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(raw[: len(raw) // 2])
    _fails(capsys, [f"--src={tmp_path / 'cut.ckpt'}", "--layout=compvis", "--setting=lsun_bedroom"], dst,
           r"could not read the PyTorch checkpoint")

    # Church without its scale_factor buffer.
    church = {k: v for k, v in built["lsun_church"]["state"].items() if k != "scale_factor"}
    with pytest.raises(ValueError, match="missing the scale_factor buffer"):
        ldm.load_compvis_checkpoint(save("church.ckpt", church), "lsun_church", **_overrides("lsun_church"))
    _fails(capsys, [f"--src={tmp_path / 'church.ckpt'}", "--layout=compvis", "--setting=lsun_church"], dst,
           r"missing the scale_factor buffer")

    # The wrong setting for the file: the DDPM buffer tells.
    with pytest.raises(ValueError, match=r"betas buffer .* is not the 'lsun_church' schedule"):
        ldm.load_compvis_checkpoint(built["lsun_bedroom"]["ckpt"], "lsun_church", **_overrides("lsun_bedroom"))
    # SD: a missing text-encoder tensor is named with its single-file key.
    sd = {k: v for k, v in built["sd"]["state"].items() if not k.endswith("final_layer_norm.bias")}
    with pytest.raises(ValueError, match=r"cond_stage_model\.transformer\.text_model\.final_layer_norm\.bias"):
        ldm.load_compvis_checkpoint(save("sd.ckpt", sd), "sd", **_overrides("sd"))

    # A bad architecture file, and an unknown setting.
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps({"unet": {**BEDROOM_UNET.to_json_dict(), "norm_num_groups": 7}}))
    _fails(capsys, [f"--src={built['lsun_bedroom']['ckpt']}", "--layout=compvis", "--setting=lsun_bedroom",
                    f"--architecture={arch}"], dst, r"architecture\.unet: UNetConfig\.norm_num_groups")
    arch.write_text(json.dumps({"text_encoder": CLIPTextConfig(**CLIP_KW).to_json_dict()}))
    _fails(capsys, [f"--src={built['lsun_bedroom']['ckpt']}", "--layout=compvis", "--setting=lsun_bedroom",
                    f"--architecture={arch}"], dst, r"setting 'lsun_bedroom' has no text_encoder")
    _fails(capsys, [f"--src={built['sd']['ckpt']}", "--layout=compvis", "--setting=cifar"], dst, r"--setting")
    _fails(capsys, [f"--src={built['sd']['ckpt']}", "--layout=compvis"], dst, r"--layout compvis needs --setting")
    with pytest.raises(ValueError, match="unknown setting 'cifar'"):
        ldm.load_compvis_checkpoint(built["sd"]["ckpt"], "cifar")


def test_corrupted_pipeline_folders(built, tmp_path, capsys):
    dst = tmp_path / "out"
    folder = tmp_path / "sd"
    shutil.copytree(built["sd"]["folder"], folder)
    # A wrong shape in the autoencoder's safetensors file.
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = safetensors.numpy.load_file(str(vae_file))
    state["decoder.conv_out.weight"] = np.zeros((3, 32, 1, 1), np.float32)
    safetensors.numpy.save_file(state, str(vae_file))
    # A renamed key in the UNet.
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = safetensors.numpy.load_file(str(unet_file))
    state["conv_in.weights"] = state.pop("conv_in.weight")
    safetensors.numpy.save_file(state, str(unet_file))
    line = _fails(capsys, [f"--src={folder}", "--layout=diffusers_pipeline"], dst,
                  r"vae/: .*decoder\.conv_out\.weight: checkpoint shape \(3, 32, 1, 1\)",
                  r"unet/: .*conv_in\.weights")
    assert "missing 1 key" in line

    # A truncated safetensors file.
    shutil.rmtree(folder)
    shutil.copytree(built["sd"]["folder"], folder)
    raw = unet_file.read_bytes()
    unet_file.write_bytes(raw[: len(raw) // 2])
    _fails(capsys, [f"--src={folder}", "--layout=diffusers_pipeline"], dst, r"unet/: could not read .*safetensors")

    # A missing tokenizer file, and a setting that the components contradict.
    shutil.rmtree(folder)
    shutil.copytree(built["sd"]["folder"], folder)
    (folder / "tokenizer" / "tokenizer.json").unlink()  # transformers 5 writes no vocab.json / merges.txt
    _fails(capsys, [f"--src={folder}", "--layout=diffusers_pipeline"], dst, r"tokenizer/: .*vocab\.json")
    _fails(capsys, [f"--src={built['sd']['folder']}", "--layout=diffusers_pipeline", "--setting=imagenet"], dst,
           r"make a 'sd' model, not 'imagenet'")
    # Nothing is overwritten silently.
    dst.mkdir()
    code, _, err = _convert_cli([f"--src={built['sd']['folder']}", "--layout=diffusers_pipeline", f"--dst={dst}"], capsys)
    assert code == 2 and "exists" in err and not any(dst.iterdir())


def test_latent_model_validation(built):
    model = ldm.load_pipeline_folder(built["imagenet"]["folder"])
    with pytest.raises(ValueError) as info:
        dataclasses.replace(model, setting="sd")
    msg = str(info.value)
    assert "class_embedder: not used" in msg and "text_encoder: required" in msg
    with pytest.raises(ValueError, match="needs a UNetConfig"):
        dataclasses.replace(model, setting="lsun_bedroom", class_embedder=None)


def test_import_is_torch_free(fresh_python):
    code = ("import iec_jax.models, iec_jax.models.ldm;"
            " print(sorted(m for m in ('torch', 'safetensors', 'orbax', 'diffusers', 'transformers') if m in sys.modules))")
    assert fresh_python(code) == "[]"
