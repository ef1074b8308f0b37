"""The experiment entry points run end to end on their smoke configurations."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from configs.oracle import propagation as propagation_config
from iec_jax.run import propagation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "models", "fmnist-ddpm")


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


def test_gpu_tables_workers_name_real_rows_and_snapshots_are_small(tmp_path):
    """The GPU driver's worker lists name rows of the gpu10k tables (a renamed row would
    only fail on the lent machine), cover Tables 1-3, and its snapshot keeps the small
    files only."""
    import tarfile

    from configs.fmnist import table as tables
    from experiments import gpu_tables

    covered = {}
    for jobs in gpu_tables.WORKERS:
        for table, only in jobs:
            names = [r["name"] for r in tables.table_config(table, "gpu10k").rows]
            chosen = gpu_tables._only(table, only, "gpu10k").split(",") if only else names
            assert set(chosen) <= set(names)
            covered.setdefault(table, set()).update(chosen)
    # One work directory: a row named in two tables is the same row (computed once), so
    # every row of Tables 1, 2, 3 and 5 must be some worker's.
    defs, everything = {}, set().union(*covered.values())
    for table in ("table1", "table2", "table3", "table5"):
        for r in tables.table_config(table, "gpu10k").rows:
            assert defs.setdefault(r["name"], dict(r)) == dict(r), r["name"]
            assert r["name"] in everything, (table, r["name"])
    with pytest.raises(ValueError, match="has no rows"):
        gpu_tables._only("table1", ["W8A8", "nope"], "gpu10k")

    work = tmp_path / "work"
    (work / "rows" / "FP" / "samples").mkdir(parents=True)
    for name in ("table1.md", "rows/FP/metrics.json", "rows/FP/progress.json",
                 "rows/FP/samples/samples_00000.npz", "logs/worker0.log"):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text("x")
    archive = gpu_tables.snapshot(str(work), tmp_path / "out")
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["work/logs/worker0.log", "work/rows/FP/metrics.json",
                                          "work/rows/FP/progress.json", "work/table1.md"]
    assert os.listdir(tmp_path / "out") == ["tables.tar.gz"]


def test_gpu_tables_jobs_pick_rows_of_the_variant():
    """``run --job``: one worker per flag, each row checked against the variant's table
    before a lease is spent; none given: the full ``WORKERS``. The ``gpu`` variant is the
    official count and batch (50,000 in batches of 500) with gpu10k's evaluation."""
    from configs.fmnist import table as tables
    from experiments import gpu_tables

    assert gpu_tables.parse_jobs([], "gpu") is gpu_tables.WORKERS
    jobs = gpu_tables.parse_jobs(["table2:FP", "table2:DeepCache N=10, DeepCache N=10 + IEC"],
                                 "gpu")
    assert jobs == ((("table2", ["FP"]),),
                    (("table2", ["DeepCache N=10", "DeepCache N=10 + IEC"]),))
    for bad, match in (("table2", "TABLE:ROW"), ("table2:", "TABLE:ROW"),
                       ("tableX:FP", "TABLE:ROW"), ("table2:FP,W8A8", "has no rows")):
        with pytest.raises(ValueError, match=match):
            gpu_tables.parse_jobs(["table1:FP", bad], "gpu")
    gpu, g10 = tables.table_config("table2", "gpu"), tables.table_config("table2", "gpu10k")
    assert (gpu.num_samples, gpu.batch_size, gpu.shard_size) == (50_000, 500, 5_000)
    assert gpu.eval == g10.eval and gpu.rows == g10.rows


def test_gpu_tables_snapshot_of_rows_computed_here(tmp_path):
    """``snapshot`` packs a work directory computed on this machine as a result directory
    that ``collect`` reads: evaluated rows only (a sampled, unevaluated row would be
    sampled again from the start by a seeded lease), and a machine.txt naming this CPU."""
    import json
    import tarfile

    from experiments import gpu_tables

    work = tmp_path / "gpu10k_cpu"
    files = {"table2_config.json": "{}", "table2.md": "x",
             "rows/DC15/row.json": "{}", "rows/DC15/metrics.json": "{}",
             "rows/DC15/progress.json": json.dumps({"samples": 10, "device": "2 × cpu"}),
             "rows/DC15/samples/samples_00000.npz": "x",
             "rows/DC15_IEC/row.json": "{}", "rows/DC15_IEC/progress.json": "{}"}
    for name, text in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(text)
    out = tmp_path / "docs" / "cpu"
    with pytest.raises(FileNotFoundError, match="no evaluated row"):
        gpu_tables.snapshot_here(str(work / "rows" / "DC15_IEC"), out)
    archive = gpu_tables.snapshot_here(str(work), out)
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == [
            "gpu10k_cpu/rows/DC15/metrics.json", "gpu10k_cpu/rows/DC15/progress.json",
            "gpu10k_cpu/rows/DC15/row.json", "gpu10k_cpu/table2.md",
            "gpu10k_cpu/table2_config.json"]
    machine = (out / "machine.txt").read_text().splitlines()
    assert "cores (CPU" in machine[1] and "DC15" in machine[2]
    # Chosen rows, by name: only those travel; an unevaluated or unknown one is refused
    # before anything is written.
    (work / "rows/DC15_IEC/metrics.json").write_text("{}")
    picked = tmp_path / "docs" / "picked"
    for bad in (["DC15 IEC", "DC15 K2"], ["DC1"]):
        with pytest.raises(FileNotFoundError, match="no evaluated row named"):
            gpu_tables.snapshot_here(str(work), picked, bad)
    assert not picked.exists()
    with tarfile.open(gpu_tables.snapshot_here(str(work), picked, ["DC15 IEC"])) as tar:
        assert sorted(n for n in tar.getnames() if "/rows/" in n) == [
            "gpu10k_cpu/rows/DC15_IEC/metrics.json", "gpu10k_cpu/rows/DC15_IEC/progress.json",
            "gpu10k_cpu/rows/DC15_IEC/row.json"]
    assert "DC15_IEC" in (picked / "machine.txt").read_text()
    (work / "rows/DC15_IEC/metrics.json").unlink()
    collected = tmp_path / "collected"
    gpu_tables.extract([out], collected)
    prog = json.loads((collected / "rows" / "DC15" / "progress.json").read_text())
    assert prog["device"] == "2 × cpu"
    assert not (collected / "rows" / "DC15_IEC").exists()


def test_gpu_tables_collect_extracts_and_records_the_machine(tmp_path):
    """collect unpacks each run's snapshot (later ones replace earlier files), names the
    GPU of machine.txt on rows whose progress.json predates the device field, and
    refuses archive members that would land outside the work directory."""
    import io
    import json
    import tarfile

    from experiments import gpu_tables

    def result(name, files, gpu):
        d = tmp_path / name
        d.mkdir()
        with tarfile.open(d / "tables.tar.gz", "w:gz") as tar:
            for arcname, text in files.items():
                data = text.encode()
                info = tarfile.TarInfo(arcname)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        (d / "machine.txt").write_text(f"name, memory.total [MiB]\n{gpu}, 143771 MiB\n")
        return d

    a = result("a", {"gpu10k/rows/FP/progress.json": '{"samples": 5}',
                     "gpu10k/rows/FP/metrics.json": "{}",
                     "gpu10k/rows/W8A8/metrics.json": "{}",
                     "gpu10k/rows/K2/progress.json": '{"samples": 3}',
                     "gpu10k/rows/W8A8/progress.json": '{"samples": 1, "device": "2 × cpu"}'},
               "NVIDIA H200")
    b = result("b", {"gpu10k/rows/FP/progress.json": '{"samples": 10}'}, "NVIDIA H100")
    work = tmp_path / "work"
    gpu_tables.collect([a, b], work)
    fp = json.loads((work / "rows" / "FP" / "progress.json").read_text())
    assert fp == {"samples": 10, "device": "1 × NVIDIA H100"}
    w8 = json.loads((work / "rows" / "W8A8" / "progress.json").read_text())
    assert w8["device"] == "2 × cpu"
    # Sampled there, never evaluated: its progress would count samples that are not here.
    assert not (work / "rows" / "K2" / "progress.json").exists()
    bad = result("bad", {"gpu10k/rows/X/row.json": "{}", "gpu10k/../../evil.json": "{}"},
                 "NVIDIA H200")
    with pytest.raises(ValueError, match="unexpected member"):
        gpu_tables.collect([bad], work)
    assert not (work / "rows" / "X").exists()  # nothing written from a refused archive


@pytest.mark.parametrize("folder, variant, min_rows", [("device", "gpu10k", 8),
                                                       ("device_gpu50k", "gpu", 7)])
def test_device_snapshots_still_seed_the_tables(tmp_path, folder, variant, min_rows):
    """The H200 snapshots kept in docs/device (gpu10k) and docs/device_gpu50k (gpu) seed
    the next lease's work directory (gpu_tables_device.sh's third argument): a seeded row
    whose row.json no longer matches what the current code would write would stop its
    worker on the GPU. So every seeded row must match today's row settings of its variant
    (model path as sampled there)."""
    import json
    import types

    from configs.fmnist import table as tables
    from experiments import gpu_tables
    from iec_jax.run import reproduce

    from pathlib import Path

    runs = sorted(p.parent for p in (Path(ROOT) / "docs" / folder).glob("*/tables.tar.gz"))
    assert runs, "no device snapshots"
    work = tmp_path / "seeded"
    gpu_tables.extract(runs, work)
    # The device's checkpoint is pack's copy of the shared one: same fingerprint.
    from iec_jax.run.common import load_unet, model_fingerprint

    fingerprint = model_fingerprint(*load_unet(SHARED))
    defs, fakes = {}, {}
    present = [t for t in ("table1", "table2", "table3", "table5")
               if (work / f"{t}_config.json").exists()]
    assert present
    for table in present:
        c = tables.table_config(table, variant)
        sampled = json.loads((work / f"{table}_config.json").read_text())
        assert sampled["num_samples"] == c.num_samples
        # As on the device: the checkpoint at the path the rows were sampled with.
        c.model.source = sampled["model"]["source"]
        # Table's own row_meta / normalize on the config alone (no checkpoint loaded).
        fake = types.SimpleNamespace(config=c, _legacy_sources={}, model_key=dict(
            name=c.model.name, dtype=c.model.dtype, fingerprint=fingerprint))
        fake.num_steps = lambda row, fake=fake: reproduce.Table.num_steps(fake, row)
        fake._legacy_model_matches = lambda m, fake=fake: reproduce.Table._legacy_model_matches(fake, m)
        for r in c.rows:
            row = reproduce.RowSpec.from_dict(r)
            defs[row.slug] = reproduce.Table.row_meta(fake, row)
            fakes[row.slug] = fake
    seeded = sorted(p.parent.name for p in (work / "rows").glob("*/row.json"))
    assert len(seeded) >= min_rows
    for slug in seeded:
        stored = json.loads((work / "rows" / slug / "row.json").read_text())
        fake = fakes[slug]
        if "source" in stored["model"]:
            # A row.json from before fingerprints names the checkpoint by path: as on the
            # device, the checkpoint is where that row was sampled — its own row.json's
            # path, not the table config's (that of the last snapshot extracted).
            fake.config.model.source = stored["model"]["source"]
        norm = lambda d, f=fake: reproduce.Table.normalize(f, d)  # noqa: E731
        assert norm(stored) == norm(defs[slug]), slug


def test_bench_batch_times_the_unet_and_refuses_bad_sizes(tmp_path):
    """experiments.bench_batch (which batch sizes to give a table job on a machine): one
    UNet setting end to end, its JSON; batch sizes it cannot run are refused."""
    import json

    import jax

    from experiments import bench_batch

    out = tmp_path / "bench.json"
    n = jax.device_count()
    bench_batch.main(["--model", SHARED, "--unet", str(n), "--inception", "", "--out", str(out)])
    got = json.loads(out.read_text())
    assert got["devices"] == n and got["inception_ms_per_image"] == {}
    from iec_jax.io import host_cpu

    assert got["cpu"] == host_cpu()  # which of the service's CPUs measured it
    assert float(got["unet_ms_per_sample"][str(n)]) > 0
    if n > 1:
        with pytest.raises(ValueError, match="not divisible"):
            bench_batch.unet_ms_per_sample(SHARED, [n + 1], 1)
    with pytest.raises(SystemExit):
        bench_batch.main(["--unet", "0"])
    with pytest.raises(SystemExit):
        bench_batch.main(["--inception", "64", "--images", "8"])
