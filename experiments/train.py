"""Train a DDPM ε-prediction UNet; resumes from the workdir's newest checkpoint.

  python -m experiments.train --config configs/fmnist/train.py --workdir runs/train/fmnist

Writes config.json, checkpoints/ (orbax), metrics.jsonl, TensorBoard event files when the
tensorboard extra is installed, and at the end model/ (the EMA parameters) and
training.json to the workdir (iec_jax/run/train.py).
"""

from iec_jax.io import use_all_cpu_cores

use_all_cpu_cores()  # before JAX initialises: one host device per core

from iec_jax.run import train  # noqa: E402
from iec_jax.run.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job(train.run, what="Training", settings=train.settings, default_config=None, default_workdir="runs/train/fmnist")
