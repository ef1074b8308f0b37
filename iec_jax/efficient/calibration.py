"""Calibration data for caching and quantization, and the cache artifact files.

Everything comes from one full-precision, no-cache DDIM (η = 0) run, deterministic from
a seed, as in the official pipeline (docs/semantics.md §4.1, §4.5, §7 items 15, 22):

* :func:`fp_trajectories` = the official collection hooks: the model inputs (x_i, t_i)
  of every step (``globalvar.appendInput`` in ``mainddpm/ddpm/functions/denoising.py``)
  and the cache-point feature at every step (``AttentionMap_add`` on
  ``model.up[1].attn[1]`` in ``ddim_cifar_predadd.py`` / ``ddim_cifar_cali.py``). Sample i
  starts from the x_T of :mod:`iec_jax.pipeline` (``fold_in(key(seed), i)``), so use a
  seed other than the evaluation seed. These arrays also feed :func:`dps_schedule
  <iec_jax.efficient.cache.dps_schedule>` and :func:`fit_cache_dec
  <iec_jax.efficient.cache.fit_cache_dec>`.
  Memory (host, float32): S·N·(H·W·C_img + h·w·c) · 4 bytes: with S = 100, 27 MB per
  sample for CIFAR-10 (cache point 16×16×256), 6.9 MB for fmnist-ddpm (16×16×64), so
  keep N small (the official ``predadd`` holds 512 CIFAR samples' features: 13 GB).
* :func:`calibration_set` = ``get_calibration`` in ``ddim_cifar_cali.py``: per step a
  fresh random subset of the FP samples, 64 at full steps and 32 at cached steps, each
  with its own feature from the last full step (the same samples) as the cache. The
  official file stores the raw feature; its activation calibration
  (``ddim_cifar_params.py``: ``model.a_list``, ``model.time = step``) runs the partial
  pass, which applies the cache-DEC inside the UNet. Our UNet has no DEC inside, so pass
  ``dec=`` to get the tensor the official quantizers saw.
* Artifacts: schedule and DEC per (model, S, N, schedule kind, bits), refused when the
  stored metadata differ from the caller's (the official file names embed the interval).

Latent and conditional models (docs/semantics.md §4, §6). :func:`fp_trajectories` takes
per-sample contexts (``context``: cin256 class embeddings of random labels, SD prompt
embeddings) and, for classifier-free guidance, the unconditional context and the scale:
every step is then one 2B pass over [x ; x] with [uncond ; cond] (the guided ε drives the
trajectory) and the recorded feature is the 2B one, stored per sample as (S, N, 2, h, w,
c) ([:, :, 0] unconditional, [:, :, 1] conditional; the official ImageNet ``all_cache1`` /
``all_cache2``). ``method="plms"`` records Stable Diffusion's PLMS trajectories (the
inputs x_i and the feature at (x_i, t_i); Heun's second evaluation at step 0 is not
recorded). :func:`calibration_set` carries each step's contexts into its
:class:`CalibStep`, which :func:`iec_jax.efficient.quant.calibrate_activations` turns into
guided 2B batches.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from iec_jax.efficient.cache import CacheDEC, last_full_index
from iec_jax.io import write_npz
from iec_jax.sampling import ddim_step, initial_noise, per_sample_keys, plms_weights, step_coefficients
from iec_jax.schedule import NoiseSchedule

__all__ = [
    "fp_trajectories",
    "CalibStep",
    "calibration_set",
    "artifact_key",
    "save_cache_artifacts",
    "load_cache_artifacts",
]

_COEFS = ("alpha", "alpha_prev", "sigma", "c_dir")


def _evaluate(fn, x, t_b, step, cache_point, context, uncond, scale):
    """(ε, feature) of one step: the plain model, a conditional one, or with guidance one
    2B pass whose ε is ε_u + w (ε_c - ε_u) and whose feature is stacked (B, 2, ...)."""
    if context is None:
        return fn(x, t_b, step, cache_point=cache_point, return_feature=True)
    if uncond is None:
        return fn(x, t_b, step, context, cache_point=cache_point, return_feature=True)
    b = x.shape[0]
    eps2, feat2 = fn(jnp.concatenate([x, x]), jnp.concatenate([t_b, t_b]), step,
                     jnp.concatenate([uncond, context]), cache_point=cache_point, return_feature=True)
    e_u, e_c = eps2[:b], eps2[b:]
    return e_u + scale * (e_c - e_u), jnp.stack([feat2[:b], feat2[b:]], axis=1)


def fp_trajectories(unet_fn: Callable, num_samples: int, batch_size: int, seed: int, schedule: NoiseSchedule,
                    timesteps, shape: tuple, cache_point, *, params: Any = None, context=None, uncond=None,
                    guidance_scale: Optional[float] = None, method: str = "ddim") -> dict[str, np.ndarray]:
    """FP no-cache DDIM (η = 0) or PLMS run of samples 0..N-1, recording every step.

    ``unet_fn(x, t, step, *context, **kw)`` is a UNet function, or with ``params`` given
    ``unet_fn(params)`` returns one (parameters stay jit arguments). The step arithmetic
    is :func:`iec_jax.sample`'s, so ``x0`` equals the plain sampler's output.

    Conditioning (conditional models): ``context`` (N, n_tokens, dim), sample i's context;
    with ``uncond`` ((n_tokens, dim) for all samples, or (N, n_tokens, dim)) and
    ``guidance_scale`` w, classifier-free guidance in one 2B pass per step (as
    :func:`iec_jax.guided_denoiser`). ``method``: "ddim" (η = 0) or "plms" (the PLMS of
    :func:`iec_jax.sample`).

    Returns host arrays: ``x`` (S, N, H, W, C) the input of step i, ``t`` (S,) int32,
    ``feature`` (S, N, h, w, c) the cache-point feature at (x_i, t_i) ((S, N, 2, h, w, c)
    with guidance), ``x0`` (N, ...), ``indices`` (N,); with conditioning also
    ``context`` (N, ...) and, guided, ``uncond`` (N, ...) and ``guidance_scale``.
    """
    coefs = step_coefficients(schedule, timesteps, 0.0)
    S, N, B = len(coefs["t"]), int(num_samples), int(batch_size)
    if N < 1 or B < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {N}, {B}")
    if method not in ("ddim", "plms"):
        raise ValueError(f"method must be 'ddim' or 'plms', got {method!r}")
    if (uncond is None) != (guidance_scale is None):
        raise ValueError("classifier-free guidance needs both uncond and guidance_scale")
    if uncond is not None and context is None:
        raise ValueError("classifier-free guidance needs the conditional context too")
    if context is not None:
        context = np.asarray(context)
        if context.ndim != 3 or context.shape[0] != N:
            raise ValueError(f"context must be (num_samples={N}, n_tokens, dim), got {context.shape}")
    if uncond is not None:
        uncond = np.asarray(uncond)
        if uncond.ndim == 2:
            uncond = np.broadcast_to(uncond, (N,) + uncond.shape)
        if uncond.shape != context.shape:
            raise ValueError(f"uncond must be {context.shape[1:]} or {context.shape}, got {uncond.shape}")
    scale = None if guidance_scale is None else float(guidance_scale)
    base = jax.random.key(seed)
    per_step = {k: jnp.asarray(coefs[k], jnp.float32) for k in _COEFS}
    per_step["t"] = jnp.asarray(coefs["t"], jnp.int32)
    per_step["step"] = jnp.arange(S, dtype=jnp.int32)
    plms = method == "plms"
    if plms:
        heun, ab = plms_weights(S)
        per_step["heun"] = jnp.asarray(heun)
        per_step["ab"] = jnp.asarray(ab, jnp.float32)
        per_step["t_next"] = jnp.asarray(np.append(coefs["t"][1:], coefs["t"][-1]), jnp.int32)
        per_step["step_next"] = jnp.asarray(np.minimum(np.arange(S) + 1, S - 1), jnp.int32)

    @jax.jit
    def run(p, indices, c, u):
        fn = unet_fn if params is None else unet_fn(p)
        x_T, _ = initial_noise(per_sample_keys(base, indices), tuple(shape))

        def body(x, xs):
            t_b = jnp.full((x.shape[0],), xs["t"], jnp.int32)
            eps, feat = _evaluate(fn, x, t_b, xs["step"], cache_point, c, u, scale)
            x_prev, _ = ddim_step(x, eps.astype(x.dtype), {k: xs[k] for k in _COEFS})
            return x_prev, (x, feat)

        def plms_body(carry, xs):
            x, hist = carry
            coef = {k: xs[k] for k in _COEFS}
            t_b = jnp.full((x.shape[0],), xs["t"], jnp.int32)
            eps, feat = _evaluate(fn, x, t_b, xs["step"], cache_point, c, u, scale)
            eps = eps.astype(x.dtype)

            def heun_eps(e):  # Heun's pair at step 0 (its second evaluation is not recorded)
                t_next = jnp.full((x.shape[0],), xs["t_next"], jnp.int32)
                e1, _ = _evaluate(fn, ddim_step(x, e, coef)[0], t_next, xs["step_next"], cache_point, c, u, scale)
                return (e1.astype(x.dtype) + e) / 2

            def ab_eps(e):
                w = xs["ab"]
                return w[0] * e + w[1] * hist[0] + w[2] * hist[1] + w[3] * hist[2]

            e_step = jax.lax.cond(xs["heun"], heun_eps, ab_eps, eps) if bool(heun.any()) else ab_eps(eps)
            x_prev, _ = ddim_step(x, e_step, coef)
            return (x_prev, (eps, hist[0], hist[1])), (x, feat)

        if plms:
            (x0, _), (xs, feats) = jax.lax.scan(plms_body, (x_T, (jnp.zeros_like(x_T),) * 3), per_step)
        else:
            x0, (xs, feats) = jax.lax.scan(body, x_T, per_step)
        return x0, xs, feats

    out: dict[str, np.ndarray] = {}
    for start in range(0, N, B):
        chunk = np.arange(start, min(start + B, N))
        padded = np.concatenate([chunk, np.full(B - len(chunk), chunk[-1])]).astype(np.uint32)
        c = None if context is None else jnp.asarray(context[padded])
        u = None if uncond is None else jnp.asarray(uncond[padded])
        x0, xs, feats = run(params, padded, c, u)
        for name, arr in (("x", xs), ("feature", feats), ("x0", x0[None])):
            arr = np.asarray(arr)
            buf = out.setdefault(name, np.empty(arr.shape[:1] + (N,) + arr.shape[2:], arr.dtype))
            buf[:, start:start + len(chunk)] = arr[:, : len(chunk)]
    out["x0"] = out["x0"][0]
    out["t"] = np.asarray(coefs["t"], np.int32)
    out["indices"] = np.arange(N)
    if context is not None:
        out["context"] = context
    if uncond is not None:
        out["uncond"] = np.ascontiguousarray(uncond)
        out["guidance_scale"] = np.float64(scale)
    return out


class CalibStep(NamedTuple):
    """One step's calibration batch: inputs (x, t), the cache the partial pass reuses
    (None at full steps), which FP samples were drawn, and for conditional models their
    contexts (``uncond`` set: guided, the feature then (n, 2, h, w, c))."""

    step: int
    x: np.ndarray
    t: np.ndarray
    cached_feature: Optional[np.ndarray]
    indices: np.ndarray
    context: Optional[np.ndarray] = None
    uncond: Optional[np.ndarray] = None


def calibration_set(traj: dict, full_steps, *, per_step_full: int = 64, per_step_cached: int = 32, seed: int,
                    dec: Optional[CacheDEC] = None) -> list[CalibStep]:
    """Per-step calibration batches from :func:`fp_trajectories` (official counts 64/32).

    Step i draws ``rng.permutation(N)[:count]`` from one ``np.random.default_rng(seed)``
    in step order (the official ``torch.randperm(n)[:count]``); fewer samples than
    ``count`` means all of them. The cache of a cached step is the feature of the same
    samples at the last full step, ``dec``-corrected with step i's (a, b) if given. The
    trajectories' ``context`` / ``uncond`` rows of the drawn samples go with them.
    """
    full = np.asarray(full_steps, bool)
    S, N = traj["x"].shape[:2]
    if full.shape != (S,):
        raise ValueError(f"full_steps has shape {full.shape}, the trajectories {S} steps")
    src = last_full_index(full)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(S):
        idx = np.sort(rng.permutation(N)[: per_step_full if full[i] else per_step_cached])
        cache = None
        if not full[i]:
            cache = traj["feature"][src[i]][idx]
            if dec is not None:
                a, b = np.asarray(dec.a[i], np.float32), np.asarray(dec.b[i], np.float32)
                cache = (a * cache.astype(np.float32) + b).astype(cache.dtype)
        t = np.full(len(idx), traj["t"][i], np.int32)
        ctx = traj["context"][idx] if traj.get("context") is not None else None
        unc = traj["uncond"][idx] if traj.get("uncond") is not None else None
        out.append(CalibStep(i, traj["x"][i][idx], t, cache, idx, ctx, unc))
    return out


# ----------------------------------------------------------------------- artifacts
_STEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def artifact_key(model_name: str, num_steps: int, interval: int, schedule_kind: str,
                 weight_bits: Optional[int] = None, act_bits: Optional[int] = None) -> str:
    """A readable file stem, e.g. ``fmnist-ddpm_S100_N10_uniform_W8A8`` (no bits: FP)."""
    if (weight_bits is None) != (act_bits is None):
        raise ValueError("give both weight_bits and act_bits, or neither (full precision)")
    name = str(model_name).replace("/", "-")
    key = f"{name}_S{int(num_steps)}_N{int(interval)}_{schedule_kind}"
    if weight_bits is not None:
        key += f"_W{int(weight_bits)}A{int(act_bits)}"
    if not _STEM.match(key):
        raise ValueError(f"artifact key {key!r} is not a plain file stem ([A-Za-z0-9._-])")
    return key


def _normalise(meta: dict) -> dict:
    return json.loads(json.dumps(meta, sort_keys=True, default=str))


def save_cache_artifacts(path, full_steps, dec: Optional[CacheDEC], meta: dict) -> None:
    """Write the schedule, the DEC (or none) and ``meta`` (JSON-able) to ``path`` (.npz,
    atomically)."""
    full = np.asarray(full_steps, bool)
    arrays = dict(full_steps=full, meta=np.array(json.dumps(_normalise(meta), sort_keys=True)))
    if dec is not None:
        a, b = np.asarray(dec.a, np.float32), np.asarray(dec.b, np.float32)
        if a.shape != b.shape or a.shape[0] != full.size:
            raise ValueError(f"dec a, b must be (S={full.size}, C), got {a.shape}, {b.shape}")
        arrays.update(dec_a=a, dec_b=b)
    write_npz(path, **arrays)


def load_cache_artifacts(path, expect_meta: dict) -> tuple[np.ndarray, Optional[CacheDEC], dict]:
    """``(full_steps, dec or None, meta)`` from :func:`save_cache_artifacts`'s file.

    Every entry of ``expect_meta`` must equal the stored one; otherwise a ValueError
    lists the differences (the artifacts belong to another setting: regenerate them).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no cache artifacts at {path}")
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
        full = np.asarray(f["full_steps"], bool)
        dec = CacheDEC(f["dec_a"], f["dec_b"]) if "dec_a" in f.files else None
    expect = _normalise(expect_meta)
    diff = [f"{k}: stored {meta.get(k, '<missing>')!r}, expected {v!r}"
            for k, v in expect.items() if k not in meta or meta[k] != v]
    if diff:
        raise ValueError(f"{path} holds cache artifacts of another setting ({'; '.join(diff)}); regenerate them")
    return full, dec, meta
