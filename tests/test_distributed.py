"""Multi-process runs through jax.distributed: two local CPU processes (coordinator on
localhost), killed mid-way and relaunched, resume without recomputing finished shards and
write exactly the samples, features and metrics of a one-process run; a table run by two
processes is the one-process table; processes
launched with different configs all stop at the start with nothing written."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/fmnist/evaluate.py:smoke"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _cmd(work, *extra, process=None, port=None, nproc=2):
    cmd = [sys.executable, "-m", "experiments.evaluate", f"--config={CONFIG}",
           f"--workdir={work}", "--config.num_samples=16", "--config.shard_size=4",
           f"--config.results_table={work}_results.md", *extra]
    if process is not None:
        cmd += ["--distributed", f"--coordinator_address=localhost:{port}",
                f"--num_processes={nproc}", f"--process_id={process}"]
    return cmd


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu")


def _launch(work, *extra, nproc=2):
    port = _port()
    return [subprocess.Popen(_cmd(work, *extra, process=p, port=port, nproc=nproc), cwd=ROOT,
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for p in range(nproc)]


def _wait(procs, timeout=900):
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


def _arrays(work, kind):
    out = {}
    for f in sorted((Path(work) / kind).glob("*.npz")):
        with np.load(f) as d:
            out[f.name] = {k: d[k] for k in d.files}
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    work = tmp_path_factory.mktemp("dist") / "single"
    done = subprocess.run(_cmd(work), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return work


def _same_as_single(work, single):
    for kind in ("samples", "features"):
        a, b = _arrays(work, kind), _arrays(single, kind)
        assert sorted(a) == sorted(b) and len(a) == 4, kind
        for name in a:
            for key in a[name]:
                assert np.array_equal(a[name][key], b[name][key]), (kind, name, key)
    ra = json.loads((Path(work) / "result.json").read_text())
    rb = json.loads((Path(single) / "result.json").read_text())
    for k in ("fid", "sfid", "precision", "recall"):
        assert ra[k] == rb[k], k
    assert ra["processes"] == 2 and rb["processes"] == 1


@pytest.mark.slow
def test_two_processes_killed_and_relaunched_write_what_one_process_writes(single, tmp_path):
    """Two processes, both killed once a shard is written, then relaunched: the finished
    shards are kept (not recomputed) and the samples, features and metrics equal the
    one-process run's bit for bit."""
    work = tmp_path / "killed"
    procs = _launch(work)
    shards = work / "samples"
    deadline = time.time() + 600
    while time.time() < deadline and len(list(shards.glob("samples_*.npz"))) < 1:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    _wait(procs)
    done = {f.name: f.stat().st_mtime_ns for f in shards.glob("samples_*.npz")}
    assert 1 <= len(done) < 4, sorted(done)
    results = _wait(_launch(work))
    for rc, out, err in results:
        assert rc == 0, err[-3000:]
    assert {n: (shards / n).stat().st_mtime_ns for n in done} == done  # not recomputed
    _same_as_single(work, single)


@pytest.mark.slow
def test_processes_with_different_configs_stop_at_the_start(tmp_path):
    work = tmp_path / "mismatch"
    port = _port()
    cmds = [_cmd(work, process=0, port=port), _cmd(work, "--config.seed=7", process=1, port=port)]
    procs = [subprocess.Popen(c, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in cmds]
    for rc, out, err in _wait(procs, timeout=300):
        assert rc == 2, err[-3000:]
        line = err.strip().splitlines()[-1]
        assert line.startswith("error: ") and "launched with different configs" in line, err[-2000:]
    assert not work.exists()


@pytest.mark.slow
def test_a_table_run_by_two_processes_is_the_one_process_table(tmp_path):
    """experiments.reproduce: the shards split between processes, process 0 evaluates;
    the table equals a one-process run's (its seconds column aside)."""
    flags = ["--config=configs/fmnist/table2.py:smoke", "--config.shard_size=4",
             "--config.only=FP"]
    one = tmp_path / "one"
    done = subprocess.run([sys.executable, "-m", "experiments.reproduce", f"--workdir={one}",
                           *flags], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    two = tmp_path / "two"
    port = _port()
    procs = [subprocess.Popen([sys.executable, "-m", "experiments.reproduce", f"--workdir={two}",
                               *flags, "--distributed", f"--coordinator_address=localhost:{port}",
                               "--num_processes=2", f"--process_id={p}"], cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for p in range(2)]
    for rc, out, err in _wait(procs):
        assert rc == 0, err[-3000:]
    a = json.loads((one / "table2_result.json").read_text())["rows"]
    b = json.loads((two / "table2_result.json").read_text())["rows"]
    assert [r["row"] for r in a] == [r["row"] for r in b] == ["FP"]
    for ra, rb in zip(a, b):
        for k in ("fid", "sfid", "precision", "recall", "l2_to_fp", "nfe"):
            assert ra[k] == rb[k], (ra["row"], k)
        assert rb["num_samples"] == 8
    assert not list(two.glob("rows/*/progress.p*.json"))  # folded into progress.json
    prog = json.loads((two / "rows" / "FP" / "progress.json").read_text())
    assert prog["samples"] == 8
