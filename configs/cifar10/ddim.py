"""DDIM-100 samples from a converted google/ddpm-cifar10-32 (the paper's CIFAR-10 model).

The checkpoint cannot be downloaded here; users who have it convert it first:
  python -m experiments.convert --src <ddpm-cifar10-32 folder> --dst runs/models/ddpm-cifar10-32
  (or --layout ddpm_original --src model-790000.ckpt for the original DDPM file)
Command:
  python -m experiments.sample --config configs/cifar10/ddim.py --workdir runs/cifar10-ddim

Sampler as in the paper's CIFAR-10 rows (PAPER.md §5.2): DDIM-100, η = 0, the DDIM
repo's "quad" grid (max t = 800, duplicates kept); linear β 1e-4 → 0.02, T = 1000.
Paper: FP FID 4.19 (Table 1), 50,000 samples, batch 500.
"""

import ml_collections

from configs.base import iec_config


def get_config(arg: str | None = None):
    c = ml_collections.ConfigDict()
    c.seed = 1243  # the official scripts' seed (1234 + 9)
    c.num_samples = 50_000
    c.batch_size = 500
    c.shard_size = 5_000
    c.grid_size = 64
    c.model = ml_collections.ConfigDict(dict(source="runs/models/ddpm-cifar10-32",
                                             dtype="float32"))
    c.schedule = ml_collections.ConfigDict(
        dict(kind="linear", beta_start=1e-4, beta_end=0.02, num_timesteps=1000, final_alpha="one")
    )
    c.sampler = ml_collections.ConfigDict(dict(num_steps=100, spacing="quad", eta=0.0))
    c.iec = iec_config("none")
    if arg not in (None, ""):
        raise ValueError(f"unknown config variant {arg!r}")
    return c
