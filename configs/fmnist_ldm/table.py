"""The latent tables on the project's own class-conditional latent Fashion-MNIST model
(configs/fmnist_ldm/table{1,2,3}.py call :func:`table_config`).

Model: the bundled ``fmnist-ldm`` (iec_jax/assets/fmnist-ldm: a KL-f4 autoencoder,
32×32×1 -> 8×8×4, and a class-conditional latent UNet in the cin256 design, trained by
configs/fmnist_ldm/train_{autoencoder,unet}.py). Sampler as the LDM settings: DDIM-100,
η = 0, classifier-free guidance 1.5 (the null class 10), sample i of class i mod 10,
seed 1243; the grid is diffusers' "leading" one with the LDM rule for the last step (to
ᾱ_0), so that the NFE-matched controls (DDIM-110, -120) exist. DeepCache at the
shallowest branch (the feature entering up_blocks[-1].resnets[-1] of three levels with
one resnet each: cache point (2, 1)). FID against the 10,000-image Fashion-MNIST test
split (decoded samples centre-cropped 32 -> 28). Both IEC variants: the official LDM
path and the paper's. "L2 to ODE" over the first 256 samples.

Variants: none = 10,000 samples per row; ``quick`` = 2,000 per row; ``smoke`` (tests).
Rows that carry a paper cell are run at 10,000 samples, the controls at 2,000
(--config.only, a separate work directory).
"""

from configs import ldm_tables
from configs.base import latent_table_config, table_row

SOURCE = "fmnist-ldm"


def table_config(table: str, rows, arg=None):
    c = latent_table_config("fmnist_ldm", source=SOURCE, method="ddim", num_steps=100, scale=1.5)
    c.name = f"fmnist-ldm {table}"
    c.table = table
    c.rows = rows
    c.sampler.spacing = "leading"
    c.cache_point = (2, 1)
    c.num_samples, c.batch_size, c.shard_size = 10_000, 250, 2_000
    c.trajectory_samples = 16
    c.bootstrap = 50
    c.fid_infinity = 15
    c.ode.samples = 256
    c.calibration.update(dict(num_samples=256, batch_size=64, per_step_full=64,
                              per_step_cached=32, dps_samples=32))
    c.eval.update(dict(dataset="fashion_mnist", split="test", crop=28, inception_batch_size=64,
                       frechet_method="eigh"))
    if arg in (None, ""):
        pass
    elif arg == "quick":
        c.num_samples = 2_000
        c.fid_infinity = 0  # 2,000 samples: below the 2048 features FID is not linear in 1/N
    elif arg == "smoke":
        ldm_tables.smoke(c)
        c.cache_point = (2, 1)
        c.model.source = SOURCE
        c.ode.samples = 4
    else:
        raise ValueError(f"unknown config variant {arg!r}; known: quick, smoke")
    return c


FP = table_row("FP")
FP_IEC = table_row("FP + IEC", iec="official_ldm", baseline="FP")
FP_HEUN = table_row("FP Heun", iec="heun", baseline="FP")
