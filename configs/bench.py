"""JAX sampler vs PyTorch (diffusers UNet2DModel + DDIMScheduler), same machine, one run.

Command (picks the setting from the JAX backend; no edits needed between machines):
  python -m experiments.bench --config configs/bench.py --workdir runs/bench
Variants: ``:cpu`` (the bundled fmnist-ddpm checkpoint, batch 64, float32 only),
          ``:gpu`` (the 35.7M DDPM CIFAR-10 architecture with random weights, batch 500,
          float32 and bfloat16), ``:smoke`` (tests: batch 2, 4 steps, no torch.compile).
Targets (issue 3): CPU: JAX at least as fast per NFE as PyTorch eager. GPU: ≥ 1.5×
eager and ≥ 1.2× torch.compile in float32, bfloat16 ≥ 2× float32, and IEC's wall-clock
ratio within 3% of its NFE ratio.
Runtime: CPU about 10 minutes on 2 cores (torch.compile's first compile included).
"""

import ml_collections


def get_config(arg: str | None = None):
    if arg in (None, ""):
        import jax

        arg = "gpu" if jax.default_backend() == "gpu" else "cpu"
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(source="fmnist-ddpm"))
    c.schedule = ml_collections.ConfigDict(
        dict(kind="linear", beta_start=1e-4, beta_end=0.02, num_timesteps=1000, final_alpha="one")
    )
    c.num_steps = 100
    c.batch_size = 64
    c.dtypes = ("float32",)
    c.repeats = 3
    c.torch_compile = True
    if arg == "gpu":
        c.model.source = "random_cifar10"
        c.batch_size = 500
        c.dtypes = ("float32", "bfloat16")
    elif arg == "smoke":
        c.batch_size = 2
        c.num_steps = 4
        c.repeats = 1
        c.torch_compile = False
    elif arg == "cpu":
        c.num_steps = 20
        c.repeats = 2
        c.dtypes = ("float32", "bfloat16")
    else:
        raise ValueError(f"unknown config variant {arg!r}; known: 'cpu', 'gpu', 'smoke'")
    return c
