"""Efficiency techniques as model transformations (docs/semantics.md §4), all composable with IEC.

* :mod:`iec_jax.efficient.quant` — simulated timestep-wise post-training quantization
  (Q-Diffusion / CacheQuant form) by ``flax.linen.intercept_methods``;
* :mod:`iec_jax.efficient.cache` — DeepCache (uniform, non-uniform, CacheQuant's DPS
  schedules), the cache in the sampler's scan carry, CacheQuant's cache-DEC;
* :mod:`iec_jax.efficient.calibration` — FP trajectories, per-step calibration sets and
  artifact files;
* :mod:`iec_jax.efficient.methods` — one builder for the tables' efficient models.

A "UNet function" ``fn(x, t, step, **unet_kwargs)`` is the common currency: the float
UNet (:func:`cache.float_unet_fn`) and the quantized one (:func:`quant.quantized_unet`)
both provide it, and :func:`cache.cached_denoiser` turns either into a stateful
:class:`iec_jax.Denoiser`.
"""

from iec_jax.efficient import cache, calibration, quant
from iec_jax.efficient.cache import (
    CacheDEC,
    cached_denoiser,
    dps_schedule,
    fit_cache_dec,
    float_unet_fn,
    nonuniform_schedule,
    uniform_schedule,
)
from iec_jax.efficient.quant import (
    QuantConfig,
    QuantState,
    build_quant_state,
    fit_quant_dec,
    quant_denoiser,
    quantized_unet,
)

__all__ = [
    "cache", "calibration", "quant", "CacheDEC", "cached_denoiser", "dps_schedule",
    "fit_cache_dec", "float_unet_fn", "nonuniform_schedule", "uniform_schedule",
    "QuantConfig", "QuantState", "build_quant_state", "fit_quant_dec", "quant_denoiser",
    "quantized_unet",
]
