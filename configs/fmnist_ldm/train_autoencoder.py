"""Stage 1 of the latent Fashion-MNIST model: a KL-regularized f4 autoencoder.

Command (about 25 minutes on the 2-core CPU machine; resumes from the workdir):
  python -m experiments.train --config configs/fmnist_ldm/train_autoencoder.py \
      --workdir runs/train/fmnist-ldm-ae
then stage 2 (configs/fmnist_ldm/train_unet.py):
  python -m experiments.train --config configs/fmnist_ldm/train_unet.py \
      --workdir runs/train/fmnist-ldm-unet --config.autoencoder=runs/train/fmnist-ldm-ae
Variants (``:arg``): ``smoke`` (tiny widths, 4 steps on 64 images: the tests' run).

Model: ``AutoencoderConfig(kind="kl")`` with three levels, block_out_channels
(16, 32, 48), one resnet per encoder level (two per decoder level), GroupNorm(8), the
mid-block attention at 8 × 8, a 4-channel latent: 32 × 32 × 1 -> 8 × 8 × 4 (f = 4).
428,293 float32 parameters, 1.7 MB.
Loss (iec_jax/train_latent.py): mean L1 reconstruction of a posterior sample plus
kl_weight = 1e-6 times the per-example KL divided by the 1,024 pixels, i.e. the LDM
autoencoder objective with LDM's KL weight, without its perceptual (LPIPS) and
adversarial terms: no LPIPS weights are available offline, and a discriminator is not
worth its cost at 32 × 32.
Data: the 60,000 training images in [-1, 1], padded with -1 to 32 × 32, random
horizontal flips (the pixel trainer's stream). At the end the EMA autoencoder's
reconstruction error on the first 1,000 test images is reported (training.json).
Optimizer: AdamW (β 0.9 / 0.999, no weight decay), 1e-3 after a 100-step warm-up, cosine
to 0 at the last step (so a resumed run keeps num_steps), gradients clipped to norm 1;
EMA 0.999 with the (1 + n) / (10 + n) warm-up. (A 300-step trial at this rate reached a
training L1 of 0.095.)

Sizes by measured step time (the configured jitted step with both cores as JAX devices,
as experiments.train runs it; other jobs shared the machine, load average ~3.5): batch
32 takes 0.34 s per step (median of 60 steps; 0.20 s at a quieter moment, 0.50 s at load
4.5), so 4,000 steps (128,000 images, 2.1 epochs) take about 23 minutes, plus ~20 s of
compilation. Stage 2 then takes about 90 minutes: both stages about 1 h 50 min.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config(arg: str | None = None):
    c = ml_collections.ConfigDict()
    c.trainer = "autoencoder"
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        dtype="float32",
        autoencoder=dict(
            kind="kl",
            latent_channels=4,
            in_channels=1,
            out_channels=1,
            block_out_channels=(16, 32, 48),
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=32,
        ),
    ))
    c.loss = ml_collections.ConfigDict(dict(kl_weight=1e-6, sample_posterior=True))
    c.data = ml_collections.ConfigDict(
        dict(dataset="fashion_mnist", split="train", data_dir=placeholder(str), flip=True))
    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=1e-3, lr_schedule="cosine", warmup_steps=100, b1=0.9, b2=0.999,
        eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0))
    c.ema = ml_collections.ConfigDict(dict(decay=0.999, warmup=True))
    c.training = ml_collections.ConfigDict(dict(
        batch_size=32, num_steps=4_000, log_every=50, checkpoint_every=250,
        keep_checkpoints=2, eval_examples=1000))

    if arg == "smoke":
        # Tiny widths, 4 steps on the first 64 training images (tests/test_train_latent.py).
        c.model.autoencoder.block_out_channels = (8, 8, 16)
        c.model.autoencoder.norm_num_groups = 4
        c.data.split = "train[:64]"
        c.optimizer.learning_rate = 1e-3
        c.optimizer.lr_schedule = "constant"  # runs of any length share one compiled step
        c.optimizer.warmup_steps = 1
        c.ema.decay = 0.9
        c.training.batch_size = 8
        c.training.num_steps = 4
        c.training.log_every = 2
        c.training.checkpoint_every = 2
        c.training.eval_examples = 16
    elif arg not in (None, ""):
        raise ValueError(f"unknown config variant {arg!r}; known: 'smoke'")
    return c
