"""The keys of a table's files: what a row's samples depend on (``row.json``), the
comparison that refuses a directory of other settings, the small per-row caches, and the
record of the runs that made a row."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from iec_jax.io import write_json

__all__ = ["ROW_LABELS", "row_meta", "normalize", "check_row_dir", "read_cached", "cached",
           "record_run"]

# RowSpec fields that label a row without changing its samples (left out of comparisons).
ROW_LABELS = ("baseline", "paper_fid", "paper_gain")


# --------------------------------------------------------------------- row keys
def row_meta(s, model_key: dict, row) -> dict:
    """What the row's samples depend on (the calibration only where it is used)."""
    fields = dataclasses.asdict(row)
    if not fields["first_k"]:  # added after rows were first stored: kept only where set
        del fields["first_k"]
    meta = dict(row=fields, model=dict(model_key),
                schedule=dataclasses.asdict(s.schedule), sampler=dataclasses.asdict(s.sampler),
                num_steps=s.num_steps(row), seed=s.seed, cache_point=list(s.cache_point),
                num_samples=s.num_samples, shard_size=s.shard_size)
    from iec_jax.run.reproduce.spec import batch_dependent

    if batch_dependent(row):
        meta["batch_size"] = s.batch_size
    if s.latent:  # what else the latent samples depend on (pixel rows keep their keys)
        meta["method"] = s.method
        meta["guidance"] = dict(s.guidance)
    cal = s.calibration
    if row.quant:
        meta["calibration"] = cal.to_dict()
    elif row.dec or (row.cache_interval and row.cache_schedule == "dps"):
        meta["calibration"] = dict(num_samples=cal.num_samples, seed=cal.seed,
                                   dps_samples=cal.dps_samples)
    elif row.cache_interval and row.cache_schedule == "nonuniform":
        meta["calibration"] = dict(nonuniform_center=cal.nonuniform_center,
                                   nonuniform_pow=cal.nonuniform_pow)
    return meta


def normalize(stored) -> Any:
    """A stored key in comparable form: JSON-plain, each row's labels (baseline, paper
    cells: they do not change its samples) dropped."""
    def walk(d):
        if isinstance(d, list):
            return [walk(v) for v in d]
        if not isinstance(d, dict):
            return d
        d = {k: walk(v) for k, v in d.items()}
        if isinstance(d.get("row"), dict):
            d["row"] = {k: v for k, v in d["row"].items() if k not in ROW_LABELS}
        return d

    return walk(json.loads(json.dumps(stored)))


def check_row_dir(rowdir: str, meta: dict) -> None:
    """Refuses a row directory written for other settings (labels do not count) once
    anything was computed in it; brings its row.json up to date when only labels differ,
    or when it holds nothing but its row.json."""
    path = os.path.join(rowdir, "row.json")
    meta = json.loads(json.dumps(meta))
    if os.path.exists(path):
        old = json.loads(Path(path).read_text())
        a, b = normalize(old), normalize(meta)
        if a != b:
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            if any(q.is_file() and q.name != "row.json" for q in Path(rowdir).rglob("*")):
                raise ValueError(f"{rowdir} was generated with other settings ({diff}); use"
                                 " another --workdir or remove the directory")
            print(f"{rowdir}: row.json written for other settings ({diff}) but nothing"
                  " computed under them; replaced", flush=True)
        if old != meta:
            write_json(path, meta)
    else:
        write_json(path, meta)


def read_cached(path: str, key: dict):
    """The value kept in ``path`` for ``key`` (None when absent or kept for another key)."""
    if os.path.exists(path):
        d = json.loads(Path(path).read_text())
        if "key" in d and normalize(d["key"]) == normalize(key):
            return d["value"]
    return None


def cached(path: str, key: dict, compute):
    """``compute()``'s value, kept in ``path`` with ``key`` (recomputed when the key
    differs; a None value is not kept): a row's metrics, its distances to the FP row, the
    passes' FLOPs."""
    value = read_cached(path, key)
    if value is None:
        value = compute()
        if value is not None:
            write_json(path, dict(key=json.loads(json.dumps(key)), value=value))
    return value


def record_run(rowdir: str, s, started: float) -> None:
    """Appends the run's whole config to the row's ``row_config.json`` (the table-level
    ``<table>_config.json`` is rewritten by every later run in the same work directory)."""
    path = os.path.join(rowdir, "row_config.json")
    runs = json.loads(Path(path).read_text())["runs"] if os.path.exists(path) else []
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
    write_json(path, dict(runs=runs + [dict(started=stamp, config=dict(s.raw))]))
