"""Sample from a UNet checkpoint into resumable .npz shards and a PNG grid.

  python -m experiments.sample --config configs/fmnist/ddim.py --workdir runs/fmnist-ddim

Writes samples/samples_*.npz (uint8 NHWC shards, resumable), grid.png, config.json and
summary.json to the workdir (iec_jax/run/sample.py).
"""

from iec_jax.io import use_all_cpu_cores

use_all_cpu_cores()  # before JAX initialises: one host device per core

from iec_jax.run import sample  # noqa: E402
from iec_jax.run.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job(sample.run, what="Sampling", settings=sample.settings, default_config=None, default_workdir="runs/sample")
