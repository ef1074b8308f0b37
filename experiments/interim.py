"""A running (or unfinished) row's gain over its baseline, from the shards both have.

  python -m experiments.interim --config configs/fmnist/table2.py:gpu10k \
      --workdir runs/gpu10k_cpu "--config.only=FP + IEC"

Same config and workdir as the experiments.reproduce run it reads; safe beside it (it
writes only the features of finished shards, which that run then reuses). Writes
<table>_interim.md and <table>_interim.json to the workdir (see
iec_jax/run/reproduce/interim.py).
"""

from iec_jax.io import use_all_cpu_cores

use_all_cpu_cores()  # before JAX initialises: one host device per core

from iec_jax.run import reproduce  # noqa: E402
from iec_jax.run.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job(reproduce.interim, what="Table", settings=reproduce.table_settings)
