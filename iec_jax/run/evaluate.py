"""Sample → Inception features → FID / sFID / precision / recall (``experiments/evaluate.py``).

Stages, each resumable (a killed run restarts where it stopped and ends with exactly the
files an uninterrupted run writes):

1. samples: ``samples/samples_{k:05d}.npz`` via :mod:`iec_jax.pipeline` (sample i depends
   only on (seed, i); shards are written atomically);
2. features: ``features/features_{k:05d}.npz`` (Inception ``pool`` and ``spatial``
   features of shard k, after the optional centre crop), written atomically;
3. metrics against cached reference features of a dataset split
   (``reference_features``), written to ``result.json``, appended as a line to the
   markdown table ``config.results_table`` and to ``metrics.jsonl``; ``grid.png`` shows
   the first 64 samples.

Sampling and feature extraction are data-parallel over the local devices (``jax.jit``
with ``NamedSharding``). With ``config.distributed``, ``jax.distributed.initialize()`` is
called and process p handles the shards k with k % process_count == p; process 0 computes
the metrics after a barrier. (The multi-host path has not been run on several hosts here.)

Logging: clu's metric writers need TensorFlow, which is not a dependency; metrics go to
the console (absl logging), ``metrics.jsonl`` and ``result.json`` instead.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Iterable, Optional

import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm

import iec_jax
from iec_jax import pipeline
from iec_jax.io import write_json, write_npz, write_text
from iec_jax.run.sample import build_sampler


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
    without the dataset: ``experiments/gpu_tables.py``); writes the same cache file."""
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


class FeatureShards:
    """Per-shard Inception features next to the sample shards."""

    def __init__(self, directory: str, samples: pipeline.SampleShards):
        self.directory = directory
        self.samples = samples

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
            images = pipeline.to_uint8(images)
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


def _rate(count: int, seconds: float):
    return round(count / seconds, 3) if count else None


def _append_table_row(path: str, row: dict) -> None:
    head = list(row)
    existing = Path(path).read_text() if os.path.exists(path) else ""
    if not existing:
        existing = "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
    write_text(path, existing + "| " + " | ".join(str(row[h]) for h in head) + " |\n")


def run(config, workdir: str) -> dict:
    start = time.time()
    if config.distributed:
        jax.distributed.initialize()
    pid, nproc = jax.process_index(), jax.process_count()
    batch_fn, _, _ = build_sampler(config)
    shards = pipeline.SampleShards(os.path.join(workdir, "samples"), config.num_samples,
                                   config.shard_size)
    mine = {k for k in range(shards.num_shards) if k % nproc == pid}
    nfe = []
    t0 = time.time()
    written = pipeline.generate(batch_fn, shards, config.batch_size, only=mine,
                                on_batch=lambda info: nfe.append(iec_jax.nfe_summary(info)))
    sampling_s, t0 = time.time() - t0, time.time()
    feature_shards = FeatureShards(os.path.join(workdir, "features"), shards)
    todo = [k for k in feature_shards.missing() if k in mine]
    for k in tqdm(todo, desc="features", unit="shard"):
        feature_shards.compute(k, config.eval.crop, config.eval.inception_batch_size)
    features_s = time.time() - t0
    if nproc > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("iec_jax.evaluate: shards done")
    if pid != 0:
        return {}

    with np.load(shards.path(0)) as f:  # the first 64 samples, for a look
        pipeline.save_grid(os.path.join(workdir, "grid.png"), f["arr_0"][:64])
    ref = reference_features(config.eval.dataset, config.eval.split,
                             data_dir=config.eval.data_dir,
                             batch_size=config.eval.inception_batch_size)
    results = compute_metrics(feature_shards.load(), ref,
                              frechet_method=config.eval.frechet_method)
    iec = config.iec.preset
    result = dict(
        name=config.name,
        model=config.model.source,
        sampler=f"DDIM-{config.sampler.num_steps} ({config.sampler.spacing}), eta={config.sampler.eta}",
        iec=iec,
        num_samples=int(config.num_samples),
        reference=f"{config.eval.dataset}/{config.eval.split} ({len(ref['pool'])})",
        **{k: round(v, 4) for k, v in results.items()},
        nfe_per_sample=round(float(np.mean([n["nfe"] for n in nfe])), 2) if nfe else None,
        wall_time_s=round(time.time() - start, 1),
        # Throughput of this invocation (None for a stage it found already done).
        samples_per_s=_rate(sum(len(shards.indices(k)) for k in written), sampling_s),
        features_per_s=_rate(sum(len(shards.indices(k)) for k in todo), features_s),
        devices=jax.device_count(),
    )
    write_json(os.path.join(workdir, "result.json"), result)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(result) + "\n")
    _append_table_row(config.results_table, result)
    logging.info("evaluation: %s", result)
    print(" | ".join(f"{k}: {v}" for k, v in result.items()))
    return result


__all__ = ["run", "reference_features", "compute_metrics", "frechet_distances", "center_crop",
           "FeatureShards"]
