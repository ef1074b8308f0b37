"""Speed of the jitted JAX sampler against PyTorch eager and torch.compile (a script, not a test).

  python -m experiments.bench --config configs/bench.py --workdir runs/bench
"""

import os

from iec_jax.io import use_all_cpu_cores

os.environ.setdefault("HF_HUB_OFFLINE", "1")
use_all_cpu_cores()  # before JAX initialises: one host device per core

from iec_jax.run import bench  # noqa: E402
from iec_jax.run.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job(bench.run, what="Benchmark", default_config="configs/bench.py", default_workdir="runs/bench")
