"""One interface over the project's UNets for the efficiency transforms (docs/semantics.md §4).

The transforms (quantization, DeepCache, CacheQuant's DPS and DEC, calibration) never look
inside a network: they intercept its leaf layers and call it through a :class:`ModelSpec`,
which hides the two calling conventions

* :class:`~iec_jax.models.unet.UNet` (pixel DDPM, the LSUN LDMs):
  ``apply({'params': p}, x, t, **kw)``;
* :class:`~iec_jax.models.unet_cond.UNetCondition` (Stable Diffusion v1, cin256):
  ``apply({'params': p}, x, t, context, **kw)``, the context a batch of tokens
  (b, n_tokens, cross_attention_dim) of the same batch b as x,

behind one ``spec.apply(params, x, t, context=None, **kw)`` (``kw``: ``cache_point``,
``cached_feature``, ``return_feature``), and gives the facts the transforms need: the
table of quantizable layers (``layer_table``), the default cache point, the layers
quant-DEC corrects, the cached feature's shape.

Families (``family``):

* ``"ddpm"`` (the default for ``UNet``): DeepCache's DDPM branch 2
  (``DEEPCACHE_DDPM_CACHE_POINT``), quant-DEC on the cache-point resnet's 1×1
  ``conv_shortcut`` only (the official CIFAR-10 ``nin_shortcut``);
* ``"ldm"`` (always for ``UNetCondition``; ask for it for the LSUN ``UNet`` configs): the
  shallowest branch ``CachePoint(levels - 1, layers_per_block)``, the feature entering
  ``up_blocks[-1].resnets[-1]`` (CompVis ``output_blocks[-1]``), and quant-DEC on that
  resnet's ``conv_shortcut`` (``skip_connection``) AND its ``conv1`` (``in_layers[2]``, the
  3×3 conv after GroupNorm + SiLU), both restricted to the cached-feature input channels.

*UNet functions* (:class:`UNetFunction`) are the common currency of the transforms:
``fn(x, t, step, *context, **kw)`` returns what ``spec.apply`` returns, ``step`` (the
sampling-step index) selecting per-step tables. A conditional function either has its
context *bound* (``float_unet_fn(model, params, context=c)``: the function then looks
unconditional, as :func:`iec_jax.guided_denoiser` with ``cond = uncond = None`` expects,
c holding the whole 2B guided batch [uncond ; cond]) or receives it as the one extra
positional argument (what :func:`iec_jax.guided_denoiser` with contexts passes through a
stateful denoiser). Under classifier-free guidance the batch is 2B throughout: the
quantizers see (and are calibrated on) the 2B batch, and the cache holds the 2B feature.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from iec_jax.models.layers import Conv2d, Dense
from iec_jax.models.unet import (
    DEEPCACHE_DDPM_CACHE_POINT,
    CachePoint,
    UNet,
    cached_feature_shape,
    validate_cache_point,
)
from iec_jax.models.unet_cond import UNetCondition

__all__ = ["FAMILIES", "ModelSpec", "as_model", "UNetFunction", "layer_table"]

FAMILIES = ("ddpm", "ldm")


@functools.lru_cache(maxsize=32)
def layer_table(module) -> dict:
    """Module path -> ``input_split`` (None for Dense and unsplit convs) of every Conv2d /
    Dense (DenseNoBias included) of ``module``, in call order, from one traced ``init``
    (no arrays are allocated)."""
    table = {}

    def record(next_fun, args, kwargs, ctx):
        if ctx.method_name == "__call__" and isinstance(ctx.module, (Conv2d, Dense)):
            table["/".join(ctx.module.path)] = getattr(ctx.module, "input_split", None)
        return next_fun(*args, **kwargs)

    cfg = module.config
    size = 2 ** (cfg.num_levels - 1)
    x = jnp.zeros((1, size, size, cfg.in_channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    args = (x, t)
    if isinstance(module, UNetCondition):
        args += (jnp.zeros((1, 1, cfg.cross_attention_dim), jnp.float32),)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda k: module.init(k, *args), jax.random.key(0))
    return table


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A UNet as the efficiency transforms see it (hashable: usable as a static argument).

    Attributes:
      module: a :class:`~iec_jax.models.unet.UNet` or
        :class:`~iec_jax.models.unet_cond.UNetCondition` (any computation dtype).
      family: ``"ddpm"`` or ``"ldm"`` (see the module docstring); None: ``"ldm"`` for a
        UNetCondition, ``"ddpm"`` for a UNet.
      cache_point: the DeepCache cache point; None: the family's (DDPM branch 2, or the
        shallowest branch ``CachePoint(levels - 1, layers_per_block)``), see
        :meth:`resolve_cache_point`.
    """

    module: Any
    family: Optional[str] = None
    cache_point: Optional[CachePoint] = None

    def __post_init__(self):
        if not isinstance(self.module, (UNet, UNetCondition)):
            raise TypeError(f"ModelSpec.module must be a UNet or a UNetCondition, got {type(self.module).__name__}")
        family = self.family or ("ldm" if self.conditional else "ddpm")
        if family not in FAMILIES:
            raise ValueError(f"ModelSpec.family must be one of {FAMILIES}, got {self.family!r}")
        if self.conditional and family != "ldm":
            raise ValueError("ModelSpec.family: a UNetCondition is a latent-diffusion model ('ldm')")
        object.__setattr__(self, "family", family)
        if self.cache_point is not None:
            object.__setattr__(self, "cache_point", validate_cache_point(self.module.config, self.cache_point))

    # ------------------------------------------------------------------ facts
    @property
    def conditional(self) -> bool:
        """True for a UNetCondition (it needs a context)."""
        return isinstance(self.module, UNetCondition)

    @property
    def config(self):
        return self.module.config

    @property
    def dtype(self):
        return self.module.dtype

    def layer_table(self) -> dict:
        """See :func:`layer_table`."""
        return layer_table(self.module)

    def resolve_cache_point(self, cache_point=None) -> CachePoint:
        """``cache_point`` validated; None: the spec's, or its family's default (validated
        here, on use: a small network may lack the DDPM branch 2)."""
        cfg = self.config
        cp = cache_point if cache_point is not None else self.cache_point
        if cp is None and self.family == "ddpm":
            cp = DEEPCACHE_DDPM_CACHE_POINT
        elif cp is None:
            cp = CachePoint(cfg.num_levels - 1, cfg.layers_per_block)
        return validate_cache_point(cfg, cp)

    def feature_shape(self, x_shape, cache_point=None) -> tuple:
        """Shape of the cached feature for inputs of shape ``x_shape`` (b, h, w, c)."""
        return cached_feature_shape(self.config, self.resolve_cache_point(cache_point), x_shape)

    def cache_resnet(self, cache_point=None) -> str:
        """Path of the resnet the cached feature enters."""
        up_block, resnet = self.resolve_cache_point(cache_point)
        return f"up_blocks_{int(up_block)}/resnets_{int(resnet)}"

    def quant_dec_layers(self, cache_point=None) -> tuple:
        """The convs quant-DEC corrects (docs/semantics.md §4.4): the cache-point resnet's
        ``conv_shortcut`` for both families, and its ``conv1`` for ``"ldm"``. A path may
        name a layer the network lacks (a resnet without shortcut): callers check."""
        base = self.cache_resnet(cache_point)
        if self.family == "ddpm":
            return (f"{base}/conv_shortcut",)
        return (f"{base}/conv_shortcut", f"{base}/conv1")

    # ------------------------------------------------------------------ calling
    def apply(self, params, x, t, context=None, **kw):
        """The network on (x, t[, context]) with ``params`` (the inner dict, without
        ``{'params': ...}``); ``kw`` as the module's ``__call__`` (``cache_point``,
        ``cached_feature``, ``return_feature``, ``train``)."""
        if self.conditional:
            if context is None:
                raise ValueError("this UNetCondition needs a context (b, n_tokens, cross_attention_dim)")
            return self.module.apply({"params": params}, x, t, context, **kw)
        if context is not None:
            raise ValueError("an unconditional UNet takes no context")
        return self.module.apply({"params": params}, x, t, **kw)

    def tracing_context(self, batch: int):
        """A zero context of one token for shape tracing (None for unconditional models)."""
        if not self.conditional:
            return None
        return jnp.zeros((batch, 1, self.config.cross_attention_dim), jnp.float32)


def as_model(model, cache_point=None) -> ModelSpec:
    """A :class:`ModelSpec` from a spec, a UNet or a UNetCondition (``cache_point``, when
    given, replaces the spec's)."""
    spec = model if isinstance(model, ModelSpec) else ModelSpec(model)
    if cache_point is not None and (spec.cache_point is None or tuple(cache_point) != tuple(spec.cache_point)):
        spec = dataclasses.replace(spec, cache_point=validate_cache_point(spec.config, cache_point))
    return spec


@dataclasses.dataclass(frozen=True, eq=False)
class UNetFunction:
    """``fn(x, t, step, *context, **kw)``: a (float or quantized) model as a function.

    Attributes:
      model: the :class:`ModelSpec`.
      run: ``(x, t, step, context, **kw) -> out`` (context None for unconditional models).
      context: a bound context (None: passed per call as the extra positional argument).
    """

    model: ModelSpec
    run: Callable
    context: Any = None

    def __call__(self, x, t, step, *context, **kw):
        if len(context) > 1:
            raise TypeError(f"a UNet function takes at most one context argument, got {len(context)}")
        if context and self.context is not None:
            raise ValueError("this UNet function has its context bound already")
        ctx = context[0] if context else self.context
        return self.run(x, t, step, ctx, **kw)

    def bind(self, context) -> "UNetFunction":
        """The same function with ``context`` bound."""
        return dataclasses.replace(self, context=context)
