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
from iec_jax.io import write_npz
from iec_jax.models.layers import Conv2d, Dense, MatMul
from iec_jax.models.unet import DEEPCACHE_DDPM_CACHE_POINT, UNet, validate_cache_point

__all__ = [
    "QuantConfig", "ActRange", "QuantDEC", "QuantState", "fake_quant", "mse_search",
    "quantize_weight", "quantize_params", "calibrate_activations", "build_quant_state",
    "quant_apply", "quantized_unet", "quant_denoiser", "quant_dec_layer", "fit_quant_dec",
    "save_quant_state", "load_quant_state",
]

NO_QUANT_BITS = 32
_SHRINK = np.array([1.0 - 0.01 * i for i in range(0, 80, 2)], np.float32)  # 40 candidates
_EMA_NEW = 0.1


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Quantization options (hashable: static under jit).

    Bits >= 32 mean "no quantization" for that group. ``first_last_layers`` are module
    paths whose weights and input activations use ``first_last_bits``.
    """

    weight_bits: int = 8
    act_bits: int = 8
    first_last_bits: int = 8
    softmax_bits: int = 8
    split: bool = True
    scale_method: str = "mse"
    symmetric: bool = False
    first_last_layers: tuple = ("conv_in", "conv_out")

    def __post_init__(self):
        for name in ("weight_bits", "act_bits", "first_last_bits", "softmax_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not (2 <= v <= 16 or v >= NO_QUANT_BITS):
                raise ValueError(f"QuantConfig.{name} must be an int in [2, 16], or >= 32 for no quantization, got {v!r}")
            object.__setattr__(self, name, int(v))
        if not isinstance(self.split, bool):
            raise ValueError(f"QuantConfig.split must be a bool, got {self.split!r}")
        if self.scale_method != "mse":
            raise ValueError(f"QuantConfig.scale_method: only 'mse' (the official default) is supported, got {self.scale_method!r}")
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
    """Quant-DEC: ``a``, ``b`` of shape (S, C_out) for the conv at the cache point."""

    a: jax.Array
    b: jax.Array


@struct.dataclass
class QuantState:
    """Calibrated quantized model (a pytree; ``config`` and ``dec_layer`` are static).

    ``params``: the UNet params with fake-quantized kernels; ``act``: key -> ActRange, key
    ``'<module path>:<operand>'`` with operand ``x`` (layer input), ``x0``/``x1`` (split
    groups) or ``a``/``b`` (matmul operands); ``dec``: optional quant-DEC on ``dec_layer``.
    """

    params: Any
    act: dict
    dec: Optional[QuantDEC] = None
    config: QuantConfig = struct.field(pytree_node=False, default=QuantConfig())
    dec_layer: Optional[str] = struct.field(pytree_node=False, default=None)

    @property
    def num_steps(self) -> int:
        return int(next(iter(self.act.values())).delta.shape[0]) if self.act else 0


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


def _mse_rows(x: jax.Array, levels, counts: Optional[np.ndarray] = None) -> tuple[jax.Array, jax.Array]:
    """Official 'mse' range search for each row of x (C, n), float32. ``levels``: 2^b - 1,
    scalar or per row (may be traced: one compile for all bit widths); ``counts``: valid
    length of each (zero-padded) row."""
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

    best = jnp.argmin(jax.lax.map(score, jnp.asarray(_SHRINK)), axis=0)  # first minimum
    f = jnp.asarray(_SHRINK)[best]
    new_max, new_min = xmax * f, xmin * f
    delta = (new_max - new_min) / n
    zp = jnp.round(-new_min / delta)
    flat = xmax == xmin
    return jnp.where(flat, jnp.where(xmax == 0, 1.0, xmax), delta), jnp.where(flat, 0.0, zp)


@functools.partial(jax.jit, static_argnames=("channel_axis",))
def _mse_search(x, levels, channel_axis):
    x = jnp.asarray(x, jnp.float32)
    if channel_axis is None:
        d, z = _mse_rows(x.reshape(1, -1), levels)
        return d[0], z[0]
    x = jnp.moveaxis(x, channel_axis, 0)
    return _mse_rows(x.reshape(x.shape[0], -1), levels)


def mse_search(x: jax.Array, bits: int, channel_axis: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
    """(delta, zero_point) of the official 'mse' search: per tensor (scalars) or per
    ``channel_axis`` (shape (C,)); bits < 32."""
    return _mse_search(x, float(2**bits - 1), channel_axis)


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


def quantize_weight(kernel: jax.Array, bits: int, split: Optional[int] = None) -> jax.Array:
    """Fake-quantized kernel (channel last: conv HWIO, dense (in, out)), per output
    channel; with ``split`` the input groups [:split] and [split:] independently."""
    if bits >= NO_QUANT_BITS:
        return kernel
    return _quantize_kernels({"w": kernel}, {"w": float(2**bits - 1)}, (("w", split),))["w"]


@functools.lru_cache(maxsize=16)
def _layer_table(unet: UNet) -> dict:
    """Module path -> input_split (None for Dense / unsplit convs), from one traced pass."""
    table = {}

    def record(next_fun, args, kwargs, ctx):
        if ctx.method_name == "__call__" and isinstance(ctx.module, (Conv2d, Dense)):
            table["/".join(ctx.module.path)] = getattr(ctx.module, "input_split", None)
        return next_fun(*args, **kwargs)

    cfg = unet.config
    size = 2 ** (cfg.num_levels - 1)
    x = jnp.zeros((1, size, size, cfg.in_channels), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda k: unet.init(k, x, jnp.zeros((1,), jnp.int32)), jax.random.key(0))
    return table


def quantize_params(unet: UNet, params: Any, config: QuantConfig) -> Any:
    """The params with every Conv2d / Dense kernel fake-quantized (biases stay float)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    bits = {p: config.layer_bits(p, weight=True) for p in _layer_table(unet)}
    splits = tuple((p, s if config.split else None) for p, s in _layer_table(unet).items() if bits[p] < NO_QUANT_BITS)
    if splits:
        kernels = {p: flat[f"{p}/kernel"] for p, _ in splits}
        quantized = _quantize_kernels(kernels, {p: float(2 ** bits[p] - 1) for p, _ in splits}, splits)
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


@functools.partial(jax.jit, static_argnames=("unet", "config", "cache_point"))
def _calib_pass(unet, config, cache_point, params, x, t, feature, prev, first):
    """One calibration batch: per operand search + EMA with ``prev`` (unless ``first``),
    quantize with the result, continue. Returns key -> ActRange (scalars)."""
    rec = {}

    def act_fn(key, bits, v):
        if key in rec:
            raise ValueError(f"operand {key} is quantized twice in one pass")
        d, z = mse_search(v, bits)
        od, oz = (d, z) if prev is None else (jnp.where(first, d, prev[key][0]), jnp.where(first, z, prev[key][1]))
        rec[key] = ActRange(_EMA_NEW * d + (1 - _EMA_NEW) * od, _EMA_NEW * z + (1 - _EMA_NEW) * oz)
        return fake_quant(v, rec[key].delta, rec[key].zero_point, bits)

    kw = {} if feature is None else dict(cached_feature=feature, cache_point=cache_point)
    with nn.intercept_methods(_interceptor(config, act_fn)):
        unet.apply({"params": params}, x, t, **kw)
    return rec


def _unpack(entry):
    if hasattr(entry, "x"):
        return entry.x, entry.t, entry.cached_feature
    if isinstance(entry, Mapping):
        return entry["x"], entry["t"], entry.get("cached_feature")
    x, t, f = entry
    return x, t, f


def calibrate_activations(
    unet: UNet, params: Any, calib: Sequence, config: QuantConfig, *,
    cache_point=DEEPCACHE_DDPM_CACHE_POINT, batch_size: int = 256, progress: bool = True,
) -> dict:
    """Per-step activation tables (key -> ActRange of shape (S,)).

    ``params``: the FLOAT params (official: weight quantization off while calibrating).
    ``calib``: per sampling step, ``(x (B,H,W,C) NHWC, t int32 (B,), cached_feature or
    None)`` as a tuple, a dict, or an object with those attributes (``CalibStep``). A
    step with a cached feature (already cache-DEC-corrected) calibrates on the partial
    pass from ``cache_point``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cp = validate_cache_point(unet.config, cache_point)
    per_step, first_seen, shapes = [], {}, {}
    for entry in tqdm(calib, desc="calibrate activations", disable=not progress):
        x, t, f = _unpack(entry)
        x, t = jnp.asarray(x), jnp.asarray(t, jnp.int32)
        f = None if f is None else jnp.asarray(f)
        n = x.shape[0]
        batch_size = min(batch_size, n)  # sticky, as set_act_quantize_params
        rec = None
        for i in range(n // batch_size):
            sl = slice(i * batch_size, (i + 1) * batch_size)
            args = (unet, config, cp, params, x[sl], t[sl], None if f is None else f[sl])
            sig = (args[4].shape, None if f is None else args[6].shape)
            if rec is None:  # zeros with the pass's key structure, so that one compile serves all batches
                if sig not in shapes:
                    probe = lambda p, xx, tt, ff: _calib_pass(unet, config, cp, p, xx, tt, ff, None, True)  # noqa: E731
                    shapes[sig] = jax.eval_shape(probe, *args[3:])
                rec = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[sig])
            rec = _calib_pass(*args, rec, jnp.asarray(i == 0))
            if i == 0:
                for k, r in rec.items():
                    first_seen.setdefault(k, r)
        per_step.append(rec or {})
    tables = {}
    for k, r0 in first_seen.items():
        rows = [s.get(k, r0) for s in per_step]
        tables[k] = ActRange(jnp.stack([r.delta for r in rows]), jnp.stack([r.zero_point for r in rows]))
    return tables


def build_quant_state(unet: UNet, params: Any, calib: Sequence, config: QuantConfig, **kwargs) -> QuantState:
    """Weights quantized once, activation tables calibrated; no quant-DEC."""
    act = calibrate_activations(unet, params, calib, config, **kwargs)
    return QuantState(quantize_params(unet, params, config), act, None, config, None)


# ---------------------------------------------------------------------- applying
def quant_apply(unet: UNet, qstate: QuantState, x, t, step, **unet_kwargs):
    """``unet.apply`` of the quantized model at sampling step ``step`` (int32 scalar,
    may be traced; in [0, S)). Same outputs/kwargs as ``unet.apply``."""
    step = jnp.asarray(step, jnp.int32)

    def act_fn(key, bits, v):
        if key not in qstate.act:
            raise KeyError(f"no activation table for {key}: calibrate with passes that run this layer")
        r = qstate.act[key]
        return fake_quant(v, r.delta[step], r.zero_point[step], bits)

    kernel_fn = None
    if qstate.dec is not None:
        a_all, b_all = qstate.dec

        def kernel_fn(path, split, kernel, bias):
            if path != qstate.dec_layer:
                return kernel, bias
            if not split:
                raise ValueError(f"quant-DEC on {path} needs a split conv and QuantConfig.split=True")
            cached = kernel[..., :split, :] * jnp.asarray(a_all)[step].astype(kernel.dtype)
            kernel = jnp.concatenate([cached, kernel[..., split:, :]], axis=-2)
            return kernel, bias + jnp.asarray(b_all)[step].astype(bias.dtype)

    with nn.intercept_methods(_interceptor(qstate.config, act_fn, kernel_fn)):
        return unet.apply({"params": qstate.params}, x, t, **unet_kwargs)


def quantized_unet(unet: UNet, qstate: QuantState):
    """``fn(x, t, step, **unet_kwargs)`` (the UNet-function protocol of
    :mod:`iec_jax.efficient.cache`). Build it inside jit to keep ``qstate`` an argument."""
    return functools.partial(quant_apply, unet, qstate)


def quant_denoiser(unet: UNet, qstate: QuantState) -> StatefulDenoiser:
    """Quant-only (no cache) denoiser: state ``()``, every step a full pass at its tables."""
    return StatefulDenoiser(lambda x, t, step, state: (quant_apply(unet, qstate, x, t, step), state))


# ------------------------------------------------------------------- quant-DEC
def quant_dec_layer(cache_point) -> str:
    """Path of the conv consuming the cached feature (DDPM ``nin_shortcut``)."""
    up_block, resnet = cache_point
    return f"up_blocks_{int(up_block)}/resnets_{int(resnet)}/conv_shortcut"


def fit_quant_dec(
    unet: UNet, params: Any, qstate: QuantState, features: Sequence, *,
    cache_point=DEEPCACHE_DDPM_CACHE_POINT, ddof: int = 1,
) -> QuantState:
    """Fit quant-DEC; returns ``qstate`` with it. ``params``: the float params.

    ``features[i]`` (B, h, w, C_split): the feature entering the cache point at step i,
    as the official ``all_cache_after_cacheadd``: the FP feature at full steps, the
    cache-DEC-corrected cached feature at cached steps. X uses the layer's step-i
    activation table (``cifar_dec.py`` hard-codes an 8-bit quantizer; the same for A8).
    ``ddof=1`` is the official ``torch.var``; ddof=0 gives the exact least-squares slope.
    Convs in float32, the regression in float64 on the host (as ``cache.fit_cache_dec``).
    """
    cp = validate_cache_point(unet.config, cache_point)
    path = quant_dec_layer(cp)
    layers = _layer_table(unet)
    if path not in layers:
        raise ValueError(f"quant-DEC: the cache-point resnet {path.rsplit('/', 1)[0]} has no conv_shortcut")
    split = layers[path]
    if not qstate.config.split or not split:
        raise ValueError(f"quant-DEC needs split quantization of {path} (QuantConfig.split=True)")
    if len(features) != qstate.num_steps:
        raise ValueError(f"quant-DEC: {len(features)} feature steps for {qstate.num_steps} table steps")
    get = lambda p: traverse_util.flatten_dict(p, sep="/")  # noqa: E731
    w, bias = get(params)[f"{path}/kernel"], get(params)[f"{path}/bias"]
    wq = get(qstate.params)[f"{path}/kernel"]
    if w.shape[:2] != (1, 1):
        raise ValueError(f"quant-DEC expects a 1x1 {path}, got kernel {w.shape}")
    w0, wq0 = w[0, 0, :split], wq[0, 0, :split]
    key, bits = f"{path}:x0", qstate.config.layer_bits(path, weight=False)

    def conv(inp, kernel):  # the 1x1 conv incl. bias, float32 -> rows of float64
        out = jnp.einsum("bhwc,co->bhwo", inp, kernel, precision=jax.lax.Precision.HIGHEST) + bias
        return np.asarray(out, np.float64).reshape(-1, kernel.shape[1])

    a_all, b_all = [], []
    for i, f in enumerate(features):
        f = jnp.asarray(f, jnp.float32)
        if f.shape[-1] != split:
            raise ValueError(f"quant-DEC: features must have {split} channels, got {f.shape}")
        r = qstate.act.get(key)
        fq = f if bits >= NO_QUANT_BITS else fake_quant(f, r.delta[i], r.zero_point[i], bits)
        y, x = conv(f, w0), conv(fq, wq0)
        mx, my = x.mean(0), y.mean(0)
        cov, var = ((x - mx) * (y - my)).mean(0), ((x - mx) ** 2).sum(0) / (x.shape[0] - ddof)
        a = np.where(var > 0, cov / np.where(var > 0, var, 1.0), 1.0)  # deviation: var 0 -> a = 1
        a_all.append(a)
        b_all.append(my - a * mx)
    dec = QuantDEC(jnp.asarray(np.stack(a_all), jnp.float32), jnp.asarray(np.stack(b_all), jnp.float32))
    return qstate.replace(dec=dec, dec_layer=path)


# ---------------------------------------------------------------------- artifacts
def _meta(qstate: QuantState, unet_config) -> str:
    return json.dumps(dict(
        config=dataclasses.asdict(qstate.config), dec_layer=qstate.dec_layer,
        unet_config=None if unet_config is None else dataclasses.asdict(unet_config),
    ), sort_keys=True, default=list)


def save_quant_state(path, qstate: QuantState, *, unet_config=None) -> None:
    """Write ``qstate`` (+ its QuantConfig and optionally the UNetConfig) atomically (npz)."""
    flat = traverse_util.flatten_dict(qstate.params, sep="/")
    arrays = {f"params/{k}": np.asarray(v) for k, v in flat.items()}
    for k, r in qstate.act.items():
        arrays[f"act/{k}/delta"], arrays[f"act/{k}/zero_point"] = np.asarray(r.delta), np.asarray(r.zero_point)
    if qstate.dec is not None:
        arrays["dec/a"], arrays["dec/b"] = np.asarray(qstate.dec.a), np.asarray(qstate.dec.b)
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
    dec = QuantDEC(jnp.asarray(data["dec/a"]), jnp.asarray(data["dec/b"])) if "dec/a" in data else None
    return QuantState(params, act, dec, stored, meta["dec_layer"])
