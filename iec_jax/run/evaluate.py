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
with ``NamedSharding``). Launched as several processes (``--distributed``,
:mod:`iec_jax.distributed`), process p handles the shards k with k % process_count == p
and process 0 computes the metrics after a barrier.

Metrics go to the console (absl logging), ``metrics.jsonl`` and ``result.json``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm

import iec_jax
from iec_jax import distributed, pipeline
from iec_jax.io import write_json, write_text
from iec_jax.metrics.reference import FeatureShards, compute_metrics, reference_features
from iec_jax.run.sample import build_sampler
from iec_jax.run.settings import SampleSettings, sample_settings


def settings(config) -> SampleSettings:
    """The config boundary of ``experiments.evaluate`` (sampling settings plus ``eval``)."""
    if isinstance(config, SampleSettings):
        return config
    s = sample_settings(config, with_eval=True)
    return s


def _rate(count: int, seconds: float):
    return round(count / seconds, 3) if count else None


def _append_table_row(path: str, row: dict) -> None:
    head = list(row)
    existing = Path(path).read_text() if os.path.exists(path) else ""
    if not existing:
        existing = "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
    write_text(path, existing + "| " + " | ".join(str(row[h]) for h in head) + " |\n")


def run(config, workdir: str) -> dict:
    s = settings(config)
    start = time.time()
    pid = jax.process_index()
    batch_fn, _, _ = build_sampler(s)
    shards = pipeline.SampleShards(os.path.join(workdir, "samples"), s.num_samples,
                                   s.shard_size)
    mine = set(distributed.my_shards(shards.num_shards))
    nfe = []
    t0 = time.time()
    written = pipeline.generate(batch_fn, shards, s.batch_size, only=mine,
                                on_batch=lambda info: nfe.append(iec_jax.nfe_summary(info)))
    sampling_s, t0 = time.time() - t0, time.time()
    feature_shards = FeatureShards(os.path.join(workdir, "features"), shards)
    todo = [k for k in feature_shards.missing() if k in mine]
    for k in tqdm(todo, desc="features", unit="shard"):
        feature_shards.compute(k, s.eval.crop, s.eval.inception_batch_size)
    features_s = time.time() - t0
    distributed.barrier("iec_jax.evaluate: shards done")
    if pid != 0:
        return {}

    with np.load(shards.path(0)) as f:  # the first 64 samples, for a look
        pipeline.save_grid(os.path.join(workdir, "grid.png"), f["arr_0"][:64])
    ref = reference_features(s.eval.dataset, s.eval.split, data_dir=s.eval.data_dir,
                             batch_size=s.eval.inception_batch_size)
    results = compute_metrics(feature_shards.load(), ref, frechet_method=s.eval.frechet_method)
    result = dict(
        name=s.name,
        model=s.model.source,
        sampler=f"DDIM-{s.sampler.num_steps} ({s.sampler.spacing}), eta={s.sampler.eta}",
        iec=s.raw.get("iec", {}).get("preset", "none"),
        num_samples=s.num_samples,
        reference=f"{s.eval.dataset}/{s.eval.split} ({len(ref['pool'])})",
        **{k: round(v, 4) for k, v in results.items()},
        nfe_per_sample=round(float(np.mean([n["nfe"] for n in nfe])), 2) if nfe else None,
        wall_time_s=round(time.time() - start, 1),
        # Throughput of this invocation (None for a stage it found already done).
        samples_per_s=_rate(sum(len(shards.indices(k)) for k in written), sampling_s),
        features_per_s=_rate(sum(len(shards.indices(k)) for k in todo), features_s),
        devices=jax.device_count(),
        processes=jax.process_count(),
    )
    write_json(os.path.join(workdir, "result.json"), result)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(result) + "\n")
    if s.results_table:
        _append_table_row(s.results_table, result)
    logging.info("evaluation: %s", result)
    print(" | ".join(f"{k}: {v}" for k, v in result.items()))
    return result


__all__ = ["run", "settings"]
