"""The experiment entry points run end to end on their smoke configurations."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from configs.oracle import propagation as propagation_config
from iec_jax.run import propagation
from iec_jax.models.loading import resolve_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_MODEL = resolve_source("fmnist-ddpm")  # the bundled reference checkpoint


def test_propagation_study_smoke(tmp_path):
    config = propagation_config.get_config("smoke")
    out = propagation.run(config, str(tmp_path))
    for name in ("errors.csv", "summary.csv", "spectral.csv", "propagation.png", "config.json",
                 "summary.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["perturbation"] for r in rows] == ["scale:1.05", "bias:0.02", "quantize:0.05",
                                                 "stale_cache:10"]
    for r in rows:
        assert np.isfinite(float(r["delta0_eff"])) and float(r["delta0_eff"]) > 0
        assert int(r["nfe_ref"]) == 20
    # The stale cache refreshes at 2 of 20 steps; official_ddpm corrects only those.
    assert int(rows[-1]["nfe_eff_iec"]) == 22
    with open(tmp_path / "errors.csv") as f:
        assert sum(1 for _ in csv.DictReader(f)) == 4 * 4 * 21
    assert out["profile"]["propagation"].shape == (20, 8)


def test_propagation_rejects_bad_options():
    config = propagation_config.get_config("smoke")
    config.perturbations = ("jitter:1",)
    with pytest.raises(ValueError, match="perturbations entries look like 'kind:value'"):
        propagation.run(config, "/nonexistent")
    with pytest.raises(ValueError, match="unknown config variant"):
        propagation_config.get_config("huge")


def test_propagation_command_line_locks_the_config(tmp_path):
    """A misspelled override fails (lock_config=True); a valid one runs."""
    cmd = [sys.executable, "-m", "experiments.propagation",
           "--config", "configs/oracle/propagation.py:smoke", "--workdir", str(tmp_path)]
    bad = subprocess.run(cmd + ["--config.iec.tolerence=1e-3"], cwd=ROOT, capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "tolerence" in bad.stderr
    ok = subprocess.run(cmd + ["--config.iec.preset=paper", "--config.iec.num_corrections=2",
                               "--config.iec.steps=head_tail", "--config.iec.fraction=0.1"],
                        cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "eff+IEC" in ok.stdout and (tmp_path / "propagation.png").exists()
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    # ±1/10 of 20 steps = steps 0, 1, 18, 19, two corrections each.
    assert int(rows[0]["nfe_eff_iec"]) == 20 + 4 * 2


def _fake_workdir(root, rows=("FP",), unevaluated=("W8A8",)):
    """A table work directory with evaluated rows (small files and a sample shard),
    unevaluated ones (progress only), a table, a log and a calibration artifact."""
    for r in rows:
        for name in ("metrics.json", "progress.json", "row.json", "l2_ode.json",
                     "error_growth_ode.json", "samples/samples_00000.npz",
                     "features/features_00000.npz"):
            (root / "rows" / r / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "rows" / r / name).write_text(f"{r} {name}")
    for r in unevaluated:
        (root / "rows" / r).mkdir(parents=True)
        (root / "rows" / r / "progress.json").write_text("{}")
    (root / "artifacts").mkdir()
    (root / "artifacts" / "a.npz").write_text("big")
    (root / "table1.md").write_text("| table |")
    (root / "run.log").write_text("log")


def test_bundle_archive_keeps_the_small_files_of_evaluated_rows(tmp_path):
    """``archive``: evaluated rows' small files, tables and logs, a machine.txt; no
    samples, features, artifacts or unevaluated rows; unknown rows refused."""
    import tarfile

    from iec_jax.run import bundle

    work = tmp_path / "work"
    _fake_workdir(work, rows=("FP", "DeepCache_N_10"))
    out = bundle.archive(str(work), str(tmp_path / "out" / "rows.tar.gz"))
    with tarfile.open(out) as tar:
        names = sorted(tar.getnames())
        machine = tar.extractfile("machine.txt").read().decode()
    small = ["error_growth_ode.json", "l2_ode.json", "metrics.json", "progress.json", "row.json"]
    assert names == ["machine.txt", *[f"work/rows/DeepCache_N_10/{n}" for n in small],
                     *[f"work/rows/FP/{n}" for n in small], "work/run.log", "work/table1.md"]
    assert "python" in machine and "jax" in machine
    picked = bundle.archive(str(work), str(tmp_path / "fp.tar.gz"), ["FP"])
    with tarfile.open(picked) as tar:
        assert not [n for n in tar.getnames() if "DeepCache" in n]
    for rows, match in ((["W8A8"], "no evaluated row"), (["nope"], "no evaluated row")):
        with pytest.raises(ValueError, match=match):
            bundle.archive(str(work), str(tmp_path / "x.tar.gz"), rows)
    with pytest.raises(ValueError, match=".tar.gz"):
        bundle.archive(str(work), str(tmp_path / "x.zip"))
    assert not (tmp_path / "x.tar.gz").exists()


def test_bundle_merge_unpacks_archives_and_refuses_bad_ones(tmp_path):
    """``merge``: archives, folders holding one and work directories, later ones
    replacing earlier files; a bad member refuses the whole merge before any write."""
    import io
    import tarfile

    from iec_jax.run import bundle

    a, b = tmp_path / "a", tmp_path / "b"
    _fake_workdir(a, rows=("FP",))
    _fake_workdir(b, rows=("FP", "N5"), unevaluated=())
    (b / "rows" / "FP" / "metrics.json").write_text("newer")
    arch = tmp_path / "res"
    arch.mkdir()
    bundle.archive(str(a), str(arch / "rows.tar.gz"))
    work = tmp_path / "merged"
    assert bundle.merge([str(arch), str(b)], str(work)) == ["FP", "N5"]
    assert (work / "rows" / "FP" / "metrics.json").read_text() == "newer"
    assert not (work / "rows" / "FP" / "samples").exists()
    assert not (work / "machine.txt").exists()
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        for name in ("w/rows/X/metrics.json", "../evil"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match="unexpected member"):
        bundle.merge([str(arch), str(bad)], str(fresh))
    assert not fresh.exists()
    with pytest.raises(ValueError, match="neither"):
        bundle.merge([str(tmp_path / "missing")], str(fresh))


def test_bundle_command_refuses_bad_input(tmp_path):
    """The command line: one line on stderr, exit status 2, nothing written."""
    for args in (["merge", "--workdir", str(tmp_path / "w")], ["frobnicate"],
                 ["archive", "--workdir", str(tmp_path)], ["pack", "--out", str(tmp_path / "o"),
                                                          "--model", "no-such-model"]):
        done = subprocess.run([sys.executable, "-m", "experiments.bundle", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, (args, done.stderr[-2000:])
        assert done.stderr.strip().startswith("error: bundle"), done.stderr[-2000:]
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("folder, variant, min_rows", [("rows_10k", "gpu10k", 25),
                                                       ("rows_50k", "gpu", 7),
                                                       ("rows_10k_cpu_check", "gpu10k", 2)])
def test_evidence_rows_match_the_current_table_settings(tmp_path, folder, variant, min_rows):
    """Every row kept in docs/evidence/<folder> (unpacked as ``experiments.bundle merge``
    would) matches what today's code writes for that row of its table variant, so that
    ``experiments.reproduce --config.time_budget_s=0`` assembles the tables from them:
    a row.json of other settings would be refused."""
    import dataclasses
    import json
    from pathlib import Path

    from configs.fmnist import table as tables
    from iec_jax.models.loading import load_unet, model_fingerprint
    from iec_jax.run import bundle, reproduce
    from iec_jax.run.reproduce import spec

    runs = sorted(p.parent for p in (Path(ROOT) / "docs" / "evidence" / folder).glob("*/rows.tar.gz"))
    work = tmp_path / "merged"
    seen = {}
    key = dict(name="fmnist-ddpm", dtype="float32",
               fingerprint=model_fingerprint(*load_unet("fmnist-ddpm")))
    for run in runs:  # one at a time, as a later archive's copy of a row replaces an earlier one's
        shutil_rmtree(work)
        bundle.merge([str(run)], str(work))
        settings = {}
        for table in ("table1", "table2", "table3", "table5"):
            s = reproduce.table_settings(tables.table_config(table, variant))
            settings.update({row.slug: (s, row) for row in s.rows})
        for p in sorted((work / "rows").glob("*/row.json")):
            stored = json.loads(p.read_text())
            s, row = settings[p.parent.name]
            if "batch_size" in stored:  # the run's own batch (CPU runs used smaller ones)
                s = dataclasses.replace(s, batch_size=stored["batch_size"])
            want = spec.row_meta(s, key, row)
            assert ("batch_size" in stored) == ("batch_size" in want), (run, p)
            assert spec.normalize(stored) == spec.normalize(want), (run, p)
            assert (p.parent / "metrics.json").exists()
            seen[p.parent.name] = run
    assert len(seen) >= min_rows, sorted(seen)


def shutil_rmtree(path):
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def test_bench_batch_times_the_unet_and_refuses_bad_sizes(tmp_path):
    """experiments.bench_batch (which batch sizes to give a table job on a machine): one
    UNet setting end to end, its JSON; batch sizes it cannot run are refused."""
    import json

    import jax

    from experiments import bench_batch

    out = tmp_path / "bench.json"
    n = jax.device_count()
    bench_batch.main(["--model", str(REFERENCE_MODEL), "--unet", str(n), "--inception", "", "--out", str(out)])
    got = json.loads(out.read_text())
    assert got["devices"] == n and got["inception_ms_per_image"] == {}
    from iec_jax.io import host_cpu

    assert got["cpu"] == host_cpu()  # which of the service's CPUs measured it
    assert float(got["unet_ms_per_sample"][str(n)]) > 0
    if n > 1:
        with pytest.raises(ValueError, match="not divisible"):
            bench_batch.unet_ms_per_sample(str(REFERENCE_MODEL), [n + 1], 1)
    with pytest.raises(SystemExit):
        bench_batch.main(["--unet", "0"])
    with pytest.raises(SystemExit):
        bench_batch.main(["--inception", "64", "--images", "8"])


def test_plot_gains_draws_the_paper_cells_of_table_csvs(tmp_path):
    """experiments.plot_gains: the rows that carry a paper gain, with their intervals where
    the csv has them (the latent Table 3 evidence: the same numbers as its result json);
    bad tables refused with nothing written."""
    import json

    from iec_jax.run import gains

    evidence = os.path.join(ROOT, "docs", "evidence", "ldm_10k")
    result = {r["row"]: r for r in json.load(open(os.path.join(evidence, "table3_result.json")))["rows"]}
    cells = gains.paper_cells(os.path.join(evidence, "table3.csv"))
    assert [c["row"] for c in cells] == [r for r, v in result.items() if v["paper_gain"] and v["gain"] is not None]
    for c in cells:
        r = result[c["row"]]
        assert c["gain"] == pytest.approx(r["gain"]) and c["paper_gain"] == pytest.approx(r["paper_gain"])
        assert c["ci"] == pytest.approx(tuple(r["gain_ci95"]))
    header = "row,FID,gain vs baseline,paper FID,paper gain"
    old = tmp_path / "old.csv"  # no interval column: drawn without intervals
    old.write_text(f"{header}\nFP,4.0,,4.19,0.0\nA,3.0,,x,0.0\nB + IEC,3.1,0.05,,0.00\nA + IEC,2.7,0.1,,0.2\n")
    assert gains.paper_cells(str(old)) == [dict(row="A + IEC", gain=0.1, paper_gain=0.2, ci=None)]
    out = tmp_path / "figs" / "gains.png"
    rows = gains.plot_gains([("pixel", str(old)), ("latent", os.path.join(evidence, "table3.csv"))], str(out))
    assert [r["group"] for r in rows] == ["pixel"] + ["latent"] * len(cells)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = {"no-column.csv": "row,FID\nA,1\n",
           "bad-interval.csv": f"{header},gain 95% interval\nA + IEC,2.7,0.1,,0.2,(0.1\n",
           "nan.csv": f"{header}\nA + IEC,2.7,nan,,0.2\n",
           "no-cells.csv": f"{header}\nFP,4.0,,4.19,0.0\n"}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match="column|interval|finite|paper gain"):
            gains.plot_gains([("t", str(tmp_path / name))], str(tmp_path / f"{name}.png"))
    (tmp_path / "bad-paper.csv").write_text(f"{header}\nA + IEC,2.7,0.1,,+36%\n")
    with pytest.raises(ValueError, match=r"bad-paper.csv:2 \(A \+ IEC\): not a number: '\+36%'"):
        gains.plot_gains([("t", str(tmp_path / "bad-paper.csv"))], str(tmp_path / "bad-paper.png"))
    with pytest.raises(ValueError, match="png"):
        gains.plot_gains([("t", str(old))], str(tmp_path / "gains.pdf"))
    for args in (["--out", str(tmp_path / "x.png"), "no-label"],
                 ["--out", str(tmp_path / "x.png"), f"t={tmp_path / 'missing.csv'}"]):
        done = subprocess.run([sys.executable, "-m", "experiments.plot_gains", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and done.stderr.strip().startswith("error: plot_gains"), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [] and sorted(os.listdir(tmp_path / "figs")) == ["gains.png"]
