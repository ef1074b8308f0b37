"""Sampling a table row: the model with its efficiency method, resumable float shards,
the row's progress record, its paired trajectory, and the Inception features of its
shards.

Per row, under ``<workdir>/rows/<row>/``: ``samples/samples_{k:05d}.npz`` (float32 x_0;
sample i depends only on (seed, i), so every row sees the same x_T), ``progress.json``
(sampling seconds, samples, NFE and IEC corrections accumulated shard by shard, and the
machines that sampled: ``devices``), ``trajectory.npz`` (the float trajectory of the
first ``trajectory_samples`` samples) and ``features/features_{k:05d}.npz``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import iec_jax
from iec_jax import distributed, pipeline
from iec_jax.io import write_json, write_npz
from iec_jax.metrics.reference import FeatureShards
from iec_jax.models.loading import model_fingerprint
from iec_jax.run.reproduce.spec import (RowSpec, TableSettings, check_row_dir, parse_bits,
                                        record_run, row_meta)

__all__ = ["Table", "Progress", "run_row", "float_shards", "complete_features", "say"]


def say(msg: str, since: float) -> None:
    """A timestamped log line with the seconds since ``since`` (where a row's time goes)."""
    print(f"  {time.strftime('%H:%M:%S')} {msg} ({time.time() - since:.1f} s)", flush=True)


def device_description() -> str:
    """``"2 × cpu (AMD EPYC …)"`` / ``"1 × NVIDIA H200"``: what sampled a shard."""
    from iec_jax.io import host_cpu

    dev = jax.devices()[0]
    what = f"{jax.device_count()} × {getattr(dev, 'device_kind', dev.platform)}"
    return f"{what} ({host_cpu()})" if dev.platform == "cpu" else what


class Progress:
    """Sampling seconds / samples / NFE of a row, accumulated shard by shard (atomic)."""

    def __init__(self, path: str):
        self.path = path
        self.data = dict(seconds=0.0, samples=0, nfe=0.0, nfe_full=0.0, nfe_partial=0.0,
                         corrections=0.0, timed_seconds=0.0, timed_samples=0, devices=[])
        if os.path.exists(path):
            self.data.update(json.loads(Path(path).read_text()))

    def add(self, seconds, infos: list[dict], counts: list[int], first_call: bool) -> None:
        """``seconds``: per batch. The first batch of an invocation includes the jit
        compilation; it is left out of the timed rate when the shard has other batches."""
        d = self.data
        d["device"] = device_description()
        # A row resumed over several sittings may span machines: all of them, in order.
        d["devices"] = list(dict.fromkeys(list(d["devices"]) + [d["device"]]))
        d["seconds"] += float(np.sum(seconds))
        skip = 1 if first_call and len(counts) > 1 else 0
        d["timed_seconds"] += float(np.sum(seconds[skip:]))
        d["timed_samples"] += int(np.sum(counts[skip:]))
        for info, n in zip(infos, counts):
            s = iec_jax.nfe_summary(info)
            d["samples"] += n
            d["nfe"] += s["nfe"] * n
            d["nfe_full"] += s["nfe_full"] * n
            d["nfe_partial"] += s["nfe_partial"] * n
            d["corrections"] += s["corrections_per_sample"] * n
        write_json(self.path, d)

    def absorb(self, other: "Progress") -> None:
        """Adds another process's record of the same row (multi-process runs)."""
        d, o = self.data, other.data
        for k in ("seconds", "samples", "nfe", "nfe_full", "nfe_partial", "corrections",
                  "timed_seconds", "timed_samples"):
            d[k] += o[k]
        d["devices"] = list(dict.fromkeys(list(d["devices"]) + list(o["devices"])))
        if o.get("device"):
            d["device"] = o["device"]
        write_json(self.path, d)

    def per_sample(self, key: str) -> Optional[float]:
        n = self.data["samples"]
        return self.data[key] / n if n else None


def _latent_fingerprint(model) -> str:
    """A latent model's content fingerprint: its components' and its scaling factor."""
    import hashlib

    h = hashlib.sha256(f"{model.setting}|{float(model.scaling_factor)!r}".encode())
    for name, c in model.components().items():
        h.update(f"{name}:{model_fingerprint(c.config, c.params)}".encode())
    return h.hexdigest()


class Table:
    """Everything one table run needs: the model, the schedule and the methods. A latent
    table (``model.setting``) samples latents with its conditioning and guidance, calibrates
    with the same contexts, and decodes for the Inception features."""

    def __init__(self, s: TableSettings, workdir: str):
        from iec_jax.efficient import methods

        self.s = s
        self.workdir = workdir
        self.latent = s.latent
        # A conditional UNet's context shape (tokens, dim) and its passes per evaluation
        # (2 under classifier-free guidance), for the FLOP count.
        self.context_shape, self.passes = None, 1
        family = contexts = None
        if self.latent:
            from iec_jax import latent as L
            from iec_jax.run.settings import ConfigError

            self.model = s.model.load()
            self.unet_config, self.params = self.model.unet
            fingerprint = _latent_fingerprint(self.model)
            self.schedule = self.model.schedule.noise_schedule()
            self.shape = L.latent_shape(self.model)
            g = s.guidance
            try:
                self.cond = L.Conditioning.for_model(self.model, classes=g["classes"],
                                                     per_class=g["per_class"], prompts=g["prompts"])
            except ValueError as e:
                raise ConfigError("guidance", str(e)) from None
            self.all_params = L.model_params(self.model)
            family = "ldm"
            if self.cond.kind != "none":
                n = s.calibration.num_samples
                c, u = self.cond.contexts(self.model, self.all_params, np.arange(n))
                guided = g["scale"] != 1.0
                self.context_shape, self.passes = tuple(c.shape[1:]), 2 if guided else 1
                contexts = methods.CalibrationContexts(
                    np.asarray(c), np.asarray(u) if guided else None,
                    g["scale"] if guided else None, method=s.method)
            self._decode = L.decoder(self.model)
        else:
            self.unet_config, self.params = s.model.load()
            fingerprint = model_fingerprint(self.unet_config, self.params)
            self.schedule = s.schedule.build()
            self.shape = (self.unet_config.sample_size, self.unet_config.sample_size,
                          self.unet_config.in_channels)
        # Results are keyed by the model's content, not by where the checkpoint lies.
        self.model_key = dict(name=s.model.name, dtype=getattr(s.model, "dtype", "float32"),
                              fingerprint=fingerprint)
        self.methods = methods.MethodBuilder(
            self.unet_config, self.params, schedule=self.schedule, shape=self.shape,
            cache_point=s.cache_point, model_name=s.model.name or s.model.setting,
            dtype=self.model_key["dtype"], calibration=s.calibration,
            artifact_dir=os.path.join(workdir, "artifacts"), spacing=s.sampler.spacing,
            fingerprint=fingerprint, family=family, contexts=contexts)

    def timesteps(self, row: RowSpec) -> np.ndarray:
        return self.s.sampler.timesteps(self.schedule, self.s.num_steps(row))

    def denoiser(self, row: RowSpec):
        """``(factory, params pytree)`` of the row's efficient model: ``factory(params)``
        returns the Denoiser, or, for a latent table, ``factory(params, indices)`` (the
        batch's conditioning; with guidance every evaluation is one 2B pass)."""
        factory, fparams = self.methods.build(
            num_steps=self.s.num_steps(row), bits=parse_bits(row.quant),
            cache_interval=row.cache_interval, cache_schedule=row.cache_schedule, dec=row.dec)
        if not self.latent:
            return factory, fparams
        from iec_jax.denoisers import StatefulDenoiser, guided_denoiser

        model, cond, scale = self.model, self.cond, float(self.s.guidance["scale"])

        def latent_factory(p, indices):
            inner = factory(p["method"])
            if cond.kind == "none":
                return inner
            c, u = cond.contexts(model, p["model"], indices)
            if scale != 1.0:
                return guided_denoiser(inner, c, u, scale)
            return StatefulDenoiser(lambda x, t, step, st: inner(x, t, step, st, c),
                                    inner.init_state, inner.select_state,
                                    inner.full_pass_mask)  # the conditional model alone

        return latent_factory, dict(method=fparams, model=self.all_params)

    def decode(self, x: np.ndarray) -> np.ndarray:
        """Samples in [-1, 1] image space: latents decoded in chunks (a latent table), or
        the samples themselves."""
        if not self.latent:
            return x
        out = [np.asarray(self._decode(self.all_params, x[i:i + 16])) for i in range(0, len(x), 16)]
        return np.concatenate(out)

    def row_meta(self, row: RowSpec) -> dict:
        return row_meta(self.s, self.model_key, row)


def float_shards(rowdir: str, s: TableSettings) -> pipeline.SampleShards:
    return pipeline.SampleShards(os.path.join(rowdir, "samples"), s.num_samples, s.shard_size,
                                 np.float32)


def feature_shards(rowdir: str, s: TableSettings, decode=None) -> FeatureShards:
    return FeatureShards(os.path.join(rowdir, "features"), float_shards(rowdir, s), decode=decode)


def complete_features(rowdir: str, s: TableSettings) -> Optional[dict]:
    """The row's features when all are on disk (None otherwise: e.g. a table assembled
    from the small files of a row computed elsewhere)."""
    feats = feature_shards(rowdir, s)
    return None if feats.missing() else feats.load()


def _trajectory(table: Table, row: RowSpec, factory, fparams, n: int) -> np.ndarray:
    """The row's float trajectory (S, n, ...) of samples 0..n-1 (same x_T as the shards)."""
    base = jax.random.key(table.s.seed)
    ts = table.timesteps(row)

    def run(p):
        indices = jnp.arange(n, dtype=jnp.uint32)
        keys = pipeline.per_sample_keys(base, indices)
        x_T, skeys = pipeline.initial_noise(keys, table.shape)
        den = factory(p, indices) if table.latent else factory(p)
        _, info = iec_jax.sample(den, x_T, skeys, schedule=table.schedule, timesteps=ts,
                                 eta=table.s.sampler.eta, iec=row.iec_config(),
                                 method=table.s.method, return_trajectory=True)
        return info["trajectory"]

    return np.asarray(jax.jit(run)(fparams))


def run_row(table: Table, row: RowSpec, rowdir: str, started: float) -> dict:
    """Samples the row's missing shards, its trajectory and features; returns
    ``dict(features=..., progress=Progress)``."""
    s = table.s
    main, nproc = distributed.is_main(), distributed.count()
    if main:
        check_row_dir(rowdir, table.row_meta(row))
        record_run(rowdir, s, started)
    distributed.barrier(f"{row.slug}: row.json")
    t0 = time.time()
    if main:  # process 0 calibrates what is missing; the others load its artifacts
        factory, fparams = table.denoiser(row)
    distributed.barrier(f"{row.slug}: calibrated")
    if not main:
        factory, fparams = table.denoiser(row)
    say(f"{row.name}: model built (calibrated where its artifacts were missing)", t0)
    batch_fn = pipeline.make_batch_sampler(
        factory, params=fparams, schedule=table.schedule, timesteps=table.timesteps(row),
        shape=table.shape, seed=s.seed, eta=s.sampler.eta, iec=row.iec_config(),
        method=s.method, pass_indices=table.latent)
    shards = float_shards(rowdir, s)
    name = "progress.json" if nproc == 1 else f"progress.p{distributed.index()}.json"
    progress = Progress(os.path.join(rowdir, name))
    first_call = True  # its batch includes the compilation: not timed when others are
    t0 = time.time()
    mine = set(distributed.my_shards(shards.num_shards))
    todo = [k for k in shards.missing() if k in mine]
    for k in todo:
        infos: list[dict] = []
        stamps = [time.time()]
        idx = shards.indices(k)

        def on_batch(info):
            infos.append(jax.device_get(info))
            stamps.append(time.time())

        pipeline.generate(batch_fn, shards, s.batch_size, only=[k], on_batch=on_batch,
                          postprocess=lambda x: np.asarray(x, np.float32))
        counts = [min(s.batch_size, len(idx) - i) for i in range(0, len(idx), s.batch_size)]
        progress.add(np.diff(stamps), infos, counts, first_call=first_call)
        first_call = False
    if todo:
        say(f"{row.name}: {len(todo)} shard(s) sampled", t0)

    traj_path = os.path.join(rowdir, "trajectory.npz")
    if main and s.trajectory_samples and not os.path.exists(traj_path):
        t0 = time.time()
        traj = _trajectory(table, row, factory, fparams, s.trajectory_samples)
        write_npz(traj_path, trajectory=traj, timesteps=table.timesteps(row))
        say(f"{row.name}: trajectory of {s.trajectory_samples} samples", t0)

    features = feature_shards(rowdir, s, decode=table.decode if table.latent else None)
    t0 = time.time()
    todo = [k for k in features.missing() if k in mine]
    for k in tqdm(todo, desc=f"features {row.name}", unit="shard"):
        features.compute(k, s.eval.crop, s.eval.inception_batch_size)
    if todo:
        say(f"{row.name}: features of {len(todo)} shard(s)", t0)
    distributed.barrier(f"{row.slug}: shards and features")
    if not main:
        return dict(features=None, progress=None)
    if nproc > 1:  # one record of the row: the processes' records added up
        progress = Progress(os.path.join(rowdir, "progress.json"))
        for p in range(nproc):
            part = os.path.join(rowdir, f"progress.p{p}.json")
            if os.path.exists(part):
                progress.absorb(Progress(part))
                os.remove(part)
    return dict(features=features.load(), progress=progress)
