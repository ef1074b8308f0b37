"""Simulated (fake) post-training quantization of the Flax UNet, Q-Diffusion / CacheQuant
style (docs/semantics.md §4.1, §4.4, §3), applied with ``flax.linen.intercept_methods`` on the
leaf layers of :mod:`iec_jax.models.layers`; the UNet itself is not edited.

Everything is fake-quantized in float32 (docs/semantics.md §7 item 10: no latency claims).
Mapping to the official code (github zysxmu/IEC = BienLuky/CacheQuant + IEC changes):

* :func:`fake_quant` = ``UniformAffineQuantizer.forward``: ``(clip(round(x / Δ) +
  round(z), 0, 2^b - 1) - round(z)) · Δ`` (``quant/quant_layer.py``). ``bits >= 32`` means
  no quantizer at all (exact passthrough; the official code has no such switch).
* :func:`mse_search` = ``init_quantization_scale_2`` with ``scale_method='mse'``: the
  candidates ``[min, max] · (1 - 0.01 i)``, i = 0, 2, …, 78 (40), are scored with
  ``calculate_qparams`` (range widened to contain 0, Δ ≥ 1e-8, z clamped to
  [0, 2^b - 1]) by ``mean |x - x_q|^2.4``; the first minimum wins. The *stored* range is
  NOT widened: Δ = (max' - min') / (2^b - 1), z = round(-min' / Δ) (official quirk kept:
  for one-signed tensors such as softmax outputs the scored and the used grids differ).
  ``min == max``: Δ = max, z = 0 (deviation: Δ = 1 when max = 0, where torch gives NaN).
  Speed (the result is unchanged): the activation calibration scores the 40 candidates
  of a tensor first approximately, all at once and vectorised (``exp(2.4 log|e|)``
  instead of the scalar ``pow``), and exactly only those within 1% of the best
  approximate score (``prune``, :func:`_pruned_argmin`): on a 2-core CPU about 4× faster
  per calibration step, with tables equal bit for bit to the full search's.
* Weights (:func:`quantize_params`, ``set_weight_quantize_params``): asymmetric, per output
  channel (each channel searched separately), computed once from the weights. Split convs
  (``--split``) have a second weight quantizer: the input-channel groups [:split] and
  [split:] are quantized independently (``QuantModule.weight_quantizer[_0]``).
* Activations (:func:`calibrate_activations`, ``set_act_quantize_params``): per tensor,
  asymmetric, one (Δ, z) per sampling step. Calibration runs FLOAT weights with the
  activation quantizers on (``set_quant_state(False, True)``): every quantizer searches its
  input, then quantizes it, so downstream layers see quantized inputs. Batches of one
  step: (Δ, z) ← 0.1 · new + 0.9 · old (``update_quantize_range``; the first batch blends
  with itself); z is rounded at use. The batch size only shrinks along the steps
  (``batch_size = min(batch_size, n_step)`` is reassigned in the official loop) and the
  remainder of a step's samples is dropped. Cached steps calibrate on the DeepCache
  partial pass (``prv_f``) from the cache-DEC-corrected feature (``model.a_list`` is set
  while ``ddim_cifar_params.py`` calibrates). Steps where a layer does not run keep the
  value of its first ever calibration batch (``torch.stack([delta] * timesteps)``).
  Tables are indexed by the sampling step passed in (``set_time(step)``; docs/semantics.md §3:
  IEC evaluations of step i use step i's tables), never by a call counter.
* Quantized operands: the input of every ``Conv2d`` / ``Dense`` (``QuantModule``: time
  embedding linears, resnet ``temb_proj`` and attention q/k/v/out included); ``split``
  convs quantize the channel groups with two tables (``act_quantizer[_0]``); attention
  (``QuantAttnBlock``): q and k at the ``matmul_qk`` input, the softmax probabilities at
  ``softmax_bits`` (``sm_abit``) and v at the ``matmul_av`` input.
* ``conv_in`` / ``conv_out`` weights and input activations at ``first_last_bits``
  (``set_first_last_layer_to_8bit``, by path here, not by position: docs/semantics.md §7 item 18).
* Quant-DEC (:func:`fit_quant_dec`, ``cache_pred_quanterr_abCov_statistic`` in
  ``error_dec/cifar/cifar_dec.py``; applied in ``QuantModule.forward`` via ``pre_err``):
  for the conv consuming the cached feature (our ``up_blocks_u/resnets_r/conv_shortcut``,
  DDPM ``nin_shortcut``), per step and output channel, Y = conv(f, W[:split]) + bias,
  X = conv(Q_step(f), Q(W[:split])) + bias, a = mean((X-X̄)(Y-Ȳ)) / var(X, ddof=1),
  b = Ȳ - a X̄ over (batch, h, w). Applied at every step (full and cached) as
  ``conv(x0q, a·W0q) + b + conv(x1q, W1q) + bias`` (here one conv with the folded kernel).
  Official quirks kept: bias inside both regressands but added unscaled; unbiased var.
  Where the IEC fork's bare ``try/except`` silently skips the correction, this raises.

Latent models (docs/semantics.md §4.1, §4.4, §6). Every function takes a ``UNet``, a
``UNetCondition`` or a :class:`~iec_jax.efficient.adapter.ModelSpec` (the module is never
edited). Conditional models get their context as one more positional argument (or bound,
:func:`quantized_unet`); under classifier-free guidance the 2B batch [uncond ; cond]
flows through every quantizer, in calibration as in sampling. What is quantized is what
the official LDM code quantizes: every Conv2d / Dense input and kernel (time-embedding
linears, resnet ``time_emb_proj``, the transformers' ``proj_in``/``proj_out``, the
bias-free q/k/v projections of self- and cross-attention, ``to_out``, the GEGLU ``proj``
and ``ff.net.2``), the attention matmul operands of the legacy attention (LSUN) and of
both transformer attentions (q, k, the softmax probabilities at ``softmax_bits``, v),
the cross-attention context at the inputs of ``attn2.to_k``/``to_v``, the split
quantizers on concatenated skips, ``conv_in``/``conv_out`` at ``first_last_bits`` by name.
GroupNorm/LayerNorm, SiLU/GELU, the softmax itself and residual adds stay float; the
autoencoder, the text encoder and the class embedder are other modules and are not
touched. :func:`quantizer_table` lists the quantizers of a model. Quant-DEC on the
latent family corrects the cache-point resnet's ``conv_shortcut`` and its ``conv1``
(CompVis ``skip_connection`` and ``in_layers[2]``; the latter on SiLU(GroupNorm(f)) of
the cached channels, the official ``in_layers`` on the first channels).

Bedroom variant (:meth:`QuantConfig.bedroom_per_channel`, the IEC fork's LSUN-Bedroom
quantization script ``sample_cachequant_bedroom_quant.py``; the other settings and the
default here use the MSE search per tensor): weights per output channel and activations
per channel, both with the official ``'max'`` range (:func:`max_search`: Δ = (max - min)
/ (2^b - 1) of the raw range, z = round(-min(min, 0) / Δ)); the activation tables then
hold one (Δ, z) per step and channel, and a step's tables are those of its LAST
calibration batch (the official channel-wise quantizer re-initialises on every batch;
no 0.1/0.9 averaging). The channel of an operand: the last axis of conv and linear
inputs; the head-dim axis of q, k and v at the attention matmuls; the query axis of the
softmax probabilities (the legacy attention's layout ``(b·h, c, t)`` / ``(b·h, t, s)``,
dimension 1, on which that script ran; the same axes are used in transformer blocks,
which that script never met). Official quirks kept: a channel whose values are all
positive is represented on [0, max - min] only (its top is clipped), and a channel that
is constant over the calibration batch gets Δ = 1e-8 — when positive it then quantizes
to 255·1e-8 ≈ 0. The time-embedding inputs are such channels (every sample of a step
shares t), so this variant zeroes their positive features.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util
from tqdm.auto import tqdm

from iec_jax.denoisers import StatefulDenoiser
from iec_jax.efficient.adapter import ModelSpec, UNetFunction, as_model
from iec_jax.io import write_npz
from iec_jax.models.layers import Conv2d, Dense, MatMul

__all__ = [
    "QuantConfig", "ActRange", "QuantDEC", "QuantState", "fake_quant", "mse_search",
    "max_search", "quantize_weight", "quantize_params", "calibrate_activations",
    "build_quant_state", "quant_apply", "quantized_unet", "quant_denoiser", "quant_dec_layer",
    "fit_quant_dec", "quantizer_table", "save_quant_state", "load_quant_state",
]

NO_QUANT_BITS = 32
_SHRINK = np.array([1.0 - 0.01 * i for i in range(0, 80, 2)], np.float32)  # 40 candidates
_EMA_NEW = 0.1
_PRUNE_MARGIN = 1e-2  # relative: candidates scored exactly (see _pruned_argmin)
_PRUNE_SLACK = 1e-30  # absolute, for all-zero approximate scores
_TILE = 1024  # column width of the approximate scores


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Quantization options (hashable: static under jit).

    Bits >= 32 mean "no quantization" for that group. ``first_last_layers`` are module
    paths whose weights and input activations use ``first_last_bits``. ``scale_method``
    "mse" with ``act_per_channel=False`` is the default (weights per output channel by
    the MSE search, activations per tensor by the MSE search with 0.1/0.9 averaging);
    "max" with ``act_per_channel=True`` is the IEC fork's LSUN-Bedroom variant
    (:meth:`bedroom_per_channel`; see the module docstring). Other pairings raise.
    """

    weight_bits: int = 8
    act_bits: int = 8
    first_last_bits: int = 8
    softmax_bits: int = 8
    split: bool = True
    scale_method: str = "mse"
    symmetric: bool = False
    first_last_layers: tuple = ("conv_in", "conv_out")
    act_per_channel: bool = False

    @classmethod
    def bedroom_per_channel(cls, **overrides) -> "QuantConfig":
        """The IEC fork's LSUN-Bedroom setting: weights per output channel and activations
        per channel, both with the official max-based range (``scale_method='max'``)."""
        return cls(**{"scale_method": "max", "act_per_channel": True, **overrides})

    def __post_init__(self):
        for name in ("weight_bits", "act_bits", "first_last_bits", "softmax_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not (2 <= v <= 16 or v >= NO_QUANT_BITS):
                raise ValueError(f"QuantConfig.{name} must be an int in [2, 16], or >= 32 for no quantization, got {v!r}")
            object.__setattr__(self, name, int(v))
        if not isinstance(self.split, bool):
            raise ValueError(f"QuantConfig.split must be a bool, got {self.split!r}")
        if not isinstance(self.act_per_channel, bool):
            raise ValueError(f"QuantConfig.act_per_channel must be a bool, got {self.act_per_channel!r}")
        if self.scale_method not in ("mse", "max"):
            raise ValueError(f"QuantConfig.scale_method must be 'mse' (the official default) or 'max' (with"
                             f" act_per_channel=True), got {self.scale_method!r}")
        if (self.scale_method == "max") != self.act_per_channel:
            raise ValueError(f"QuantConfig.scale_method {self.scale_method!r} with act_per_channel="
                             f"{self.act_per_channel}: use 'mse' per tensor (the default) or 'max' per"
                             " channel (QuantConfig.bedroom_per_channel())")
        if self.symmetric is not False:
            raise ValueError(f"QuantConfig.symmetric: only asymmetric quantization (False) is supported, got {self.symmetric!r}")
        layers = self.first_last_layers
        if not isinstance(layers, (tuple, list)) or not all(isinstance(p, str) and p for p in layers):
            raise ValueError(f"QuantConfig.first_last_layers must be a tuple of module paths, got {layers!r}")
        object.__setattr__(self, "first_last_layers", tuple(layers))

    def layer_bits(self, path: str, weight: bool) -> int:
        if path in self.first_last_layers:
            return self.first_last_bits
        return self.weight_bits if weight else self.act_bits


class ActRange(NamedTuple):
    """Activation quantizer table: ``delta``, ``zero_point`` of shape (S,) (z unrounded)."""

    delta: jax.Array
    zero_point: jax.Array


class QuantDEC(NamedTuple):
    """Quant-DEC: ``a``, ``b`` of shape (S, C_out) for a conv consuming the cached feature."""

    a: jax.Array
    b: jax.Array


@struct.dataclass
class QuantState:
    """Calibrated quantized model (a pytree; ``config`` and ``dec_layer`` are static).

    ``params``: the UNet params with fake-quantized kernels; ``act``: key -> ActRange, key
    ``'<module path>:<operand>'`` with operand ``x`` (layer input), ``x0``/``x1`` (split
    groups) or ``a``/``b`` (matmul operands); ActRange fields are (S,) per tensor or (S, C)
    per channel. ``dec``: optional quant-DEC: one :class:`QuantDEC` on the layer
    ``dec_layer`` (a path), or a dict path -> QuantDEC with ``dec_layer`` the tuple of
    those paths (the latent family corrects two convs).
    """

    params: Any
    act: dict
    dec: Any = None
    config: QuantConfig = struct.field(pytree_node=False, default=QuantConfig())
    dec_layer: Any = struct.field(pytree_node=False, default=None)

    @property
    def num_steps(self) -> int:
        return int(next(iter(self.act.values())).delta.shape[0]) if self.act else 0

    def dec_tables(self) -> dict:
        """Quant-DEC as a dict path -> QuantDEC (empty without quant-DEC)."""
        if self.dec is None:
            return {}
        if isinstance(self.dec, QuantDEC):
            if not isinstance(self.dec_layer, str):
                raise ValueError(f"QuantState: a single QuantDEC needs dec_layer as a path, got {self.dec_layer!r}")
            return {self.dec_layer: self.dec}
        return dict(self.dec)


# ------------------------------------------------------------------ primitives
def _fq(x: jax.Array, delta, zero_point, levels) -> jax.Array:
    """Fake quantization onto the integers [0, levels] (levels = 2^b - 1, maybe traced)."""
    dt = jnp.promote_types(x.dtype, jnp.float32)
    z, delta = jnp.round(jnp.asarray(zero_point, dt)), jnp.asarray(delta, dt)
    q = jnp.clip(jnp.round(x.astype(dt) / delta) + z, 0, levels)
    return ((q - z) * delta).astype(x.dtype)


def fake_quant(x: jax.Array, delta, zero_point, bits: int) -> jax.Array:
    """Asymmetric uniform affine fake quantization (official op order); bits >= 32: x."""
    return x if bits >= NO_QUANT_BITS else _fq(x, delta, zero_point, float(2**bits - 1))


def _approx_scores(x: jax.Array, xmax: jax.Array, xmin: jax.Array, n: jax.Array) -> jax.Array:
    """The 40 candidates' scores of each row of x (C, m) at once, (C, 40), float32, with
    ``|e|^2.4`` as ``exp(2.4 log|e|)``: vectorised, unlike the scalar ``pow`` of the exact
    score, and within ~1e-5 (relative) of it. Laid out as (C, m/k, 40, k) column sums, which
    XLA's CPU emitter vectorises far better than 40 long row reductions; the zero padding to
    a multiple of k adds exactly 0 (0 quantizes to itself on every candidate grid)."""
    c, m = x.shape
    k = min(_TILE, m)
    # Constants broadcast to the (C, m/k, 40, k) shape make XLA's CPU compiler materialise
    # them (shared between tensors of one shape) and split the fusion, ~5x slower: every
    # operand of the big elementwise chain is per tensor, behind a barrier tied to x.
    x, n, power = jax.lax.optimization_barrier((x, n, jnp.float32(2.4)))
    xt = jnp.pad(x, ((0, 0), (0, (-m) % k))).reshape(c, -1, 1, k)
    f = jnp.asarray(_SHRINK)
    hi, lo = jnp.maximum(xmax[:, None] * f, 0.0), jnp.minimum(xmin[:, None] * f, 0.0)  # (C, 40)
    s = jnp.maximum((hi - lo) / n[:, None], jnp.float32(1e-8))
    z = jnp.clip(-jnp.round(lo / s), 0.0, n[:, None])
    # clip(round(x/s) + z, 0, n) - z as one clip of round(x/s) (exact on these integers)
    q_lo, q_hi = (-z)[:, None, :, None], (n[:, None] - z)[:, None, :, None]
    s = s[:, None, :, None]
    xq = jnp.clip(jnp.round(xt / s), q_lo, q_hi) * s
    err = jnp.exp(power * jnp.log(jnp.abs(xt - xq)))
    return err.sum(1).sum(-1) / np.float32(m)


def _pruned_argmin(score, x: jax.Array, xmax: jax.Array, xmin: jax.Array, n: jax.Array) -> jax.Array:
    """The first minimum of the 40 exact scores, ``argmin(lax.map(score, candidates))``,
    scoring exactly only the candidates whose approximate score (:func:`_approx_scores`) is
    within the relative margin ``_PRUNE_MARGIN`` (1%) of the row's approximate minimum
    (about 1.3 of the 40 on the main job's activations). A pruned candidate's exact score
    exceeds the minimum unless approximate and exact scores differ by more than the margin;
    measured on those activations: 2e-6 (median), 4e-5 at most, float32 rounding of the
    two sums. ``score`` is the full search's own function (its values in the ``cond``
    equal the full search's bit for bit: tests/test_speedups.py), so the first minimum
    among the survivors is the full search's winner (NaN scores are kept: argmin returns
    the first NaN, as the full search does).
    Scores that are all zero up to rounding keep every candidate (``_PRUNE_SLACK``)."""
    approx = _approx_scores(x, xmax, xmin, n)
    bound = approx.min(1, keepdims=True) * (1.0 + _PRUNE_MARGIN) + _PRUNE_SLACK
    alive = (approx <= bound) | jnp.isnan(approx)
    inf = jnp.full(x.shape[:1], jnp.inf, jnp.float32)

    def body(args):
        f, a = args
        return jax.lax.cond(jnp.any(a), lambda ff: jnp.where(a, score(ff), inf), lambda ff: inf, f)

    return jnp.argmin(jax.lax.map(body, (jnp.asarray(_SHRINK), alive.T)), axis=0)


def _mse_rows(x: jax.Array, levels, counts: Optional[np.ndarray] = None, prune: bool = False,
              ) -> tuple[jax.Array, jax.Array]:
    """Official 'mse' range search for each row of x (C, n), float32. ``levels``: 2^b - 1,
    scalar or per row (may be traced: one compile for all bit widths); ``counts``: valid
    length of each (zero-padded) row."""
    if prune and counts is not None:
        raise ValueError("the pruned search takes unpadded rows (counts=None)")
    n = jnp.broadcast_to(jnp.asarray(levels, jnp.float32), x.shape[:1])
    mask = None if counts is None else np.arange(x.shape[1])[None, :] < np.asarray(counts)[:, None]
    xmax = x.max(1) if mask is None else jnp.where(mask, x, -jnp.inf).max(1)
    xmin = x.min(1) if mask is None else jnp.where(mask, x, jnp.inf).min(1)

    def score(f):  # calculate_qparams + quantize + lp_loss(p=2.4, 'all')
        hi, lo = jnp.maximum(xmax * f, 0.0), jnp.minimum(xmin * f, 0.0)
        s = jnp.maximum((hi - lo) / n, jnp.float32(1e-8))
        z = jnp.clip(-jnp.round(lo / s), 0.0, n)
        xq = (jnp.clip(jnp.round(x / s[:, None]) + z[:, None], 0.0, n[:, None]) - z[:, None]) * s[:, None]
        err = jnp.abs(x - xq) ** 2.4
        if mask is None:
            return jnp.mean(err, axis=1)
        return jnp.where(mask, err, 0.0).sum(1) / np.asarray(counts, np.float32)

    if prune:
        best = _pruned_argmin(score, x, xmax, xmin, n)
    else:
        best = jnp.argmin(jax.lax.map(score, jnp.asarray(_SHRINK)), axis=0)  # first minimum
    f = jnp.asarray(_SHRINK)[best]
    new_max, new_min = xmax * f, xmin * f
    delta = (new_max - new_min) / n
    zp = jnp.round(-new_min / delta)
    flat = xmax == xmin
    return jnp.where(flat, jnp.where(xmax == 0, 1.0, xmax), delta), jnp.where(flat, 0.0, zp)


@functools.partial(jax.jit, static_argnames=("channel_axis", "prune"))
def _mse_search(x, levels, channel_axis, prune=False):
    x = jnp.asarray(x, jnp.float32)
    if channel_axis is None:
        d, z = _mse_rows(x.reshape(1, -1), levels, prune=prune)
        return d[0], z[0]
    x = jnp.moveaxis(x, channel_axis, 0)
    return _mse_rows(x.reshape(x.shape[0], -1), levels, prune=prune)


def mse_search(x: jax.Array, bits: int, channel_axis: Optional[int] = None, *,
               prune: bool = False) -> tuple[jax.Array, jax.Array]:
    """(delta, zero_point) of the official 'mse' search: per tensor (scalars) or per
    ``channel_axis`` (shape (C,)); bits < 32. ``prune``: score exactly only the candidates
    that a vectorised approximate scoring cannot rule out (:func:`_pruned_argmin`; the
    same result, several times faster on CPU)."""
    return _mse_search(x, float(2**bits - 1), channel_axis, prune)


def _max_rows(x: jax.Array, levels) -> tuple[jax.Array, jax.Array]:
    """Official 'max' range of each row of x (C, n), float32: Δ = (max - min) / (2^b - 1)
    of the RAW range (at least 1e-8), z = round(-min(min, 0) / Δ) (official quirk kept: the
    zero point uses the range widened to contain 0, Δ does not). An all-zero row gives
    Δ = 1e-8, z = 0 (the official weight path divides 0 by 0 there)."""
    xmax, xmin = x.max(1), x.min(1)
    delta = jnp.maximum((xmax - xmin) / jnp.asarray(levels, jnp.float32), jnp.float32(1e-8))
    zp = jnp.round(-jnp.minimum(xmin, 0.0) / delta)
    return delta, zp


@functools.partial(jax.jit, static_argnames=("channel_axis",))
def _max_search(x, levels, channel_axis):
    x = jnp.asarray(x, jnp.float32)
    if channel_axis is None:
        d, z = _max_rows(x.reshape(1, -1), levels)
        return d[0], z[0]
    x = jnp.moveaxis(x, channel_axis, 0)
    return _max_rows(x.reshape(x.shape[0], -1), levels)


def max_search(x: jax.Array, bits: int, channel_axis: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
    """(delta, zero_point) of the official ``'max'`` scale method (``init_quantization_
    scale_for_activation`` / ``init_quantization_scale_2``): per tensor (scalars) or per
    ``channel_axis`` (shape (C,)); bits < 32. See :func:`_max_rows` for the formula."""
    return _max_search(x, float(2**bits - 1), channel_axis)


def _channel_axis(key: str) -> int:
    """The channel axis of an operand in the per-channel variant (see the module docstring):
    the last axis of layer inputs; at ``matmul_qk`` (q (.., n, d), kᵀ (.., d, m)) the head
    dim: -1 for q, -2 for kᵀ; at ``matmul_av`` (probs (.., n, m), v (.., m, d)) the query
    axis -2 for the probabilities and the head dim -1 for v."""
    path, operand = key.rsplit(":", 1)
    if operand in ("a", "b"):
        if path.rsplit("/", 1)[-1] == "matmul_av":
            return -2 if operand == "a" else -1
        return -1 if operand == "a" else -2
    return -1


def _along(values: jax.Array, axis: int, ndim: int) -> jax.Array:
    """Per-channel ``values`` (C,) shaped to broadcast along ``axis`` of an ndim tensor."""
    shape = [1] * ndim
    shape[axis] = values.shape[0]
    return values.reshape(shape)


def _fake_quant_table(x: jax.Array, delta, zero_point, bits: int, key: str) -> jax.Array:
    """:func:`fake_quant` with a per-tensor (scalar) or per-channel ((C,), along the key's
    channel axis) delta / zero point."""
    if bits >= NO_QUANT_BITS:
        return x
    if jnp.ndim(delta) == 0:
        return fake_quant(x, delta, zero_point, bits)
    axis = _channel_axis(key)
    return fake_quant(x, _along(delta, axis, x.ndim), _along(zero_point, axis, x.ndim), bits)


@functools.partial(jax.jit, static_argnames=("splits",))
def _quantize_kernels_max(kernels: dict, levels: dict, splits: tuple) -> dict:
    """As :func:`_quantize_kernels` with the official 'max' range per output channel."""
    out = {}
    for name, split in splits:
        k = kernels[name]
        parts = (k[..., :split, :], k[..., split:, :]) if split else (k,)
        q = []
        for p in parts:
            d, z = _max_rows(p.reshape(-1, p.shape[-1]).T.astype(jnp.float32), levels[name])
            q.append(_fq(p, d, z, levels[name]))
        out[name] = jnp.concatenate(q, axis=-2)
    return out


@functools.partial(jax.jit, static_argnames=("splits",))
def _quantize_kernels(kernels: dict, levels: dict, splits: tuple) -> dict:
    """Per-output-channel fake quantization of channel-last kernels (``splits``: (name,
    split) pairs; ``levels``: name -> 2^b - 1) in ONE zero-padded row search."""
    parts = [(name, p) for name, split in splits
             for p in ((kernels[name][..., :split, :], kernels[name][..., split:, :]) if split else (kernels[name],))]
    rows = [p.reshape(-1, p.shape[-1]).T.astype(jnp.float32) for _, p in parts]
    width = max(r.shape[1] for r in rows)
    x = jnp.concatenate([jnp.pad(r, ((0, 0), (0, width - r.shape[1]))) for r in rows])
    n = jnp.concatenate([jnp.full(r.shape[0], levels[name], jnp.float32) for (name, _), r in zip(parts, rows)])
    d, z = _mse_rows(x, n, np.concatenate([np.full(r.shape[0], r.shape[1]) for r in rows]))
    done: dict = {}
    o = 0
    for name, p in parts:
        c = p.shape[-1]
        done.setdefault(name, []).append(_fq(p, d[o : o + c], z[o : o + c], levels[name]))
        o += c
    return {name: jnp.concatenate(q, axis=-2) for name, q in done.items()}


def quantize_weight(kernel: jax.Array, bits: int, split: Optional[int] = None, scale_method: str = "mse") -> jax.Array:
    """Fake-quantized kernel (channel last: conv HWIO, dense (in, out)), per output
    channel; with ``split`` the input groups [:split] and [split:] independently;
    ``scale_method`` "mse" (default) or "max" (the Bedroom variant)."""
    if bits >= NO_QUANT_BITS:
        return kernel
    fn = _quantize_kernels_max if scale_method == "max" else _quantize_kernels
    return fn({"w": kernel}, {"w": float(2**bits - 1)}, (("w", split),))["w"]


def _layer_table(unet) -> dict:
    """Module path -> input_split (None for Dense / unsplit convs), from one traced pass
    (:func:`iec_jax.efficient.adapter.layer_table`)."""
    return as_model(unet).layer_table()


def quantize_params(unet, params: Any, config: QuantConfig) -> Any:
    """The params with every Conv2d / Dense kernel fake-quantized (biases stay float).
    ``unet``: a UNet, a UNetCondition or a ModelSpec."""
    table = _layer_table(unet)
    flat = traverse_util.flatten_dict(params, sep="/")
    bits = {p: config.layer_bits(p, weight=True) for p in table}
    splits = tuple((p, s if config.split else None) for p, s in table.items() if bits[p] < NO_QUANT_BITS)
    if splits:
        kernels = {p: flat[f"{p}/kernel"] for p, _ in splits}
        fn = _quantize_kernels_max if config.scale_method == "max" else _quantize_kernels
        quantized = fn(kernels, {p: float(2 ** bits[p] - 1) for p, _ in splits}, splits)
        flat.update({f"{p}/kernel": k for p, k in quantized.items()})
    return traverse_util.unflatten_dict(flat, sep="/")


# ------------------------------------------------------------------ interception
def _interceptor(config: QuantConfig, act_fn, kernel_fn=None):
    """act_fn(key, bits, x) -> x' quantizes one operand; kernel_fn(path, split, kernel,
    bias) -> (kernel, bias) may rewrite a layer's weights (quant-DEC)."""

    def q(key, bits, v):
        return v if bits >= NO_QUANT_BITS else act_fn(key, bits, v)

    def intercept(next_fun, args, kwargs, ctx):
        m = ctx.module
        if ctx.method_name != "__call__" or not isinstance(m, (Conv2d, Dense, MatMul)):
            return next_fun(*args, **kwargs)
        path = "/".join(m.path)
        if isinstance(m, MatMul):
            a, b = args
            a_bits = config.softmax_bits if m.name == "matmul_av" else config.act_bits
            return next_fun(q(f"{path}:a", a_bits, a), q(f"{path}:b", config.act_bits, b), **kwargs)
        (x,) = args
        bits = config.layer_bits(path, weight=False)
        split = m.input_split if isinstance(m, Conv2d) and config.split else None
        if split:
            x = jnp.concatenate([q(f"{path}:x0", bits, x[..., :split]), q(f"{path}:x1", bits, x[..., split:])], -1)
        else:
            x = q(f"{path}:x", bits, x)
        kernel, bias = m.get_variable("params", "kernel"), m.get_variable("params", "bias")
        if kernel_fn is not None:
            kernel, bias = kernel_fn(path, split, kernel, bias)
        return m.compute(x, kernel, bias)

    return intercept


@functools.partial(jax.jit, static_argnames=("model", "config", "cache_point", "prune"))
def _calib_pass(model, config, cache_point, params, x, t, feature, context, prev, first, prune=True):
    """One calibration batch: per operand search + EMA with ``prev`` (unless ``first``),
    quantize with the result, continue. Returns key -> ActRange (scalars; (C,) per
    channel, where the batch's own range replaces ``prev``)."""
    rec = {}

    def act_fn(key, bits, v):
        if key in rec:
            raise ValueError(f"operand {key} is quantized twice in one pass")
        if config.act_per_channel:
            d, z = max_search(v, bits, _channel_axis(key))
            rec[key] = ActRange(d, z)
            return _fake_quant_table(v, d, z, bits, key)
        d, z = mse_search(v, bits, prune=prune)
        od, oz = (d, z) if prev is None else (jnp.where(first, d, prev[key][0]), jnp.where(first, z, prev[key][1]))
        rec[key] = ActRange(_EMA_NEW * d + (1 - _EMA_NEW) * od, _EMA_NEW * z + (1 - _EMA_NEW) * oz)
        return fake_quant(v, rec[key].delta, rec[key].zero_point, bits)

    kw = {} if feature is None else dict(cached_feature=feature, cache_point=cache_point)
    with nn.intercept_methods(_interceptor(config, act_fn)):
        model.apply(params, x, t, context, **kw)
    return rec


def _unpack(entry):
    """(x, t, cached_feature, context, uncond) of one calibration entry."""
    if hasattr(entry, "x"):
        return (entry.x, entry.t, entry.cached_feature, getattr(entry, "context", None),
                getattr(entry, "uncond", None))
    if isinstance(entry, Mapping):
        return entry["x"], entry["t"], entry.get("cached_feature"), entry.get("context"), entry.get("uncond")
    if len(entry) not in (3, 4, 5):
        raise ValueError(f"a calibration entry is (x, t, cached_feature[, context[, uncond]]), got {len(entry)} items")
    return tuple(entry) + (None,) * (5 - len(entry))


def _calib_batch(x, t, f, ctx, unc, sl):
    """The network inputs of samples ``sl``: as they are, or with guidance (``unc`` given)
    the 2B batch [x ; x], [t ; t], [uncond ; cond] and the feature [f_u ; f_c] (the entry's
    feature has shape (n, 2, ...): each sample's unconditional and conditional feature)."""
    if unc is None:
        return x[sl], t[sl], None if f is None else f[sl], None if ctx is None else ctx[sl]
    twice = lambda a: jnp.concatenate([a[sl], a[sl]])  # noqa: E731
    f2 = None if f is None else jnp.concatenate([f[sl, 0], f[sl, 1]])
    return twice(x), twice(t), f2, jnp.concatenate([unc[sl], ctx[sl]])


def calibrate_activations(
    unet, params: Any, calib: Sequence, config: QuantConfig, *,
    cache_point=None, batch_size: int = 256, progress: bool = True, prune: bool = True,
) -> dict:
    """Per-step activation tables (key -> ActRange of shape (S,), or (S, C) per channel).

    ``unet``: a UNet, a UNetCondition or a ModelSpec; ``cache_point``: None for the
    model's (the DDPM branch for a bare UNet). ``params``: the FLOAT params (official:
    weight quantization off while calibrating). ``calib``: per sampling step, ``(x
    (B,H,W,C) NHWC, t int32 (B,), cached_feature or None[, context[, uncond]])`` as a
    tuple, a dict, or an object with those attributes (``CalibStep``). A step with a
    cached feature (already cache-DEC-corrected) calibrates on the partial pass from the
    cache point. Conditional models need ``context`` (B, n_tokens, dim), one per sample.
    With ``uncond`` ((B, n_tokens, dim), or (n_tokens, dim) for all samples) every batch
    is the guided 2B batch [x ; x] with [uncond ; context] (the official
    ``set_act_quantize_params_cond``), and a cached feature has shape (B, 2, h, w, c).
    ``batch_size`` counts samples (a guided pass has twice as many rows).

    ``prune`` (default True): the per-tensor MSE search scores exactly only the candidates
    a vectorised approximate scoring leaves within 1% of the best (see
    :func:`mse_search`); False scores all 40 exactly (the slower form of the same
    search; the per-channel ``'max'`` variant has no search and ignores it). Each step is
    one jitted pass per batch, compiled once per input shape (full and partial passes).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = as_model(unet, cache_point)
    cp = model.resolve_cache_point()
    per_step, first_seen, shapes = [], {}, {}
    for entry in tqdm(calib, desc="calibrate activations", disable=not progress):
        x, t, f, ctx, unc = _unpack(entry)
        x, t = jnp.asarray(x), jnp.asarray(t, jnp.int32)
        f = None if f is None else jnp.asarray(f)
        ctx = None if ctx is None else jnp.asarray(ctx)
        n = x.shape[0]
        if unc is not None:
            if ctx is None:
                raise ValueError("a guided calibration entry (uncond given) needs its context")
            unc = jnp.asarray(unc)
            unc = jnp.broadcast_to(unc, (n,) + unc.shape[-2:]) if unc.ndim == 2 else unc
        batch_size = min(batch_size, n)  # sticky, as set_act_quantize_params
        rec = None
        for i in range(n // batch_size):
            xb, tb, fb, cb = _calib_batch(x, t, f, ctx, unc, slice(i * batch_size, (i + 1) * batch_size))
            args = (model, config, cp, params, xb, tb, fb, cb)
            sig = (xb.shape, None if fb is None else fb.shape, None if cb is None else cb.shape)
            if rec is None:  # zeros with the pass's key structure, so that one compile serves all batches
                if sig not in shapes:
                    probe = lambda p, xx, tt, ff, cc: _calib_pass(model, config, cp, p, xx, tt, ff, cc, None, True, prune)  # noqa: E731
                    shapes[sig] = jax.eval_shape(probe, *args[3:])
                rec = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[sig])
            rec = _calib_pass(*args, rec, jnp.asarray(i == 0), prune)
            if i == 0:
                for k, r in rec.items():
                    first_seen.setdefault(k, r)
        per_step.append(rec or {})
    tables = {}
    for k, r0 in first_seen.items():
        rows = [s.get(k, r0) for s in per_step]
        tables[k] = ActRange(jnp.stack([r.delta for r in rows]), jnp.stack([r.zero_point for r in rows]))
    return tables


def build_quant_state(unet, params: Any, calib: Sequence, config: QuantConfig, **kwargs) -> QuantState:
    """Weights quantized once, activation tables calibrated; no quant-DEC."""
    act = calibrate_activations(unet, params, calib, config, **kwargs)
    return QuantState(quantize_params(unet, params, config), act, None, config, None)


# ---------------------------------------------------------------------- applying
def quant_apply(unet, qstate: QuantState, x, t, step, *context, **unet_kwargs):
    """The quantized model at sampling step ``step`` (int32 scalar, may be traced; in
    [0, S)): ``unet.apply`` with the quantized weights and the step's activation tables.
    ``unet``: a UNet, a UNetCondition or a ModelSpec; a conditional model takes its
    context after ``step`` (or as ``context=``). Same outputs/kwargs as ``apply``."""
    model = as_model(unet)
    step = jnp.asarray(step, jnp.int32)
    if len(context) > 1:
        raise TypeError(f"quant_apply takes at most one context argument, got {len(context)}")
    ctx = context[0] if context else unet_kwargs.pop("context", None)

    def act_fn(key, bits, v):
        if key not in qstate.act:
            raise KeyError(f"no activation table for {key}: calibrate with passes that run this layer")
        r = qstate.act[key]
        return _fake_quant_table(v, r.delta[step], r.zero_point[step], bits, key)

    kernel_fn = None
    decs = qstate.dec_tables()
    if decs:

        def kernel_fn(path, split, kernel, bias):
            if path not in decs:
                return kernel, bias
            if not split:
                raise ValueError(f"quant-DEC on {path} needs a split conv and QuantConfig.split=True")
            a_all, b_all = decs[path]
            cached = kernel[..., :split, :] * jnp.asarray(a_all)[step].astype(kernel.dtype)
            kernel = jnp.concatenate([cached, kernel[..., split:, :]], axis=-2)
            return kernel, bias + jnp.asarray(b_all)[step].astype(bias.dtype)

    with nn.intercept_methods(_interceptor(qstate.config, act_fn, kernel_fn)):
        return model.apply(qstate.params, x, t, ctx, **unet_kwargs)


def quantized_unet(unet, qstate: QuantState, *, context=None) -> UNetFunction:
    """``fn(x, t, step, *context, **unet_kwargs)`` (the UNet-function protocol of
    :mod:`iec_jax.efficient.cache`); ``context`` binds a context. Build it inside jit to
    keep ``qstate`` an argument."""
    model = as_model(unet)

    def run(x, t, step, ctx, **kw):
        return quant_apply(model, qstate, x, t, step, *(() if ctx is None else (ctx,)), **kw)

    return UNetFunction(model, run, context)


def quant_denoiser(unet, qstate: QuantState) -> StatefulDenoiser:
    """Quant-only (no cache) denoiser: state ``()``, every step a full pass at its tables.
    A conditional model takes its context after the state (``den(x, t, step, state,
    context)``, e.g. inside :func:`iec_jax.guided_denoiser`)."""
    model = as_model(unet)
    return StatefulDenoiser(lambda x, t, step, state, *c: (quant_apply(model, qstate, x, t, step, *c), state))


def quantizer_table(unet, config: QuantConfig) -> dict:
    """What ``config`` quantizes in ``unet`` (a UNet, UNetCondition or ModelSpec), from one
    traced full pass: ``{'weights': {path: bits}, 'acts': {key: bits}}`` (keys as in
    :class:`QuantState`: ``'<path>:x'``/``x0``/``x1`` layer inputs, ``'<path>:a'``/``b``
    matmul operands; ``.../matmul_av:a`` is the softmax output). Groups at 32 bits are
    left out."""
    model = as_model(unet)
    acts = {}

    def act_fn(key, bits, v):
        acts[key] = bits
        return v

    cfg = model.config
    size = 2 ** (cfg.num_levels - 1)
    x = jnp.zeros((1, size, size, cfg.in_channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    ctx = model.tracing_context(1)
    abstract = jax.eval_shape(lambda k: model.module.init(k, x, t, *(() if ctx is None else (ctx,)))["params"],
                              jax.random.key(0))

    def run(p):
        with nn.intercept_methods(_interceptor(config, act_fn)):
            return model.apply(p, x, t, ctx)

    jax.eval_shape(run, abstract)
    weights = {p: config.layer_bits(p, weight=True) for p in model.layer_table()}
    return {"weights": {p: b for p, b in weights.items() if b < NO_QUANT_BITS}, "acts": acts}


# ------------------------------------------------------------------- quant-DEC
def quant_dec_layer(cache_point) -> str:
    """Path of the 1×1 conv consuming the cached feature (DDPM ``nin_shortcut``)."""
    up_block, resnet = cache_point
    return f"up_blocks_{int(up_block)}/resnets_{int(resnet)}/conv_shortcut"


def _norm_silu_part(model: ModelSpec, params, resnet: str, f: jax.Array, in_channels: int) -> jax.Array:
    """SiLU(GroupNorm(·)) of the resnet's ``norm1`` on the first f.shape[-1] (cached)
    channels of its input: the official ``in_layers[:2]`` rebuilt on those channels
    (GroupNorm(16, 224) of the Bedroom script). The groups must not straddle the split."""
    cfg = model.config
    groups, split = cfg.norm_num_groups, f.shape[-1]
    size = in_channels // groups
    if split % size:
        raise ValueError(f"quant-DEC on {resnet}/conv1: the {split} cached channels cut a GroupNorm group of {size}")
    flat = traverse_util.flatten_dict(params, sep="/")
    scale, bias = flat[f"{resnet}/norm1/scale"][:split], flat[f"{resnet}/norm1/bias"][:split]
    norm = nn.GroupNorm(num_groups=split // size, epsilon=cfg.norm_eps, use_fast_variance=False)
    return nn.silu(norm.apply({"params": {"scale": scale, "bias": bias}}, f))


def fit_quant_dec(
    unet, params: Any, qstate: QuantState, features: Sequence, *,
    cache_point=None, layers: Optional[Sequence[str]] = None, ddof: int = 1,
) -> QuantState:
    """Fit quant-DEC; returns ``qstate`` with it. ``params``: the float params.

    ``unet``: a UNet, a UNetCondition or a ModelSpec (``cache_point`` None: the model's).
    ``layers``: the convs to correct; None: ``ModelSpec.quant_dec_layers`` (the
    cache-point resnet's ``conv_shortcut``; for the latent family also its ``conv1``).
    ``features[i]`` (B, h, w, C_split), or (B, 2, h, w, C_split) for a guided batch: the
    feature entering the cache point at step i, as the official
    ``all_cache_after_cacheadd``: the FP feature at full steps, the cache-DEC-corrected
    cached feature at cached steps. Per layer and step, on the cached input channels,
    Y = conv(u, W[:split]) + bias and X = conv(Q_i(u), Q(W[:split])) + bias with u the
    layer's input on those channels (the feature for ``conv_shortcut``, SiLU(GroupNorm(f))
    for ``conv1``) and Q_i the layer's step-i ``x0`` table (``*_dec.py`` hard-code an
    8-bit quantizer; the same for A8). ``ddof=1`` is the official ``torch.var``; ddof=0
    gives the exact least-squares slope. Convs in float32, the regression in float64 on
    the host (as ``cache.fit_cache_dec``). One layer: ``dec`` is a QuantDEC on
    ``dec_layer``; several: a dict path -> QuantDEC and ``dec_layer`` their tuple.
    """
    model = as_model(unet, cache_point)
    cp = model.resolve_cache_point()
    table = model.layer_table()
    if layers is None:
        paths = [p for p in model.quant_dec_layers(cp) if p in table]
        if not paths:
            raise ValueError(f"quant-DEC: the cache-point resnet {model.cache_resnet(cp)} has no conv_shortcut")
    else:
        paths = list(layers)
        missing = [p for p in paths if p not in table]
        if missing or not paths:
            raise ValueError(f"quant-DEC: no such conv(s) {missing or paths}")
    if len(features) != qstate.num_steps:
        raise ValueError(f"quant-DEC: {len(features)} feature steps for {qstate.num_steps} table steps")
    get = lambda p: traverse_util.flatten_dict(p, sep="/")  # noqa: E731
    flat, qflat = get(params), get(qstate.params)
    fitted = {}
    for path in paths:
        split = table[path]
        if not qstate.config.split or not split:
            raise ValueError(f"quant-DEC needs split quantization of {path} (QuantConfig.split=True)")
        w, bias, wq = flat[f"{path}/kernel"], flat[f"{path}/bias"], qflat[f"{path}/kernel"]
        resnet, name = path.rsplit("/", 1)
        if name == "conv_shortcut":
            if w.shape[:2] != (1, 1):
                raise ValueError(f"quant-DEC expects a 1x1 {path}, got kernel {w.shape}")
        elif name != "conv1":
            raise ValueError(f"quant-DEC corrects a resnet's conv_shortcut or conv1, got {path}")
        key, bits = f"{path}:x0", qstate.config.layer_bits(path, weight=False)

        if w.shape[:2] == (1, 1):
            w0, wq0 = w[0, 0, :split], wq[0, 0, :split]

            def conv(inp, kernel):  # the 1x1 conv incl. bias, float32 -> rows of float64
                out = jnp.einsum("bhwc,co->bhwo", inp, kernel, precision=jax.lax.Precision.HIGHEST) + bias
                return np.asarray(out, np.float64).reshape(-1, kernel.shape[1])
        else:
            w0, wq0 = w[..., :split, :], wq[..., :split, :]
            pad = (w.shape[0] - 1) // 2

            def conv(inp, kernel):  # the kxk conv (stride 1, same padding) incl. bias
                out = jax.lax.conv_general_dilated(
                    inp, kernel, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                    precision=jax.lax.Precision.HIGHEST) + bias
                return np.asarray(out, np.float64).reshape(-1, kernel.shape[-1])

        a_all, b_all = [], []
        for i, f in enumerate(features):
            f = jnp.asarray(f, jnp.float32)
            if f.shape[-1] != split:
                raise ValueError(f"quant-DEC: features must have {split} channels, got {f.shape}")
            f = f.reshape((-1,) + f.shape[-3:])
            u = f if name == "conv_shortcut" else _norm_silu_part(model, params, resnet, f, w.shape[-2])
            r = qstate.act.get(key)
            uq = u if bits >= NO_QUANT_BITS else _fake_quant_table(u, r.delta[i], r.zero_point[i], bits, key)
            y, x = conv(u, w0), conv(uq, wq0)
            mx, my = x.mean(0), y.mean(0)
            cov, var = ((x - mx) * (y - my)).mean(0), ((x - mx) ** 2).sum(0) / (x.shape[0] - ddof)
            a = np.where(var > 0, cov / np.where(var > 0, var, 1.0), 1.0)  # deviation: var 0 -> a = 1
            a_all.append(a)
            b_all.append(my - a * mx)
        fitted[path] = QuantDEC(jnp.asarray(np.stack(a_all), jnp.float32), jnp.asarray(np.stack(b_all), jnp.float32))
    if len(fitted) == 1:
        (path, dec), = fitted.items()
        return qstate.replace(dec=dec, dec_layer=path)
    return qstate.replace(dec=fitted, dec_layer=tuple(fitted))


# ---------------------------------------------------------------------- artifacts
def _config_dict(config: QuantConfig) -> dict:
    """The config as stored; options at their defaults that older files lack are left out
    (so the default setting's files do not change)."""
    d = dataclasses.asdict(config)
    if not d["act_per_channel"]:
        del d["act_per_channel"]
    return d


def _meta(qstate: QuantState, unet_config) -> str:
    dec_layer = qstate.dec_layer
    return json.dumps(dict(
        config=_config_dict(qstate.config), dec_layer=list(dec_layer) if isinstance(dec_layer, tuple) else dec_layer,
        unet_config=None if unet_config is None else dataclasses.asdict(unet_config),
    ), sort_keys=True, default=list)


def save_quant_state(path, qstate: QuantState, *, unet_config=None) -> None:
    """Write ``qstate`` (+ its QuantConfig and optionally the UNetConfig) atomically (npz)."""
    flat = traverse_util.flatten_dict(qstate.params, sep="/")
    arrays = {f"params/{k}": np.asarray(v) for k, v in flat.items()}
    for k, r in qstate.act.items():
        arrays[f"act/{k}/delta"], arrays[f"act/{k}/zero_point"] = np.asarray(r.delta), np.asarray(r.zero_point)
    if isinstance(qstate.dec, QuantDEC):
        arrays["dec/a"], arrays["dec/b"] = np.asarray(qstate.dec.a), np.asarray(qstate.dec.b)
    elif qstate.dec is not None:
        for layer, d in qstate.dec_tables().items():
            arrays[f"dec/{layer}/a"], arrays[f"dec/{layer}/b"] = np.asarray(d.a), np.asarray(d.b)
    write_npz(path, meta=np.array(_meta(qstate, unet_config)), **arrays)


def load_quant_state(path, *, config: Optional[QuantConfig] = None, unet_config=None) -> QuantState:
    """Read a :func:`save_quant_state` file; ValueError if ``config`` / ``unet_config``
    (when given) differ from the stored ones."""
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    meta = json.loads(str(data.pop("meta")))
    stored = QuantConfig(**meta["config"])
    if config is not None and config != stored:
        raise ValueError(f"{path}: stored QuantConfig {stored} differs from the expected {config}")
    if unet_config is not None:
        expected = json.loads(json.dumps(dataclasses.asdict(unet_config), sort_keys=True, default=list))
        if meta["unet_config"] != expected:
            raise ValueError(f"{path}: stored UNetConfig {meta['unet_config']} differs from the expected {expected}")
    flat = {k[len("params/") :]: jnp.asarray(v) for k, v in data.items() if k.startswith("params/")}
    params = traverse_util.unflatten_dict(flat, sep="/")
    act = {}
    for k in data:
        if k.startswith("act/") and k.endswith("/delta"):
            name = k[4 : -len("/delta")]
            act[name] = ActRange(jnp.asarray(data[k]), jnp.asarray(data[f"act/{name}/zero_point"]))
    dec_layer = meta["dec_layer"]
    if "dec/a" in data:
        dec = QuantDEC(jnp.asarray(data["dec/a"]), jnp.asarray(data["dec/b"]))
    elif isinstance(dec_layer, list):
        dec_layer = tuple(dec_layer)
        dec = {p: QuantDEC(jnp.asarray(data[f"dec/{p}/a"]), jnp.asarray(data[f"dec/{p}/b"])) for p in dec_layer}
    else:
        dec = None
    return QuantState(params, act, dec, stored, dec_layer)
