"""DDIM-100 samples from the bundled Fashion-MNIST reference checkpoint.

Command:
  python -m experiments.sample --config configs/fmnist/ddim.py --workdir runs/fmnist-ddim
Variants (``:arg``): ``smoke`` (16 samples, 10 steps), ``bf16`` (bfloat16 compute).
Overrides, e.g.: --config.iec.preset=official_ddpm --config.num_samples=10000
Runtime: see the README (CPU throughput is measured by experiments.bench).

The model is the bundled fmnist-ddpm (iec_jax/assets/fmnist-ddpm, a diffusers folder,
converted in memory) unless model.source names another checkpoint or folder. Its
training schedule: linear β 1e-4 → 0.02, T = 1000. The grid is "uniform" (990, ..., 0),
which is also what its diffusers DDIMScheduler ("leading") uses for 100 steps.
"""

from configs.base import sampling_config


def get_config(arg: str | None = None):
    c = sampling_config("fmnist-ddpm", spacing="uniform")
    if arg == "smoke":
        c.num_samples, c.batch_size, c.shard_size, c.grid_size = 16, 8, 16, 16
        c.sampler.num_steps = 10
    elif arg == "bf16":
        c.model.dtype = "bfloat16"
    elif arg not in (None, ""):
        raise ValueError(f"unknown config variant {arg!r}; known: 'smoke', 'bf16'")
    return c
