"""Train a DDPM ε-prediction UNet; resumes from the workdir's newest checkpoint.

  python -m experiments.train --config configs/fmnist/train.py --workdir runs/train/fmnist
"""

from iec_jax.io import use_all_cpu_cores

use_all_cpu_cores()  # before JAX initialises: one host device per core


from absl import app, flags
from ml_collections import config_flags

from iec_jax.io import enable_compilation_cache
from iec_jax.run import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training configuration.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/train/fmnist", "Where outputs are written.")
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    enable_compilation_cache()
    train.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
