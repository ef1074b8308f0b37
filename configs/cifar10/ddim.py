"""DDIM-100 samples from a converted google/ddpm-cifar10-32 (the paper's CIFAR-10 model).

The checkpoint cannot be downloaded here; users who have it convert it first:
  python -m experiments.convert --src <ddpm-cifar10-32 folder> --dst runs/models/ddpm-cifar10-32
  (or --layout ddpm_original --src model-790000.ckpt for the original DDPM file)
Command:
  python -m experiments.sample --config configs/cifar10/ddim.py --workdir runs/cifar10-ddim

Sampler as in the paper's CIFAR-10 rows (docs/semantics.md §5.1): DDIM-100, η = 0, the DDIM
repo's "quad" grid (max t = 800, duplicates kept); linear β 1e-4 → 0.02, T = 1000.
Paper: FP FID 4.19 (Table 1), 50,000 samples, batch 500.
"""

from configs.base import sampling_config


def get_config(arg: str | None = None):
    # The official scripts' seed (1234 + 9), 50,000 samples in batches of 500.
    c = sampling_config("runs/models/ddpm-cifar10-32", spacing="quad", seed=1243)
    c.num_samples, c.batch_size, c.shard_size = 50_000, 500, 5_000
    if arg not in (None, ""):
        raise ValueError(f"unknown config variant {arg!r}")
    return c
