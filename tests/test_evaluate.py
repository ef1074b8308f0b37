"""The evaluation pipeline: end to end, and killed at random points then resumed."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from iec_jax.models.loading import resolve_source

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_MODEL = resolve_source("fmnist-ddpm")  # the bundled reference checkpoint


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    e = dict(os.environ, IEC_JAX_CACHE=str(tmp / "cache"), PYTHONPATH=str(ROOT),
             PYTHONUNBUFFERED="1")
    return tmp, e


def _cmd(workdir, tmp):
    return [sys.executable, "-m", "experiments.evaluate",
            "--config", "configs/fmnist/evaluate.py:smoke", "--workdir", str(workdir),
            f"--config.model.source={REFERENCE_MODEL}", f"--config.eval.data_dir={tmp / 'tfds'}",
            f"--config.results_table={tmp / 'results.md'}"]


def _outputs(workdir):
    files = {}
    for sub in ("samples", "features"):
        for p in sorted((workdir / sub).iterdir()):
            with np.load(p) as f:
                files[f"{sub}/{p.name}"] = {k: f[k] for k in f.files}
    return files


@pytest.fixture(scope="module")
def uninterrupted(env):
    tmp, e = env
    work = tmp / "uninterrupted"
    t0 = time.time()
    res = subprocess.run(_cmd(work, tmp), cwd=ROOT, env=e, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return work, time.time() - t0


def test_end_to_end(uninterrupted, env):
    work, _ = uninterrupted
    tmp, _ = env
    result = json.loads((work / "result.json").read_text())
    for key in ("fid", "sfid", "precision", "recall"):
        assert np.isfinite(result[key])
    assert result["num_samples"] == 12 and result["nfe_per_sample"] == 4
    assert result["reference"] == "fashion_mnist/test[:64] (64)"
    assert sorted(os.listdir(work / "samples")) == [f"samples_0000{k}.npz" for k in range(3)]
    table = (tmp / "results.md").read_text().splitlines()
    assert table[0].startswith("| name | model |") and table[-1].startswith("| smoke |")
    feats = _outputs(work)["features/features_00000.npz"]
    assert feats["pool"].shape == (4, 2048) and feats["spatial"].shape == (4, 2023)


def test_killed_runs_resume_to_identical_shards_and_fid(uninterrupted, env):
    work_ref, total = uninterrupted
    tmp, e = env
    work = tmp / "killed"
    rng = np.random.default_rng(0)
    # 1) Killed inside a shard write: the writer dies after writing half of the file.
    driver = textwrap.dedent(f"""
        import os, signal, sys
        import numpy as np
        from iec_jax import pipeline
        real = np.savez
        def dying_savez(f, **arrays):
            f.write(b"PK" + b"x" * 100)  # a partial zip
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        pipeline.np.savez = dying_savez
        sys.argv = {_cmd(work, tmp)[3:]!r}
        sys.argv.insert(0, "evaluate")
        import runpy
        runpy.run_module("experiments.evaluate", run_name="__main__")
    """)
    res = subprocess.run([sys.executable, "-c", driver], cwd=ROOT, env=e, capture_output=True,
                         text=True)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    leftovers = os.listdir(work / "samples")
    assert leftovers and all(n.startswith(".samples_") for n in leftovers)  # only a temp file
    # 2) Five kills at random moments of the whole run (SIGKILL, no clean-up).
    for delay in rng.uniform(0.3, 0.95, 5) * total:
        proc = subprocess.Popen(_cmd(work, tmp), cwd=ROOT, env=e, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    # 3) Resume to the end.
    res = subprocess.run(_cmd(work, tmp), cwd=ROOT, env=e, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _outputs(work_ref), _outputs(work)
    assert a.keys() == b.keys()
    for name in a:
        for key in a[name]:
            np.testing.assert_array_equal(a[name][key], b[name][key], err_msg=f"{name}:{key}")
    ra = json.loads((work_ref / "result.json").read_text())
    rb = json.loads((work / "result.json").read_text())
    for key in ("fid", "sfid", "precision", "recall"):
        assert ra[key] == rb[key], key
    assert not [n for n in os.listdir(work / "samples") if n.endswith(".tmp")]
