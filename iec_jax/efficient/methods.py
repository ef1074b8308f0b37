"""One builder for every efficient model of the paper's tables, with its calibration.

``MethodBuilder.build(num_steps=, bits=, cache_interval=, cache_schedule=, dec=)`` returns
``(factory, params)``: ``factory(params) -> Denoiser`` is called inside jit (the
parameters, quantized weights, activation tables and DEC fits stay jit arguments).

The official CacheQuant/IEC pipeline order (PAPER.md §6.4) is followed:

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
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np

from iec_jax.efficient import cache as cache_lib
from iec_jax.efficient import calibration as calib_lib
from iec_jax.efficient import quant as quant_lib
from iec_jax.io import write_json
from iec_jax.models import UNet
from iec_jax.schedule import NoiseSchedule, make_timesteps

__all__ = ["MethodBuilder", "nonuniform_center"]


def nonuniform_center(calib, num_steps: int) -> int:
    """The non-uniform cache schedule's centre step: ``calib.nonuniform_center``, or the
    middle step where it is unset (None or negative)."""
    c = calib.nonuniform_center
    return int(num_steps // 2 if c is None or c < 0 else c)


class MethodBuilder:
    def __init__(self, unet_config, params, *, schedule: NoiseSchedule, shape: tuple,
                 cache_point, model_name: str, dtype: str = "float32", calibration,
                 artifact_dir: str, spacing: str, fingerprint: Optional[str] = None):
        from iec_jax.run.common import DTYPES, model_fingerprint

        if dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        self.unet = UNet(unet_config, dtype=DTYPES[dtype])
        self.params = params
        # Artifacts name the model; its content fingerprint (architecture and weights)
        # guards against another checkpoint under the same name.
        self.fingerprint = fingerprint or model_fingerprint(unet_config, params)
        self.schedule = schedule
        self.shape = tuple(shape)
        self.cache_point = tuple(int(i) for i in cache_point)
        self.model_name = model_name
        self.dtype = dtype
        self.calib = calibration
        self.artifact_dir = artifact_dir
        self.spacing = spacing
        self._traj: dict[int, dict] = {}

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
        return meta

    def _legacy(self, path: str, stored: dict) -> dict:
        """An artifact written before fingerprints (no ``model_fingerprint``) is taken to
        be of this model when everything else matches (its name included): said, and
        recorded with this model's fingerprint from now on."""
        if "model_fingerprint" in stored:
            return stored
        print(f"{path}: calibrated before model fingerprints; accepted for model"
              f" {stored.get('model')!r} by name, recorded with fingerprint"
              f" {self.fingerprint[:12]}…", flush=True)
        return dict(stored, model_fingerprint=self.fingerprint)

    def _have(self, path: str, meta: dict) -> bool:
        """A quantizer artifact ``path`` is reused only with its sidecar ``.json`` equal to
        ``meta`` (written after the .npz: a missing sidecar means an interrupted write)."""
        side = path[:-4] + ".json"
        if not (os.path.exists(path) and os.path.exists(side)):
            return False
        with open(side) as f:
            raw = json.load(f)
        stored = self._legacy(path, raw)
        if stored != json.loads(json.dumps(meta)):
            diff = sorted(k for k in set(stored) | set(meta) if stored.get(k) != meta.get(k))
            raise ValueError(f"{path} was calibrated with other settings ({diff}); remove it or"
                             " use another --workdir")
        if stored != raw:
            write_json(side, stored)
        return True

    def timesteps(self, num_steps: int) -> np.ndarray:
        return make_timesteps(self.schedule.num_timesteps, num_steps, self.spacing)

    def trajectories(self, num_steps: int) -> dict:
        if num_steps not in self._traj:
            self._traj.clear()  # one grid at a time: they are large
            c = self.calib
            print(f"calibration: FP trajectories of {c.num_samples} samples, {num_steps} steps",
                  flush=True)
            self._traj[num_steps] = calib_lib.fp_trajectories(
                lambda p: cache_lib.float_unet_fn(self.unet, p), c.num_samples, c.batch_size,
                c.seed, self.schedule, self.timesteps(num_steps), self.shape, self.cache_point,
                params=self.params)
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
        return meta

    def cache_artifacts(self, num_steps: int, interval: int, kind: str, dec: bool):
        """(full-step mask, CacheDEC or None), computed once and stored."""
        stem = calib_lib.artifact_key(self.model_name, num_steps, interval, kind) + (
            "_dec" if dec else "")
        meta = self._meta(num_steps, interval, kind, dec=dec)
        path = self._path(stem)
        if os.path.exists(path):
            bare = {k: v for k, v in meta.items() if k != "model_fingerprint"}
            full, d, raw = calib_lib.load_cache_artifacts(path, bare)
            stored = self._legacy(path, raw)
            if stored["model_fingerprint"] != self.fingerprint:
                raise ValueError(f"{path} was calibrated for another model of the same name"
                                 " (model_fingerprint differs); remove it or use another"
                                 " --workdir")
            if stored is not raw:  # upgraded: record the fingerprint
                calib_lib.save_cache_artifacts(path, full, d, meta)
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
            "_dec" if dec else "")
        qcfg = quant_lib.QuantConfig(weight_bits=quant_lib.NO_QUANT_BITS, act_bits=act_bits)
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
        qstate = quant_lib.build_quant_state(self.unet, self.params, steps, qcfg,
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
            "_dec" if dec else "")
        qcfg = quant_lib.QuantConfig(weight_bits=bits[0], act_bits=bits[1])
        path = self._path(stem)
        meta = self._quant_meta(num_steps, interval, kind, bits, dec)
        if self._have(path, meta):
            return quant_lib.load_quant_state(path, config=qcfg, unet_config=self.unet.config)
        act = self.act_tables(num_steps, bits[1], interval, kind, dec)
        qstate = quant_lib.QuantState(quant_lib.quantize_params(self.unet, self.params, qcfg),
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
            qstate = quant_lib.fit_quant_dec(self.unet, self.params, qstate, feats,
                                             cache_point=self.cache_point)
        quant_lib.save_quant_state(path, qstate, unet_config=self.unet.config)
        write_json(path[:-4] + ".json", meta)
        return qstate

    # --------------------------------------------------------------------- building
    def build(self, *, num_steps: int, bits: Optional[tuple] = None, cache_interval: int = 0,
              cache_schedule: str = "uniform", dec: bool = False):
        """``(factory, params)``: ``factory(params) -> Denoiser`` for the sampler."""
        if dec and not cache_interval:
            raise ValueError("DEC needs a cache (cache_interval > 0)")
        unet, cp = self.unet, self.cache_point
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
                return StatefulDenoiser(lambda x, t, step, s: (fn(x, t, step), s))
        else:
            def factory(p):
                return cache_lib.cached_denoiser(unet_fn(p), full_steps=full, cache_point=cp,
                                                 dec=p["dec"])
        return factory, fparams
