"""Efficiency techniques as model transformations (docs/semantics.md §4), all composable with IEC.

* :mod:`iec_jax.efficient.quant` — simulated timestep-wise post-training quantization
  (Q-Diffusion / CacheQuant form) by ``flax.linen.intercept_methods``;
* :mod:`iec_jax.efficient.cache` — DeepCache (uniform, non-uniform, CacheQuant's DPS
  schedules), the cache in the sampler's scan carry, CacheQuant's cache-DEC;
* :mod:`iec_jax.efficient.calibration` — FP trajectories, per-step calibration sets and
  artifact files;
* :mod:`iec_jax.efficient.methods` — one builder for the tables' efficient models.

A "UNet function" ``fn(x, t, step, *context, **unet_kwargs)`` is the common currency: the
float model (:func:`cache.float_unet_fn`) and the quantized one (:func:`quant.quantized_unet`)
both provide it, and :func:`cache.cached_denoiser` turns either into a stateful
:class:`iec_jax.Denoiser`. :mod:`iec_jax.efficient.adapter` makes every transform work on
the pixel ``UNet``, the LSUN latent ``UNet`` s and the conditional ``UNetCondition`` (SD,
cin256) alike (:class:`~iec_jax.efficient.adapter.ModelSpec`); a conditional model takes
its context as one more positional argument, and with classifier-free guidance
(:func:`iec_jax.guided_denoiser`) the 2B batch flows through quantizers and cache.

A quantized, cached, CacheQuant conditional model with guidance::

    model = ModelSpec(UNetCondition(cfg))                 # cache point: the shallowest branch
    qstate = quant.build_quant_state(model, params, calib_steps, QuantConfig())
    qstate = quant.fit_quant_dec(model, params, qstate, features)
    def denoiser(qs, dec):                                # inside jit
        den = cache.cached_denoiser(quant.quantized_unet(model, qs), full_steps=full,
                                    cache_point=model.resolve_cache_point(), dec=dec)
        return iec_jax.guided_denoiser(den, cond, uncond, scale)
"""

from iec_jax.efficient import adapter, cache, calibration, quant
from iec_jax.efficient.adapter import ModelSpec, UNetFunction, as_model
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
    "adapter", "ModelSpec", "UNetFunction", "as_model",
    "cache", "calibration", "quant", "CacheDEC", "cached_denoiser", "dps_schedule",
    "fit_cache_dec", "float_unet_fn", "nonuniform_schedule", "uniform_schedule",
    "QuantConfig", "QuantState", "build_quant_state", "fit_quant_dec", "quant_denoiser",
    "quantized_unet",
]
