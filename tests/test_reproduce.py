"""The table job (experiments.reproduce) end to end on a tiny setting, its resumption,
and its validation of rows and run directories."""

import csv
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from configs.base import table_config, table_row
from configs.fmnist import table1, table2, table3, table5
from iec_jax.run import reproduce
from iec_jax.efficient import cache as cache_lib
from iec_jax.efficient.methods import nonuniform_center
from iec_jax.models.loading import resolve_source

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_MODEL = resolve_source("fmnist-ddpm")  # the bundled reference checkpoint


def _config():
    c = table_config(str(REFERENCE_MODEL), model_name="fmnist-ddpm")
    c.name, c.table = "tiny", "tiny"
    c.bootstrap = 5
    c.num_samples, c.batch_size, c.shard_size, c.trajectory_samples = 4, 2, 4, 2
    c.sampler.num_steps = 4
    c.calibration.update(dict(num_samples=4, batch_size=4, per_step_full=4, per_step_cached=2,
                              dps_samples=2))
    c.eval.update(dict(split="test[:64]", inception_batch_size=4, frechet_method="eigh"))
    c.rows = [
        table_row("FP"),
        table_row("CacheQuant W8A8 N=2", quant="W8A8", cache_interval=2, dec=True,
                  cache_schedule="dps"),
        table_row("CacheQuant W8A8 N=2 + IEC", quant="W8A8", cache_interval=2, dec=True,
                  cache_schedule="dps", iec="official_ddpm",
                  baseline="CacheQuant W8A8 N=2", paper_gain=0.21),
    ]
    return c


def _budget0():
    c = _config()
    c.time_budget_s = 0.0
    return c


def _json_copy(work, dest):
    """A copy of a run's small files (what a device snapshot holds: no samples or
    features)."""
    import shutil

    for p in work.rglob("*.json"):
        (dest / p.relative_to(work)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dest / p.relative_to(work))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("reproduce")
    results = reproduce.run(_config(), str(work))
    return work, results


def test_tiny_table_end_to_end(tiny_run):
    work, results = tiny_run
    assert [r["row"] for r in results] == [r["name"] for r in _config().rows]
    assert len(results) == 3
    by = {r["row"]: r for r in results}
    for r in results:
        assert np.isfinite(r["fid"]) and np.isfinite(r["l2_to_fp"])
    assert by["FP"]["l2_to_fp"] == 0.0
    assert by["CacheQuant W8A8 N=2"]["l2_to_fp"] > 0
    # NFE bookkeeping: 4 steps, 2 DPS groups -> 2 full passes and 2 partial ones; IEC adds
    # one full pass at each full step (unless the batch-global test stops it early).
    base, iec = by["CacheQuant W8A8 N=2"], by["CacheQuant W8A8 N=2 + IEC"]
    assert by["FP"]["nfe"] == 4 and by["FP"]["nfe_partial"] == 0
    assert base["nfe_full"] == 2 and base["nfe_partial"] == 2
    assert iec["nfe_partial"] == 2 and 2 < iec["nfe_full"] <= 4
    assert iec["gain"] == pytest.approx((base["fid"] - iec["fid"]) / base["fid"])
    lo, hi = iec["gain_ci95"]
    assert lo <= hi and np.isfinite([lo, hi]).all()
    assert iec["gflops"] > base["gflops"] > 0
    for name in ("tiny.md", "tiny.csv", "tiny_result.json", "tiny_error_growth.png",
                 "tiny_fid_vs_nfe.png", "tiny_config.json"):
        assert (work / name).stat().st_size > 0, name
    with open(work / "tiny.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    assert "| CacheQuant W8A8 N=2 + IEC |" in (work / "tiny.md").read_text()
    # Calibration artifacts are named by model, steps, interval, schedule and bits.
    names = sorted(os.listdir(work / "artifacts"))
    assert "fmnist-ddpm_S4_N2_dps_W8A8_dec.npz" in names, names
    assert "fmnist-ddpm_S4_N2_dps_dec.npz" in names, names


def test_samples_are_float_and_match_the_trajectories(tiny_run):
    work, _ = tiny_run
    for row in ("FP", "CacheQuant_W8A8_N_2_plus_IEC"):
        with np.load(work / "rows" / row / "samples" / "samples_00000.npz") as f:
            x0 = f["arr_0"]
        with np.load(work / "rows" / row / "trajectory.npz") as f:
            traj = f["trajectory"]
        assert x0.dtype == np.float32 and x0.shape == (4, 32, 32, 1)
        # The trajectory run uses the shards' seeds (sample i from (seed, i)): same x_0.
        assert traj.shape == (4, 2, 32, 32, 1)
        np.testing.assert_allclose(traj[-1], x0[:2], atol=1e-4)


def test_resume_does_no_work_and_refuses_other_settings(tiny_run):
    work, results = tiny_run
    progress = {p: p.read_text() for p in (work / "rows").glob("*/progress.json")}
    mtimes = {p: p.stat().st_mtime_ns for p in (work / "rows").rglob("*.npz")}
    again = reproduce.run(_config(), str(work))
    assert [r["fid"] for r in again] == [r["fid"] for r in results]
    assert {p: p.read_text() for p in progress} == progress
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    other = _config()
    other.seed = 7
    with pytest.raises(ValueError, match="other settings"):
        reproduce.run(other, str(work))


def test_row_dir_with_nothing_computed_takes_new_settings(tmp_path, capsys):
    """A row that failed before it computed anything (say, while its model was built)
    leaves only its row.json: a re-run with other settings replaces it (said so). Once
    anything was computed there, other settings are refused."""
    row = tmp_path / "rows" / "X"
    row.mkdir(parents=True)
    (row / "samples").mkdir()  # an empty folder is nothing computed
    (row / "row.json").write_text(json.dumps({"steps": 10}))
    reproduce.spec.check_row_dir(str(row), {"steps": 20})
    assert json.loads((row / "row.json").read_text()) == {"steps": 20}
    assert "nothing computed under them; replaced" in capsys.readouterr().out
    (row / "samples" / "samples_00000.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="other settings"):
        reproduce.spec.check_row_dir(str(row), {"steps": 30})
    assert json.loads((row / "row.json").read_text()) == {"steps": 20}


def test_calibration_is_one_deterministic_resumable_command(tiny_run, tmp_path):
    work, _ = tiny_run
    digests = reproduce.calibrate(_config(), str(tmp_path))
    stored = json.loads((tmp_path / "artifacts" / "manifest.json").read_text())
    assert digests == stored and len(digests) == 3  # schedule+DEC, A8 tables, W8A8 state
    # The same bytes as the artifacts the table run computed on its own.
    for name in digests:
        assert (tmp_path / "artifacts" / name).read_bytes() == (work / "artifacts" / name).read_bytes()
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "artifacts").glob("*.npz")}
    assert reproduce.calibrate(_config(), str(tmp_path)) == digests  # resumed: nothing redone
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_artifacts_are_keyed_by_model_content(tiny_run, tmp_path):
    """Calibration artifacts record the model's fingerprint: another checkpoint under the
    same model name is refused, and so is an artifact without a fingerprint."""
    import shutil

    from iec_jax.efficient import calibration as calib_lib

    work, _ = tiny_run
    art = tmp_path / "artifacts"
    shutil.copytree(work / "artifacts", art)
    c = _config()
    row = reproduce.RowSpec.from_dict(c.rows[1])
    table = reproduce.Table(reproduce.table_settings(c), str(tmp_path))
    quant_bytes = {p: p.read_bytes() for p in art.glob("*.npz")}
    table.denoiser(row)  # the same model: every artifact is reused
    assert {p: p.read_bytes() for p in quant_bytes} == quant_bytes
    table.methods.fingerprint = "0" * 64  # as if another checkpoint named fmnist-ddpm
    with pytest.raises(ValueError, match="another model|other settings"):
        table.denoiser(row)
    sides = sorted(art.glob("*.json"))
    caches = [p for p in art.glob("*.npz") if not p.with_suffix(".json").exists()]
    assert sides and caches
    for p in caches:  # a cache artifact without a fingerprint
        full, dec, meta = calib_lib.load_cache_artifacts(p, {})
        del meta["model_fingerprint"]
        calib_lib.save_cache_artifacts(p, full, dec, meta)
    table = reproduce.Table(reproduce.table_settings(c), str(tmp_path))
    with pytest.raises(ValueError, match="another model"):
        table.denoiser(row)


def test_only_selects_rows(tiny_run):
    work, _ = tiny_run
    c = _config()
    c.only = "FP, CacheQuant W8A8 N=2"
    assert [r["row"] for r in reproduce.run(c, str(work))] == ["FP", "CacheQuant W8A8 N=2"]
    c.only = "FP,nope"
    with pytest.raises(ValueError, match="unknown rows"):
        reproduce.run(c, str(work))


def test_rows_keep_the_configs_of_the_runs_that_made_them(tiny_run, tmp_path):
    """A later run in the same work directory rewrites ``tiny_config.json`` (here with
    another ``only``); each row's ``row_config.json`` keeps the config of every run that
    sampled or evaluated it, and is appended to only by such a run."""
    import shutil

    work, _ = tiny_run
    first = _config().to_dict()
    for row in ("FP", "CacheQuant_W8A8_N_2", "CacheQuant_W8A8_N_2_plus_IEC"):
        runs = json.loads((work / "rows" / row / "row_config.json").read_text())["runs"]
        assert runs[0]["config"] == json.loads(json.dumps(first)), row
    copy = tmp_path / "copy"
    shutil.copytree(work, copy)
    before = (copy / "rows" / "FP" / "row_config.json").read_text()
    c = _config()
    c.only = "FP,CacheQuant W8A8 N=2"  # both evaluated: read, not run again
    reproduce.run(c, str(copy))
    assert json.loads((copy / "tiny_config.json").read_text())["only"] == c.only
    assert (copy / "rows" / "FP" / "row_config.json").read_text() == before
    (copy / "rows" / "CacheQuant_W8A8_N_2" / "metrics.json").unlink()
    c.eval.inception_batch_size = 2
    reproduce.run(c, str(copy))  # evaluates that row again (from its samples)
    runs = json.loads((copy / "rows" / "CacheQuant_W8A8_N_2" / "row_config.json").read_text())["runs"]
    assert [r["config"].get("only") for r in runs] == [first.get("only"), c.only]
    assert runs[1]["config"]["eval"]["inception_batch_size"] == 2
    assert runs[0]["started"] <= runs[1]["started"]
    assert (copy / "rows" / "FP" / "row_config.json").read_text() == before


def test_time_budget_leaves_out_unfinished_rows(tiny_run, tmp_path):
    work, results = tiny_run
    c = _config()
    c.time_budget_s = 0.0  # assemble only: finished rows are read, nothing new is started
    c.rows = c.rows + [table_row("W4A8", quant="W4A8")]
    got = reproduce.run(c, str(work))
    assert [r["row"] for r in got] == [r["row"] for r in results]
    assert [r["fid"] for r in got] == [r["fid"] for r in results]
    assert not (work / "rows" / "W4A8").exists()
    md = (work / "tiny.md").read_text()
    assert "Not evaluated when the time budget of 0 s was spent: W4A8." in md
    assert json.loads((work / "tiny_result.json").read_text())["left_out"] == ["W4A8"]
    # In a fresh directory nothing is finished: every row is left out.
    empty = reproduce.run(c, str(tmp_path))
    assert empty == []
    c.time_budget_s = -1.0
    with pytest.raises(ValueError, match="time_budget_s"):
        reproduce.run(c, str(work))


def test_fid_infinity_columns(tiny_run, tmp_path, monkeypatch):
    """``config.fid_infinity``: refused before anything is written where the table has
    too few samples for the fit; otherwise each row's fit (here a stand-in: the fit itself
    is tested in test_metrics) is cached in ``fid_inf.json``, FID∞ and gain∞ join the
    table, the CSV and the result, a plot shows the fits, and a copy of the small files
    assembles the same columns without features."""
    import shutil

    work, results = tiny_run
    c = _config()
    c.fid_infinity = 15
    with pytest.raises(ValueError, match="needs num_samples > 8192"):
        reproduce.run(c, str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
    c.fid_infinity = 2
    with pytest.raises(ValueError, match=">= 3 subset sizes"):
        reproduce.run(c, str(tmp_path / "refused"))

    copy = tmp_path / "copy"
    shutil.copytree(work, copy)
    import dataclasses

    c.fid_infinity = 0
    c.bootstrap = 0  # the features are then read for the fits alone
    # Settings past the sample-count check (4 samples are far too few for a real fit).
    s = dataclasses.replace(reproduce.table_settings(c), fid_infinity=15)
    seen = []

    def fit(rowdir, feats, settings, refstats):
        feats = feats or reproduce.complete_features(rowdir, settings)
        seen.append(settings.fid_infinity)
        f = float(np.abs(feats["pool"]).mean())
        return dict(fid=f, slope=10.0, sizes=[2, 3, 4], fids=[f + 5, f + 10 / 3, f + 2.5])

    monkeypatch.setattr(reproduce, "row_fid_infinity", fit)
    got = {r["row"]: r for r in reproduce.run(s, str(copy))}
    assert seen == [15, 15, 15]
    base, row = got["CacheQuant W8A8 N=2"], got["CacheQuant W8A8 N=2 + IEC"]
    assert row["gain_inf"] == pytest.approx((base["fid_inf"] - row["fid_inf"]) / base["fid_inf"])
    assert base["gain_inf"] is None and got["FP"]["fid_inf"] > 0
    assert [got[r["row"]]["fid"] for r in results] == [r["fid"] for r in results]
    md = (copy / "tiny.md").read_text()
    assert "| FID∞ | gain∞ |" in md and f"{100 * row['gain_inf']:+.1f}%" in md
    assert "FID∞: FID extrapolated" in md
    header = (copy / "tiny.csv").read_text().splitlines()[0]
    assert header.endswith("paper gain,FID∞,gain∞,gain 95% interval")
    assert (copy / "tiny_fid_infinity.png").stat().st_size > 0
    cached = json.loads((copy / "rows" / "FP" / "fid_inf.json").read_text())
    assert cached["value"]["fid"] == got["FP"]["fid_inf"] and cached["key"]["points"] == 15

    snap = tmp_path / "snap"  # the small files alone: the cached fits, no features
    _json_copy(copy, snap)
    s = dataclasses.replace(s, time_budget_s=0.0)
    again = {r["row"]: r for r in reproduce.run(s, str(snap))}
    assert seen == [15, 15, 15]  # nothing refitted
    assert {k: r["gain_inf"] for k, r in again.items()} == {k: r["gain_inf"] for k, r in got.items()}
    reproduce.run(dataclasses.replace(s, fid_infinity=0), str(snap))  # off: plain columns
    assert "FID∞" not in (snap / "tiny.md").read_text()


def test_assembles_from_small_files_alone(tiny_run, tmp_path):
    """A copy of the rows' small files (what a time-limited GPU machine sends back: no
    samples, features or trajectories) assembles into the same table, L2 and error-growth
    plot included; a row with samples but no metrics is left out at budget 0, not
    evaluated."""
    import shutil

    work, results = tiny_run
    snap = tmp_path / "snap"
    _json_copy(work, snap)
    assert not list(snap.rglob("*.npz"))
    c = _budget0()
    got = reproduce.run(c, str(snap))
    for key in ("row", "fid", "sfid", "precision", "recall", "l2_to_fp", "nfe", "nfe_full",
                "gflops", "gain", "device"):
        assert [r[key] for r in got] == [r[key] for r in results], key
    # Where the rows were sampled, recorded per row, with the CPU's model (2-core
    # containers of one service differ from session to session), every machine a
    # resumed row ran on in `devices`.
    from iec_jax.io import host_cpu

    assert got[0]["device"] == f"{jax.device_count()} × cpu ({host_cpu()})"
    assert got[0]["devices"] == [got[0]["device"]]
    assert host_cpu() in (snap / "tiny.md").read_text()
    # The intervals come from the rows' gain_ci.json; another replicate count needs the
    # features, which the small files lack: no interval then.
    assert [r["gain_ci95"] for r in got] == [r["gain_ci95"] for r in results]
    assert any(r["gain_ci95"] is not None for r in got)
    assert (snap / "tiny_error_growth.png").stat().st_size > 0
    c6 = _budget0()
    c6.bootstrap = 6
    assert all(r["gain_ci95"] is None for r in reproduce.run(c6, str(snap)))
    # Samples present but metrics not: left out when the budget is spent.
    (snap / "rows" / "FP" / "metrics.json").unlink()
    shutil.copytree(work / "rows" / "FP" / "samples", snap / "rows" / "FP" / "samples")
    got = reproduce.run(c, str(snap))
    assert [r["row"] for r in got] == [r["row"] for r in results[1:]]
    assert json.loads((snap / "tiny_result.json").read_text())["left_out"] == ["FP"]


def _interim_config():
    c = _config()
    c.only = "CacheQuant W8A8 N=2 + IEC"
    return c


def test_interim_over_every_shard_is_the_table(tiny_run, tmp_path):
    """experiments.interim over a finished row: its FIDs, gain and bootstrap interval
    are the table's (the same features, the same replicates); the L2 is between the row
    and its baseline."""
    import shutil

    work, results = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(work, copy)
    (got,) = reproduce.interim(_interim_config(), str(copy))
    by = {r["row"]: r for r in results}
    row, base = by["CacheQuant W8A8 N=2 + IEC"], by["CacheQuant W8A8 N=2"]
    assert got["shards"] == [0] and got["num_samples"] == got["of_samples"] == 4
    assert got["fid"] == row["fid"] and got["fid_baseline"] == base["fid"]
    assert got["sfid"] == row["sfid"] and got["sfid_baseline"] == base["sfid"]
    assert got["gain"] == row["gain"]
    assert tuple(got["gain_ci95"]) == tuple(row["gain_ci95"])  # bootstrap = 5 in both
    assert got["nfe"] == row["nfe"]
    a, b = (np.load(copy / "rows" / d / "samples" / "samples_00000.npz")["arr_0"]
            .astype(np.float64) for d in ("CacheQuant_W8A8_N_2_plus_IEC", "CacheQuant_W8A8_N_2"))
    assert got["l2_to_baseline"] == pytest.approx(
        np.sqrt(((a - b) ** 2).reshape(4, -1).sum(1)).mean(), rel=1e-12)
    assert got["l2_to_baseline"] > 0
    assert "| CacheQuant W8A8 N=2 + IEC | CacheQuant W8A8 N=2 | 4 of 4 |" in (
        copy / "tiny_interim.md").read_text()
    assert json.loads((copy / "tiny_interim.json").read_text())["rows"][0]["fid"] == got["fid"]
    with pytest.raises(ValueError, match="no selected row has a baseline"):
        c = _config()
        c.only = "FP"
        reproduce.interim(c, str(copy))


def test_interim_uses_the_shards_both_rows_have(tiny_run, tmp_path):
    """A row half-way through: only the shards sampled by both it and its baseline count;
    the features they lack are computed (the files the full run would write); no common
    shard, or a row not started, is refused."""
    from iec_jax import metrics

    work, _ = tiny_run
    copy = tmp_path / "copy"
    names = ("CacheQuant_W8A8_N_2_plus_IEC", "CacheQuant_W8A8_N_2")
    c = _interim_config()
    c.shard_size = 2  # the tiny run's 4 samples in two shards of 2
    full = {}
    for name in names:
        src, dst = work / "rows" / name, copy / "rows" / name
        (dst / "samples").mkdir(parents=True)
        (dst / "features").mkdir()
        meta = json.loads((src / "row.json").read_text())
        meta["shard_size"] = 2
        (dst / "row.json").write_text(json.dumps(meta))
        with np.load(src / "samples" / "samples_00000.npz") as f:
            x = f["arr_0"]
        with np.load(src / "features" / "features_00000.npz") as f:
            full[name] = {n: f[n] for n in f.files if n != "indices"}
        for k in (0, 1):
            idx = np.arange(2 * k, 2 * k + 2)
            np.savez(dst / "samples" / f"samples_{k:05d}.npz", arr_0=x[idx], indices=idx)
            if name == names[1]:  # the baseline's features are there; the row's are not
                np.savez(dst / "features" / f"features_{k:05d}.npz", indices=idx,
                         **{n: v[idx] for n, v in full[name].items()})
    (copy / "rows" / names[0] / "samples" / "samples_00001.npz").unlink()  # still sampling
    (got,) = reproduce.interim(c, str(copy))
    assert got["shards"] == [0] and got["num_samples"] == 2 and got["of_samples"] == 4
    # The row's shard-0 features were computed, and equal the full run's (batch 2 vs 4).
    assert not (copy / "rows" / names[0] / "features" / "features_00001.npz").exists()
    with np.load(copy / "rows" / names[0] / "features" / "features_00000.npz") as f:
        np.testing.assert_allclose(f["pool"], full[names[0]]["pool"][:2], rtol=1e-4, atol=1e-4)
    from iec_jax.metrics.reference import reference_features

    ref = reference_features(c.eval.dataset, c.eval.split, data_dir=c.eval.data_dir,
                             batch_size=c.eval.inception_batch_size)
    fid_base = metrics.FeatureStats.from_features(full[names[1]]["pool"][:2]).frechet_distance(
        metrics.FeatureStats.from_arrays(ref), method="eigh")
    assert got["fid_baseline"] == pytest.approx(fid_base, rel=1e-9)
    (copy / "rows" / names[0] / "samples" / "samples_00000.npz").unlink()
    with pytest.raises(ValueError, match="no sample shard in common"):
        reproduce.interim(c, str(copy))
    import shutil

    shutil.rmtree(copy / "rows" / names[0])
    with pytest.raises(ValueError, match="has not been started"):
        reproduce.interim(c, str(copy))


def test_seeded_workdir_resamples_the_reference_row_only(tiny_run, tmp_path):
    """A work directory seeded with another machine's small files (experiments.bundle
    merge): evaluated rows are read, the reference row is sampled again (the new rows'
    L2 needs its samples; its metrics stay cached), new rows are computed."""
    import shutil

    work, results = tiny_run
    seeded = tmp_path / "seeded"
    for row in ("FP", "CacheQuant_W8A8_N_2"):
        for p in (work / "rows" / row).glob("*.json"):
            (seeded / "rows" / row).mkdir(parents=True, exist_ok=True)
            shutil.copy(p, seeded / "rows" / row / p.name)
    shutil.copy(work / "flops.json", seeded / "flops.json")
    got = reproduce.run(_config(), str(seeded))
    assert [r["fid"] for r in got] == [r["fid"] for r in results]
    assert (seeded / "rows" / "FP" / "samples" / "samples_00000.npz").exists()
    assert not (seeded / "rows" / "CacheQuant_W8A8_N_2" / "samples").exists()
    assert got[2]["l2_to_fp"] == pytest.approx(results[2]["l2_to_fp"], rel=1e-6)


def test_rows_are_keyed_by_model_content_not_path(tiny_run, tmp_path):
    """row.json and the L2 / FLOPs caches name the model by its content fingerprint: the
    same checkpoint at another path (and a changed paper cell, a label) reuses the rows;
    a row.json of another model is refused."""
    work, results = tiny_run
    snap = tmp_path / "snap"
    _json_copy(work, snap)
    (tmp_path / "elsewhere").symlink_to(REFERENCE_MODEL, target_is_directory=True)
    c = _budget0()
    c.model.source = str(tmp_path / "elsewhere")
    c.rows[2]["paper_gain"] = 0.5
    got = reproduce.run(c, str(snap))
    assert [r["fid"] for r in got] == [r["fid"] for r in results]
    assert [r["l2_to_fp"] for r in got] == [r["l2_to_fp"] for r in results]
    row_json = snap / "rows" / "CacheQuant_W8A8_N_2_plus_IEC" / "row.json"
    assert json.loads(row_json.read_text())["row"]["paper_gain"] == 0.5  # brought up to date
    d = json.loads(row_json.read_text())
    d["model"]["fingerprint"] = "0" * 64  # another model
    row_json.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="other settings"):
        reproduce.run(c, str(snap))


def test_metrics_do_not_depend_on_the_inception_batch_size(tiny_run, tmp_path):
    """The Inception batch size is how features are batched (on the 2-core CPU 117 ms per
    image at 64 against 160 at a GPU's 500: experiments.bench_batch), not what they are:
    cached metrics and FID fits stay valid when it changes."""
    work, results = tiny_run
    snap = tmp_path / "snap"
    _json_copy(work, snap)
    c = _budget0()  # nothing may be recomputed: a key mismatch leaves rows out
    c.eval.inception_batch_size = 2
    got = reproduce.run(c, str(snap))
    for p in (snap / "rows").glob("*/metrics.json"):
        assert "inception_batch_size" not in json.loads(p.read_text())["key"]["eval"]
    assert [r["fid"] for r in got] == [r["fid"] for r in results]
    c.eval.frechet_method = "sqrtm"  # how the metrics are computed does count
    assert reproduce.run(c, str(snap)) == []


def test_iec_rows_are_keyed_by_batch_size(tiny_run, tmp_path):
    """IEC's batch-global stop test makes an IEC row's samples depend on the batch size:
    its row.json records it, and a resume with another batch size is refused rather than
    mixing shards; rows without IEC do not record it, and a row.json without it is
    refused for an IEC row."""
    work, results = tiny_run
    iec_json = work / "rows" / "CacheQuant_W8A8_N_2_plus_IEC" / "row.json"
    assert json.loads(iec_json.read_text())["batch_size"] == 2
    assert "batch_size" not in json.loads((work / "rows" / "FP" / "row.json").read_text())
    snap = tmp_path / "snap"
    _json_copy(work, snap)
    c = _budget0()
    c.batch_size = 4
    with pytest.raises(ValueError, match=r"other settings \(\['batch_size'\]\)"):
        reproduce.run(c, str(snap))
    snap_json = snap / "rows" / "CacheQuant_W8A8_N_2_plus_IEC" / "row.json"
    stored = json.loads(snap_json.read_text())
    del stored["batch_size"]
    snap_json.write_text(json.dumps(stored))
    with pytest.raises(ValueError, match=r"other settings \(\['batch_size'\]\)"):
        reproduce.run(_budget0(), str(snap))
    assert reproduce.spec.batch_dependent(reproduce.RowSpec.from_dict(_config().rows[2]))
    assert not reproduce.spec.batch_dependent(reproduce.RowSpec.from_dict(_config().rows[0]))


def test_model_fingerprint_is_content(tmp_path):
    import subprocess
    import sys

    from iec_jax.models.loading import load_unet, model_fingerprint

    # A diffusers folder and its converted checkpoint are the same model.
    subprocess.run([sys.executable, "-m", "experiments.convert", f"--src={REFERENCE_MODEL}",
                    f"--dst={tmp_path / 'converted'}"], check=True, cwd=ROOT,
                   capture_output=True)
    assert (tmp_path / "converted" / "checkpoint.json").exists()
    assert (model_fingerprint(*load_unet(str(tmp_path / "converted")))
            == model_fingerprint(*load_unet(str(REFERENCE_MODEL))))

    params = {"a": {"kernel": np.ones((2, 3), np.float32)}, "b": np.zeros(4, np.float32)}
    f = model_fingerprint({"ch": 8}, params)
    assert f == model_fingerprint({"ch": 8}, jax.tree.map(np.copy, params))
    bumped = jax.tree.map(np.copy, params)
    bumped["b"][1] = np.float32(1e-30)
    assert model_fingerprint({"ch": 8}, bumped) != f
    assert model_fingerprint({"ch": 16}, params) != f
    assert model_fingerprint({"ch": 8}, jax.tree.map(lambda x: x.astype(np.float16), params)) != f


@pytest.mark.parametrize("fields, match", [
    (dict(quant="W8"), "quant must look like"),
    (dict(dec=True), "needs a cache"),
    (dict(iec="fancy"), "iec must be"),
    (dict(iec_steps="head_tail", iec="official_ddpm"), "fraction"),
    (dict(fraction=0.1), "IEC options are set"),
    (dict(cache_schedule="random", cache_interval=2), "cache_schedule"),
])
def test_bad_rows_raise(fields, match):
    with pytest.raises(ValueError, match=match):
        reproduce.RowSpec.from_dict(table_row("x", **fields))


def test_table_configs_are_complete():
    for module in (table1, table2, table3, table5):
        for variant in (None, "quick", "gpu", "gpu10k", "smoke"):
            c = module.get_config(variant)
            rows = [reproduce.RowSpec.from_dict(r) for r in c.rows]
            names = [r.name for r in rows]
            assert "FP" in names and len(set(names)) == len(names)
            assert all(r.baseline in names for r in rows if r.baseline)
            assert any(r.iec != "none" for r in rows)
            # Every fixed cache schedule can be built at the variant's step count (the
            # non-uniform rule has no solution for some (S, N, center, pow): the smoke
            # table's 10 steps once failed in a CPU dry run of the GPU driver).
            for r in rows:
                if r.cache_interval and r.cache_schedule != "dps":
                    S = r.num_steps or int(c.sampler.num_steps)
                    cache_lib.make_schedule(r.cache_schedule, S, r.cache_interval,
                                            center=nonuniform_center(c.calibration, S),
                                            pow=c.calibration.nonuniform_pow)
        text = Path(module.__file__).read_text()
        assert "python -m experiments.reproduce --config configs/fmnist/" in text
    # The paper's cells are in the rows.
    paper = {r["name"]: r["paper_fid"] for r in table1.get_config().rows}
    assert paper["W8A8"] == "4.32" and paper["W8A8 + IEC"] == "3.76"
    gains = {r["name"]: r["paper_gain"] for r in table2.get_config().rows}
    assert gains["DeepCache N=10 + IEC"] == 0.20 and gains["DeepCache N=15 + IEC"] == 0.15


def test_config_variants_do_not_leak_into_each_other():
    """The smoke variant shrinks its rows in place; another config built afterwards in the
    same process keeps the paper's settings (the rows shared between tables are not
    edited)."""
    from configs.cifar10 import table as cifar_tables
    from configs.fmnist import table as fmnist_tables

    fmnist_tables.table_config("table2", "smoke")
    for module in (fmnist_tables, cifar_tables):
        rows = {r["name"]: r for r in module.table_config("table2", None).rows}
        assert rows["DeepCache N=10"]["cache_interval"] == 10
        assert rows["DeepCache N=15 + IEC"]["cache_interval"] == 15


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(0)
    ref_feats = rng.normal(size=(400, 2048))
    from iec_jax import metrics

    ref = metrics.FeatureStats.from_features(ref_feats).to_arrays()
    base = rng.normal(size=(200, 2048)) + 0.3
    better = base - 0.2  # closer to the reference mean
    lo, hi = reproduce.paired_bootstrap_gain(base, better, ref, replicates=20)
    assert 0 < lo <= hi < 1
    # The interval holds its own point estimate: resampling raises both rows' FIDs by about
    # the same amount (duplicated samples), which cancels in the difference but would pull
    # a ratio of resampled FIDs towards 0 (the former interval missed the point here).
    fb = metrics.FeatureStats.from_features(base).frechet_distance(
        metrics.FeatureStats.from_arrays(ref), method="eigh")
    fr = metrics.FeatureStats.from_features(better).frechet_distance(
        metrics.FeatureStats.from_arrays(ref), method="eigh")
    gain = (fb - fr) / fb
    lo, hi = reproduce.paired_bootstrap_gain(base, better, ref, replicates=40)
    assert lo < gain < hi
    with pytest.raises(ValueError, match="replicates"):
        reproduce.paired_bootstrap_gain(base, better, ref, replicates=1)
    lo, hi = reproduce.paired_bootstrap_gain(base, base, ref, replicates=5)
    assert lo == hi == 0


def test_main_job_config_and_embedded_model():
    """The README's main job: its rows, and the embedded model it runs on (shipped in the
    repository with its training record, small enough to keep there)."""
    from configs.fmnist import main
    from iec_jax.models import CachePoint, cache_point_from_deepcache_branch, load_checkpoint

    for variant in (None, "smoke"):
        c = main.get_config(variant)
        rows = [reproduce.RowSpec.from_dict(r) for r in c.rows]
        names = [r.name for r in rows]
        assert names[0] == "FP" and len(set(names)) == len(names)
        assert all(r.baseline in names for r in rows if r.baseline)
    with pytest.raises(ValueError, match="unknown config variant"):
        main.get_config("nope")
    model_dir = ROOT / main.EMBEDDED_MODEL
    size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    assert size <= 10e6
    unet_config, params = load_checkpoint(model_dir)
    # DeepCache's DDPM branch 2 on the embedded model's three levels.
    assert cache_point_from_deepcache_branch(2, unet_config) == CachePoint(*main.get_config().cache_point)
    record = json.loads((model_dir / "training.json").read_text())
    assert record["steps"] > 0 and record["num_params"] == sum(
        int(np.prod(p.shape)) for p in __import__("jax").tree_util.tree_leaves(params))
    assert "configs/fmnist/train.py:cpu" in record["command"]
    # At that cache point a partial pass fed the full pass's feature returns its ε.
    import jax
    import jax.numpy as jnp
    from iec_jax.models import UNet

    net, cp = UNet(unet_config), CachePoint(*main.get_config().cache_point)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
    t = jnp.array([500, 20], jnp.int32)
    eps, feature = net.apply({"params": params}, x, t, cache_point=cp, return_feature=True)
    partial = net.apply({"params": params}, x, t, cache_point=cp, cached_feature=feature)
    np.testing.assert_allclose(np.asarray(partial), np.asarray(eps), rtol=0, atol=1e-5)
    assert float(jnp.std(eps)) > 0.5  # a trained ε-predictor of unit-variance noise


def test_progress_keeps_every_machine_a_resumed_row_ran_on(tmp_path):
    """A row resumed on another machine: `device` is the latest, `devices` all of them in
    order (each once), and the counts accumulate."""
    from iec_jax.io import host_cpu

    path = tmp_path / "progress.json"
    path.write_text(json.dumps(dict(seconds=10.0, samples=2, nfe=8.0, device="1 × NVIDIA H200",
                                    devices=["1 × NVIDIA H200"])))
    info = dict(nfe=np.ones(4, int), full_pass=np.ones(4, bool), corrections=np.zeros((4, 2)))
    for _ in range(2):
        p = reproduce.Progress(str(path))
        p.add([1.0], [info], [2], first_call=True)
    here = f"{jax.device_count()} × cpu ({host_cpu()})"
    d = json.loads(path.read_text())
    assert d["device"] == here and d["devices"] == ["1 × NVIDIA H200", here]
    assert d["samples"] == 6 and d["seconds"] == 12.0
    assert d["nfe"] == 8.0 + 2 * 4 * 2
    assert host_cpu().strip()  # a name, never empty


@pytest.mark.slow
def test_ode_reference_does_not_depend_on_which_row_solves_it_first(tmp_path):
    """A row on a finer grid with the same end points (DDIM-6 beside DDIM-4) shares the
    ODE problem and its solution; run first, it must not leave its own grid's states as
    the reference trajectory: the DDIM-4 rows run after it still get their error-growth
    curve against the ODE, and it gets none."""
    c = _config()
    c.rows = [table_row("FP"), table_row("FP DDIM-6", num_steps=6, baseline="FP")]
    c.ode.samples, c.ode.rtol, c.ode.atol = 2, 1e-2, 1e-2
    c.bootstrap = 0
    s = reproduce.table_settings(c)
    table = reproduce.Table(s, str(tmp_path))
    ts = [table.timesteps(r) for r in s.rows]
    assert len(ts[0]) != len(ts[1]) and ts[0][0] == ts[1][0] and ts[0][-1] == ts[1][-1]
    c.only = "FP DDIM-6"
    fine = reproduce.run(c, str(tmp_path))[0]
    c.only = "FP"
    fp = reproduce.run(c, str(tmp_path))[0]
    assert len(list((tmp_path / "ode").iterdir())) == 1  # one problem, solved once
    assert np.isfinite(fine["l2_to_ode"]) and np.isfinite(fp["l2_to_ode"])
    curve = json.loads((tmp_path / "rows" / "FP" / "error_growth_ode.json").read_text())["value"]
    assert len(curve) == len(ts[0]) and all(np.isfinite(curve))
    assert not (tmp_path / "rows" / "FP_DDIM-6" / "error_growth_ode.json").exists()
