"""What a table reports per row besides its samples: FLOPs of the passes, the metrics key,
the paired-bootstrap interval of a gain, FID∞, the L2 distance to the FP samples and the
per-step error growth against the FP trajectory.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from iec_jax.run.reproduce.sampling import complete_features, float_shards
from iec_jax.run.reproduce.spec import TableSettings

__all__ = ["metrics_key", "flops", "paired_bootstrap_gain", "row_fid_infinity", "l2_to",
           "mean_l2", "error_growth"]


def metrics_key(s: TableSettings, reference_num: int) -> dict:
    """What a row's metrics (and FID∞) depend on besides its samples: the evaluation
    settings less the Inception batch size (how the features are batched, not what they
    are), the reference set's size and the sample count."""
    return dict(eval=s.eval.metrics_dict(), reference_num=int(reference_num),
                num_samples=s.num_samples)


def flops(unet_config, params, shape, cache_point, dtype: str, *, context_shape=None,
          passes: int = 1) -> dict[str, float]:
    """FLOPs of one float full pass and one partial (cached) pass for one sample
    (``context_shape``: (tokens, dim) of a conditional UNet's context; ``passes``: network
    passes per evaluation, 2 under classifier-free guidance)."""
    from iec_jax.models import cached_feature_shape
    from iec_jax.models.loading import DTYPES, module_for

    net = module_for(unet_config, DTYPES[dtype])
    x = jax.ShapeDtypeStruct((1,) + tuple(shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    f = jax.ShapeDtypeStruct(cached_feature_shape(unet_config, cache_point, (1,) + tuple(shape)),
                             jnp.float32)
    ctx = () if context_shape is None else (
        jax.ShapeDtypeStruct((1,) + tuple(context_shape), jnp.float32),)
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype),
                                      params)

    def cost(fn, *args):
        # The lowered (unoptimized) HLO's count, on the CPU backend: a GPU executable's
        # count leaves out the convolutions it hands to cuDNN, and the GPU backend gives
        # no count for lowered HLO. NaN (shown as "–") where no count is available.
        try:
            with jax.default_device(jax.devices("cpu")[0]):
                ca = jax.jit(fn).lower(abstract, *args).cost_analysis()
        except Exception as e:  # noqa: BLE001 - FLOPs are informative only
            print(f"no FLOP count ({type(e).__name__}: {e})", flush=True)
            ca = None
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return float(ca.get("flops", float("nan"))) if ca else float("nan")

    full = cost(lambda p, x, t, *c: net.apply({"params": p}, x, t, *c), x, t, *ctx)
    partial = cost(lambda p, x, t, f, *c: net.apply({"params": p}, x, t, *c,
                                                    cache_point=cache_point, cached_feature=f),
                   x, t, f, *ctx)
    return dict(full=passes * full, partial=passes * partial)


def paired_bootstrap_gain(feats_base: np.ndarray, feats_row: np.ndarray, ref: dict, *,
                          replicates: int, seed: int = 0) -> tuple[float, float]:
    """95% interval of the relative FID gain (FID_base − FID_row) / FID_base under a
    paired bootstrap: the same resampled sample indices for both rows (their samples
    share x_T), the reference statistics fixed. FIDs by the symmetric ``eigh`` form
    (:class:`iec_jax.metrics.ResampledFrechet`).

    The interval is the percentile interval of the paired *difference*
    FID_base* − FID_row*, divided by the full-sample FID_base. A resample holds only ~63%
    distinct samples, which raises every resampled FID by about the same amount; that
    shared bias cancels in the difference but shrinks a ratio of resampled FIDs towards
    0, so that the percentile interval of the resampled *ratio* can miss its own point
    estimate (a test shows it on synthetic features). The denominator is held at its
    full-sample value."""
    from iec_jax import metrics

    if len(feats_base) != len(feats_row):
        raise ValueError("paired bootstrap needs the same samples in both rows")
    if int(replicates) < 2:
        raise ValueError(f"need at least 2 bootstrap replicates, got {replicates}")
    ref_stats = metrics.FeatureStats.from_arrays(ref)
    fid_base = metrics.ResampledFrechet(feats_base, ref_stats)
    fid_row = metrics.ResampledFrechet(feats_row, ref_stats)
    n = len(feats_base)
    denom = fid_base(np.arange(n))
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(int(replicates)):
        idx = rng.integers(0, n, n)
        diffs.append(fid_base(idx) - fid_row(idx))
    lo, hi = np.quantile(diffs, [0.025, 0.975]) / denom
    return float(lo), float(hi)


def row_fid_infinity(rowdir: str, feats: Optional[dict], s: TableSettings,
                     refstats: dict) -> Optional[dict]:
    """The row's FID∞ fit (:func:`iec_jax.metrics.fid_infinity`); its features are read
    only here, when no fit is cached (None without them: a row assembled from small
    files)."""
    from iec_jax import metrics

    if feats is None:
        feats = complete_features(rowdir, s)
    if feats is None:
        return None
    fit = metrics.fid_infinity(feats["pool"], metrics.FeatureStats.from_arrays(refstats),
                               num_points=s.fid_infinity)
    return dataclasses.asdict(fit)


def mean_l2(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over paired samples of ‖a_i − b_i‖₂ (float64)."""
    d = a.astype(np.float64) - b.astype(np.float64)
    return float(np.sqrt((d.reshape(len(d), -1) ** 2).sum(1)).mean())


def l2_to(rowdir: str, refdir: str, s: TableSettings) -> Optional[float]:
    """The row's mean L2 distance to the reference row's samples (None without both)."""
    a, b = float_shards(rowdir, s), float_shards(refdir, s)
    if a.missing() or b.missing():
        return None
    return mean_l2(a.load(), b.load())


def _load_trajectory(path: str) -> np.ndarray:
    with np.load(path) as f:
        return f["trajectory"].astype(np.float64)


def error_growth(rowdir: str, refdir: str) -> Optional[list]:
    """Per sampling step, the mean over the trajectory samples of ‖x_t − x_t^FP‖₂ (None
    without both trajectories, or on another step grid: the compute-matched rows)."""
    paths = [os.path.join(d, "trajectory.npz") for d in (rowdir, refdir)]
    if not all(os.path.exists(q) for q in paths):
        return None
    traj, ref_traj = (_load_trajectory(q) for q in paths)
    if traj.shape != ref_traj.shape:
        return None
    d = np.sqrt(((traj - ref_traj) ** 2).reshape(traj.shape[0], traj.shape[1], -1).sum(-1))
    return [float(v) for v in d.mean(1)]
