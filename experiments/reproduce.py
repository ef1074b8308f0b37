"""Reproduce one of the paper's tables: every row with and without IEC (resumable).

  python -m experiments.reproduce --config configs/fmnist/table1.py --workdir runs/table1
  python -m experiments.reproduce --config configs/fmnist/table2.py:quick --workdir runs/t2q

Writes <table>.md, <table>.csv, <table>_result.json, <table>_config.json,
<table>_error_growth.png and <table>_fid_vs_nfe.png to the workdir, <table>_fid_infinity.png
where config.fid_infinity is on, and each row's files under rows/<row>/ (see
iec_jax/run/reproduce/__init__.py). Bad config fields are refused before anything is
written, with one line naming the field.
"""

from iec_jax.io import use_all_cpu_cores

use_all_cpu_cores()  # before JAX initialises: one host device per core

from iec_jax.run import reproduce  # noqa: E402
from iec_jax.run.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job(reproduce.run, what="Table", settings=reproduce.table_settings, default_config=None, default_workdir=None)
