"""Sample N images, compute Inception features and FID/sFID/precision/recall (resumable).

  python -m experiments.evaluate --config configs/fmnist/evaluate.py --workdir runs/eval/NAME

Writes to the workdir samples/samples_*.npz (uint8 shards), features/features_*.npz,
grid.png, result.json and metrics.jsonl, and appends a line to config.results_table
(see iec_jax/run/evaluate.py). Resumable at every stage.
"""

from iec_jax.io import use_all_cpu_cores

use_all_cpu_cores()  # before JAX initialises: one host device per core

from iec_jax.run import evaluate  # noqa: E402
from iec_jax.run.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job(evaluate.run, what="Evaluation", settings=evaluate.settings, default_config=None, default_workdir=None)
