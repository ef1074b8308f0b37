"""Error propagation with and without IEC on the exact oracle.

  python -m experiments.propagation --config configs/oracle/propagation.py \
      [--workdir runs/propagation] [--config.iec.preset=paper] ...
"""

from iec_jax.io import use_all_cpu_cores

use_all_cpu_cores()  # before JAX initialises: one host device per core


from absl import app, flags
from ml_collections import config_flags

from iec_jax.io import enable_compilation_cache
from iec_jax.run import propagation

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/oracle/propagation.py", "Study configuration.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/propagation", "Where outputs are written.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    enable_compilation_cache()
    propagation.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
