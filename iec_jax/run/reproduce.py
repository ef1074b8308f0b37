"""The paper's tables, row by row, with and without IEC (``experiments/reproduce.py``).

A table config (``configs/<dataset>/table{1,2,3,5}.py``) lists rows; each row is an
efficient model (float, PTQ, DeepCache, CacheQuant = cache + quantization + DEC), an IEC
setting and optionally a different number of sampling steps (the compute-matched
controls). For every row the job writes, under ``<workdir>/rows/<row>/``:

* ``row.json`` — the row and the settings its samples depend on, the model by name, dtype
  and content fingerprint (:func:`iec_jax.run.common.model_fingerprint`), not by path: a
  directory that belongs to other settings is refused, never mixed; one written before
  fingerprints (model by path) is accepted when that path is today's ``model.source`` or
  still holds a checkpoint with today's fingerprint;
* ``samples/samples_{k:05d}.npz`` — float32 x_0 (resumable shards; sample i depends only
  on (seed, i), so every row sees the same x_T: rows are paired);
* ``features/features_{k:05d}.npz`` — Inception features of the uint8 images;
* ``progress.json`` — sampling seconds, samples and NFE accumulated shard by shard, and
  the machine that sampled (``device``; on a CPU with its model name) — every machine
  of a row resumed over several sittings in ``devices``;
* ``row_config.json`` — the whole config of every run that sampled or evaluated the row
  (``runs``: a list, appended each time, with the run's start time), so that the
  table-level ``table1_config.json``, rewritten by every later run in the same work
  directory (another ``only``, batch size, ...), is not the only record of how a row
  was made;
* ``trajectory.npz`` — the float trajectory of the first ``trajectory_samples`` samples;
* ``metrics.json``, ``l2.json``, ``error_growth.json`` — the row's FID / sFID /
  precision / recall, its L2 distance to the FP samples and its per-step distance to the
  FP trajectory, each cached with the settings it was computed for. A row whose metrics
  are cached is assembled from these small files alone (with ``progress.json`` and
  ``row.json``): samples and features are not read, so a table can be assembled from a
  copy of them brought back from another machine;
* ``fid_inf.json`` — with ``config.fid_infinity`` set: FID extrapolated to infinitely
  many samples (:func:`iec_jax.metrics.fid_infinity`) and the subset FIDs it was fitted
  to;

and, for the whole table (``config.table``, e.g. ``table1``), ``table1.md``,
``table1.csv``, ``table1_result.json`` and the plots ``table1_error_growth.png``
(per-step distance to the full-precision trajectory) and ``table1_fid_vs_nfe.png``.
Tables may share one workdir: identical rows (FP, FP + IEC, ...) and calibration
artifacts are then computed once. Calibration artifacts (FP trajectories, activation tables, DPS
schedules, DEC fits) are computed once and kept under ``<workdir>/artifacts/`` by a key
naming model, steps, interval and bit-widths (see :mod:`iec_jax.efficient`).

Columns: FID/sFID/precision/recall against the reference split; ``L2 to FP`` — the mean
over samples of ‖x_0 − x_0^FP‖₂ on the [-1, 1] scale (float32 samples, paired seeds);
NFE per sample split into full and partial (cached) passes; GFLOPs per sample from XLA's
cost analysis of the lowered HLO of one float full / partial pass (fake quantization is
simulated in float, so its FLOPs are not those of an integer kernel); sampling seconds per 1,000 samples on
the machine that ran the row (steady state: an invocation's first batch, which
compiles, is left out when the shard has more); the relative FID gain over the row's ``baseline`` next to
the paper's. With ``config.fid_infinity``: ``FID∞`` and the gain computed with it
(``gain∞``), free of FID's finite-sample bias, which is shared by the rows and so dilutes
their relative gains.
"""

from __future__ import annotations

import csv
import dataclasses
import io as _io
import os
import re
import time
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import iec_jax
from iec_jax import pipeline
from iec_jax.io import write_json, write_npz, write_text
from iec_jax.run.common import build_schedule, load_unet, model_fingerprint
from iec_jax.run.evaluate import (FeatureShards, compute_metrics, frechet_distances,
                                  reference_features)

__all__ = ["RowSpec", "run", "calibrate", "interim", "parse_bits", "paired_bootstrap_gain"]

_QUANT = re.compile(r"^W(\d+)A(\d+)$")


def parse_bits(quant: str) -> Optional[tuple[int, int]]:
    """``"W8A8"`` -> (8, 8); ``""`` -> None."""
    if not quant:
        return None
    m = _QUANT.match(quant)
    if not m:
        raise ValueError(f"row quant must look like 'W8A8' (or '' for float), got {quant!r}")
    return int(m.group(1)), int(m.group(2))


def row_slug(name: str) -> str:
    """A row's directory name under ``rows/`` (from its display name)."""
    s = name.replace("+", "plus").replace("±", "pm").replace("/", "over")
    return re.sub(r"[^A-Za-z0-9.-]+", "_", s).strip("_")


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One table row (see ``configs.base.TABLE_ROW_DEFAULTS`` for the fields)."""

    name: str
    quant: str = ""
    cache_interval: int = 0
    cache_schedule: str = "uniform"
    dec: bool = False
    iec: str = "none"
    iec_steps: str = ""
    fraction: float = 0.0
    step_sizes: tuple = ()
    num_steps: int = 0
    baseline: str = ""
    paper_fid: str = ""
    paper_gain: float = 0.0

    @classmethod
    def from_dict(cls, d) -> "RowSpec":
        d = dict(d)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"table row {d.get('name')!r}: unknown field(s) {unknown}")
        d["step_sizes"] = tuple(float(s) for s in d.get("step_sizes", ()))
        return cls(**d)

    def __post_init__(self):
        def fail(field, msg):
            raise ValueError(f"table row {self.name!r}: {field} {msg}")

        if not self.name or not re.match(r"^[A-Za-z0-9 =+±/.,()_-]+$", self.name):
            fail("name", f"must be non-empty plain text, got {self.name!r}")
        parse_bits(self.quant)
        if self.cache_interval < 0:
            fail("cache_interval", f"must be >= 0, got {self.cache_interval}")
        if self.cache_schedule not in ("uniform", "nonuniform", "dps"):
            fail("cache_schedule", f"must be uniform, nonuniform or dps, got {self.cache_schedule!r}")
        if self.dec and not self.cache_interval:
            fail("dec", "(CacheQuant DEC) needs a cache (cache_interval > 0)")
        if self.iec not in ("none",) + tuple(iec_jax.iec.PRESETS):
            fail("iec", f"must be 'none' or one of {tuple(iec_jax.iec.PRESETS)}, got {self.iec!r}")
        if self.iec == "none" and (self.iec_steps or self.step_sizes or self.fraction):
            fail("iec", "is 'none' but IEC options are set")
        if self.iec_steps not in ("", "all", "full_compute", "head_tail"):
            fail("iec_steps", f"must be '', all, full_compute or head_tail, got {self.iec_steps!r}")
        if (self.iec_steps == "head_tail") != (self.fraction > 0):
            fail("fraction", "must be > 0 exactly when iec_steps='head_tail'")
        if self.num_steps < 0:
            fail("num_steps", f"must be >= 0, got {self.num_steps}")

    @property
    def slug(self) -> str:
        return row_slug(self.name)

    def iec_config(self) -> Optional[iec_jax.IECConfig]:
        if self.iec == "none":
            return None
        over: dict[str, Any] = {}
        steps = self.iec_steps or ("full_compute" if self.cache_interval else "all")
        over["steps"] = steps
        if steps == "head_tail":
            over["fraction"] = self.fraction
        if self.step_sizes:
            over["step_sizes"] = self.step_sizes
        return iec_jax.IECConfig.preset(self.iec, **over)


def _batch_dependent(row: RowSpec) -> bool:
    """Whether the row's samples depend on the batch size: IEC's batch-global stop test
    (``convergence="batch"``, every preset's, as in the official code) takes one decision
    per batch (``iec_jax.pipeline``). Such rows record their batch size in row.json, so a
    resumed run with another ``batch_size`` is refused instead of mixing shards."""
    iec = row.iec_config()
    return iec is not None and iec.convergence == "batch" and iec.tolerance > 0


def _stored_batch_dependent(row: dict) -> bool:
    """:func:`_batch_dependent` of a row as stored in a row.json (labels dropped); a row
    that no longer parses (fields of another version) counts as batch dependent when it
    has IEC at all, as before the rule was spelled out."""
    try:
        return _batch_dependent(RowSpec.from_dict(row))
    except (TypeError, ValueError):
        return row.get("iec", "none") != "none"


def _select_rows(config) -> list[RowSpec]:
    rows = [RowSpec.from_dict(r) for r in config.rows]
    if not rows:
        raise ValueError("the config has no rows")
    names = [r.name for r in rows]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate row names {dup}")
    slugs = [r.slug for r in rows]
    if len(set(slugs)) != len(slugs):
        raise ValueError(f"row names collide as directory names: {slugs}")
    for r in rows:
        if r.baseline and r.baseline not in names:
            raise ValueError(f"row {r.name!r}: baseline {r.baseline!r} is not a row of this table")
    if config.get("only"):
        wanted = [n.strip() for n in config.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise ValueError(f"--config.only names unknown rows {unknown}; rows: {names}")
        rows = [r for r in rows if r.name in wanted]
    return rows


class _Progress:
    """Sampling seconds / samples / NFE of a row, accumulated shard by shard (atomic)."""

    def __init__(self, path: str):
        self.path = path
        self.data = dict(seconds=0.0, samples=0, nfe=0.0, nfe_full=0.0, nfe_partial=0.0,
                         corrections=0.0, timed_seconds=0.0, timed_samples=0)
        if os.path.exists(path):
            import json

            self.data.update(json.loads(Path(path).read_text()))

    def add(self, seconds, infos: list[dict], counts: list[int], first_call: bool) -> None:
        """``seconds``: per batch. The first batch of an invocation includes the jit
        compilation; it is left out of the timed rate when the shard has other batches."""
        d = self.data
        # A row resumed over several sittings may span machines: all of them, in order
        # (a progress.json from before `devices` existed names its machine in `device`).
        seen = d.get("devices") or ([d["device"]] if d.get("device") else [])
        d["device"] = _device_description()
        d["devices"] = list(dict.fromkeys(seen + [d["device"]]))
        d["seconds"] += float(np.sum(seconds))
        skip = 1 if first_call and len(counts) > 1 else 0
        d["timed_seconds"] += float(np.sum(seconds[skip:]))
        d["timed_samples"] += int(np.sum(counts[skip:]))
        for info, n in zip(infos, counts):
            s = iec_jax.nfe_summary(info)
            d["samples"] += n
            d["nfe"] += s["nfe"] * n
            d["nfe_full"] += s["nfe_full"] * n
            d["nfe_partial"] += s["nfe_partial"] * n
            d["corrections"] += s["corrections_per_sample"] * n
        write_json(self.path, d)

    def per_sample(self, key: str) -> Optional[float]:
        n = self.data["samples"]
        return self.data[key] / n if n else None


def _device_description() -> str:
    """``"2 × cpu (AMD EPYC …)"`` / ``"1 × NVIDIA H200"``: what sampled a shard."""
    from iec_jax.io import host_cpu

    dev = jax.devices()[0]
    what = f"{jax.device_count()} × {getattr(dev, 'device_kind', dev.platform)}"
    return f"{what} ({host_cpu()})" if dev.platform == "cpu" else what


class Table:
    """Everything one table run needs: the model, the schedule and the methods."""

    def __init__(self, config, workdir: str):
        from iec_jax.efficient import methods

        self.config = config
        self.workdir = workdir
        self.unet_config, self.params = load_unet(config.model.source)
        # Results are keyed by the model's content, not by where the checkpoint lies.
        self.model_key = dict(name=config.model.name, dtype=config.model.dtype,
                              fingerprint=model_fingerprint(self.unet_config, self.params))
        self._legacy_sources: dict[str, bool] = {}
        self.schedule = build_schedule(config.schedule)
        self.shape = (self.unet_config.sample_size, self.unet_config.sample_size,
                      self.unet_config.in_channels)
        self.methods = methods.MethodBuilder(
            self.unet_config, self.params, schedule=self.schedule, shape=self.shape,
            cache_point=tuple(config.cache_point), model_name=config.model.name,
            dtype=config.model.dtype, calibration=config.calibration,
            artifact_dir=os.path.join(workdir, "artifacts"), spacing=config.sampler.spacing,
            fingerprint=self.model_key["fingerprint"],
        )

    def num_steps(self, row: RowSpec) -> int:
        return row.num_steps or int(self.config.sampler.num_steps)

    def timesteps(self, row: RowSpec) -> np.ndarray:
        return iec_jax.make_timesteps(self.schedule.num_timesteps, self.num_steps(row),
                                      self.config.sampler.spacing)

    def denoiser(self, row: RowSpec):
        """``(factory: params -> Denoiser, params pytree)`` of the row's efficient model."""
        bits = parse_bits(row.quant)
        return self.methods.build(
            num_steps=self.num_steps(row), bits=bits, cache_interval=row.cache_interval,
            cache_schedule=row.cache_schedule, dec=row.dec,
        )

    def row_meta(self, row: RowSpec) -> dict:
        """What the row's samples depend on (the calibration only where it is used)."""
        c = self.config
        meta = dict(row=dataclasses.asdict(row), model=dict(self.model_key),
                    schedule=c.schedule.to_dict(), sampler=c.sampler.to_dict(),
                    num_steps=self.num_steps(row), seed=int(c.seed),
                    cache_point=list(c.cache_point),
                    num_samples=int(c.num_samples), shard_size=int(c.shard_size))
        if _batch_dependent(row):
            meta["batch_size"] = int(c.batch_size)
        cal = c.calibration
        if row.quant:
            meta["calibration"] = cal.to_dict()
        elif row.dec or (row.cache_interval and row.cache_schedule == "dps"):
            meta["calibration"] = dict(num_samples=cal.num_samples, seed=cal.seed,
                                       dps_samples=cal.dps_samples)
        elif row.cache_interval and row.cache_schedule == "nonuniform":
            meta["calibration"] = dict(nonuniform_center=cal.nonuniform_center,
                                       nonuniform_pow=cal.nonuniform_pow)
        return meta

    def normalize(self, stored):
        """A stored key (row.json, a cache's key) in today's comparable form: JSON-plain;
        each row's labels (baseline, paper cells: they do not change its samples) dropped;
        a ``model`` block written before fingerprints (``source``: a checkpoint path)
        replaced by today's when it names the same model: the same path as
        ``config.model.source``, or a checkpoint still at that path with today's
        fingerprint (left as it is otherwise, so it does not match)."""
        import json

        def walk(d):
            if isinstance(d, list):
                return [walk(v) for v in d]
            if not isinstance(d, dict):
                return d
            d = {k: walk(v) for k, v in d.items()}
            if isinstance(d.get("row"), dict):
                d["row"] = {k: v for k, v in d["row"].items() if k not in ROW_LABELS}
                if "sampler" in d and "batch_size" not in d and _stored_batch_dependent(d["row"]):
                    # Written before IEC rows recorded their batch size: taken to be
                    # today's (accepted as before; rewritten with it).
                    d["batch_size"] = int(self.config.batch_size)
            m = d.get("model")
            if isinstance(m, dict) and "source" in m and "fingerprint" not in m:
                if self._legacy_model_matches(m):
                    d["model"] = dict(self.model_key)
            return d

        return walk(json.loads(json.dumps(stored)))

    def _legacy_model_matches(self, m: dict) -> bool:
        c = self.config.model
        if m.get("name") != c.name or m.get("dtype", "float32") != c.dtype:
            return False
        src = str(m["source"])
        if src not in self._legacy_sources:
            same = os.path.abspath(os.path.expanduser(src)) == os.path.abspath(
                os.path.expanduser(c.source))
            if not same:
                try:
                    same = model_fingerprint(*load_unet(src)) == self.model_key["fingerprint"]
                except (OSError, ValueError):
                    same = False
            self._legacy_sources[src] = same
        return self._legacy_sources[src]


# RowSpec fields that label a row without changing its samples (left out of comparisons).
ROW_LABELS = ("baseline", "paper_fid", "paper_gain")


def _check_row_dir(rowdir: str, meta: dict, normalize) -> None:
    """Refuses a row directory written for other settings (compared after ``normalize``:
    labels and the checkpoint's location do not count) once anything was computed in it;
    brings its row.json up to date when only those differ, or when it holds nothing but
    its row.json."""
    import json

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
            # Nothing was computed under the old settings (e.g. the row failed while its
            # model was built): the new settings replace them.
            print(f"{rowdir}: row.json written for other settings ({diff}) but nothing"
                  " computed under them; replaced", flush=True)
        if old != meta:
            write_json(path, meta)
    else:
        write_json(path, meta)


def _read_cached(path: str, key: dict, normalize=None):
    """The value kept in ``path`` for ``key`` (None when absent or kept for another key;
    keys compared after ``normalize`` where given)."""
    import json

    norm = normalize or (lambda k: json.loads(json.dumps(k)))
    if os.path.exists(path):
        d = json.loads(Path(path).read_text())
        if "key" in d and norm(d["key"]) == norm(key):
            return d["value"]
    return None


def _metrics_key(config, reference_num: int) -> dict:
    """What a row's metrics (and FID∞) depend on besides its samples: the evaluation
    settings, less the Inception batch size (how the features are batched, not what they
    are: the CPU and a GPU each run faster at their own), and the reference set's size."""
    ev = {k: v for k, v in config.eval.to_dict().items() if k != "inception_batch_size"}
    return dict(eval=ev, reference_num=int(reference_num), num_samples=int(config.num_samples))


def _metrics_normalize(key: dict) -> dict:
    """A stored metrics key in :func:`_metrics_key`'s form (those written by earlier
    versions held the Inception batch size)."""
    import json

    key = json.loads(json.dumps(key))
    if isinstance(key.get("eval"), dict):
        key["eval"].pop("inception_batch_size", None)
    return key


def _cached(path: str, key: dict, compute, normalize=None):
    """``compute()``'s value, kept in ``path`` with ``key`` (recomputed when the key
    differs; a None value is not kept): a row's metrics against the reference split, its
    distances to the FP row, the passes' FLOPs."""
    import json

    value = _read_cached(path, key, normalize)
    if value is None:
        value = compute()
        if value is not None:
            write_json(path, dict(key=json.loads(json.dumps(key)), value=value))
    return value


def _flops(unet_config, params, shape, cache_point, dtype: str) -> dict[str, float]:
    """FLOPs of one float full pass and one partial (cached) pass for one sample."""
    from iec_jax.models import UNet, cached_feature_shape
    from iec_jax.run.common import DTYPES

    net = UNet(unet_config, dtype=DTYPES[dtype])
    x = jax.ShapeDtypeStruct((1,) + tuple(shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    f = jax.ShapeDtypeStruct(cached_feature_shape(unet_config, cache_point, (1,) + tuple(shape)),
                             jnp.float32)

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

    full = cost(lambda p, x, t: net.apply({"params": p}, x, t), x, t)
    partial = cost(lambda p, x, t, f: net.apply({"params": p}, x, t, cache_point=cache_point,
                                                cached_feature=f), x, t, f)
    return dict(full=full, partial=partial)


def _trajectory(table: Table, row: RowSpec, factory, fparams, n: int) -> np.ndarray:
    """The row's float trajectory (S, n, ...) of samples 0..n-1 (same x_T as the shards)."""
    base = jax.random.key(int(table.config.seed))
    ts = table.timesteps(row)

    def run(p):
        keys = pipeline.per_sample_keys(base, jnp.arange(n, dtype=jnp.uint32))
        x_T, skeys = pipeline.initial_noise(keys, table.shape)
        _, info = iec_jax.sample(factory(p), x_T, skeys, schedule=table.schedule, timesteps=ts,
                                 eta=table.config.sampler.eta, iec=row.iec_config(),
                                 return_trajectory=True)
        return info["trajectory"]

    return np.asarray(jax.jit(run)(fparams))


def _float_shards(directory, config) -> pipeline.SampleShards:
    return pipeline.SampleShards(directory, config.num_samples, config.shard_size, np.float32)


def _record_run(rowdir: str, config, started: float) -> None:
    """Appends the run's whole config to the row's ``row_config.json``."""
    import json

    path = os.path.join(rowdir, "row_config.json")
    runs = json.loads(Path(path).read_text())["runs"] if os.path.exists(path) else []
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
    write_json(path, dict(runs=runs + [dict(started=stamp, config=config.to_dict())]))


def _run_row(table: Table, row: RowSpec, rowdir: str, started: float) -> dict:
    config = table.config
    _check_row_dir(rowdir, table.row_meta(row), table.normalize)
    _record_run(rowdir, config, started)
    t0 = time.time()
    factory, fparams = table.denoiser(row)
    _say(f"{row.name}: model built (calibrated where its artifacts were missing)", t0)
    batch_fn = pipeline.make_batch_sampler(
        factory, params=fparams, schedule=table.schedule, timesteps=table.timesteps(row),
        shape=table.shape, seed=int(config.seed), eta=config.sampler.eta, iec=row.iec_config())
    shards = _float_shards(os.path.join(rowdir, "samples"), config)
    progress = _Progress(os.path.join(rowdir, "progress.json"))
    first_call = True  # its batch includes the compilation: not timed when others are
    t0 = time.time()
    todo = shards.missing()
    for k in todo:
        infos: list[dict] = []
        stamps = [time.time()]
        idx = shards.indices(k)

        def on_batch(info):
            infos.append(jax.device_get(info))
            stamps.append(time.time())

        pipeline.generate(batch_fn, shards, config.batch_size, only=[k], on_batch=on_batch,
                          postprocess=lambda x: np.asarray(x, np.float32))
        bs = config.batch_size
        counts = [min(bs, len(idx) - s) for s in range(0, len(idx), bs)]
        progress.add(np.diff(stamps), infos, counts, first_call=first_call)
        first_call = False
    if todo:
        _say(f"{row.name}: {len(todo)} shard(s) sampled", t0)

    traj_path = os.path.join(rowdir, "trajectory.npz")
    if config.trajectory_samples and not os.path.exists(traj_path):
        t0 = time.time()
        traj = _trajectory(table, row, factory, fparams, int(config.trajectory_samples))
        write_npz(traj_path, trajectory=traj, timesteps=table.timesteps(row))
        _say(f"{row.name}: trajectory of {config.trajectory_samples} samples", t0)

    features = FeatureShards(os.path.join(rowdir, "features"), shards)
    t0 = time.time()
    todo = features.missing()
    for k in tqdm(todo, desc=f"features {row.name}", unit="shard"):
        features.compute(k, config.eval.crop, config.eval.inception_batch_size)
    if todo:
        _say(f"{row.name}: features of {len(todo)} shard(s)", t0)
    feats = features.load()
    return dict(features=feats, progress=progress)


def _say(msg: str, since: float) -> None:
    """A timestamped log line with the seconds since ``since`` (where a row's time goes)."""
    print(f"  {time.strftime('%H:%M:%S')} {msg} ({time.time() - since:.1f} s)", flush=True)


def _complete_features(rowdir: str, config) -> Optional[dict]:
    """The row's features when all are on disk (None otherwise: e.g. a table assembled
    from the small files of a row computed elsewhere)."""
    shards = _float_shards(os.path.join(rowdir, "samples"), config)
    feats = FeatureShards(os.path.join(rowdir, "features"), shards)
    return None if feats.missing() else feats.load()


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
    0 — the percentile interval of the resampled *ratio* then misses its own point
    estimate (+9.1% [+6.6, +8.1] on the quick Table 2; a test shows the same on synthetic
    features). The denominator is held at its full-sample value."""
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


def _fid_infinity_points(config) -> int:
    """``config.fid_infinity`` (0: off), checked before anything is sampled."""
    from iec_jax.metrics.inception import POOL_DIM

    n = int(config.get("fid_infinity") or 0)
    if n and n < 3:
        raise ValueError(f"fid_infinity must be 0 (off) or >= 3 subset sizes, got {n}")
    if n and int(config.num_samples) // 4 <= POOL_DIM:
        raise ValueError(
            f"fid_infinity fits subsets of N/4 to N samples, which must exceed the {POOL_DIM}"
            f" Inception features (below that FID is not linear in 1/N): needs num_samples >"
            f" {4 * POOL_DIM}, got {config.num_samples}")
    return n


def _fid_infinity(pool: np.ndarray, refstats: dict, points: int) -> dict:
    from iec_jax import metrics

    fit = metrics.fid_infinity(pool, metrics.FeatureStats.from_arrays(refstats),
                               num_points=points)
    return dataclasses.asdict(fit)


def _row_fid_infinity(rowdir: str, feats: Optional[dict], config, refstats: dict,
                      points: int) -> Optional[dict]:
    """The row's FID∞ fit; its features are read only here, when no fit is cached (None
    without them: a row assembled from small files)."""
    if feats is None:
        feats = _complete_features(rowdir, config)
    return None if feats is None else _fid_infinity(feats["pool"], refstats, points)


def _l2_to(rowdir: str, refdir: str, config) -> Optional[float]:
    a = _float_shards(os.path.join(rowdir, "samples"), config)
    b = _float_shards(os.path.join(refdir, "samples"), config)
    if a.missing() or b.missing():
        return None
    return _mean_l2(a.load(), b.load())


def _mean_l2(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over paired samples of ‖a_i − b_i‖₂ (float64)."""
    d = a.astype(np.float64) - b.astype(np.float64)
    return float(np.sqrt((d.reshape(len(d), -1) ** 2).sum(1)).mean())


def _load_trajectory(path: str) -> np.ndarray:
    with np.load(path) as f:
        return f["trajectory"].astype(np.float64)


def _error_growth(rowdir: str, refdir: str) -> Optional[list]:
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


def _fmt(v, nd=2):
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


COLUMNS = ("row", "FID", "sFID", "precision", "recall", "L2 to FP", "NFE", "NFE full",
           "NFE partial", "GFLOPs", "s / 1k samples", "gain vs baseline", "paper FID",
           "paper gain")


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:+.1f}%"


def _write_outputs(workdir: str, config, results: list[dict], left_out=()) -> None:
    inf = bool(config.get("fid_infinity"))
    columns = COLUMNS + (("FID∞", "gain∞") if inf else ())
    lines = [f"# {config.name}", "",
             f"{config.num_samples} samples per row, DDIM-{config.sampler.num_steps}"
             f" ({config.sampler.spacing}), η = {config.sampler.eta}, seed {config.seed};"
             f" reference {config.eval.dataset}/{config.eval.split}; sampled on "
             + (", ".join(sorted({dv for r in results for dv in (
                 r.get("devices") or [r.get("device") or "an unrecorded machine"])}))
                or "–") + ".", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    buf = _io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns + ("gain 95% interval",))
    for r in results:
        cells = [r["row"], _fmt(r["fid"]), _fmt(r["sfid"]), _fmt(r["precision"], 3),
                 _fmt(r["recall"], 3), _fmt(r["l2_to_fp"], 3), _fmt(r["nfe"], 1),
                 _fmt(r["nfe_full"], 1), _fmt(r["nfe_partial"], 1), _fmt(r["gflops"], 2),
                 _fmt(r["seconds_per_1k"], 0),
                 "–" if r["gain"] is None else f"{100 * r['gain']:+.1f}%" + (
                     "" if not r.get("gain_ci95") else
                     f" [{100 * r['gain_ci95'][0]:+.1f}, {100 * r['gain_ci95'][1]:+.1f}]"),
                 r["paper_fid"] or "–",
                 f"{100 * r['paper_gain']:+.0f}%" if r["paper_gain"] else "–"]
        if inf:
            cells += [_fmt(r.get("fid_inf")), _pct(r.get("gain_inf"))]
        lines.append("| " + " | ".join(cells) + " |")
        w.writerow([r["row"]] + [r[k] for k in ("fid", "sfid", "precision", "recall",
                    "l2_to_fp", "nfe", "nfe_full", "nfe_partial", "gflops", "seconds_per_1k",
                    "gain", "paper_fid", "paper_gain")]
                   + ([r.get("fid_inf"), r.get("gain_inf")] if inf else []) + [r.get("gain_ci95")])
    lines += ["", "gain = (FID_baseline − FID_row) / FID_baseline; paper gain = the same for"
              " the paper's CIFAR-10 cells" + (
                  f"; [a, b] = 95% paired-bootstrap interval ({config.bootstrap} replicates) of"
                  " FID_baseline − FID_row, divided by FID_baseline"
                  if config.bootstrap else "") +
              ". L2 to FP: mean ‖x_0 − x_0^FP‖₂ over paired samples." + (
                  f" FID∞: FID extrapolated to infinitely many samples by a line in 1/N"
                  f" through the FIDs of {config.fid_infinity} nested random subsets of"
                  " N/4 to N samples (Chong & Forsyth, CVPR 2020), the reference statistics"
                  " fixed; gain∞: the gain computed with it." if inf else "")]
    if left_out:
        lines += ["", f"Not evaluated when the time budget of {config.time_budget_s:.0f} s"
                  f" was spent: {', '.join(left_out)}."]
    write_text(os.path.join(workdir, f"{config.table}.md"), "\n".join(lines) + "\n")
    write_text(os.path.join(workdir, f"{config.table}.csv"), buf.getvalue())
    write_json(os.path.join(workdir, f"{config.table}_result.json"),
               dict(name=config.name, rows=results, left_out=list(left_out)))


def _plots(workdir: str, config, results: list[dict], curves: dict[str, list],
           fits: Optional[dict[str, dict]] = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from iec_jax.io import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.5))
    shown = [r["row"] for r in results if r["row"] in curves and any(curves[r["row"]])]
    if shown:  # the FP row's own curve is zero
        for name in shown:
            d = curves[name]
            ax.semilogy(np.arange(1, len(d) + 1), d, label=name,
                        ls="--" if "IEC" in name else "-")
        ax.set_xlabel("sampling step")
        ax.set_ylabel("mean ‖x_t − x_t^FP‖₂")
        ax.set_title(f"{config.name}: error growth against the FP trajectory", fontsize=9)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        with atomic_path(os.path.join(workdir, f"{config.table}_error_growth.png")) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        if r["fid"] is None or r["nfe"] is None:
            continue
        ax.scatter(r["nfe"], r["fid"], marker="o" if "IEC" not in r["row"] else "^")
        ax.annotate(r["row"], (r["nfe"], r["fid"]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("NFE per sample (full + partial)")
    ax.set_ylabel("FID")
    ax.set_title(f"{config.name}: FID against NFE", fontsize=9)
    fig.tight_layout()
    with atomic_path(os.path.join(workdir, f"{config.table}_fid_vs_nfe.png")) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)

    shown = [r["row"] for r in results if r["row"] in (fits or {})]
    if shown:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in shown:
            f = fits[name]
            inv = 1.0 / np.asarray(f["sizes"], np.float64)
            line = ax.plot(inv, f["fids"], "o" if "IEC" not in name else "^", ms=3,
                           label=f"{name} (FID∞ {f['fid']:.2f})")[0]
            grid = np.linspace(0.0, inv.max(), 50)
            ax.plot(grid, f["fid"] + f["slope"] * grid, color=line.get_color(), lw=0.8,
                    ls="--" if "IEC" in name else "-")
        ax.set_xlim(left=0.0)
        ax.set_xlabel("1 / N (nested random subsets of the row's samples)")
        ax.set_ylabel("FID")
        ax.set_title(f"{config.name}: FID against 1/N, extrapolated to N = ∞", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        with atomic_path(os.path.join(workdir, f"{config.table}_fid_infinity.png")) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)


def run(config, workdir: str) -> list[dict]:
    """Run (or resume) every selected row, then write the table and the plots."""
    start = time.time()
    rows = _select_rows(config)
    all_rows = {r.name: r for r in (RowSpec.from_dict(d) for d in config.rows)}
    ref = all_rows.get(config.reference_row)
    if ref is None:
        raise ValueError(f"reference_row {config.reference_row!r} is not a row of this table")
    if ref.quant or ref.cache_interval or ref.iec != "none" or ref.num_steps:
        raise ValueError(f"reference_row {ref.name!r} must be the plain full-precision row")
    n_inf = _fid_infinity_points(config)
    os.makedirs(workdir, exist_ok=True)
    if not re.match(r"^[A-Za-z0-9_-]+$", config.table):
        raise ValueError(f"config.table must be a plain file stem, got {config.table!r}")
    write_json(os.path.join(workdir, f"{config.table}_config.json"), config.to_dict())
    table = Table(config, workdir)
    flops = _cached(os.path.join(workdir, "flops.json"),
                    dict(model=table.model_key, cache_point=list(config.cache_point),
                         count="lowered HLO"),
                    lambda: _flops(table.unet_config, table.params, table.shape,
                                   tuple(config.cache_point), config.model.dtype),
                    table.normalize)
    refstats = reference_features(config.eval.dataset, config.eval.split,
                                  data_dir=config.eval.data_dir,
                                  batch_size=config.eval.inception_batch_size)
    # The FP row first: the others are compared with it.
    order = sorted(rows, key=lambda r: r.name != ref.name)
    budget = config.get("time_budget_s")
    if budget is not None and budget < 0:
        raise ValueError(f"time_budget_s must be >= 0 (or None), got {budget}")
    out: dict[str, dict] = {}
    pools: dict[str, np.ndarray] = {}
    curves: dict[str, list] = {}
    fits: dict[str, dict] = {}
    left_out: list[str] = []
    metrics_key = _metrics_key(config, int(refstats["num"]))
    refdir = os.path.join(workdir, "rows", ref.slug)
    ref_key = dict(reference=table.row_meta(ref))  # what the distances to FP depend on
    for i, row in enumerate(order):
        rowdir = os.path.join(workdir, "rows", row.slug)
        metrics_path = os.path.join(rowdir, "metrics.json")
        m = _read_cached(metrics_path, metrics_key, _metrics_normalize)
        in_budget = budget is None or time.time() - start < budget
        if (m is not None and row.name == ref.name and in_budget
                and _float_shards(os.path.join(rowdir, "samples"), config).missing()):
            # Evaluated elsewhere (a snapshot), but the other rows' L2 and error growth
            # need the reference row's samples and trajectory: sample it again.
            m = None
        if m is not None:  # evaluated earlier (maybe elsewhere): its small files suffice
            print(f"[{i + 1}/{len(order)}] {row.name}: evaluated", flush=True)
            _check_row_dir(rowdir, table.row_meta(row), table.normalize)
            feats = _complete_features(rowdir, config) if config.bootstrap else None
            p = _Progress(os.path.join(rowdir, "progress.json"))
        elif not in_budget:
            print(f"[{i + 1}/{len(order)}] {row.name}: not evaluated (time budget"
                  f" {budget:.0f} s spent)", flush=True)
            left_out.append(row.name)
            continue
        else:
            print(f"[{i + 1}/{len(order)}] {row.name}", flush=True)
            res = _run_row(table, row, rowdir, start)
            t0 = time.time()
            m = _cached(metrics_path, metrics_key,
                        lambda: compute_metrics(res["features"], refstats,
                                                frechet_method=config.eval.frechet_method),
                        _metrics_normalize)
            _say(f"{row.name}: metrics", t0)
            feats, p = res["features"], res["progress"]
        if feats is not None and config.bootstrap:  # kept for the paired bootstrap only
            pools[row.name] = feats["pool"]
        l2 = _cached(os.path.join(rowdir, "l2.json"), ref_key,
                     lambda: _l2_to(rowdir, refdir, config), table.normalize)
        curve = _cached(os.path.join(rowdir, "error_growth.json"), ref_key,
                        lambda: _error_growth(rowdir, refdir), table.normalize)
        fit = None
        if n_inf:
            t0 = time.time()
            fit = _cached(os.path.join(rowdir, "fid_inf.json"), dict(metrics_key, points=n_inf),
                          lambda: _row_fid_infinity(rowdir, feats, config, refstats, n_inf),
                          _metrics_normalize)
            if fit is not None:
                fits[row.name] = fit
                _say(f"{row.name}: FID∞ {fit['fid']:.2f}", t0)
        if curve is not None:
            curves[row.name] = curve
        nfe_full, nfe_partial = p.per_sample("nfe_full"), p.per_sample("nfe_partial")
        gflops = (None if nfe_full is None else
                  (nfe_full * flops["full"] + nfe_partial * flops["partial"]) / 1e9)
        timed = p.data["timed_samples"]
        out[row.name] = dict(
            row=row.name, fid=m["fid"], sfid=m["sfid"], precision=m["precision"],
            recall=m["recall"],
            fid_inf=None if fit is None else fit["fid"], gain_inf=None,
            l2_to_fp=l2,
            nfe=p.per_sample("nfe"), nfe_full=nfe_full, nfe_partial=nfe_partial,
            corrections=p.per_sample("corrections"), gflops=gflops,
            seconds_per_1k=1000 * p.data["timed_seconds"] / timed if timed else None,
            baseline=row.baseline, gain=None, paper_fid=row.paper_fid,
            paper_gain=row.paper_gain, num_samples=int(config.num_samples),
            device=p.data.get("device"), devices=p.data.get("devices"),
        )
        print("  " + ", ".join(f"{k}={_fmt(v, 4)}" for k, v in out[row.name].items()
                               if k in ("fid", "sfid", "l2_to_fp", "nfe")), flush=True)
    for r in out.values():
        b = out.get(r["baseline"])
        r["gain_ci95"] = None
        if b is not None:
            r["gain"] = (b["fid"] - r["fid"]) / b["fid"]
            if r["fid_inf"] is not None and b["fid_inf"] is not None:
                r["gain_inf"] = (b["fid_inf"] - r["fid_inf"]) / b["fid_inf"]
            if (config.bootstrap and r["row"] in pools and b["row"] in pools
                    and pools[r["row"]].shape == pools[b["row"]].shape):
                r["gain_ci95"] = paired_bootstrap_gain(
                    pools[b["row"]], pools[r["row"]], refstats, replicates=config.bootstrap)
    results = [out[r.name] for r in rows if r.name in out]
    _write_outputs(workdir, config, results, left_out)
    _plots(workdir, config, results, curves, fits)
    md = os.path.join(workdir, f"{config.table}.md")
    print(f"table: {md} ({time.time() - start:.0f} s)")
    print(Path(md).read_text())
    return results


def calibrate(config, workdir: str) -> dict[str, str]:
    """Only the calibration of the selected rows (``experiments/calibrate.py``): FP
    trajectories, cache schedules (DPS), cache-DEC, activation tables and quant-DEC, each
    written once to ``<workdir>/artifacts/`` (resumable: present artifacts are loaded and
    checked, not recomputed; deterministic given ``calibration.seed``). Returns and writes
    (``artifacts/manifest.json``) each artifact's SHA-256."""
    from iec_jax.io import file_digest

    rows = _select_rows(config)
    table = Table(config, workdir)
    for row in rows:
        if row.quant or row.cache_interval:
            print(f"calibrating {row.name}", flush=True)
            table.denoiser(row)
    art = os.path.join(workdir, "artifacts")
    names = sorted(n for n in os.listdir(art) if n.endswith(".npz")) if os.path.isdir(art) else []
    digests = {n: file_digest(os.path.join(art, n), "sha256") for n in names}
    if names:
        write_json(os.path.join(art, "manifest.json"), digests)
    for n, d in digests.items():
        print(f"{d[:16]}  {n}")
    return digests


def interim(config, workdir: str) -> list[dict]:
    """A row's gain over its baseline from the shards both have sampled so far
    (``experiments/interim.py``): for a row that takes hours, a paired result before it
    ends (or when it cannot end in one sitting). Reads the shards of a (possibly running)
    ``experiments.reproduce`` work directory with the same config, computes the Inception
    features those shards lack (the same files the full run would write, so none of
    this is done twice) and reports, per selected row with a baseline, FID and sFID of
    both over the common samples, the relative gain with its paired-bootstrap interval
    (``config.bootstrap`` replicates, 50 when unset), the L2 between the two rows'
    samples and the row's NFE so far. Writes ``<table>_interim.{md,json}``.

    FID over n < N samples is biased upwards (FID ≈ FID∞ + c / n, c about the same for
    paired rows), which shrinks the magnitude of a relative gain; the interval covers
    the sampling noise of those n samples only."""
    rows = _select_rows(config)
    all_rows = {r.name: r for r in (RowSpec.from_dict(d) for d in config.rows)}
    pairs = [(r, all_rows[r.baseline]) for r in rows if r.baseline]
    if not pairs:
        raise ValueError("no selected row has a baseline: select one with --config.only"
                         f" (rows with a baseline: {[r.name for r in all_rows.values() if r.baseline]})")
    table = Table(config, workdir)
    refstats = reference_features(config.eval.dataset, config.eval.split,
                                  data_dir=config.eval.data_dir,
                                  batch_size=config.eval.inception_batch_size)
    replicates = int(config.bootstrap or 50)
    results = []
    for row, base in pairs:
        dirs = [os.path.join(workdir, "rows", r.slug) for r in (row, base)]
        for r, d in zip((row, base), dirs):
            if not os.path.exists(os.path.join(d, "row.json")):
                raise ValueError(f"{r.name!r} has not been started in {workdir} ({d})")
            _check_row_dir(d, table.row_meta(r), table.normalize)
        shards = [_float_shards(os.path.join(d, "samples"), config) for d in dirs]
        common = [k for k in range(shards[0].num_shards)
                  if all(s.is_complete(k) for s in shards)]
        if not common:
            raise ValueError(f"{row.name!r} and its baseline {base.name!r} have no sample"
                             " shard in common yet")
        t0 = time.time()
        feats = []
        for d, s in zip(dirs, shards):
            fs = FeatureShards(os.path.join(d, "features"), s)
            for k in sorted(set(fs.missing()) & set(common)):
                fs.compute(k, config.eval.crop, config.eval.inception_batch_size)
            feats.append(fs.load(only=common))
        _say(f"{row.name}: features of {len(common)} common shard(s)", t0)
        m_row, m_base = (frechet_distances(f, refstats, frechet_method=config.eval.frechet_method)
                         for f in feats)
        lo, hi = paired_bootstrap_gain(feats[1]["pool"], feats[0]["pool"], refstats,
                                       replicates=replicates)
        p = _Progress(os.path.join(dirs[0], "progress.json"))
        results.append(dict(
            row=row.name, baseline=base.name, shards=common,
            num_samples=int(sum(len(shards[0].indices(k)) for k in common)),
            of_samples=int(config.num_samples),
            fid=m_row["fid"], fid_baseline=m_base["fid"],
            sfid=m_row["sfid"], sfid_baseline=m_base["sfid"],
            gain=(m_base["fid"] - m_row["fid"]) / m_base["fid"], gain_ci95=[lo, hi],
            replicates=replicates,
            l2_to_baseline=_mean_l2(*(s.load(only=common) for s in shards)),
            nfe=p.per_sample("nfe"), paper_gain=row.paper_gain or None))
    lines = [f"# {config.name}: interim (shards sampled by both rows so far)", "",
             "| row | baseline | samples | FID | FID baseline | gain [95%] | sFID | sFID baseline"
             " | L2 to baseline | NFE | paper gain |", "|" + "---|" * 11]
    for r in results:
        lines.append(
            f"| {r['row']} | {r['baseline']} | {r['num_samples']:,} of {r['of_samples']:,}"
            f" | {r['fid']:.2f} | {r['fid_baseline']:.2f} | {_pct(r['gain'])}"
            f" [{100 * r['gain_ci95'][0]:+.1f}, {100 * r['gain_ci95'][1]:+.1f}]"
            f" | {r['sfid']:.2f} | {r['sfid_baseline']:.2f} | {r['l2_to_baseline']:.3f}"
            f" | {_fmt(r['nfe'], 1)} | {_pct(r['paper_gain'])} |")
    lines += ["", "Over the samples of the shards both rows have (paired seeds). FID over"
              " fewer samples is biased upwards in both rows alike, which shrinks the gain;"
              f" [a, b]: 95% paired-bootstrap interval ({replicates} replicates) of the FID"
              " difference over these samples, divided by the baseline's FID."]
    write_text(os.path.join(workdir, f"{config.table}_interim.md"), "\n".join(lines) + "\n")
    write_json(os.path.join(workdir, f"{config.table}_interim.json"), dict(rows=results))
    print("\n".join(lines))
    return results

