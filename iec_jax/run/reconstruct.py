"""Reconstruction FID of a latent model's autoencoder (``experiments/reconstruct.py``):
decode(encode(x)) of a dataset split against the split itself.

Writes to the workdir ``reconstructions.npz`` (uint8 NHWC, the first ``grid`` of them
also as ``grid.png``) and ``result.json`` (FID, sFID, precision, recall of the
reconstructions against the split's reference statistics; the mean L1 and PSNR of the
reconstructions on the [-1, 1] scale).
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from iec_jax import pipeline
from iec_jax.io import write_json, write_npz
from iec_jax.metrics.reference import (center_crop, compute_metrics, reference_features)

__all__ = ["run"]


def run(*, source: str, setting: str, dataset: str, split: str, workdir: str,
        batch_size: int = 256, crop=None, pad_to: int = 32) -> dict:
    """Reconstructs ``dataset/split`` through the model's autoencoder (posterior mean),
    scores it against the split; images are padded with −1 to ``pad_to`` first (the
    training padding of the Fashion-MNIST models) and cropped back by ``crop``."""
    from iec_jax import data, metrics
    from iec_jax.models.autoencoder import Autoencoder
    from iec_jax.models.ldm import load_latent_model

    start = time.time()
    model = load_latent_model(source, setting)
    data.prepare(dataset, download=False)
    images = data.load_images(dataset, split)  # uint8 NHWC
    h = images.shape[1]
    x = images.astype(np.float32) / 127.5 - 1.0
    if pad_to and h < pad_to:
        p = (pad_to - h) // 2
        x = np.pad(x, ((0, 0), (p, pad_to - h - p), (p, pad_to - h - p), (0, 0)), constant_values=-1.0)
    ae = Autoencoder(model.autoencoder.config)
    fn = jax.jit(lambda p, x: ae.apply({"params": p}, ae.apply({"params": p}, x, method="encode"),
                                       method="decode"))
    out = np.concatenate([np.asarray(fn(model.autoencoder.params, x[i:i + batch_size]))
                          for i in range(0, len(x), batch_size)])
    l1 = float(np.abs(out - x).mean())
    psnr = float(10 * np.log10(4.0 / np.mean((out - x) ** 2)))
    recon = center_crop(pipeline.to_uint8(out), crop or (h if h < out.shape[1] else None))
    feats = metrics.compute_features(recon, batch_size=64)
    ref = reference_features(dataset, split)
    scores = compute_metrics(feats, ref, frechet_method="eigh")
    os.makedirs(workdir, exist_ok=True)
    write_npz(os.path.join(workdir, "reconstructions.npz"), arr_0=recon)
    pipeline.save_grid(os.path.join(workdir, "grid.png"), recon[:64])
    result = dict(model=source, setting=setting, reference=f"{dataset}/{split}",
                  num=int(len(recon)), l1=round(l1, 5), psnr=round(psnr, 3),
                  **{k: round(v, 4) for k, v in scores.items()},
                  wall_time_s=round(time.time() - start, 1))
    write_json(os.path.join(workdir, "result.json"), result)
    print(" | ".join(f"{k}: {v}" for k, v in result.items()))
    return result
