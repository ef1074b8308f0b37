"""Leaf layers of the UNet: the interception points for quantization.

Every convolution, dense layer, attention matmul and attention softmax of
:class:`iec_jax.models.unet.UNet` is one of the four small Linen classes below, so an
efficiency transform can find and replace them by class with
``flax.linen.intercept_methods`` without editing the UNet (docs/semantics.md §4.1: every
Conv2d/Linear becomes a ``QuantModule``; the attention matmuls and the softmax get their
own activation quantizers).

==============  =================================  ======================================
class           diffusers / PyTorch                official quantizer (``quant/``)
==============  =================================  ======================================
``Conv2d``      ``nn.Conv2d`` (weight OIHW)        ``QuantModule`` (weights per output
                                                   channel, input activation per tensor)
``Dense``       ``nn.Linear`` (weight (out, in))   ``QuantModule``; the pytorch_diffusion
                                                   attention q/k/v/proj_out are 1×1 convs
``MatMul``      ``bmm(q, k)``, ``bmm(v, w_)``       ``act_quantizer_q/k`` and ``_w/_v``
``Softmax``     ``softmax(w_, dim=2)``             ``act_quantizer_w`` (``sm_abit``)
==============  =================================  ======================================

Writing an interceptor. The interceptor receives ``(next_fun, args, kwargs, context)``;
``context.module`` is the bound layer (``isinstance`` selects the class,
``context.module.path`` names it, e.g. ``('up_blocks_2', 'resnets_2', 'conv_shortcut')``)
and ``context.method_name`` is ``'__call__'`` for the forward computation. Layers with
parameters expose their arithmetic as the pure method ``compute(x, kernel, bias)``, so a
fake-quantizing interceptor reads the float weights, transforms them and the input, and
calls ``compute``::

    def fake_quant(next_fun, args, kwargs, context):
        m = context.module
        if isinstance(m, layers.Conv2d) and context.method_name == "__call__":
            (x,) = args
            kernel = m.get_variable("params", "kernel")
            bias = m.get_variable("params", "bias")
            return m.compute(quant_act(x), quant_weight(kernel), bias)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(fake_quant):
        eps = model.apply(params, x, t)

``Conv2d.input_split`` marks convolutions whose input is the channel concatenation
[up-path feature ‖ skip feature] (the up-path resnets' ``conv1`` and ``conv_shortcut``):
the first ``input_split`` input channels come from the up path (at the DeepCache cache
point: the cached feature), the rest from the skip connection. The official ``--split``
quantization uses separate quantizers for the two groups.

Layout: activations are NHWC (channels last); conv kernels are HWIO, dense kernels
(in, out). Parameters are stored in ``param_dtype`` (float32) and cast to ``dtype`` for
the computation (bfloat16 compute with float32 parameters).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

__all__ = ["Conv2d", "Dense", "MatMul", "Softmax", "torch_default_kernel_init", "LEAF_LAYERS"]

Dtype = Any
Padding = Union[int, Sequence[Sequence[int]]]

# PyTorch's default for nn.Conv2d / nn.Linear weights: kaiming_uniform(a=sqrt(5)), i.e.
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), variance 1 / (3 fan_in). Biases start at zero here
# (PyTorch draws them uniformly too). Only matters for models trained by this project:
# converted checkpoints overwrite every parameter.
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _explicit_padding(padding: Padding) -> tuple[tuple[int, int], tuple[int, int]]:
    if isinstance(padding, int):
        if padding < 0:
            raise ValueError(f"Conv2d.padding must be >= 0, got {padding}")
        return ((padding, padding), (padding, padding))
    pads = tuple(tuple(int(p) for p in pair) for pair in padding)
    if len(pads) != 2 or any(len(pair) != 2 or min(pair) < 0 for pair in pads):
        raise ValueError(
            f"Conv2d.padding must be an int or ((top, bottom), (left, right)), got {padding!r}"
        )
    return pads  # type: ignore[return-value]


class Conv2d(nn.Module):
    """2-D convolution with bias on NHWC inputs (``torch.nn.Conv2d``).

    Attributes:
      features: output channels.
      kernel_size: square kernel size.
      stride: square stride.
      padding: zero padding, symmetric ``int`` or ``((top, bottom), (left, right))``.
      input_split: for a convolution applied to the concatenation [up-path ‖ skip], the
        number of leading input channels that come from the up path; None otherwise.
      dtype: computation dtype (None: from the inputs).
      param_dtype: parameter dtype.

    Parameters: ``kernel`` (kh, kw, in, out) = torch ``weight.permute(2, 3, 1, 0)``;
    ``bias`` (out,).
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: Padding = 1
    input_split: Optional[int] = None
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x`` (b, h, w, in) -> (b, h', w', features)."""
        in_features = x.shape[-1]
        if self.input_split is not None and not 0 < self.input_split < in_features:
            raise ValueError(
                f"Conv2d {self.name}: input_split={self.input_split} must lie strictly"
                f" between 0 and the {in_features} input channels"
            )
        k = self.kernel_size
        kernel = self.param(
            "kernel", torch_default_kernel_init, (k, k, in_features, self.features), self.param_dtype
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        return self.compute(x, kernel, bias)

    @nn.nowrap
    def compute(self, x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
        """The convolution given explicit (possibly transformed) weights; not intercepted."""
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(self.stride, self.stride),
            padding=_explicit_padding(self.padding),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + bias


class Dense(nn.Module):
    """Affine map over the last axis (``torch.nn.Linear``).

    Parameters: ``kernel`` (in, out) = torch ``weight.T``; ``bias`` (out,).
    """

    features: int
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x`` (..., in) -> (..., features)."""
        kernel = self.param(
            "kernel", torch_default_kernel_init, (x.shape[-1], self.features), self.param_dtype
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        return self.compute(x, kernel, bias)

    @nn.nowrap
    def compute(self, x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
        """The affine map given explicit (possibly transformed) weights; not intercepted."""
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        return jnp.matmul(x, kernel) + bias


class MatMul(nn.Module):
    """Batched matrix product of two activations, ``a @ b`` (no parameters).

    The attention uses two: ``matmul_qk`` (q, kᵀ) -> scores and ``matmul_av``
    (probs, v) -> output; a quantizer fake-quantizes both operands.
    """

    dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """``a`` (..., m, k), ``b`` (..., k, n) -> (..., m, n)."""
        a, b = promote_dtype(a, b, dtype=self.dtype)
        return jnp.matmul(a, b)


class Softmax(nn.Module):
    """Softmax over the last axis, computed in at least float32 (diffusers'
    ``upcast_softmax=True``) and returned in the input dtype (no parameters)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x`` (..., n) -> probabilities (..., n)."""
        compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
        return jax.nn.softmax(x.astype(compute_dtype), axis=-1).astype(x.dtype)


LEAF_LAYERS = (Conv2d, Dense, MatMul, Softmax)
