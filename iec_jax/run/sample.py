"""Sampling from a UNet checkpoint or a latent model (``experiments/sample.py``).

Latent models (configs with ``model.setting``: ``configs/{lsun_bedroom,lsun_church,
imagenet,sd}/sample.py``) sample latents with DDIM or PLMS, class labels or prompts and
classifier-free guidance (:mod:`iec_jax.latent`), and decode them to images.

Writes to the workdir: ``samples/samples_{k:05d}.npz`` (uint8 NHWC ``arr_0`` and
``indices``; resumable: existing complete shards are kept), ``grid.png`` (the first
``grid_size`` samples), ``config.json`` and ``summary.json`` (NFE, wall time, images/s).
Launched as several processes (``--distributed``), each samples every P-th shard and
process 0 writes the rest.
"""

from __future__ import annotations

import os
import time

import iec_jax
from iec_jax import distributed, pipeline
from iec_jax.io import write_json
from iec_jax.models.loading import unet_denoiser
from iec_jax.run.settings import (ConfigError, LatentSampleSettings, SampleSettings,
                                  latent_sample_settings, sample_settings)

__all__ = ["run", "build_sampler", "settings"]


def settings(config):
    """The config boundary of ``experiments.sample``: a pixel UNet (``SampleSettings``) or
    a latent model (``LatentSampleSettings``, configs with ``model.setting``)."""
    if isinstance(config, (SampleSettings, LatentSampleSettings)):
        return config
    if "setting" in config.model:
        return latent_sample_settings(config)
    return sample_settings(config)


def _latent_sampler(s: LatentSampleSettings):
    """``(batch_fn, decode_fn, model)`` of a latent sampling job; bad class labels or
    prompts are refused (ConfigError) before anything is compiled."""
    from iec_jax import latent

    model = s.model.load()
    try:
        cond = latent.Conditioning.for_model(
            model, classes=s.classes, per_class=s.per_class,
            prompts=list(s.prompts) if s.prompts else None)
    except ValueError as e:
        raise ConfigError("guidance", str(e)) from None
    schedule = model.schedule.noise_schedule()
    params = latent.model_params(model)
    batch_fn = pipeline.make_batch_sampler(
        latent.guided(model, cond, scale=s.guidance_scale), params=params, schedule=schedule,
        timesteps=s.sampler.timesteps(schedule), shape=latent.latent_shape(model), seed=s.seed,
        eta=s.sampler.eta, iec=s.iec, method=s.method, pass_indices=True)
    decode = latent.decoder(model)
    placed = batch_fn.placed_params
    return batch_fn, lambda z: latent.decode_uint8(model, placed, z, decode), model


def build_sampler(s: SampleSettings):
    """``(batch_fn, image_shape, unet_config)`` for sampling settings."""
    unet_config, params = s.model.load()
    schedule = s.schedule.build()
    shape = (unet_config.sample_size, unet_config.sample_size, unet_config.in_channels)
    batch_fn = pipeline.make_batch_sampler(
        unet_denoiser(unet_config, s.model.dtype), params=params, schedule=schedule,
        timesteps=s.sampler.timesteps(schedule), shape=shape, seed=s.seed, eta=s.sampler.eta,
        iec=s.iec)
    return batch_fn, shape, unet_config


def run(config, workdir: str) -> dict:
    s = settings(config)
    start = time.time()
    post = pipeline.to_uint8
    if isinstance(s, LatentSampleSettings):
        batch_fn, post, _ = _latent_sampler(s)
    else:
        batch_fn, _, _ = build_sampler(s)
    shards = pipeline.SampleShards(os.path.join(workdir, "samples"), s.num_samples,
                                   s.shard_size)
    nfe = []
    written = pipeline.generate(
        batch_fn, shards, s.batch_size, only=distributed.my_shards(shards.num_shards),
        on_batch=lambda info: nfe.append(iec_jax.nfe_summary(info)["nfe"]), postprocess=post,
    )
    distributed.barrier("iec_jax.sample: shards done")
    if not distributed.is_main():  # process 0 writes the run's files
        return {}
    images = shards.load()
    if s.grid_size:
        pipeline.save_grid(os.path.join(workdir, "grid.png"), images[: s.grid_size])
    elapsed = time.time() - start
    generated = sum(len(shards.indices(k)) for k in written)
    summary = dict(
        num_samples=s.num_samples,
        shards_written=len(written),
        nfe_per_batch=sorted(set(nfe)),
        wall_time_s=round(elapsed, 2),
        images_per_s=round(generated / elapsed, 2) if generated else None,
        image_shape=list(images.shape[1:]),
    )
    write_json(os.path.join(workdir, "config.json"), dict(s.raw))
    write_json(os.path.join(workdir, "summary.json"), summary)
    print(f"{s.num_samples} samples in {workdir} ({len(written)} shards written,"
          f" {elapsed:.1f} s); NFE per batch {summary['nfe_per_batch']}")
    return summary
