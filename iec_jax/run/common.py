"""Builders shared by the experiment jobs: one place that turns config blocks into objects."""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp

import iec_jax

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_schedule(cfg) -> iec_jax.NoiseSchedule:
    """A NoiseSchedule from a ``schedule`` config block (kind, beta_start, beta_end,
    num_timesteps[, final_alpha])."""
    kind = cfg.kind
    final = cfg.get("final_alpha", "one") or "one"
    if kind == "linear":
        return iec_jax.NoiseSchedule.linear(cfg.beta_start, cfg.beta_end, cfg.num_timesteps,
                                            final_alpha=final)
    if kind == "scaled_linear":
        return iec_jax.NoiseSchedule.scaled_linear(cfg.beta_start, cfg.beta_end,
                                                   cfg.num_timesteps, final_alpha=final)
    if kind == "cosine":
        return iec_jax.NoiseSchedule.cosine(cfg.num_timesteps, final_alpha=final)
    raise ValueError(f"schedule.kind must be linear, scaled_linear or cosine, got {kind!r}")


def load_unet(source: str):
    """``(UNetConfig, params)`` from a converted checkpoint directory (``checkpoint.json``,
    written by ``experiments.convert``) or, converting in memory, from a diffusers
    ``UNet2DModel`` folder (``config.json``)."""
    from iec_jax.models import load_checkpoint, load_diffusers

    path = Path(os.path.expanduser(source))
    if (path / "checkpoint.json").is_file():
        return load_checkpoint(path)
    if (path / "config.json").is_file():
        return load_diffusers(path)
    raise ValueError(
        f"model.source={source!r} is neither an iec_jax checkpoint (checkpoint.json) nor a"
        " diffusers UNet2DModel folder (config.json)"
    )


def model_fingerprint(unet_config, params) -> str:
    """SHA-256 of a model's architecture and weights (the UNet config, then every parameter's
    path, dtype, shape and bytes, in tree order): what a result computed with the model
    depends on, independent of where the checkpoint lies or its format (a diffusers folder
    and its ``experiments.convert`` output give the same fingerprint)."""
    import dataclasses
    import hashlib
    import json

    import jax
    import numpy as np

    h = hashlib.sha256()
    cfg = dataclasses.asdict(unet_config) if dataclasses.is_dataclass(unet_config) else unet_config
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def unet_denoiser(unet_config, dtype: str = "float32"):
    """``params -> eps_fn(x, t)`` for the Flax UNet (NHWC), computing in ``dtype``."""
    from iec_jax.models import UNet

    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    net = UNet(unet_config, dtype=DTYPES[dtype])

    def make(params):
        return lambda x, t: net.apply({"params": params}, x, t)

    return make
