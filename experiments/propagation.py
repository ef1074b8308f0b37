"""Error propagation with and without IEC on the exact oracle.

  python -m experiments.propagation --config configs/oracle/propagation.py \
      [--workdir runs/propagation] [--config.iec.preset=paper] ...

Writes errors.csv, summary.csv, summary.md, spectral.csv, propagation.png and
config.json to the workdir and prints the summary table (iec_jax/run/propagation.py).
"""

from iec_jax.io import use_all_cpu_cores

use_all_cpu_cores()  # before JAX initialises: one host device per core

from iec_jax.run import propagation  # noqa: E402
from iec_jax.run.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job(propagation.run, what="Study", default_config="configs/oracle/propagation.py", default_workdir="runs/propagation")
