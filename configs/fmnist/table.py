"""The paper's tables on the bundled Fashion-MNIST reference checkpoint (the table*.py
configs call :func:`table_config`).

Sampler as the paper's CIFAR-10 rows (docs/semantics.md §5.1): DDIM-100, η = 0, quad grid (max t
800, duplicates kept), seed 1243; DeepCache branch 2 (cache point up_blocks[2].resnets[2]);
calibration as the official CIFAR-10 scripts (512 FP samples, 64 / 32 per full / cached
step). FID against the 10,000-image test split (samples centre-cropped 32 → 28).

Variants (``:arg``): none = 10,000 samples per row (a CPU's size);
``gpu`` = 50,000 samples in batches of 500 (the official CIFAR-10 setting); ``gpu10k`` =
10,000 samples in batches of 1,000 (minutes on one GPU); these three
report FID∞ (15 nested subsets of N/4 to N samples) beside FID; ``quick`` = 500 samples per row, 128
calibration samples with 16 / 8 per full / cached step (the activation search costs
~0.5 s per sample and step on a 2-core CPU); ``smoke`` = a few samples, 10 steps (tests).
"""

from configs import tables
from configs.base import table_config as _base


def table_config(table: str, arg=None):
    c = _base("fmnist-ddpm", model_name="fmnist-ddpm")
    c.name = f"fmnist-ddpm {table}"
    c.table = table
    c.rows = tables.TABLES[table]()
    c.fid_infinity = 15  # FID∞ beside FID where num_samples > 4 x 2048 (not quick, smoke)
    if arg in (None, ""):
        pass
    elif arg in ("gpu", "gpu10k"):
        # gpu: the official CIFAR-10 script's count and batch (docs/semantics.md §5.1)
        c.num_samples, c.batch_size, c.shard_size = {"gpu": (50_000, 500, 5_000),
                                                      "gpu10k": (10_000, 1_000, 2_000)}[arg]
        c.eval.inception_batch_size = 500
        c.eval.frechet_method = "eigh"  # symmetric form, same quantity; faster than sqrtm
    elif arg == "quick":
        c.num_samples, c.batch_size, c.shard_size = 500, 100, 500
        # CPU-sized calibration (official: 512 samples, 64 / 32 per full / cached step).
        c.calibration.update(dict(num_samples=128, per_step_full=16, per_step_cached=8))
        c.bootstrap = 50
        c.fid_infinity = 0  # 500 samples: below the 2048 features FID is not linear in 1/N
    elif arg == "smoke":
        smoke(c)
    else:
        raise ValueError(f"unknown config variant {arg!r}; known: gpu, gpu10k, quick, smoke")
    return c


def smoke(c) -> None:
    """A few samples and 10 steps (tests): shrinks a table config in place, keeping the
    rows' proportions (step counts, cache intervals) on 10 steps."""
    c.num_samples, c.batch_size, c.shard_size = 8, 4, 8
    c.fid_infinity = 0
    c.trajectory_samples = 2
    c.sampler.num_steps = 10
    c.calibration.update(dict(num_samples=8, batch_size=4, per_step_full=4,
                              per_step_cached=2, dps_samples=4,
                              # DeepCache's non-uniform rule has no 5 distinct steps for
                              # S = 10, N = 2, center 5 at pow <= 1.4; at 2.0 it has.
                              nonuniform_pow=2.0))
    c.eval.split = "test[:64]"
    c.eval.inception_batch_size = 8
    c.eval.frechet_method = "eigh"
    for r in c.rows:
        r["num_steps"] = {200: 20, 110: 11}.get(r["num_steps"], r["num_steps"])
        r["cache_interval"] = {10: 2, 15: 3, 5: 1}.get(r["cache_interval"], r["cache_interval"])
