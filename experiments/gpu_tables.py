"""The paper's tables at 10,000 samples per row within one time-limited GPU lease.

A lent GPU machine here has none of this project's downloads: no TFDS data, no converted
Inception, no ``../shared`` checkpoint, and at most 64 MiB travel with the repository. So
the work is split in two commands:

  # here (CPU): a bundle of what the GPU machine needs, in .device/ (git-ignored)
  python -m experiments.gpu_tables pack --bundle .device
  # there (GPU), from the repository root, with the bundle carried:
  python -m experiments.gpu_tables run --bundle .device --out "$OUT" --deadline_s 540

``pack`` writes the reference checkpoint (a copy of ``../shared/models/fmnist-ddpm``), the
uint8 Fashion-MNIST test images (from TFDS), and the converted FID Inception's parameters
rounded to float16 (87 MB as float32 would not travel). It also measures what that
rounding changes: the largest relative difference of the pool features of ``--check``
test images, and the FID of those images against the full test split with either set of
parameters.

``run`` restores (``restore``, in a child process) the Inception cache (float16 →
float32) and the reference statistics of the test split (same code as
``reference_features``, fed the bundled images), then runs the tables' rows with
``configs/fmnist/table*.py:gpu10k`` in five worker processes that share the GPU and one
work directory (``WORKERS``: each table's paper cells first, controls and ablations
after): a row not started before the deadline's margin is left out (``time_budget_s``),
workers still busy at the deadline are stopped (their finished shards stay), and every
table is then assembled from the evaluated rows (``time_budget_s=0``). The tables,
plots, worker logs and each row's small files (progress, metrics, L2, error growth) go
to ``--out/tables.tar.gz``, rewritten atomically every 30 s and whenever a job ends, so
a run killed from outside still returns its last snapshot; ``--out/driver.log`` holds
the driver's timeline. The workers' BLAS thread pools are split between them.
``--seed`` starts from earlier runs' evaluated rows. ``--job 'TABLE:ROW,ROW'`` (repeated:
one worker each) runs only those rows instead of ``WORKERS``, and ``--variant gpu`` the
tables at 50,000 samples (work directory ``runs/<variant>``), e.g. the headline DeepCache
pair at the paper's sample count:

  python -m experiments.gpu_tables run --out "$OUT" --deadline_s 500 --variant gpu \
      --job table2:FP --job "table2:DeepCache N=10" --job "table2:DeepCache N=10 + IEC"

``collect`` (here) assembles the tables from one or more such result directories
(``tables.tar.gz`` + ``machine.txt``), from the rows' small files alone:

  python -m experiments.gpu_tables collect docs/device/<call1> docs/device/<call2> \
      --workdir runs/gpu10k_collected
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODEL = ROOT.parent / "shared" / "models" / "fmnist-ddpm"

_BUNDLE = flags.DEFINE_string("bundle", ".device", "Bundle directory (relative to the repo root).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Table work directory (default: run:"
                                " runs/<variant>; snapshot, collect: runs/gpu10k).")
_OUT = flags.DEFINE_string("out", None, "Where the results archive and log go (run).")
_DEADLINE = flags.DEFINE_float("deadline_s", 540.0, "Seconds from the start of `run` by which"
                               " the results archive must be written.")
_CHECK = flags.DEFINE_integer("check", 1000, "Test images for pack's float16 check (0: none).")
_VARIANT = flags.DEFINE_string("variant", "gpu10k", "Table config variant (run).")
_ROW_MARGIN = flags.DEFINE_float("row_margin_s", 150.0, "No row is started later than this"
                                 " many seconds before the deadline (run).")
_SEED = flags.DEFINE_list("seed", [], "run: result directories of earlier runs (tables.tar.gz"
                          " + machine.txt) whose evaluated rows are not computed again.")
_ROWS = flags.DEFINE_list("rows", [], "snapshot: the evaluated rows to pack, by name"
                          " (default: all).")
_JOBS = flags.DEFINE_multi_string("job", [], "run: one worker per flag, running the rows"
                                  " 'TABLE:ROW,ROW,...' (default: WORKERS, every row of"
                                  " Tables 1, 2, 3 and 5).")
_ASSEMBLY_S = flags.DEFINE_float("assembly_s", 75.0, "Seconds kept for assembling the tables"
                                 " after the workers are stopped (run).")

INCEPTION_FP16 = "inception_fp16.npz"
TEST_IMAGES = "fashion_mnist_test_images.npz"
MODEL_DIR = "fmnist-ddpm"

# Per worker, its jobs in order: (table, rows) with rows None (all), a list of names, or
# "-a,b" (all but these). Each table's headline rows (the paper's cells and their IEC rows)
# come first, the controls and ablations after, so that a lease that ends early has the
# cells the README compares with the paper. Rows shared by two tables (FP, W8A8 + IEC,
# DeepCache N=10 + IEC, ...) are computed once in the shared work directory. CacheQuant
# W4A8 (a Table 3 cell) follows worker 0's Table 2 cells rather than worker 2's W8A8 pair:
# in a run seeded with the evaluated DeepCache rows, worker 0 is otherwise idle after FP.
WORKERS = (
    (("table2", ["FP", "DeepCache N=10", "DeepCache N=10 + IEC", "DeepCache N=15",
                 "DeepCache N=15 + IEC"]),
     ("table3", ["CacheQuant W4A8 N=10", "CacheQuant W4A8 N=10 + IEC"]),
     ("table2", ["FP + IEC", "DeepCache N=10 DDIM-110", "DeepCache N=5",
                 "DeepCache N=10 nonuniform"])),
    (("table1", ["W8A8", "W8A8 + IEC"]),
     ("table5", ["W8A8 + IEC ±1/10", "W8A8 + IEC ±1/20"]),
     ("table1", ["W8A8 DDIM-200", "FP DDIM-200"])),
    (("table3", ["CacheQuant W8A8 N=10", "CacheQuant W8A8 N=10 + IEC"]),
     ("table3", ["CacheQuant W8A8 N=10 DPS", "CacheQuant W8A8 N=10 DPS + IEC",
                 "W8A8 N=10 no DEC"])),
    (("table1", ["W4A8", "W4A8 + IEC"]),
     ("table1", ["W4A8 DDIM-200"])),
    (("table5", ["DeepCache N=10 + IEC ±1/10", "DeepCache N=10 + IEC ±1/20",
                 "DeepCache N=10 + IEC K=2", "DeepCache N=10 + IEC K=3"]),),
)


def pack(bundle: Path) -> None:
    import numpy as np

    from iec_jax import data, metrics
    from iec_jax.io import atomic_path, write_npz
    from iec_jax.run.evaluate import reference_features

    bundle.mkdir(parents=True, exist_ok=True)
    if not (SHARED_MODEL / "config.json").exists():
        raise FileNotFoundError(f"no reference checkpoint at {SHARED_MODEL}")
    dst = bundle / MODEL_DIR
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(SHARED_MODEL, dst)

    data.prepare("fashion_mnist", download=False)
    images = data.load_images("fashion_mnist", "test")
    with atomic_path(str(bundle / TEST_IMAGES)) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, images=images)

    from iec_jax.metrics import inception

    flat = inception.flat_params(inception.load_inception_params())
    fp16 = {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in flat.items()}
    write_npz(bundle / INCEPTION_FP16, **fp16)
    print(f"bundle {bundle}: {sum(f.stat().st_size for f in bundle.rglob('*') if f.is_file()) / 2**20:.1f}"
          f" MiB ({len(images)} test images, {len(flat)} Inception arrays)")

    n = _CHECK.value
    if n:
        ref = metrics.FeatureStats.from_arrays(reference_features("fashion_mnist", "test"))
        rounded = inception.params_from_flat(
            {k: np.asarray(v, np.float32) if v.dtype == np.float16 else v
             for k, v in fp16.items()})
        f32 = metrics.compute_features(images[:n], batch_size=50)["pool"]
        f16 = metrics.compute_features(images[:n], batch_size=50, params=rounded)["pool"]
        rel = np.linalg.norm(f16 - f32, axis=1) / np.linalg.norm(f32, axis=1)
        fid32 = metrics.FeatureStats.from_features(f32).frechet_distance(ref)
        fid16 = metrics.FeatureStats.from_features(f16).frechet_distance(ref)
        print(f"float16-rounded Inception on test[:{n}]: pool features relative L2 difference"
              f" max {rel.max():.2e}, mean {rel.mean():.2e}; FID vs test {fid32:.5f} (float32)"
              f" vs {fid16:.5f} (float16-rounded)")


def _restore(bundle: Path, split: str) -> None:
    """Inception cache and reference statistics (of ``split``: ``test`` or ``test[:n]``)
    on a machine that has the bundle only."""
    import re

    import numpy as np

    from iec_jax.metrics import inception
    from iec_jax.run import evaluate

    with np.load(bundle / INCEPTION_FP16) as f:
        flat = {k: (f[k].astype(np.float32) if f[k].dtype == np.float16 else f[k])
                for k in f.files}
    cache = inception.inception_cache_dir()
    inception.save_params_cache(inception.params_from_flat(flat), cache)
    m = re.fullmatch(r"test(?:\[:(\d+)\])?", split)
    if not m:
        raise ValueError(f"the bundle holds the test split; cannot evaluate against {split!r}")
    if evaluate._reference_path("fashion_mnist", split, None).exists():
        print(f"reference statistics of fashion_mnist/{split}: cached (an earlier call)",
              flush=True)
        return
    with np.load(bundle / TEST_IMAGES) as f:
        images = f["images"][:int(m.group(1))] if m.group(1) else f["images"]
    t = time.time()
    ref = evaluate.reference_features_from_images(images, "fashion_mnist", split,
                                                   batch_size=min(500, len(images)))
    print(f"reference statistics of {len(ref['pool'])} test images: {time.time() - t:.0f} s",
          flush=True)


def parse_jobs(specs, variant: str) -> tuple:
    """``--job`` values ('TABLE:ROW,ROW,...', one worker each) as a ``WORKERS``-shaped
    tuple, every row checked against the variant's table here, before a lease's time is
    spent (no specs: ``WORKERS``)."""
    if not specs:
        return WORKERS
    workers = []
    for spec in specs:
        table, sep, rows = spec.partition(":")
        if not sep or not re.fullmatch(r"table\d+", table) or not rows.strip():
            raise ValueError(f"--job wants 'TABLE:ROW,ROW,...' (e.g. 'table2:FP'), got {spec!r}")
        only = [r.strip() for r in rows.split(",")]
        _only(table, only, variant)  # raises on a row the table does not have
        workers.append(((table, only),))
    return tuple(workers)


def _job_cmd(table: str, only, workdir: str, variant: str, budget: float, model: str,
             lease: bool = True) -> list:
    """The ``reproduce`` command of one job. On a lease (``lease``), FID∞ is off: its
    subset fits (~1–2 min per row of 10,000 on a few cores) would eat the sampling time;
    rows fitted elsewhere keep their ``fid_inf.json`` and show it when collected."""
    cmd = [sys.executable, "-m", "experiments.reproduce",
           f"--config=configs/fmnist/{table}.py:{variant}", f"--workdir={workdir}",
           f"--config.model.source={model}", f"--config.time_budget_s={budget:.0f}"]
    if lease:
        cmd.append("--config.fid_infinity=0")
    if only:
        cmd.append(f"--config.only={_only(table, only, variant)}")
    return cmd


def _only(table: str, only, variant: str) -> str:
    from configs.fmnist import table as tables

    names = [r["name"] for r in tables.table_config(table, variant).rows]
    if isinstance(only, str) and only.startswith("-"):
        drop = set(only[1:].split(","))
        return ",".join(n for n in names if n not in drop)
    missing = sorted(set(only) - set(names))
    if missing:
        raise ValueError(f"{table} has no rows {missing}")
    return ",".join(only)


_SMALL_SUFFIXES = (".md", ".csv", ".png", ".log")
_SMALL_NAMES = ("_result.json", "_config.json", "progress.json", "row.json", "metrics.json",
                "l2.json", "error_growth.json", "flops.json", "fid_inf.json")


def snapshot(workdir: str, out: Path, rows=None) -> Path:
    """``out/tables.tar.gz``: the work directory's small files (tables, plots, logs, each
    row's row.json / progress.json / metrics.json), replaced atomically, so that a run
    killed at any moment still leaves the last complete snapshot. ``rows``: the row
    directories to keep (None: all)."""
    from iec_jax.io import atomic_path

    archive = out / "tables.tar.gz"
    root = Path(workdir)
    with atomic_path(str(archive)) as tmp, tarfile.open(tmp, "w:gz") as tar:
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root)
            if (rows is not None and len(rel.parts) > 1 and rel.parts[0] == "rows"
                    and rel.parts[1] not in rows):
                continue
            if p.is_file() and (p.suffix in _SMALL_SUFFIXES or p.name.endswith(_SMALL_NAMES)):
                tar.add(p, arcname=str(Path(root.name) / rel))
    return archive


def snapshot_here(workdir: str, out: Path, names=()) -> Path:
    """``snapshot`` of a work directory computed on this machine, plus a ``machine.txt``
    in the form ``collect`` reads (a header line, then the machine's name first). Only
    evaluated rows travel: a row with samples but no metrics would be sampled again from
    the start by a seeded run, and ``collect`` drops its progress anyway. ``names``: the
    rows to pack, by row name (default: every evaluated row), e.g. to keep a row that
    ``collect`` should take from another machine out of this snapshot."""
    import jax

    from iec_jax.io import host_cpu
    from iec_jax.run.reproduce import row_slug

    rows = sorted(p.parent.name for p in Path(workdir).glob("rows/*/metrics.json"))
    if not rows:
        raise FileNotFoundError(f"{workdir} has no evaluated row (rows/*/metrics.json)")
    if names:
        wanted = {row_slug(n): n for n in names}
        missing = sorted(n for slug, n in wanted.items() if slug not in rows)
        if missing:
            raise FileNotFoundError(f"{workdir} has no evaluated row named {missing}"
                                    f" (evaluated: {rows})")
        rows = sorted(wanted)
    cpu = host_cpu()
    out.mkdir(parents=True, exist_ok=True)
    (out / "machine.txt").write_text(
        "name, cores\n"
        f"{cpu}, {os.cpu_count()} cores (CPU; each row's progress.json names its devices)\n"
        f"{sys.version.split()[0]} jax {jax.__version__} evaluated rows: {', '.join(rows)}\n")
    return snapshot(workdir, out, rows)


def run(bundle: Path, workdir: str, out: Path, deadline_s: float, variant: str,
        workers: tuple = WORKERS) -> None:
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(workdir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    driver_log = open(out / "driver.log", "a", buffering=1)

    def say(msg: str) -> None:
        line = f"[{time.time() - start:5.0f} s] {msg}"
        print(line, flush=True)
        driver_log.write(line + "\n")

    if _SEED.value:
        extract([ROOT / d for d in _SEED.value], Path(workdir))
        say(f"seeded {workdir} with the evaluated rows of {', '.join(_SEED.value)}")
    say(f"restore (bundle {os.path.relpath(bundle)})")
    # In a child process: its GPU memory is released before the workers start.
    subprocess.run([sys.executable, "-m", "experiments.gpu_tables", "restore",
                    f"--bundle={bundle}", f"--variant={variant}"], check=True,
                   timeout=max(1.0, deadline_s - _ASSEMBLY_S.value),
                   env=dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false"))
    # Relative to the working directory the workers inherit (the repository root, as
    # for --workdir): the rows' configs then name no machine's absolute path.
    model = os.path.relpath(bundle / MODEL_DIR)
    row_deadline = start + deadline_s - _ROW_MARGIN.value  # no row starts after this
    stop_at = start + deadline_s - _ASSEMBLY_S.value  # workers still busy are stopped
    # The workers share the CPU too: unlimited BLAS pools (numpy's eigh in the Fréchet
    # distance) in five processes stalled every row's metrics in the second H200 call.
    threads = str(max(1, (os.cpu_count() or 1) // len(workers)))
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.9 / len(workers):.2f}",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads,
               MKL_NUM_THREADS=threads)
    queues = [list(jobs) for jobs in workers]
    running: list = [None] * len(workers)  # (Popen, log file, name) per worker

    def launch(i: int) -> None:
        budget = row_deadline - time.time()
        if not queues[i] or budget <= 0:
            running[i] = None
            return
        table, only = queues[i].pop(0)
        cmd = _job_cmd(table, only, workdir, variant, budget, model)
        name = f"worker{i}.{len(workers[i]) - len(queues[i])}_{table}"  # one log per job
        say(f"{name}: {' '.join(cmd[1:])}")
        log = open(logs / f"{name}.log", "w")
        running[i] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True), log, name)

    def stop(job) -> None:
        if job[0].poll() is None:
            try:
                os.killpg(job[0].pid, 9)
            except ProcessLookupError:
                pass
        try:
            job[0].wait(timeout=30)
        except subprocess.TimeoutExpired:
            say(f"{job[2]}: still not gone 30 s after SIGKILL")
        job[1].close()

    for i in range(len(workers)):
        launch(i)
    last_snapshot = time.time()
    while time.time() < stop_at and any(running):
        time.sleep(2)
        for i, job in enumerate(running):
            if job and job[0].poll() is not None:
                job[1].close()
                say(f"{job[2]}: exit {job[0].returncode}")
                launch(i)
                snapshot(workdir, out)
                last_snapshot = time.time()
        if time.time() - last_snapshot > 30:
            snapshot(workdir, out)
            last_snapshot = time.time()
    busy = [job for job in running if job]
    for job in busy:  # all at once: tearing down a CUDA context can take a while
        say(f"{job[2]}: stopped at the deadline")
        try:
            os.killpg(job[0].pid, 9)
        except ProcessLookupError:
            pass
    for job in busy:
        stop(job)
    snapshot(workdir, out)
    tables = sorted({t for jobs in workers for t, _ in jobs})
    assembly = []
    for table in tables:  # in parallel: each reads its rows' cached metrics
        log = open(logs / f"assemble_{table}.log", "w")
        cmd = _job_cmd(table, None, workdir, variant, 0, model)
        # Assembly reads cached small files only: the CPU backend will do.
        assembly.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                          env=dict(env, JAX_PLATFORMS="cpu"),
                                          start_new_session=True), log, f"assemble {table}"))
    end = start + deadline_s - 5
    for job in assembly:
        try:
            job[0].wait(timeout=max(1.0, end - time.time()))
        except subprocess.TimeoutExpired:
            say(f"{job[2]}: stopped at the deadline")
        stop(job)
        say(f"{job[2]}: exit {job[0].returncode}")
    archive = snapshot(workdir, out)
    say(f"{archive}: {archive.stat().st_size / 2**20:.1f} MiB")
    driver_log.close()


def extract(results: list, workdir: Path) -> None:
    """The small files of ``run`` results (each a directory with ``tables.tar.gz`` and
    ``machine.txt``; later ones replace earlier files) unpacked into ``workdir``; rows
    whose progress.json predates its device field get machine.txt's GPU, and rows that
    were sampled but not evaluated lose their progress.json (their samples stayed
    there)."""
    import json

    from iec_jax.io import write_json

    workdir.mkdir(parents=True, exist_ok=True)
    for d in map(Path, results):
        with tarfile.open(d / "tables.tar.gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            for m in members:  # all checked before anything is written
                parts = Path(m.name).parts
                if len(parts) < 2 or ".." in parts or Path(m.name).is_absolute():
                    raise ValueError(f"{d}: unexpected member {m.name!r}")
            for m in members:
                dst = workdir.joinpath(*Path(m.name).parts[1:])
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(tar.extractfile(m).read())
        # Rows sampled before progress.json recorded the device: from machine.txt.
        lines = (d / "machine.txt").read_text().splitlines()
        gpu = lines[1].split(",")[0].strip() if len(lines) > 1 else "unknown GPU"
        for p in (workdir / "rows").glob("*/progress.json"):
            if not (p.parent / "metrics.json").exists() and not (p.parent / "samples").exists():
                # Sampled there but not evaluated: the samples did not come back, and a
                # run seeded with this directory samples the row again from the start.
                p.unlink()
                continue
            prog = json.loads(p.read_text())
            if "device" not in prog:
                prog["device"] = f"1 × {gpu}"
                write_json(str(p), prog)
        print(f"{d}: {len(members)} files ({gpu})")


def collect(results: list, workdir: Path) -> None:
    """Assemble the tables here from the ``run`` results brought back from lent machines
    (:func:`extract`), each from its evaluated rows (``time_budget_s=0``, CPU). Needs the
    bundle's checkpoint (``pack``) at the path the rows were sampled with."""
    import json

    extract(results, workdir)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for cfg in sorted(workdir.glob("table*_config.json")):
        c = json.loads(cfg.read_text())
        table = c["table"]
        variant = _VARIANT.value
        source = c["model"]["source"]  # absolute, or relative to the repository root
        if not (ROOT / source / "config.json").exists():
            raise FileNotFoundError(f"{table}'s rows were sampled with the checkpoint at"
                                    f" {source}, which is not here: run `pack` first")
        cmd = _job_cmd(table, None, str(workdir), variant, 0, source, lease=False)
        print("$ python " + " ".join(cmd[1:]), flush=True)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            raise RuntimeError(f"assembling {table} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
        print((workdir / f"{table}.md").read_text())


def main(argv):
    if len(argv) < 2 or argv[1] not in ("pack", "restore", "run", "collect", "snapshot"):
        raise app.UsageError("usage: python -m experiments.gpu_tables"
                             " pack|restore|run|snapshot [--flags]"
                             " | collect RESULT_DIR... --workdir DIR")
    if len(argv) > 2 and argv[1] != "collect":
        raise app.UsageError(f"{argv[1]} takes flags only, got {argv[2:]}")
    if _ROWS.value and argv[1] != "snapshot":
        raise app.UsageError(f"--rows is an option of snapshot, not of {argv[1]}")
    if _JOBS.value and argv[1] != "run":
        raise app.UsageError(f"--job is an option of run, not of {argv[1]}")
    bundle = ROOT / _BUNDLE.value
    workdir = _WORKDIR.value or (f"runs/{_VARIANT.value}" if argv[1] == "run" else "runs/gpu10k")
    if argv[1] == "pack":
        pack(bundle)
    elif argv[1] == "collect":
        if len(argv) < 3:
            raise app.UsageError("collect needs the result directories of run")
        collect(argv[2:], ROOT / workdir)
    elif argv[1] == "snapshot":
        if not _OUT.value:
            raise app.UsageError("snapshot needs --out")
        print(snapshot_here(workdir, Path(_OUT.value), _ROWS.value))
    elif argv[1] == "restore":
        from configs.fmnist import table as tables

        _restore(bundle, tables.table_config("table1", _VARIANT.value).eval.split)
    else:
        if not _OUT.value:
            raise app.UsageError("run needs --out")
        workers = parse_jobs(_JOBS.value, _VARIANT.value)  # before any time is spent
        from iec_jax.io import enable_compilation_cache

        enable_compilation_cache()
        run(bundle, workdir, Path(_OUT.value), _DEADLINE.value, _VARIANT.value, workers)


if __name__ == "__main__":
    app.run(main)
