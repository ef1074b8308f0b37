"""Moving work between machines (``experiments/bundle.py``).

* :func:`pack` — an offline bundle for a machine without internet or datasets (a GPU
  cluster node, an air-gapped server): the model checkpoint, the converted FID Inception
  parameters and the reference statistics of the evaluation split. On that machine,
  ``IEC_JAX_CACHE=<bundle>/cache`` and ``--config.model.source=<bundle>/model`` make
  ``experiments.reproduce`` / ``evaluate`` run without downloading or converting anything.
* :func:`archive` — the small files of a table work directory (tables, plots, logs,
  configs, and each *evaluated* row's ``row.json``, ``progress.json``, ``row_config.json``
  and metric caches; no samples or features) as one ``.tar.gz``, with ``machine.txt``
  naming the hardware it ran on.
* :func:`merge` — archives (or result folders holding one, or other work directories)
  unpacked into one work directory, later sources replacing earlier files;
  ``experiments.reproduce --config.time_budget_s=0`` then assembles the tables from the
  merged rows without sampling anything (each row is refused if it does not match the
  table's current settings).
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence

__all__ = ["pack", "archive", "merge", "machine_description", "SMALL_FILES"]

# What travels in an archive: every file with these suffixes or name endings.
_SMALL_SUFFIXES = (".md", ".csv", ".png", ".log")
# The ODE columns' caches (l2_ode.json, error_growth_ode.json) travel too: a merged row has
# no samples to recompute them from.
SMALL_FILES = ("_result.json", "_config.json", "progress.json", "row.json", "metrics.json",
               "l2.json", "error_growth.json", "flops.json", "fid_inf.json", "gain_ci.json",
               "l2_ode.json", "error_growth_ode.json")


def machine_description() -> str:
    """Two lines: the accelerator or CPU model and core count; Python and JAX versions."""
    import jax

    from iec_jax.io import host_cpu

    dev = jax.devices()[0]
    what = (f"{jax.device_count()} × {dev.device_kind}" if dev.platform != "cpu"
            else f"{host_cpu()}, {os.cpu_count()} cores")
    return f"{what}\npython {sys.version.split()[0]}, jax {jax.__version__}\n"


def pack(out: str, *, model: str, dataset: str, split: str, overwrite: bool = False) -> Path:
    """Writes the offline bundle ``out`` (``model/``, ``cache/inception/``,
    ``cache/reference/``, ``README.txt``); nothing is left behind on failure."""
    from iec_jax.metrics import inception
    from iec_jax.metrics.reference import _reference_path, reference_features
    from iec_jax.models.loading import resolve_source

    dst = Path(out)
    if dst.exists() and not overwrite:
        raise ValueError(f"--out {out} exists (give --overwrite to replace it)")
    src = resolve_source(model)
    inception.load_inception_params()  # converts once from the TorchScript file if needed
    reference_features(dataset, split)  # computes once if needed
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bundle-", dir=dst.parent))
    try:
        shutil.copytree(src, tmp / "model")
        shutil.copytree(inception.inception_cache_dir(), tmp / "cache" / "inception")
        ref = _reference_path(dataset, split, None)
        (tmp / "cache" / "reference").mkdir(parents=True)
        shutil.copy2(ref, tmp / "cache" / "reference" / ref.name)
        (tmp / "README.txt").write_text(
            f"Offline bundle: model {model!r}, reference statistics of {dataset}/{split}.\n"
            "On the machine without internet, from the repository root:\n"
            f"  export IEC_JAX_CACHE={dst.resolve()}/cache\n"
            "  python -m experiments.reproduce --config configs/<...>.py --workdir runs/<...> \\\n"
            f"      --config.model.source={dst.resolve()}/model\n")
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    print(f"bundle {dst}: {size / 2**20:.1f} MiB")
    return dst


def _evaluated_rows(workdir: Path) -> list[str]:
    return sorted(p.parent.name for p in workdir.glob("rows/*/metrics.json"))


def archive(workdir: str, out: str, rows: Sequence[str] = ()) -> Path:
    """``out`` (a .tar.gz) with the small files of ``workdir``'s evaluated rows (``rows``:
    by row name, default all) and its tables, plus ``machine.txt``; written atomically."""
    from iec_jax.io import atomic_path
    from iec_jax.run.reproduce.spec import row_slug

    root = Path(workdir)
    evaluated = _evaluated_rows(root)
    if not evaluated:
        raise ValueError(f"{workdir} has no evaluated row (rows/*/metrics.json)")
    keep = evaluated
    if rows:
        wanted = [row_slug(n) for n in rows]
        missing = sorted(n for n, slug in zip(rows, wanted) if slug not in evaluated)
        if missing:
            raise ValueError(f"{workdir} has no evaluated row named {missing} (evaluated:"
                             f" {evaluated})")
        keep = sorted(wanted)
    if not out.endswith(".tar.gz"):
        raise ValueError(f"--out must name a .tar.gz file, got {out!r}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, tarfile.open(tmp, "w:gz") as tar:
        info = tarfile.TarInfo("machine.txt")
        text = machine_description().encode()
        info.size = len(text)
        import io

        tar.addfile(info, io.BytesIO(text))
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root)
            if len(rel.parts) > 1 and rel.parts[0] == "rows" and rel.parts[1] not in keep:
                continue
            if "samples" in rel.parts or "features" in rel.parts or "artifacts" in rel.parts:
                continue
            if p.is_file() and (p.suffix in _SMALL_SUFFIXES or p.name.endswith(SMALL_FILES)):
                tar.add(p, arcname=str(Path(root.name) / rel))
    print(f"{out}: rows {', '.join(keep)}")
    return Path(out)


def _archive_of(source: Path) -> Optional[Path]:
    if source.is_file() and source.name.endswith(".tar.gz"):
        return source
    found = sorted(source.glob("*.tar.gz")) if source.is_dir() else []
    if len(found) > 1:
        raise ValueError(f"{source} holds several archives {[f.name for f in found]}; name one")
    return found[0] if found else None


def _members(path: Path):
    """The archive's files (under one top folder; ``machine.txt`` at the top), each
    checked before anything is written."""
    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        for m in members:
            parts = Path(m.name).parts
            if Path(m.name).is_absolute() or ".." in parts or (len(parts) < 2
                                                                 and m.name != "machine.txt"):
                raise ValueError(f"{path}: unexpected member {m.name!r}")
        return [(m.name, tar.extractfile(m).read()) for m in members]


def merge(sources: Iterable[str], workdir: str) -> list[str]:
    """Unpacks each source (an archive, a folder holding one, or a work directory) into
    ``workdir``; returns the evaluated rows found there afterwards."""
    sources = [Path(s) for s in sources]
    if not sources:
        raise ValueError("merge needs at least one archive or work directory")
    plans = []
    for src in sources:  # every source read and checked before anything is written
        arch = _archive_of(src)
        if arch is not None:
            files = [(name, data) for name, data in _members(arch) if name != "machine.txt"]
            plans.append((src, [(Path(*Path(n).parts[1:]), d) for n, d in files]))
        elif src.is_dir() and (src / "rows").is_dir():
            files = [(p.relative_to(src), p.read_bytes()) for p in sorted(src.rglob("*"))
                     if p.is_file() and (p.suffix in _SMALL_SUFFIXES or p.name.endswith(SMALL_FILES))
                     and "samples" not in p.parts and "features" not in p.parts]
            plans.append((src, files))
        else:
            raise ValueError(f"{src} is neither a .tar.gz archive, a folder holding one, nor a"
                             " work directory (rows/)")
    dst = Path(workdir)
    for src, files in plans:
        for rel, data in files:
            target = dst / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        print(f"{src}: {len(files)} files")
    rows = _evaluated_rows(dst)
    print(f"{workdir}: evaluated rows {', '.join(rows) or '(none)'}")
    return rows
