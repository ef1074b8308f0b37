"""One builder for every efficient model of the paper's tables, with its calibration.

``MethodBuilder.build(num_steps=, bits=, cache_interval=, cache_schedule=, dec=)`` returns
``(factory, params)``: ``factory(params) -> Denoiser`` is called inside jit (the
parameters, quantized weights, activation tables and DEC fits stay jit arguments).

The official CacheQuant/IEC pipeline order (docs/semantics.md §4.5) is followed:

1. FP no-cache DDIM trajectories of ``calibration.num_samples`` samples (seed
   ``calibration.seed``), recording x_i and the cache-point feature at every step
   (:func:`iec_jax.efficient.calibration.fp_trajectories`);
2. the cache schedule: uniform, DeepCache's non-uniform rule, or CacheQuant's DPS on the
   first ``calibration.dps_samples`` trajectories;
3. cache-DEC (when ``dec``): per-step, per-channel (a, b) regressing each step's FP
   feature on the feature of the last full step;
4. activation quantizer tables: per step, 64 / 32 random FP samples at full / cached steps
   (the cached ones through the partial pass on the DEC-corrected cache), shared by all
   weight bit-widths; weights by the per-channel MSE search;
5. quant-DEC (when ``dec`` and quantized) on the conv consuming the cached feature.

Every artifact is written once under ``artifact_dir`` with a key naming model, steps,
interval, schedule and bit-widths (``fmnist-ddpm_S100_N10_uniform_W8A8``) and is reloaded
(and checked against its metadata, which holds the model's content fingerprint, so a
different checkpoint under the same name is refused) on later runs: calibration is resumable and, given its
seed, deterministic. The FP trajectories are recomputed when an artifact is missing (they
are large: ~7 MB per sample at S = 100 for fmnist-ddpm, so they are not stored).

Latent and conditional models (docs/semantics.md §4, §6): ``unet_config`` may be a
``UNetConditionConfig`` or a :class:`~iec_jax.efficient.adapter.ModelSpec`; ``family="ldm"``
asks for the latent family's quant-DEC layers on an LSUN ``UNet`` (a UNetCondition is
always "ldm"); ``contexts`` (:class:`CalibrationContexts`) gives the calibration
trajectories' contexts, the unconditional context and guidance scale, and the sampler
(DDIM, or PLMS for Stable Diffusion); ``quant_options`` passes extra :class:`QuantConfig
<iec_jax.efficient.quant.QuantConfig>` fields (e.g. the Bedroom per-channel variant,
``dict(scale_method="max", act_per_channel=True)``). The factory of a conditional model
returns a denoiser that takes the context after its state, for
:func:`iec_jax.guided_denoiser`::

    factory, fparams = builder.build(num_steps=250, bits=(8, 8), cache_interval=20,
                                     cache_schedule="dps", dec=True)
    den = lambda p: iec_jax.guided_denoiser(factory(p), cond, uncond, 1.5)

These options enter the artifacts' metadata (and file names) only when set, so the
pixel models' artifacts are those of before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable, Mapping, Optional

import numpy as np

from iec_jax.efficient import cache as cache_lib
from iec_jax.efficient import calibration as calib_lib
from iec_jax.efficient import quant as quant_lib
from iec_jax.efficient.adapter import ModelSpec
from iec_jax.io import write_json
from iec_jax.schedule import NoiseSchedule, make_timesteps

__all__ = ["CalibrationConfig", "CalibrationContexts", "class_contexts", "MethodBuilder",
           "nonuniform_center"]


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """How the efficient models are calibrated (the official CIFAR-10 scripts' values by
    default).

    Attributes:
      num_samples, batch_size: FP no-cache trajectories recorded (and their batch).
      per_step_full, per_step_cached: calibration samples per full / cached step.
      dps_samples: trajectories whose cache-point features the DPS schedule is fitted on.
      act_batch_size: the activation range search's batch (official: min(batch, samples
        of the step), kept once it shrinks).
      nonuniform_center, nonuniform_pow: DeepCache's non-uniform schedule (its scripts
        have no defaults; center None or < 0 = the middle step).
      seed: the trajectories' and the per-step draws' seed.
    """

    num_samples: int = 512
    batch_size: int = 128
    per_step_full: int = 64
    per_step_cached: int = 32
    dps_samples: int = 32
    act_batch_size: int = 256
    nonuniform_center: Optional[int] = -1
    nonuniform_pow: float = 1.4
    seed: int = 0

    def __post_init__(self):
        for name in ("num_samples", "batch_size", "per_step_full", "per_step_cached",
                     "dps_samples", "act_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"calibration.{name} must be an integer >= 1, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"calibration.seed must be an integer >= 0, got {self.seed!r}")
        if self.nonuniform_center is not None and (
                isinstance(self.nonuniform_center, bool)
                or not isinstance(self.nonuniform_center, (int, np.integer))):
            raise ValueError("calibration.nonuniform_center must be an integer (< 0: the middle"
                             f" step) or None, got {self.nonuniform_center!r}")
        if not isinstance(self.nonuniform_pow, (int, float)) or not self.nonuniform_pow > 0:
            raise ValueError(f"calibration.nonuniform_pow must be a number > 0, got {self.nonuniform_pow!r}")
        if self.dps_samples > self.num_samples:
            raise ValueError(f"calibration.dps_samples must be <= calibration.num_samples="
                             f"{self.num_samples}, got {self.dps_samples}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, eq=False)
class CalibrationContexts:
    """The contexts of a conditional model's calibration trajectories (arrays; e.g. from
    ``iec_jax.latent.Conditioning.contexts`` for the first N sample indices).

    Attributes:
      context: (M, n_tokens, dim) contexts; calibration sample i uses row i (M must be at
        least ``CalibrationConfig.num_samples``): cin256 class embeddings of random
        labels, Stable Diffusion prompt embeddings.
      uncond: the unconditional context, (n_tokens, dim) or (M, n_tokens, dim) (cin256:
        the null class's embedding, SD: the empty prompt's), or None without guidance.
      guidance_scale: the classifier-free guidance weight (with ``uncond``); every
        trajectory step is then one 2B pass [uncond ; cond], whose 2B feature is cached.
      method: the calibration sampler, "ddim" (LSUN, cin256) or "plms" (SD).
    """

    context: Any
    uncond: Any = None
    guidance_scale: Optional[float] = None
    method: str = "ddim"

    def __post_init__(self):
        ctx = np.asarray(self.context, np.float32)
        if ctx.ndim != 3:
            raise ValueError(f"CalibrationContexts.context must be (samples, n_tokens, dim), got {ctx.shape}")
        object.__setattr__(self, "context", ctx)
        if (self.uncond is None) != (self.guidance_scale is None):
            raise ValueError("CalibrationContexts: give uncond and guidance_scale together (guidance) or neither")
        if self.uncond is not None:
            unc = np.asarray(self.uncond, np.float32)
            if unc.shape not in (ctx.shape[1:], ctx.shape):
                raise ValueError(f"CalibrationContexts.uncond must be {ctx.shape[1:]} or {ctx.shape},"
                                 f" got {unc.shape}")
            object.__setattr__(self, "uncond", unc)
            object.__setattr__(self, "guidance_scale", float(self.guidance_scale))
        if self.method not in ("ddim", "plms"):
            raise ValueError(f"CalibrationContexts.method must be 'ddim' or 'plms', got {self.method!r}")

    def fingerprint(self) -> str:
        """SHA-256 of the contexts, the scale and the sampler (enters artifact metadata)."""
        h = hashlib.sha256(json.dumps([self.guidance_scale, self.method]).encode())
        for a in (self.context, self.uncond):
            if a is not None:
                h.update(f"{a.shape}".encode())
                h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def rows(self, n: int) -> dict:
        """fp_trajectories' conditioning keywords for the first ``n`` samples."""
        if self.context.shape[0] < n:
            raise ValueError(f"CalibrationContexts has {self.context.shape[0]} contexts for {n}"
                             " calibration samples")
        unc = self.uncond
        if unc is not None and unc.ndim == 3:
            unc = unc[:n]
        return dict(context=self.context[:n], uncond=unc, guidance_scale=self.guidance_scale, method=self.method)


def class_contexts(embed: Callable, num_samples: int, *, seed: int, guidance_scale: Optional[float],
                   num_classes: int = 1000, null_class: int = 1000) -> CalibrationContexts:
    """Random class labels for a class-conditional model (cin256: 1000 classes, the null
    class 1000): labels ``default_rng(seed).integers(0, num_classes, num_samples)``,
    ``embed(labels (n,) int32) -> (n, 1, dim)`` (e.g. the ``ClassEmbedder``), and with a
    ``guidance_scale`` the null class's embedding as the unconditional context."""
    labels = np.random.default_rng(seed).integers(0, num_classes, num_samples).astype(np.int32)
    context = np.asarray(embed(labels), np.float32)
    uncond = None if guidance_scale is None else np.asarray(embed(np.array([null_class], np.int32)), np.float32)[0]
    return CalibrationContexts(context, uncond, guidance_scale)


def nonuniform_center(calib, num_steps: int) -> int:
    """The non-uniform cache schedule's centre step: ``calib.nonuniform_center``, or the
    middle step where it is unset (None or negative)."""
    c = calib.nonuniform_center
    return int(num_steps // 2 if c is None or c < 0 else c)


class MethodBuilder:
    """Builds (and calibrates, once) the efficient models of one network.

    Args:
      unet_config: a ``UNetConfig``, a ``UNetConditionConfig`` or a ModelSpec.
      params: the float parameters.
      schedule, shape, spacing: the noise schedule, the sample (latent) shape (h, w, c)
        and the timestep spacing of the sampler.
      cache_point: the DeepCache cache point.
      model_name, fingerprint: name the artifacts (fingerprint: the model's content).
      dtype: the computation dtype's name ("float32" / "bfloat16").
      calibration: a :class:`CalibrationConfig`; artifact_dir: where artifacts live.
      family: None, or "ldm" for the latent family's quant-DEC layers on an LSUN UNet
        (see :mod:`iec_jax.efficient.adapter`).
      contexts: a :class:`CalibrationContexts` (required for a conditional model).
      quant_options: extra QuantConfig fields for every quantized model.
    """

    def __init__(self, unet_config, params, *, schedule: NoiseSchedule, shape: tuple,
                 cache_point, model_name: str, dtype: str = "float32", calibration,
                 artifact_dir: str, spacing: str, fingerprint: Optional[str] = None,
                 family: Optional[str] = None, contexts: Optional[CalibrationContexts] = None,
                 quant_options: Optional[Mapping[str, Any]] = None):
        from iec_jax.models.loading import DTYPES, model_fingerprint, module_for

        if dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        if isinstance(unet_config, ModelSpec):
            if unet_config.dtype != DTYPES[dtype]:
                raise ValueError(f"the ModelSpec computes in {unet_config.dtype}, model.dtype is {dtype!r}")
            if family is not None and family != unet_config.family:
                raise ValueError(f"family {family!r} differs from the ModelSpec's {unet_config.family!r}")
            spec = unet_config
        else:
            spec = ModelSpec(module_for(unet_config, DTYPES[dtype]), family)
        self.cache_point = tuple(int(i) for i in cache_point)
        try:
            self.model = dataclasses.replace(spec, cache_point=self.cache_point)
        except ValueError:  # a cache point the network lacks fails where it is used
            self.model = spec
        self.unet = self.model.module
        if self.model.conditional and contexts is None:
            raise ValueError("a conditional model needs contexts (CalibrationContexts) for its calibration")
        if contexts is not None and not self.model.conditional:
            raise ValueError("calibration contexts given for an unconditional model")
        self.contexts = contexts
        self.quant_options = dict(quant_options or {})
        quant_lib.QuantConfig(**self.quant_options)  # fail early on a bad option
        self.params = params
        # Artifacts name the model; its content fingerprint (architecture and weights)
        # guards against another checkpoint under the same name.
        self.fingerprint = fingerprint or model_fingerprint(self.model.config, params)
        self.schedule = schedule
        self.shape = tuple(shape)
        self.model_name = model_name
        self.dtype = dtype
        self.calib = calibration
        self.artifact_dir = artifact_dir
        self.spacing = spacing
        self._traj: dict[int, dict] = {}

    def _qconfig(self, weight_bits: int, act_bits: int) -> quant_lib.QuantConfig:
        return quant_lib.QuantConfig(weight_bits=weight_bits, act_bits=act_bits, **self.quant_options)

    def _extra_meta(self) -> dict:
        """Metadata of the options beyond the pixel setting (empty for it)."""
        extra = {}
        if self.model.family != "ddpm":
            extra["family"] = self.model.family
        if self.contexts is not None:
            extra["contexts"] = self.contexts.fingerprint()
        return extra

    def _quant_suffix(self) -> str:
        return "_chmax" if self.quant_options.get("act_per_channel") else ""

    # ----------------------------------------------------------------- calibration
    def _path(self, stem: str) -> str:
        return os.path.join(self.artifact_dir, stem + ".npz")

    def _quant_meta(self, num_steps, interval, kind, bits, dec) -> dict:
        c = self.calib
        meta = self._meta(num_steps, interval, kind, bits=bits, dec=dec)
        meta.update(calib_samples=int(c.num_samples), calib_seed=int(c.seed),
                    per_step_full=int(c.per_step_full), per_step_cached=int(c.per_step_cached),
                    act_batch_size=int(c.act_batch_size))
        if interval and kind == "dps":
            meta.update(dps_samples=int(c.dps_samples))
        if self.quant_options:
            meta.update(quant_options=dict(sorted(self.quant_options.items())))
        return meta

    def _have(self, path: str, meta: dict) -> bool:
        """A quantizer artifact ``path`` is reused only with its sidecar ``.json`` equal to
        ``meta`` (written after the .npz: a missing sidecar means an interrupted write)."""
        side = path[:-4] + ".json"
        if not (os.path.exists(path) and os.path.exists(side)):
            return False
        with open(side) as f:
            stored = json.load(f)
        if stored != json.loads(json.dumps(meta)):
            diff = sorted(k for k in set(stored) | set(meta) if stored.get(k) != meta.get(k))
            raise ValueError(f"{path} was calibrated with other settings ({diff}); remove it or"
                             " use another --workdir")
        return True

    def timesteps(self, num_steps: int) -> np.ndarray:
        return make_timesteps(self.schedule.num_timesteps, num_steps, self.spacing)

    def trajectories(self, num_steps: int) -> dict:
        if num_steps not in self._traj:
            self._traj.clear()  # one grid at a time: they are large
            c = self.calib
            print(f"calibration: FP trajectories of {c.num_samples} samples, {num_steps} steps",
                  flush=True)
            cond = {} if self.contexts is None else self.contexts.rows(c.num_samples)
            self._traj[num_steps] = calib_lib.fp_trajectories(
                lambda p: cache_lib.float_unet_fn(self.model, p), c.num_samples, c.batch_size,
                c.seed, self.schedule, self.timesteps(num_steps), self.shape, self.cache_point,
                params=self.params, **cond)
        return self._traj[num_steps]

    def _meta(self, num_steps, interval, kind, bits=None, dec=False) -> dict:
        """What an artifact depends on (and nothing else, so that unrelated calibration
        settings do not invalidate it)."""
        c = self.calib
        meta = dict(model=self.model_name, model_fingerprint=self.fingerprint,
                    num_steps=int(num_steps), interval=int(interval),
                    schedule=kind, spacing=self.spacing, cache_point=list(self.cache_point),
                    bits="float" if bits is None else f"W{bits[0]}A{bits[1]}", dec=bool(dec),
                    dtype=self.dtype)
        if kind == "nonuniform":
            meta.update(center=nonuniform_center(c, num_steps), pow=float(c.nonuniform_pow))
        if kind == "dps" or dec:
            meta.update(calib_samples=int(c.num_samples), calib_seed=int(c.seed))
        if kind == "dps":
            meta.update(dps_samples=int(c.dps_samples))
        meta.update(self._extra_meta())
        return meta

    def cache_artifacts(self, num_steps: int, interval: int, kind: str, dec: bool):
        """(full-step mask, CacheDEC or None), computed once and stored."""
        stem = calib_lib.artifact_key(self.model_name, num_steps, interval, kind) + (
            "_dec" if dec else "")
        meta = self._meta(num_steps, interval, kind, dec=dec)
        path = self._path(stem)
        if os.path.exists(path):
            bare = {k: v for k, v in meta.items() if k != "model_fingerprint"}
            full, d, stored = calib_lib.load_cache_artifacts(path, bare)
            if stored.get("model_fingerprint") != self.fingerprint:
                raise ValueError(f"{path} was calibrated for another model of the same name"
                                 " (model_fingerprint differs); remove it or use another"
                                 " --workdir")
            return full, d
        features = None
        if kind == "dps" or dec:
            features = self.trajectories(num_steps)["feature"]
        full = cache_lib.make_schedule(
            kind, num_steps, interval,
            features=None if features is None else features[:, : self.calib.dps_samples],
            center=nonuniform_center(self.calib, num_steps), pow=float(self.calib.nonuniform_pow))
        d = cache_lib.fit_cache_dec(features, None, full) if dec else None
        calib_lib.save_cache_artifacts(path, full, d, meta)
        return full, d

    def act_tables(self, num_steps: int, act_bits: int, interval: int, kind: str, dec: bool):
        """Per-step activation tables. They depend on the activation bits and the cache
        setting only: the official calibration runs the float weights with the activation
        quantizers on (``set_quant_state(False, True)``), and conv_in / conv_out inputs
        are 8-bit whatever the configured bits. So W8A8 and W4A8 share one calibration."""
        stem = calib_lib.artifact_key(self.model_name, num_steps, interval or 1,
                                      kind if interval else "nocache") + f"_A{act_bits}" + (
            "_dec" if dec else "") + self._quant_suffix()
        qcfg = self._qconfig(quant_lib.NO_QUANT_BITS, act_bits)
        path = self._path(stem)
        meta = self._quant_meta(num_steps, interval, kind, (quant_lib.NO_QUANT_BITS, act_bits), dec)
        if self._have(path, meta):
            return quant_lib.load_quant_state(path, config=qcfg, unet_config=self.unet.config).act
        if interval:
            full, cdec = self.cache_artifacts(num_steps, interval, kind, dec)
        else:
            full, cdec = np.ones(num_steps, bool), None
        c = self.calib
        steps = calib_lib.calibration_set(self.trajectories(num_steps), full,
                                          per_step_full=c.per_step_full,
                                          per_step_cached=c.per_step_cached, seed=c.seed,
                                          dec=cdec)
        qstate = quant_lib.build_quant_state(self.model, self.params, steps, qcfg,
                                             cache_point=self.cache_point,
                                             batch_size=c.act_batch_size)
        quant_lib.save_quant_state(path, qstate, unet_config=self.unet.config)
        write_json(path[:-4] + ".json", meta)
        return qstate.act

    def quant_state(self, num_steps: int, bits: tuple, interval: int, kind: str, dec: bool):
        """Calibrated QuantState for this cache setting (interval 0: no cache): weights by
        the MSE search, the shared activation tables, and quant-DEC when ``dec``."""
        stem = calib_lib.artifact_key(self.model_name, num_steps, interval or 1,
                                      kind if interval else "nocache", *bits) + (
            "_dec" if dec else "") + self._quant_suffix()
        qcfg = self._qconfig(bits[0], bits[1])
        path = self._path(stem)
        meta = self._quant_meta(num_steps, interval, kind, bits, dec)
        if self._have(path, meta):
            return quant_lib.load_quant_state(path, config=qcfg, unet_config=self.unet.config)
        act = self.act_tables(num_steps, bits[1], interval, kind, dec)
        qstate = quant_lib.QuantState(quant_lib.quantize_params(self.model, self.params, qcfg),
                                      act, None, qcfg, None)
        if dec:
            full, cdec = self.cache_artifacts(num_steps, interval, kind, dec)
            traj = self.trajectories(num_steps)
            # The feature entering the cache point at each step: FP at full steps, the
            # DEC-corrected cached feature at cached steps (official all_cache_after_cacheadd).
            src = cache_lib.last_full_index(full)
            feats = []
            for i in range(num_steps):
                f = traj["feature"][src[i]].astype(np.float32)
                if not full[i]:
                    f = np.asarray(cdec.a[i])[None, None, None] * f + np.asarray(cdec.b[i])
                feats.append(f)
            qstate = quant_lib.fit_quant_dec(self.model, self.params, qstate, feats,
                                             cache_point=self.cache_point)
        quant_lib.save_quant_state(path, qstate, unet_config=self.unet.config)
        write_json(path[:-4] + ".json", meta)
        return qstate

    # --------------------------------------------------------------------- building
    def build(self, *, num_steps: int, bits: Optional[tuple] = None, cache_interval: int = 0,
              cache_schedule: str = "uniform", dec: bool = False):
        """``(factory, params)``: ``factory(params) -> Denoiser`` for the sampler (for a
        conditional model a denoiser taking the context after its state, to be wrapped by
        :func:`iec_jax.guided_denoiser`)."""
        if dec and not cache_interval:
            raise ValueError("DEC needs a cache (cache_interval > 0)")
        unet, cp = self.model, self.cache_point
        full = cdec = None
        if cache_interval:
            full, cdec = self.cache_artifacts(num_steps, cache_interval, cache_schedule, dec)
        if bits is not None:
            qstate = self.quant_state(num_steps, bits, cache_interval, cache_schedule, dec)
            fparams: Any = dict(q=qstate, dec=cdec)
            unet_fn = lambda p: quant_lib.quantized_unet(unet, p["q"])  # noqa: E731
        else:
            fparams = dict(p=self.params, dec=cdec)
            unet_fn = lambda p: cache_lib.float_unet_fn(unet, p["p"])  # noqa: E731

        if full is None:
            from iec_jax.denoisers import StatefulDenoiser

            def factory(p):
                fn = unet_fn(p)
                return StatefulDenoiser(lambda x, t, step, s, *c: (fn(x, t, step, *c), s))
        else:
            def factory(p):
                return cache_lib.cached_denoiser(unet_fn(p), full_steps=full, cache_point=cp,
                                                 dec=p["dec"])
        return factory, fparams
