"""Speed of the jitted JAX sampler against PyTorch eager and torch.compile (a script, not a test).

  python -m experiments.bench --config configs/bench.py --workdir runs/bench
"""

import os

from iec_jax.io import use_all_cpu_cores

os.environ.setdefault("HF_HUB_OFFLINE", "1")
use_all_cpu_cores()  # before JAX initialises: one host device per core

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from iec_jax.io import enable_compilation_cache  # noqa: E402
from iec_jax.run import bench  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bench.py", "Benchmark configuration.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/bench", "Where bench.json is written.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    enable_compilation_cache()
    bench.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
