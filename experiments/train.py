"""Train a diffusion model from scratch; resumes from the workdir's newest checkpoint.

The pixel DDPM (an ε-prediction UNet on 32 × 32 Fashion-MNIST):
  python -m experiments.train --config configs/fmnist/train.py --workdir runs/train/fmnist
The latent model in two stages, a KL autoencoder, then a class-conditional latent UNet
with label dropout for classifier-free guidance on its latents (the config's
``trainer`` picks the stage):
  python -m experiments.train --config configs/fmnist_ldm/train_autoencoder.py \
      --workdir runs/train/fmnist-ldm-ae
  python -m experiments.train --config configs/fmnist_ldm/train_unet.py \
      --workdir runs/train/fmnist-ldm-unet --config.autoencoder=runs/train/fmnist-ldm-ae

Writes config.json, checkpoints/ (orbax), metrics.jsonl, TensorBoard event files when the
tensorboard extra is installed, and at the end model/ (the EMA model: the UNet; the
autoencoder; or the whole latent model with the fitted scale factor, plus latents.json)
and training.json to the workdir (iec_jax/run/train.py).
"""

from iec_jax.io import use_all_cpu_cores

use_all_cpu_cores()  # before JAX initialises: one host device per core

from iec_jax.run import train  # noqa: E402
from iec_jax.run.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job(train.run, what="Training", settings=train.settings, default_config=None, default_workdir="runs/train/fmnist")
