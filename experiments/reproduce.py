"""Reproduce one of the paper's tables: every row with and without IEC (resumable).

  python -m experiments.reproduce --config configs/fmnist/table1.py --workdir runs/table1
  python -m experiments.reproduce --config configs/fmnist/table2.py:quick --workdir runs/t2q

Writes table.md, table.csv, result.json, error_growth.png and fid_vs_nfe.png to the
workdir, and fid_infinity.png where config.fid_infinity is on (see
iec_jax/run/reproduce.py for the per-row files).
"""

from iec_jax.io import use_all_cpu_cores

use_all_cpu_cores()  # before JAX initialises: one host device per core

from iec_jax.run import reproduce  # noqa: E402
from iec_jax.run.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job(reproduce.run, what="Table", default_config=None, default_workdir=None)
