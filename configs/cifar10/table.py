"""The paper's tables on a converted google/ddpm-cifar10-32 (the paper's own CIFAR-10 model).

The checkpoint cannot be downloaded here; convert it first:
  python -m experiments.convert --src <ddpm-cifar10-32 folder> --dst runs/models/ddpm-cifar10-32
  (or --layout ddpm_original --src model-790000.ckpt)
The reference statistics are the 50,000 CIFAR-10 training images (TFDS ``cifar10``,
prepared once where TensorFlow is installed: ``tfds build cifar10``).

Settings as docs/semantics.md §5.1: DDIM-100, η = 0, quad grid, seed 1243, 50,000 samples in
batches of 500, DeepCache branch 2, calibration 512 samples (64 / 32 per step).
Variants: none = 50,000 samples (GPU); ``cpu`` = 10,000. Both report FID∞ (15 subsets of
N/4 to N samples) beside FID.
"""

from configs import tables
from configs.base import table_config as _base


def table_config(table: str, arg=None):
    c = _base("runs/models/ddpm-cifar10-32", model_name="ddpm-cifar10-32")
    c.name = f"ddpm-cifar10-32 {table}"
    c.table = table
    c.rows = tables.TABLES[table]()
    c.num_samples, c.batch_size, c.shard_size = 50_000, 500, 5_000
    c.eval.update(dict(dataset="cifar10", split="train", crop=None))
    c.fid_infinity = 15  # FID∞ beside FID (both variants have > 4 x 2048 samples)
    if arg == "cpu":
        c.num_samples, c.batch_size, c.shard_size = 10_000, 128, 1_000
    elif arg not in (None, ""):
        raise ValueError(f"unknown config variant {arg!r}; known: cpu")
    return c
