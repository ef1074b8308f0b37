"""Reproduce one of the paper's tables: every row with and without IEC (resumable).

  python -m experiments.reproduce --config configs/fmnist/table1.py --workdir runs/table1
  python -m experiments.reproduce --config configs/fmnist/table2.py:quick --workdir runs/t2q

Writes table.md, table.csv, result.json, error_growth.png and fid_vs_nfe.png to the
workdir (see iec_jax/run/reproduce.py for the per-row files).
"""

from iec_jax.io import use_all_cpu_cores

use_all_cpu_cores()  # before JAX initialises: one host device per core


from absl import app, flags
from ml_collections import config_flags

from iec_jax.io import enable_compilation_cache
from iec_jax.run import reproduce

_CONFIG = config_flags.DEFINE_config_file("config", None, "Table configuration.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (resumed if it exists).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    enable_compilation_cache()
    reproduce.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
