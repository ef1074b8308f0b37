"""Flax models mirroring diffusers / transformers configs, checkpoint conversion and storage.

    from iec_jax.models import UNet, UNetConfig, load_checkpoint, load_unet

    config, params = load_unet("fmnist-ddpm")                     # a bundled checkpoint, by name
    config, params = load_checkpoint("runs/models/fmnist-ddpm")   # written by experiments.convert
    eps = UNet(config).apply({"params": params}, x, t)            # x (b, h, w, c) NHWC, t (b,) int32

Modules: :mod:`~iec_jax.models.unet` (UNetConfig, UNet, DeepCache cache points),
:mod:`~iec_jax.models.layers` (the Conv2d / Dense / MatMul / Softmax interception points),
:mod:`~iec_jax.models.convert` (diffusers and original-DDPM checkpoints -> params),
:mod:`~iec_jax.models.checkpoint` (orbax save / load),
:mod:`~iec_jax.models.loading` (bundled checkpoints by name, ``load_diffusers`` dispatching on a
folder's class, ``module_for``, content fingerprints), and the latent-diffusion families:
:mod:`~iec_jax.models.unet_cond` (UNet2DConditionModel: Stable Diffusion v1, LDM cin256),
:mod:`~iec_jax.models.autoencoder` (VQ-f4, KL-f8), :mod:`~iec_jax.models.clip` (the CLIP
ViT-L/14 text encoder and its tokenizer), :mod:`~iec_jax.models.convert_compvis` (the
original CompVis single-file UNet layouts), and :mod:`~iec_jax.models.ldm` (whole latent
models: ``LatentModel`` from a diffusers pipeline folder, a CompVis single-file checkpoint
or the converted folder ``experiments.convert`` writes).

    config, params = load_diffusers("path/to/unet")               # any of the four families
    eps = module_for(config).apply({"params": params}, x, t, context)

    model = load_latent_model("runs/models/ldm-church")             # unet, autoencoder, schedule, ...

Importing this package needs neither torch, safetensors nor orbax: the converters and the
checkpoint functions import them when called.
"""

from iec_jax.models.checkpoint import load_checkpoint, save_checkpoint
from iec_jax.models.autoencoder import Autoencoder, AutoencoderConfig
from iec_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, tokenize
from iec_jax.models.convert import convert_checkpoint, load_ddpm_original
from iec_jax.models.convert_compvis import compvis_unet_to_diffusers, params_from_compvis_unet
from iec_jax.models.loading import (BUNDLED, load_diffusers, load_unet, model_fingerprint,
                                    module_for, resolve_source, unet_denoiser)
from iec_jax.models.ldm import (SETTINGS, ClassEmbedderConfig, LatentModel, LatentSchedule,
                                load_compvis_checkpoint, load_latent_model, load_pipeline_folder,
                                save_latent_model)
from iec_jax.models.unet_cond import ClassEmbedder, UNetCondition, UNetConditionConfig
from iec_jax.models.unet import (
    DEEPCACHE_DDPM_CACHE_POINT,
    CachePoint,
    UNet,
    UNetConfig,
    cache_point_from_deepcache_branch,
    cached_feature_shape,
    count_params,
    deepcache_ldm_cache_point,
)

__all__ = [
    "SETTINGS",
    "ClassEmbedderConfig",
    "LatentModel",
    "LatentSchedule",
    "load_compvis_checkpoint",
    "load_latent_model",
    "load_pipeline_folder",
    "save_latent_model",
    "Autoencoder",
    "AutoencoderConfig",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTokenizer",
    "ClassEmbedder",
    "UNetCondition",
    "UNetConditionConfig",
    "compvis_unet_to_diffusers",
    "deepcache_ldm_cache_point",
    "load_diffusers",
    "module_for",
    "params_from_compvis_unet",
    "tokenize",
    "BUNDLED",
    "load_unet",
    "model_fingerprint",
    "resolve_source",
    "unet_denoiser",
    "DEEPCACHE_DDPM_CACHE_POINT",
    "CachePoint",
    "UNet",
    "UNetConfig",
    "cache_point_from_deepcache_branch",
    "cached_feature_shape",
    "convert_checkpoint",
    "count_params",
    "load_checkpoint",
    "load_ddpm_original",
    "load_diffusers",
    "save_checkpoint",
]
