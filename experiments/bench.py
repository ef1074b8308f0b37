"""Speed of the jitted JAX sampler against PyTorch eager and torch.compile (a script, not a test).

  python -m experiments.bench --config configs/bench.py --workdir runs/bench

Times DDIM sampling of one UNet with the same weights and steps in JAX (float32 and
bfloat16, with and without IEC) and in PyTorch (diffusers UNet2DModel + DDIMScheduler,
eager and torch.compile). Prints a table and writes bench.json and bench.md (images/s,
ms per NFE, FLOP rate, IEC's wall ratio against its NFE ratio) to the workdir.
"""

import os

from iec_jax.io import use_all_cpu_cores

os.environ.setdefault("HF_HUB_OFFLINE", "1")
use_all_cpu_cores()  # before JAX initialises: one host device per core

from iec_jax.run import bench  # noqa: E402
from iec_jax.run.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job(bench.run, what="Benchmark", default_config="configs/bench.py", default_workdir="runs/bench")
