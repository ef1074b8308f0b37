"""A running row's gain over its baseline from the shards both have sampled so far
(``experiments/interim.py``)."""

from __future__ import annotations

import os
import time

from iec_jax.io import write_json, write_text
from iec_jax.metrics.reference import FeatureShards, frechet_distances
from iec_jax.run.reproduce.output import fmt, pct
from iec_jax.run.reproduce.sampling import Progress, Table, float_shards, say
from iec_jax.run.reproduce.scores import mean_l2, paired_bootstrap_gain
from iec_jax.run.reproduce.spec import check_row_dir, table_settings

__all__ = ["interim"]


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
    s = table_settings(config)
    all_rows = {r.name: r for r in s.rows}
    pairs = [(r, all_rows[r.baseline]) for r in s.selected if r.baseline]
    if not pairs:
        raise ValueError("no selected row has a baseline: select one with --config.only"
                         f" (rows with a baseline: {[r.name for r in all_rows.values() if r.baseline]})")
    table = Table(s, workdir)
    refstats = s.eval.reference()
    replicates = int(s.bootstrap or 50)
    results = []
    for row, base in pairs:
        dirs = [os.path.join(workdir, "rows", r.slug) for r in (row, base)]
        for r, d in zip((row, base), dirs):
            if not os.path.exists(os.path.join(d, "row.json")):
                raise ValueError(f"{r.name!r} has not been started in {workdir} ({d})")
            check_row_dir(d, table.row_meta(r))
        shards = [float_shards(d, s) for d in dirs]
        common = [k for k in range(shards[0].num_shards)
                  if all(s.is_complete(k) for s in shards)]
        if not common:
            raise ValueError(f"{row.name!r} and its baseline {base.name!r} have no sample"
                             " shard in common yet")
        t0 = time.time()
        feats = []
        for d, sh in zip(dirs, shards):
            fs = FeatureShards(os.path.join(d, "features"), sh,
                               decode=table.decode if table.latent else None)
            for k in sorted(set(fs.missing()) & set(common)):
                fs.compute(k, s.eval.crop, s.eval.inception_batch_size)
            feats.append(fs.load(only=common))
        say(f"{row.name}: features of {len(common)} common shard(s)", t0)
        m_row, m_base = (frechet_distances(f, refstats, frechet_method=s.eval.frechet_method)
                         for f in feats)
        lo, hi = paired_bootstrap_gain(feats[1]["pool"], feats[0]["pool"], refstats,
                                       replicates=replicates)
        p = Progress(os.path.join(dirs[0], "progress.json"))
        results.append(dict(
            row=row.name, baseline=base.name, shards=common,
            num_samples=int(sum(len(shards[0].indices(k)) for k in common)),
            of_samples=s.num_samples,
            fid=m_row["fid"], fid_baseline=m_base["fid"],
            sfid=m_row["sfid"], sfid_baseline=m_base["sfid"],
            gain=(m_base["fid"] - m_row["fid"]) / m_base["fid"], gain_ci95=[lo, hi],
            replicates=replicates,
            l2_to_baseline=mean_l2(*(sh.load(only=common) for sh in shards)),
            nfe=p.per_sample("nfe"), paper_gain=row.paper_gain or None))
    lines = [f"# {s.name}: interim (shards sampled by both rows so far)", "",
             "| row | baseline | samples | FID | FID baseline | gain [95%] | sFID | sFID baseline"
             " | L2 to baseline | NFE | paper gain |", "|" + "---|" * 11]
    for r in results:
        lines.append(
            f"| {r['row']} | {r['baseline']} | {r['num_samples']:,} of {r['of_samples']:,}"
            f" | {r['fid']:.2f} | {r['fid_baseline']:.2f} | {pct(r['gain'])}"
            f" [{100 * r['gain_ci95'][0]:+.1f}, {100 * r['gain_ci95'][1]:+.1f}]"
            f" | {r['sfid']:.2f} | {r['sfid_baseline']:.2f} | {r['l2_to_baseline']:.3f}"
            f" | {fmt(r['nfe'], 1)} | {pct(r['paper_gain'])} |")
    lines += ["", "Over the samples of the shards both rows have (paired seeds). FID over"
              " fewer samples is biased upwards in both rows alike, which shrinks the gain;"
              f" [a, b]: 95% paired-bootstrap interval ({replicates} replicates) of the FID"
              " difference over these samples, divided by the baseline's FID."]
    write_text(os.path.join(workdir, f"{s.table}_interim.md"), "\n".join(lines) + "\n")
    write_json(os.path.join(workdir, f"{s.table}_interim.json"), dict(rows=results))
    print("\n".join(lines))
    return results

