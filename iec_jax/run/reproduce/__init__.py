"""The paper's tables, row by row, with and without IEC (``experiments/reproduce.py``).

A table config (``configs/<dataset>/table{1,2,3,5}.py``) lists rows; each row is an
efficient model (float, PTQ, DeepCache, CacheQuant = cache + quantization + DEC), an IEC
setting and optionally a different number of sampling steps (the compute-matched
controls). The modules of this package, in the order data flows through them:

* :mod:`.spec` — rows, the validated :class:`TableSettings`, the keys of a row's files;
* :mod:`.sampling` — building a row's model and sampling its shards, trajectory, features;
* :mod:`.scores` — metrics key, FLOPs, bootstrap intervals, FID∞, L2 and error growth;
* :mod:`.output` — the table's markdown / CSV / JSON and plots;
* :mod:`.interim` — a running row's gain from the shards sampled so far.

For every row the job writes, under ``<workdir>/rows/<row>/``: ``row.json`` (what its
samples depend on; a directory of other settings is refused), the sample and feature
shards, ``progress.json``, ``row_config.json`` (the whole config of every run that
sampled or evaluated it), ``trajectory.npz``, and the small caches ``metrics.json``,
``l2.json``, ``error_growth.json``, ``gain_ci.json`` (the paired-bootstrap interval
against its baseline) and, with ``fid_infinity``, ``fid_inf.json``. A row
whose metrics are cached is assembled from these small files alone, so a table can be
assembled from rows computed on other machines (``experiments.bundle merge``).
For the whole table (``table``, e.g. ``table1``): ``table1.md``, ``.csv``,
``_result.json``, ``_config.json``, ``_error_growth.png``, ``_fid_vs_nfe.png`` (and
``_fid_infinity.png``). Tables may share one workdir: identical rows and calibration
artifacts (``<workdir>/artifacts/``) are then computed once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from iec_jax import distributed
from iec_jax.io import file_digest, write_json
from iec_jax.metrics.reference import compute_metrics
from iec_jax.run.reproduce import ode_ref
from iec_jax.run.reproduce.interim import interim
from iec_jax.run.reproduce.output import fmt, plots, write_outputs
from iec_jax.run.reproduce.sampling import (Progress, Table, complete_features, float_shards,
                                            run_row, say)
from iec_jax.run.reproduce.scores import (error_growth, flops, l2_to, metrics_key,
                                          paired_bootstrap_gain, row_fid_infinity)
from iec_jax.run.reproduce.spec import (RowSpec, TableSettings, cached, check_row_dir,
                                        parse_bits, read_cached, row_slug, table_settings)

__all__ = ["RowSpec", "TableSettings", "table_settings", "run", "calibrate", "interim",
           "parse_bits", "row_slug", "paired_bootstrap_gain"]


def _reference(s: TableSettings) -> dict:
    return s.eval.reference()


def _main_first(name: str, fn):
    """``fn()`` on process 0, then, after a barrier, on the others (``fn`` reads what
    process 0 wrote: a cached file, calibration artifacts)."""
    value = fn() if distributed.is_main() else None
    distributed.barrier(name)
    return value if distributed.is_main() else fn()


def _evaluate_row(s, table, row, rowdir, started, refstats, mkey, budget_left: bool):
    """``(metrics, features or None, Progress)`` of a row, sampling and evaluating it
    unless its metrics are cached (then without its features: what needs them reads
    them); None when it is not evaluated and out of time. In a multi-process run the
    other processes return ``(None, None, None)`` after sampling their shards: process 0
    evaluates."""
    m = read_cached(os.path.join(rowdir, "metrics.json"), mkey)
    if (m is not None and row.name == s.reference_row and budget_left
            and float_shards(rowdir, s).missing()):
        # Evaluated elsewhere (merged in), but the other rows' L2 and error growth need
        # the reference row's samples and trajectory: sample it again.
        m = None
    if m is not None:  # evaluated earlier (maybe elsewhere): its small files suffice
        check_row_dir(rowdir, table.row_meta(row))
        return m, None, Progress(os.path.join(rowdir, "progress.json"))
    if not budget_left:
        return None
    res = run_row(table, row, rowdir, started)
    if not distributed.is_main():
        return None, None, None
    t0 = time.time()
    m = cached(os.path.join(rowdir, "metrics.json"), mkey,
               lambda: compute_metrics(res["features"], refstats,
                                       frechet_method=s.eval.frechet_method))
    say(f"{row.name}: metrics", t0)
    return m, res["features"], res["progress"]


def run(config, workdir: str) -> list[dict]:
    """Run (or resume) every selected row, then write the table and the plots
    (``config``: a table config or its :class:`TableSettings`)."""
    s = table_settings(config)
    start = time.time()
    # The model first: a latent table's conditioning (class labels, prompts) is refused
    # there, before anything is written or compiled.
    table = Table(s, workdir)
    if distributed.is_main():
        os.makedirs(workdir, exist_ok=True)
        write_json(os.path.join(workdir, f"{s.table}_config.json"), dict(s.raw))
    key = dict(model=table.model_key, cache_point=list(s.cache_point), count="lowered HLO")
    if table.passes != 1:
        key["passes"] = table.passes
    fl = _main_first("flops", lambda: cached(
        os.path.join(workdir, "flops.json"), key,
        lambda: flops(table.unet_config, table.params, table.shape, s.cache_point,
                      table.model_key["dtype"], context_shape=table.context_shape,
                      passes=table.passes)))
    refstats = _main_first("reference", lambda: _reference(s))
    mkey = metrics_key(s, int(refstats["num"]))
    refdir = os.path.join(workdir, "rows", s.reference.slug)
    ref_key = dict(reference=table.row_meta(s.reference))  # what distances to FP depend on
    out: dict[str, dict] = {}
    pools: dict[str, np.ndarray] = {}
    curves: dict[str, list] = {}
    ode_curves: dict[str, list] = {}
    fits: dict[str, dict] = {}
    left_out: list[str] = []
    for i, row in enumerate(s.selected):
        rowdir = os.path.join(workdir, "rows", row.slug)
        distributed.barrier(f"row {row.slug}")  # process 0's files of the last row are written
        budget_left = distributed.broadcast_flag(
            s.time_budget_s is None or time.time() - start < s.time_budget_s)
        print(f"[{i + 1}/{len(s.selected)}] {row.name}", flush=True)
        got = _evaluate_row(s, table, row, rowdir, start, refstats, mkey, budget_left)
        if got is None:
            print(f"  not evaluated (time budget {s.time_budget_s:.0f} s spent)", flush=True)
            left_out.append(row.name)
            continue
        m, feats, p = got
        if m is None:  # another process of a multi-process run: process 0 evaluates
            continue
        if feats is not None and s.bootstrap:  # kept for the paired bootstrap
            pools[row.name] = feats["pool"]
        l2 = cached(os.path.join(rowdir, "l2.json"), ref_key, lambda: l2_to(rowdir, refdir, s))
        l2_ode = None
        if s.ode_samples:
            t0 = time.time()
            l2_ode, curve_ode = ode_ref.row_columns(table, row, rowdir)
            if curve_ode is not None:
                ode_curves[row.name] = curve_ode
            say(f"{row.name}: L2 to ODE {fmt(l2_ode, 3)}", t0)
        curve = cached(os.path.join(rowdir, "error_growth.json"), ref_key,
                       lambda: error_growth(rowdir, refdir))
        fit = None
        if s.fid_infinity:
            t0 = time.time()
            fit = cached(os.path.join(rowdir, "fid_inf.json"), dict(mkey, points=s.fid_infinity),
                         lambda: row_fid_infinity(rowdir, feats, s, refstats))
            if fit is not None:
                fits[row.name] = fit
                say(f"{row.name}: FID∞ {fit['fid']:.2f}", t0)
        if curve is not None:
            curves[row.name] = curve
        nfe_full, nfe_partial = p.per_sample("nfe_full"), p.per_sample("nfe_partial")
        gflops = (None if nfe_full is None else
                  (nfe_full * fl["full"] + nfe_partial * fl["partial"]) / 1e9)
        timed = p.data["timed_samples"]
        out[row.name] = dict(
            row=row.name, fid=m["fid"], sfid=m["sfid"], precision=m["precision"],
            recall=m["recall"], fid_inf=None if fit is None else fit["fid"], gain_inf=None,
            l2_to_fp=l2, l2_to_ode=l2_ode, nfe=p.per_sample("nfe"), nfe_full=nfe_full, nfe_partial=nfe_partial,
            corrections=p.per_sample("corrections"), gflops=gflops,
            seconds_per_1k=1000 * p.data["timed_seconds"] / timed if timed else None,
            baseline=row.baseline, gain=None, paper_fid=row.paper_fid,
            paper_gain=row.paper_gain, num_samples=s.num_samples,
            device=p.data.get("device"), devices=p.data.get("devices"))
        print("  " + ", ".join(f"{k}={fmt(v, 4)}" for k, v in out[row.name].items()
                               if k in ("fid", "sfid", "l2_to_fp", "nfe")), flush=True)
    specs = {row.name: row for row in s.rows}
    for r in out.values():
        b = out.get(r["baseline"])
        r["gain_ci95"] = None
        if b is not None:
            r["gain"] = (b["fid"] - r["fid"]) / b["fid"]
            if r["fid_inf"] is not None and b["fid_inf"] is not None:
                r["gain_inf"] = (b["fid_inf"] - r["fid_inf"]) / b["fid_inf"]
            if s.bootstrap:
                r["gain_ci95"] = _gain_interval(workdir, table, specs[r["row"]], specs[b["row"]], pools,
                                                refstats, mkey, s.bootstrap)
    distributed.barrier("rows done")
    if not distributed.is_main():
        return []
    results = [out[r.name] for r in s.rows if r.name in out]
    write_outputs(workdir, s, results, left_out)
    plots(workdir, s, results, curves, fits, {k: v for k, v in ode_curves.items() if v})
    md = os.path.join(workdir, f"{s.table}.md")
    print(f"table: {md} ({time.time() - start:.0f} s)")
    print(Path(md).read_text())
    return results


def _gain_interval(workdir: str, table: Table, row: RowSpec, base: RowSpec, pools: dict,
                   refstats: dict, mkey: dict, replicates: int):
    """The row's paired-bootstrap interval against its baseline, kept in the row's
    ``gain_ci.json`` (keyed by the metrics settings, the baseline's sample settings and the
    replicate count, so that assembling a table again, or from the small files alone,
    does not redo it); None where it is not cached and the features are not on disk.
    ``pools`` holds the features of the rows sampled in this run; the others' are read
    here, only where the interval is computed, and kept in ``pools`` for the next row."""
    def pool(spec: RowSpec):
        if spec.name not in pools:
            feats = complete_features(os.path.join(workdir, "rows", spec.slug), table.s)
            pools[spec.name] = None if feats is None else feats["pool"]
        return pools[spec.name]

    def compute():
        a, b = pool(base), pool(row)
        if a is None or b is None or a.shape != b.shape:
            return None
        return list(paired_bootstrap_gain(a, b, refstats, replicates=replicates))

    key = dict(mkey, baseline=table.row_meta(base), replicates=int(replicates))
    return cached(os.path.join(workdir, "rows", row.slug, "gain_ci.json"), key, compute)


def calibrate(config, workdir: str) -> dict[str, str]:
    """Only the calibration of the selected rows (``experiments/calibrate.py``): FP
    trajectories, cache schedules (DPS), cache-DEC, activation tables and quant-DEC, each
    written once to ``<workdir>/artifacts/`` (resumable; deterministic given
    ``calibration.seed``). Returns and writes (``artifacts/manifest.json``) each
    artifact's SHA-256."""
    s = table_settings(config)
    table = Table(s, workdir)
    for row in s.selected:
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
