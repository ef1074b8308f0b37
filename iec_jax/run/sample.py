"""Sampling from a UNet checkpoint (``experiments/sample.py``).

Writes to the workdir: ``samples/samples_{k:05d}.npz`` (uint8 NHWC ``arr_0`` and
``indices``; resumable: existing complete shards are kept), ``grid.png`` (the first
``grid_size`` samples), ``config.json`` and ``summary.json`` (NFE, wall time, images/s).
"""

from __future__ import annotations

import os
import time

import iec_jax
from iec_jax import pipeline
from iec_jax.io import write_json
from iec_jax.run.common import build_schedule, load_unet, unet_denoiser


def build_sampler(config):
    """``(batch_fn, image_shape, unet_config)`` for a sampling config."""
    unet_config, params = load_unet(config.model.source)
    schedule = build_schedule(config.schedule)
    ts = iec_jax.make_timesteps(schedule.num_timesteps, config.sampler.num_steps,
                                config.sampler.spacing)
    shape = (unet_config.sample_size, unet_config.sample_size, unet_config.in_channels)
    batch_fn = pipeline.make_batch_sampler(
        unet_denoiser(unet_config, config.model.dtype), params=params, schedule=schedule,
        timesteps=ts, shape=shape, seed=config.seed, eta=config.sampler.eta,
        iec=iec_jax.IECConfig.from_config(config.iec),
    )
    return batch_fn, shape, unet_config


def run(config, workdir: str) -> dict:
    start = time.time()
    batch_fn, shape, _ = build_sampler(config)
    shards = pipeline.SampleShards(os.path.join(workdir, "samples"), config.num_samples,
                                   config.shard_size)
    nfe = []
    written = pipeline.generate(
        batch_fn, shards, config.batch_size,
        on_batch=lambda info: nfe.append(iec_jax.nfe_summary(info)["nfe"]),
    )
    images = shards.load()
    pipeline.save_grid(os.path.join(workdir, "grid.png"), images[: config.grid_size])
    elapsed = time.time() - start
    generated = sum(len(shards.indices(k)) for k in written)
    summary = dict(
        num_samples=int(config.num_samples),
        shards_written=len(written),
        nfe_per_batch=sorted(set(nfe)),
        wall_time_s=round(elapsed, 2),
        images_per_s=round(generated / elapsed, 2) if generated else None,
        image_shape=list(images.shape[1:]),
    )
    write_json(os.path.join(workdir, "config.json"), config.to_dict())
    write_json(os.path.join(workdir, "summary.json"), summary)
    print(f"{config.num_samples} samples in {workdir} ({len(written)} shards written,"
          f" {elapsed:.1f} s); NFE per batch {summary['nfe_per_batch']}")
    return summary


__all__ = ["run", "build_sampler"]
