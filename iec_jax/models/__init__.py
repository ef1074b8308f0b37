"""Flax UNets mirroring diffusers configs, checkpoint conversion and storage.

    from iec_jax.models import UNet, UNetConfig, load_checkpoint, load_unet

    config, params = load_unet("fmnist-ddpm")                     # a bundled checkpoint, by name
    config, params = load_checkpoint("runs/models/fmnist-ddpm")   # written by experiments.convert
    eps = UNet(config).apply({"params": params}, x, t)            # x (b, h, w, c) NHWC, t (b,) int32

Modules: :mod:`~iec_jax.models.unet` (UNetConfig, UNet, DeepCache cache points),
:mod:`~iec_jax.models.layers` (the Conv2d / Dense / MatMul / Softmax interception points),
:mod:`~iec_jax.models.convert` (diffusers and original-DDPM checkpoints -> params),
:mod:`~iec_jax.models.checkpoint` (orbax save / load),
:mod:`~iec_jax.models.loading` (bundled checkpoints by name, content fingerprints).

Importing this package needs neither torch, safetensors nor orbax: the converters and the
checkpoint functions import them when called.
"""

from iec_jax.models.checkpoint import load_checkpoint, save_checkpoint
from iec_jax.models.convert import convert_checkpoint, load_ddpm_original, load_diffusers
from iec_jax.models.loading import (BUNDLED, load_unet, model_fingerprint, resolve_source,
                                    unet_denoiser)
from iec_jax.models.unet import (
    DEEPCACHE_DDPM_CACHE_POINT,
    CachePoint,
    UNet,
    UNetConfig,
    cache_point_from_deepcache_branch,
    cached_feature_shape,
    count_params,
)

__all__ = [
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
