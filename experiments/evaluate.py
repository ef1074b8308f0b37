"""Sample N images, compute Inception features and FID/sFID/precision/recall (resumable).

  python -m experiments.evaluate --config configs/fmnist/evaluate.py --workdir runs/eval/NAME
"""

from iec_jax.io import use_all_cpu_cores

use_all_cpu_cores()  # before JAX initialises: one host device per core


from absl import app, flags
from ml_collections import config_flags

from iec_jax.io import enable_compilation_cache
from iec_jax.run import evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Evaluation configuration.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (resumed if it exists).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    enable_compilation_cache()
    evaluate.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
