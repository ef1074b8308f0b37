"""Train the project's own small Fashion-MNIST DDPM (ε-prediction) from scratch.

Command:
  python -m experiments.train --config configs/fmnist/train.py --workdir runs/train/fmnist
Variants (``:arg``): ``gpu`` (batch 512, for one accelerator), ``smoke`` (a tiny model,
4 steps: the tests' end-to-end run). Overrides, e.g.: --config.training.num_steps=2000
--config.data.data_dir=runs/tfds --config.model.dtype=bfloat16
Then sample the EMA model:
  python -m experiments.sample --config configs/fmnist/ddim.py --workdir runs/train/fmnist-ddim \
      --config.model.source=runs/train/fmnist/model

Target: a model small enough to ship in the repository (1,623,169 float32 parameters,
6.5 MB): the reference checkpoint's layout (fmnist-ddpm, bundled: the DDPM
CIFAR-10 UNet scaled down) with three levels instead of four, block_out_channels
(32, 64, 64) at 32 × 32, attention at 16 × 16, 2 res blocks per level, GroupNorm(16),
dropout 0.1. Data as the reference: the 60,000 training images scaled to [-1, 1], padded
by 2 pixels of -1 to 32 × 32, random horizontal flips. Diffusion: T = 1000, linear β
1e-4 → 0.02 (the schedule configs/fmnist/ddim.py samples with).
Optimizer: AdamW (β 0.9 / 0.999, no weight decay), 2e-4 after a 1,000-step linear warm-up,
then constant (DDPM's CIFAR-10 recipe), gradients clipped to global norm 1; EMA 0.9999
with the (1 + n) / (10 + n) warm-up (see iec_jax/train.py).
Runtime: on the idle 2-core CPU machine (both cores as JAX devices) one step at batch
128 takes ~4 s (32 images/s), so 20,000 steps take about a day there; the ``gpu`` variant
is the practical way to train it. Compiling the step takes ~10-40 s on that CPU.

The ``cpu`` variant is what that CPU trains in about 1.3 hours and is the embedded model
shipped in ``iec_jax/assets/fmnist-small`` (5,000 steps at ~1.1 steps/s, 4,601 s; its
training.json and metrics.jsonl lie next to it; FID in the README, "Training").
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config(arg: str | None = None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        dtype="float32",  # computation dtype ("bfloat16" on accelerators); params float32
        unet=dict(
            sample_size=32,
            in_channels=1,
            out_channels=1,
            block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            layers_per_block=2,
            downsample_padding=1,
            norm_num_groups=16,
            norm_eps=1e-5,
            flip_sin_to_cos=False,
            freq_shift=1,
            dropout=0.1,
        ),
    ))
    c.schedule = ml_collections.ConfigDict(
        dict(kind="linear", beta_start=1e-4, beta_end=0.02, num_timesteps=1000))
    c.data = ml_collections.ConfigDict(
        dict(dataset="fashion_mnist", split="train", data_dir=placeholder(str), flip=True))
    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=2e-4, lr_schedule="constant", warmup_steps=1000, b1=0.9, b2=0.999,
        eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0))
    c.ema = ml_collections.ConfigDict(dict(decay=0.9999, warmup=True))
    c.training = ml_collections.ConfigDict(dict(
        batch_size=128, num_steps=20_000, log_every=100, checkpoint_every=1000,
        keep_checkpoints=3))

    if arg == "gpu":
        # One accelerator: 4x the batch (and a 2x learning rate), bfloat16 compute; about
        # the reference checkpoint's budget (batch 512, ~5,700 steps) plus a margin.
        c.model.dtype = "bfloat16"
        c.training.batch_size = 512
        c.training.num_steps = 8_000
        c.optimizer.learning_rate = 4e-4
        c.optimizer.warmup_steps = 500
        c.training.checkpoint_every = 500
    elif arg == "cpu":
        # What a 2-core CPU trains in about 1.3 hours: the embedded model shipped in
        # iec_jax/assets/ (see its training.json). Half the width at 32 x 32 and 16 x 16
        # (926,817 parameters, 3.7 MB), no dropout, batch 64, a higher learning rate with a
        # short warm-up, and an EMA horizon that suits a few thousand steps.
        c.model.unet.block_out_channels = (16, 32, 64)
        c.model.unet.norm_num_groups = 8
        c.model.unet.dropout = 0.0
        c.training.batch_size = 64
        c.training.num_steps = 5_000
        c.optimizer.learning_rate = 5e-4
        c.optimizer.warmup_steps = 200
        c.ema.decay = 0.9995
        c.training.log_every = 50
        c.training.checkpoint_every = 250
    elif arg == "smoke":
        # A tiny model and 4 steps on the real data (tests/test_train.py runs it).
        c.model.unet.block_out_channels = (8, 16)
        c.model.unet.down_block_types = ("DownBlock2D", "AttnDownBlock2D")
        c.model.unet.up_block_types = ("AttnUpBlock2D", "UpBlock2D")
        c.model.unet.layers_per_block = 1
        c.model.unet.norm_num_groups = 4
        c.optimizer.learning_rate = 1e-3
        c.optimizer.warmup_steps = 2
        c.ema.decay = 0.9
        c.training.batch_size = 8
        c.training.num_steps = 4
        c.training.log_every = 2
        c.training.checkpoint_every = 2
        c.training.keep_checkpoints = 2
    elif arg not in (None, ""):
        raise ValueError(f"unknown config variant {arg!r}; known: 'gpu', 'cpu', 'smoke'")
    return c
