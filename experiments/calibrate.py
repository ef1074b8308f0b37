"""Calibrate the efficient models of a table without sampling (resumable, deterministic).

  python -m experiments.calibrate --config configs/fmnist/table3.py --workdir runs/tables
  python -m experiments.calibrate --config configs/fmnist/table3.py --workdir runs/tables \
      --config.only="CacheQuant W8A8 N=10"      # one row: its schedule, DEC fits, tables

Writes <workdir>/artifacts/*.npz (FP-trajectory-derived cache schedules, cache-DEC,
activation tables, quant-DEC), named by model, steps, interval, schedule and bits, and a
manifest of their SHA-256; experiments.reproduce with the same --workdir reuses them.
"""

from iec_jax.io import use_all_cpu_cores

use_all_cpu_cores()  # before JAX initialises: one host device per core

from iec_jax.run import reproduce  # noqa: E402
from iec_jax.run.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job(reproduce.calibrate, what="Table", settings=reproduce.table_settings)
