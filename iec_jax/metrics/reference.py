"""Reference statistics of a dataset split, per-shard Inception features of sample
shards, and the metrics of a set of features against a reference.

    from iec_jax.metrics import reference

    ref = reference.reference_features("fashion_mnist", "test")   # cached after the first call
    feats = reference.FeatureShards("run/features", sample_shards)  # next to the sample shards
    reference.compute_metrics(feats.load(), ref)                  # FID, sFID, precision, recall

The reference cache lives in ``$IEC_JAX_CACHE/reference`` (default
``~/.cache/iec_jax/reference``): ``<dataset>_<split>.npz`` with the pool features (for
precision/recall) and the guided-diffusion evaluator's statistics keys ``mu``, ``sigma``,
``mu_s``, ``sigma_s``, plus the count ``num``. A cached file is read without TFDS.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from tqdm.auto import tqdm

from iec_jax import pipeline
from iec_jax.io import write_npz

__all__ = ["cache_root", "center_crop", "reference_features", "reference_features_from_images",
           "reference_features_from_batch",
           "FeatureShards", "frechet_distances", "compute_metrics"]


def cache_root() -> Path:
    return Path(os.environ.get("IEC_JAX_CACHE", os.path.expanduser("~/.cache/iec_jax")))


def center_crop(images: np.ndarray, size: Optional[int]) -> np.ndarray:
    """The central size×size pixels of NHWC images (None: unchanged)."""
    if not size:
        return images
    h, w = images.shape[1:3]
    if size > min(h, w):
        raise ValueError(f"eval.crop={size} is larger than the images ({h}×{w})")
    top, left = (h - size) // 2, (w - size) // 2
    return images[:, top:top + size, left:left + size]


def _features(images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    from iec_jax import metrics

    feats = metrics.compute_features(images, batch_size=batch_size)
    return {k: v for k, v in feats.items() if k in ("pool", "spatial", "logits")}


def _reference_path(dataset: str, split: str, cache_dir: Optional[str]) -> Path:
    cache = Path(cache_dir) if cache_dir else cache_root() / "reference"
    return cache / (re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{dataset}_{split}").strip("_") + ".npz")


def reference_features(dataset: str, split: str, *, data_dir: Optional[str] = None,
                       batch_size: int = 64, cache_dir: Optional[str] = None,
                       progress: bool = True) -> dict[str, np.ndarray]:
    """Inception ``pool`` features and ``spatial`` statistics of a dataset split, cached.

    The cache file ``<cache>/reference/<dataset>_<split>.npz`` holds ``pool`` (N, 2048)
    float32 (for precision/recall), and ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` — the
    guided-diffusion evaluator's statistics keys — plus the count ``num``. A cached file
    is read without TFDS.
    """
    path = _reference_path(dataset, split, cache_dir)
    if path.exists():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    from iec_jax import data

    data.prepare(dataset, data_dir=data_dir, download=False)
    images = data.load_images(dataset, split, data_dir=data_dir)
    return reference_features_from_images(images, dataset, split, batch_size=batch_size,
                                          cache_dir=cache_dir, progress=progress)


def reference_features_from_images(images: np.ndarray, dataset: str, split: str, *,
                                   batch_size: int = 64, cache_dir: Optional[str] = None,
                                   progress: bool = True) -> dict[str, np.ndarray]:
    """:func:`reference_features` of the split's uint8 images given directly (a machine
    without the dataset); writes the same cache file."""
    from iec_jax import metrics

    pool, spatial = [], metrics.FeatureStats.empty(metrics.inception.SPATIAL_DIM)
    chunks = range(0, len(images), 1000)
    for s in tqdm(chunks, desc=f"reference {dataset}/{split}", unit="k img", disable=not progress):
        f = _features(images[s:s + 1000], batch_size)
        pool.append(f["pool"])
        spatial = spatial.update(f["spatial"])
    pool = np.concatenate(pool)
    stats = metrics.FeatureStats.from_features(pool)
    arrays = dict(pool=pool, **stats.to_arrays(), **spatial.to_arrays("_s"))
    write_npz(_reference_path(dataset, split, cache_dir), **arrays)
    return arrays


def reference_features_from_batch(path: str, *, batch_size: int = 64, cache_dir: Optional[str] = None,
                                  progress: bool = True) -> dict[str, np.ndarray]:
    """:func:`reference_features` of an evaluator reference batch (``.npz`` with ``arr_0``,
    NHWC uint8, as the guided-diffusion evaluator's), cached under its name and digest."""
    from iec_jax.io import file_digest

    name = f"batch_{Path(path).stem}_{file_digest(path, 'sha256')[:12]}"
    cached = _reference_path(name, "all", cache_dir)
    if cached.exists():
        with np.load(cached) as f:
            return {k: f[k] for k in f.files}
    with np.load(path) as f:
        if "arr_0" not in f.files:
            raise ValueError(f"{path} is not a reference batch (no arr_0)")
        images = f["arr_0"]
    return reference_features_from_images(images, name, "all", batch_size=batch_size,
                                          cache_dir=cache_dir, progress=progress)


class FeatureShards:
    """Per-shard Inception features next to the sample shards."""

    def __init__(self, directory: str, samples: pipeline.SampleShards, decode=None):
        """``decode``: maps float samples to images in [-1, 1] first (latent samples
        through their autoencoder); None: the samples are images."""
        self.directory = directory
        self.samples = samples
        self.decode = decode

    def path(self, k: int) -> str:
        return os.path.join(self.directory, f"features_{k:05d}.npz")

    def missing(self) -> list[int]:
        return [k for k in range(self.samples.num_shards) if not os.path.exists(self.path(k))]

    def compute(self, k: int, crop: Optional[int], batch_size: int) -> None:
        """Features of sample shard ``k``; float shards (x_0 in [-1, 1], as the table
        jobs store them) are quantized with :func:`pipeline.to_uint8` first."""
        with np.load(self.samples.path(k)) as f:
            images, idx = f["arr_0"], f["indices"]
        if images.dtype != np.uint8:
            images = pipeline.to_uint8(self.decode(images) if self.decode else images)
        feats = _features(center_crop(images, crop), batch_size)
        write_npz(self.path(k), indices=idx, **feats)

    def load(self, only: Optional[Iterable[int]] = None) -> dict[str, np.ndarray]:
        """The features of every shard, or of the shards ``only`` (in that order)."""
        parts = []
        for k in range(self.samples.num_shards) if only is None else only:
            with np.load(self.path(k)) as f:
                if not np.array_equal(f["indices"], self.samples.indices(k)):
                    raise ValueError(f"{self.path(k)} belongs to another run; remove it")
                parts.append({n: f[n] for n in f.files if n != "indices"})
        return {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}


def frechet_distances(feats: dict, ref: dict, *, frechet_method: str = "sqrtm") -> dict:
    """FID (pool features) and sFID (spatial) against the reference statistics ``ref``."""
    from iec_jax import metrics

    pool = metrics.FeatureStats.from_features(feats["pool"])
    spatial = metrics.FeatureStats.from_features(feats["spatial"])
    return dict(
        fid=float(pool.frechet_distance(metrics.FeatureStats.from_arrays(ref),
                                        method=frechet_method)),
        sfid=float(spatial.frechet_distance(metrics.FeatureStats.from_arrays(ref, "_s"),
                                            method=frechet_method)),
    )


def compute_metrics(feats: dict, ref: dict, *, frechet_method: str = "sqrtm") -> dict:
    """:func:`frechet_distances`, precision and recall (k = 3) and, with logits, the
    Inception Score."""
    from iec_jax import metrics

    out = frechet_distances(feats, ref, frechet_method=frechet_method)
    out["precision"], out["recall"] = metrics.precision_recall(ref["pool"], feats["pool"], 3)
    if "logits" in feats:
        out["inception_score"] = metrics.inception_score(feats["logits"])
    return {k: float(v) for k, v in out.items()}
