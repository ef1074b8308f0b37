"""Inception Score and k-NN precision/recall, with guided-diffusion's evaluator semantics.

**Inception Score** (:func:`inception_score`). The evaluator feeds the 2048-d pool features
through the TF graph's ``softmax/logits`` weight *without its bias* (1008 classes), takes
the softmax, cuts the predictions into consecutive splits of ``split_size = 5000`` (the
last split may be shorter; 50 000 samples give 10 splits), computes
``exp(mean_x KL(p(y|x) || p(y)))`` per split with p(y) the split's mean prediction, and
reports the **mean over splits** (no standard deviation). Here the softmax and the KL are
computed in float64 from the logits (log-softmax), which avoids the ``0 * log 0 = nan``
that float32 probabilities can produce; otherwise the arithmetic is the evaluator's.

**Precision and recall** (:func:`precision_recall`), Kynkäänniemi et al.'s improved
precision/recall as the evaluator's ``ManifoldEstimator`` computes it (k = 3):

* distances are *squared* Euclidean, ``max(|u|^2 - 2 u.v + |v|^2, 0)``, computed blockwise
  (``row_batch_size`` × ``col_batch_size``, 10 000 each by default);
* by default each block is computed in float16, as the evaluator does, and recomputed in
  float32 when any entry is not finite (float16 overflows beyond 65 504);
* the radius of a point is its k-th smallest distance to the set *including itself*
  (index k of the sorted row, whose index 0 is the self-distance 0), i.e. the distance to
  its k-th nearest other point;
* optional clamping (``clamp_to_percentile``, off in the evaluator): radii above that
  percentile are set to 0, i.e. those hyperspheres are pruned;
* precision = fraction of samples inside at least one reference hypersphere
  (``d(sample, ref) <= radius(ref)``); recall = fraction of reference points inside at
  least one sample hypersphere.

The float16 mode emulates the evaluator's rounding: inputs, squares, norms, the product
``u.v`` (accumulated in float32, as GPU half-precision GEMMs do) and each elementwise
result are rounded to float16 with ``lax.reduce_precision`` (which flushes float16
subnormals, below 6.1e-5, to zero: immaterial for these sums). Exact bit equality with
TensorFlow is not possible (accumulation order), and borderline comparisons can differ.
"""

from __future__ import annotations

import functools
from typing import Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from scipy import special

__all__ = [
    "inception_score",
    "pairwise_sq_distances",
    "manifold_radii",
    "manifold_membership",
    "precision_recall",
]

DistanceMode = Literal["float16", "float32"]
_HIGHEST = lax.Precision.HIGHEST


# ---------------------------------------------------------------- Inception Score
def inception_score(logits, split_size: int = 5000) -> float:
    """The evaluator's Inception Score from (N, classes) logits (see the module docstring).

    Args:
      logits: pre-softmax scores, e.g. ``compute_features(...)["logits"]`` (bias-free
        1008-class TF logits).
      split_size: consecutive samples per split; the score is the mean over splits.
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must be a non-empty (num, classes) array, got {logits.shape}")
    if split_size < 1:
        raise ValueError(f"split_size must be positive, got {split_size}")
    log_p = special.log_softmax(logits, axis=1)
    scores = []
    for i in range(0, len(log_p), split_size):
        part = log_p[i : i + split_size]
        log_marginal = special.logsumexp(part, axis=0) - np.log(len(part))
        kl = np.sum(np.exp(part) * (part - log_marginal[None]), axis=1)
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores))


# ------------------------------------------------------------ pairwise distances
def _f16(x: jax.Array) -> jax.Array:
    """Round float32 values to float16 precision and range (overflow -> inf)."""
    return lax.reduce_precision(x, exponent_bits=5, mantissa_bits=10)


def _sq_distances_f32(u: jax.Array, v: jax.Array) -> jax.Array:
    norm_u = jnp.sum(jnp.square(u), axis=1)
    norm_v = jnp.sum(jnp.square(v), axis=1)
    d = norm_u[:, None] - 2.0 * jnp.matmul(u, v.T, precision=_HIGHEST) + norm_v[None, :]
    return jnp.maximum(d, 0.0)


def _sq_distances_f16(u: jax.Array, v: jax.Array) -> jax.Array:
    u, v = _f16(u), _f16(v)
    norm_u = _f16(jnp.sum(_f16(jnp.square(u)), axis=1))
    norm_v = _f16(jnp.sum(_f16(jnp.square(v)), axis=1))
    two_uv = _f16(2.0 * _f16(jnp.matmul(u, v.T, precision=_HIGHEST)))
    d = _f16(_f16(norm_u[:, None] - two_uv) + norm_v[None, :])
    return jnp.maximum(d, 0.0)


@functools.partial(jax.jit, static_argnames="mode")
def pairwise_sq_distances(u, v, mode: DistanceMode = "float16") -> jax.Array:
    """Squared Euclidean distances (len(u), len(v)) as float32, the evaluator's DistanceBlock.

    ``mode="float16"`` computes in emulated float16 and falls back to float32 for the whole
    block when any entry is not finite; ``"float32"`` computes in float32 only.
    """
    u = jnp.asarray(u, jnp.float32)
    v = jnp.asarray(v, jnp.float32)
    if mode == "float32":
        return _sq_distances_f32(u, v)
    if mode != "float16":
        raise ValueError(f"mode must be 'float16' or 'float32', got {mode!r}")
    d16 = _sq_distances_f16(u, v)
    return lax.cond(
        jnp.all(jnp.isfinite(d16)), lambda: d16, lambda: _sq_distances_f32(u, v)
    )


@functools.partial(jax.jit, static_argnames="k")
def _kth_smallest(d: jax.Array, k: int) -> jax.Array:
    return -lax.top_k(-d, k + 1)[0][:, k]


@jax.jit
def _membership_block(d, radii_rows, radii_cols):
    # rows inside some column's sphere; columns inside some row's sphere.
    rows_in = jnp.any(d <= radii_cols[None, :], axis=1)
    cols_in = jnp.any(d <= radii_rows[:, None], axis=0)
    return rows_in, cols_in


def _check_features(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (num, dim) array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must be floating point, got dtype {x.dtype}")
    return x.astype(np.float32, copy=False)


def manifold_radii(
    features,
    k: int = 3,
    *,
    row_batch_size: int = 10000,
    col_batch_size: int = 10000,
    clamp_to_percentile: Optional[float] = None,
    mode: DistanceMode = "float16",
) -> np.ndarray:
    """Squared k-NN radius of each feature vector (float32, (num,)).

    The k-th smallest squared distance of each row to all rows (self included, so it is
    the distance to the k-th nearest *other* point). With ``clamp_to_percentile``, radii
    above that percentile are set to 0.
    """
    x = _check_features(features, "features")
    n = len(x)
    if not 1 <= k < n:
        raise ValueError(f"k must satisfy 1 <= k < num = {n}, got k = {k}")
    radii = np.empty(n, np.float32)
    for b1 in range(0, n, row_batch_size):
        rows = x[b1 : b1 + row_batch_size]
        d = jnp.concatenate(
            [
                pairwise_sq_distances(rows, x[b2 : b2 + col_batch_size], mode=mode)
                for b2 in range(0, n, col_batch_size)
            ],
            axis=1,
        )
        radii[b1 : b1 + len(rows)] = np.asarray(_kth_smallest(d, k))
    if clamp_to_percentile is not None:
        radii[radii > np.percentile(radii, clamp_to_percentile)] = 0.0
    return radii


def manifold_membership(
    features_1,
    radii_1,
    features_2,
    radii_2,
    *,
    row_batch_size: int = 10000,
    col_batch_size: int = 10000,
    mode: DistanceMode = "float16",
) -> tuple[np.ndarray, np.ndarray]:
    """Which points of each set lie inside some hypersphere of the other set.

    Returns ``(in_2, in_1)``: boolean (len(features_1),) telling whether each point of set
    1 lies within ``radii_2`` of some point of set 2, and (len(features_2),) the converse.
    """
    x1, x2 = _check_features(features_1, "features_1"), _check_features(features_2, "features_2")
    r1 = np.asarray(radii_1, np.float32).reshape(-1)
    r2 = np.asarray(radii_2, np.float32).reshape(-1)
    if len(r1) != len(x1) or len(r2) != len(x2):
        raise ValueError("each radii array needs one radius per feature vector")
    if x1.shape[1] != x2.shape[1]:
        raise ValueError(f"feature dims differ: {x1.shape[1]} and {x2.shape[1]}")
    status_1 = np.zeros(len(x1), bool)
    status_2 = np.zeros(len(x2), bool)
    for b1 in range(0, len(x1), row_batch_size):
        e1 = b1 + row_batch_size
        for b2 in range(0, len(x2), col_batch_size):
            e2 = b2 + col_batch_size
            d = pairwise_sq_distances(x1[b1:e1], x2[b2:e2], mode=mode)
            in_1, in_2 = _membership_block(d, r1[b1:e1], r2[b2:e2])
            status_1[b1:e1] |= np.asarray(in_1)
            status_2[b2:e2] |= np.asarray(in_2)
    return status_1, status_2


def precision_recall(
    ref_features,
    sample_features,
    k: int = 3,
    *,
    row_batch_size: int = 10000,
    col_batch_size: int = 10000,
    clamp_to_percentile: Optional[float] = None,
    mode: DistanceMode = "float16",
) -> tuple[float, float]:
    """``(precision, recall)`` of samples against reference features (pool features).

    Precision: fraction of samples within the k-NN hypersphere of some reference point.
    Recall: fraction of reference points within the k-NN hypersphere of some sample.
    """
    kwargs = dict(row_batch_size=row_batch_size, col_batch_size=col_batch_size, mode=mode)
    radii_ref = manifold_radii(ref_features, k, clamp_to_percentile=clamp_to_percentile, **kwargs)
    radii_sample = manifold_radii(
        sample_features, k, clamp_to_percentile=clamp_to_percentile, **kwargs
    )
    ref_in, sample_in = manifold_membership(
        ref_features, radii_ref, sample_features, radii_sample, **kwargs
    )
    return float(np.mean(sample_in)), float(np.mean(ref_in))
