"""DDIM-100 samples from the shared Fashion-MNIST reference checkpoint.

Command:
  python -m experiments.sample --config configs/fmnist/ddim.py --workdir runs/fmnist-ddim
Variants (``:arg``): ``smoke`` (16 samples, 10 steps), ``bf16`` (bfloat16 compute).
Overrides, e.g.: --config.iec.preset=official_ddpm --config.num_samples=10000
Runtime: see the README (CPU throughput is measured by experiments.bench).

The model is read from ../shared/models/fmnist-ddpm (a diffusers folder, converted in
memory) unless model.source names a checkpoint written by experiments.convert. Its
training schedule: linear β 1e-4 → 0.02, T = 1000. The grid is "uniform" (990, ..., 0),
which is also what its diffusers DDIMScheduler ("leading") uses for 100 steps.
"""

import ml_collections

from configs.base import iec_config


def get_config(arg: str | None = None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_samples = 256
    c.batch_size = 128
    c.shard_size = 1024
    c.grid_size = 64
    c.model = ml_collections.ConfigDict(dict(source="../shared/models/fmnist-ddpm",
                                             dtype="float32"))
    c.schedule = ml_collections.ConfigDict(
        dict(kind="linear", beta_start=1e-4, beta_end=0.02, num_timesteps=1000, final_alpha="one")
    )
    c.sampler = ml_collections.ConfigDict(dict(num_steps=100, spacing="uniform", eta=0.0))
    c.iec = iec_config("none")

    if arg == "smoke":
        c.num_samples, c.batch_size, c.shard_size, c.grid_size = 16, 8, 16, 16
        c.sampler.num_steps = 10
    elif arg == "bf16":
        c.model.dtype = "bfloat16"
    elif arg not in (None, ""):
        raise ValueError(f"unknown config variant {arg!r}; known: 'smoke', 'bf16'")
    return c
