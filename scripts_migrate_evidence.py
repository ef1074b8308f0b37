"""One-off: migrate the committed evidence to the current file formats and layout.

Run once from the repository root, then delete (it exists in the history only):

  python scripts_migrate_evidence.py

* docs/device/<run>, docs/device_gpu50k/<run>, docs/cpu/<run> become
  docs/evidence/rows_{10k,50k,10k_cpu_check}/<new name>/ with machine.txt and
  rows.tar.gz, numbered in the order their rows were merged into the tables (a later
  archive's copy of a row replaces an earlier one's);
* every archived row.json / l2.json / error_growth.json names the model by its content
  fingerprint (rows written before fingerprints named the checkpoint by path: all of
  them are the bundled fmnist-ddpm, whose fingerprint is recorded by later rows);
  IEC rows written before rows recorded their batch size get the batch size their run
  used (the table config's of that run);
* metrics keys lose the Inception batch size (they no longer carry it);
* progress.json gets its ``devices`` list (from ``device``, or the run's machine.txt);
* rows sampled but never evaluated (no metrics.json) are dropped;
* absolute paths of the machines the runs ran on are rewritten relative to the
  repository (the checkpoint then lay in a git-ignored copy: today it is bundled).
* the lent-machine driver logs are dropped (their timings are stated in docs/results.md).
"""

import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

FINGERPRINT = "2b46df9a1d6ec03ca9d41360b6cbcf187379a9b87ddf5ee427804f10dfd81c67"
MODEL = dict(dtype="float32", fingerprint=FINGERPRINT, name="fmnist-ddpm")

MOVES = {
    "docs/device/2026-11-26_h200_call1": "docs/evidence/rows_10k/01_2026-11-26_h200_a",
    "docs/device/2026-11-26_h200_call2": "docs/evidence/rows_10k/02_2026-11-26_h200_b",
    "docs/device/2026-11-26_cpu_gpu10k": "docs/evidence/rows_10k/03_2026-11-26_cpu_n15",
    "docs/device/2026-11-27_cpu_gpu10k": "docs/evidence/rows_10k/04_2026-11-27_cpu_n5",
    "docs/device/2026-11-27b_cpu_gpu10k": "docs/evidence/rows_10k/05_2026-11-27_cpu_n5_l2",
    "docs/device/2026-11-27c_cpu_gpu10k": "docs/evidence/rows_10k/08_2026-11-27_cpu_n15_l2",
    "docs/device/2026-11-27_h200_call1": "docs/evidence/rows_10k/06_2026-11-27_h200_a",
    "docs/device/2026-11-27_h200_call2": "docs/evidence/rows_10k/07_2026-11-27_h200_b",
    "docs/device/2026-11-28_cpu_gpu10k": "docs/evidence/rows_10k/09_2026-11-28_cpu_n15_iec_l2",
    "docs/device/2026-11-28b_cpu_gpu10k": "docs/evidence/rows_10k/10_2026-11-28_cpu_ddim110_l2",
    "docs/device/2026-11-27_cpu_fp": "docs/evidence/rows_10k_cpu_check/2026-11-27_cpu_fp",
    "docs/cpu/2026-11-27_cpu_fp_iec": "docs/evidence/rows_10k_cpu_check/2026-11-27_cpu_fp_iec",
    "docs/device_gpu50k/2026-11-28_h200_call1": "docs/evidence/rows_50k/01_2026-11-28_h200_a",
    "docs/device_gpu50k/2026-11-28_h200_call2": "docs/evidence/rows_50k/02_2026-11-28_h200_b",
    "docs/device_gpu50k/2026-11-28_h200_call3": "docs/evidence/rows_50k/03_2026-11-28_h200_c",
    "docs/device_gpu50k/2026-11-28_h200_call4": "docs/evidence/rows_50k/04_2026-11-28_h200_d",
}
PLAIN_MOVES = {
    "docs/device/gpu10k_collected": "docs/evidence/tables_10k",
    "docs/device/2026-11-26_h200_tables": "docs/evidence/tables_10k_first_run",
    "docs/device_gpu50k/collected": "docs/evidence/tables_50k",
    "docs/interim/2026-11-27_cpu_fp_iec": "docs/evidence/rows_10k_cpu_check/2026-11-27_cpu_fp_iec_interim",
    "docs/h200_call1_table5_w8a8.md": "docs/evidence/checks/2026-11-25_h200_table5_w8a8.md",
    "docs/bench/bench_batch_cpu.json": "docs/evidence/bench/bench_batch_cpu.json",
    "docs/embedded_samples.png": "docs/figures/embedded_samples.png",
    "docs/fmnist_ddim100_grid.png": "docs/figures/fmnist_ddim100_grid.png",
    "docs/main_error_growth.png": "docs/figures/main_error_growth.png",
    "docs/table2_error_growth.png": "docs/figures/table2_error_growth.png",
}

PATHS = [("/work/main/.device/fmnist-ddpm", "fmnist-ddpm"), ("/work/main/", ""),
         ("/root/out", "$OUT")]


def rewrite_paths(text: str) -> str:
    for a, b in PATHS:
        text = text.replace(a, b)
    return text


def batch_dependent(row: dict) -> bool:
    return row.get("iec", "none") != "none"  # every preset: batch-global test, tol > 0


def fix_key(d, batch_size):
    """A stored row meta (row.json, or the 'reference' of an l2 / error-growth key)."""
    if not isinstance(d, dict):
        return d
    d = {k: fix_key(v, batch_size) if isinstance(v, dict) else v for k, v in d.items()}
    m = d.get("model")
    if isinstance(m, dict) and "source" in m and "fingerprint" not in m:
        assert m["name"] == "fmnist-ddpm", m
        d["model"] = dict(MODEL)
    if isinstance(d.get("row"), dict) and "sampler" in d and "batch_size" not in d \
            and batch_dependent(d["row"]):
        d["batch_size"] = batch_size
    if isinstance(d.get("eval"), dict):
        d["eval"].pop("inception_batch_size", None)
    return d


def migrate_archive(src: Path, machine: str) -> bytes:
    files = {}
    with tarfile.open(src) as tar:
        for m in tar.getmembers():
            if m.isfile():
                files[m.name] = tar.extractfile(m).read()
    top = {n.split("/")[0] for n in files}
    assert len(top) == 1, top
    configs = {n: json.loads(b) for n, b in files.items() if n.endswith("_config.json")
               and "/rows/" not in n}
    batch = {c["batch_size"] for c in configs.values()}
    assert len(batch) == 1, (src, batch)
    batch_size = batch.pop()
    rows = {n.split("/rows/")[1].split("/")[0] for n in files if "/rows/" in n}
    evaluated = {r for r in rows if any(n.endswith(f"/rows/{r}/metrics.json") for n in files)}
    gpu = machine.splitlines()[1].split(",")[0].strip()
    out = {}
    for name, data in sorted(files.items()):
        if "/rows/" in name and name.split("/rows/")[1].split("/")[0] not in evaluated:
            continue  # sampled there, never evaluated: its samples did not come back
        base = name.rsplit("/", 1)[-1]
        if base.endswith(".json"):
            obj = json.loads(rewrite_paths(data.decode()))
            if base == "row.json":
                obj = fix_key(obj, batch_size)
            elif base in ("l2.json", "error_growth.json", "metrics.json", "fid_inf.json",
                          "flops.json"):
                obj["key"] = fix_key(obj["key"], batch_size)
            elif base == "progress.json":
                if "devices" not in obj:
                    obj.setdefault("device", f"1 × {gpu}")
                    obj["devices"] = [obj["device"]]
            data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()
        elif base.endswith((".log", ".md", ".csv")):
            data = rewrite_paths(data.decode()).encode()
        out[name] = data
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        text = machine.encode()
        info = tarfile.TarInfo("machine.txt")
        info.size, info.mtime = len(text), 0
        tar.addfile(info, io.BytesIO(text))
        for name, data in out.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def main():
    for old, new in MOVES.items():
        o, n = Path(old), Path(new)
        machine = (o / "machine.txt").read_text()
        n.mkdir(parents=True, exist_ok=True)
        (n / "machine.txt").write_text(machine)
        (n / "rows.tar.gz").write_bytes(migrate_archive(o / "tables.tar.gz", machine))
        subprocess.run(["git", "rm", "-rq", old], check=True)
        print(f"{old} -> {new}")
    for old, new in PLAIN_MOVES.items():
        Path(new).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "mv", old, new], check=True)
        for p in ([Path(new)] if Path(new).is_file() else Path(new).rglob("*")):
            if p.is_file() and p.suffix in (".md", ".csv", ".json", ".log"):
                p.write_text(rewrite_paths(p.read_text()))
        print(f"{old} -> {new}")
    for d in ("docs/device", "docs/device_gpu50k", "docs/cpu", "docs/interim", "docs/bench"):
        if os.path.isdir(d) and not any(Path(d).rglob("*")):
            shutil.rmtree(d)
    subprocess.run(["git", "add", "docs"], check=True)


if __name__ == "__main__":
    main()
