"""Sample from a UNet checkpoint into resumable .npz shards and a PNG grid.

  python -m experiments.sample --config configs/fmnist/ddim.py --workdir runs/fmnist-ddim
"""

from iec_jax.io import use_all_cpu_cores

use_all_cpu_cores()  # before JAX initialises: one host device per core


from absl import app, flags
from ml_collections import config_flags

from iec_jax.io import enable_compilation_cache
from iec_jax.run import sample

_CONFIG = config_flags.DEFINE_config_file("config", None, "Sampling configuration.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/sample", "Where outputs are written.")
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    enable_compilation_cache()
    sample.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
