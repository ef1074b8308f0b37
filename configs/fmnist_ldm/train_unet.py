"""Stage 2 of the latent Fashion-MNIST model: a class-conditional latent UNet (the
class-conditional LDM design, cin256's, at a small size) with label dropout for
classifier-free guidance, on the latents of the stage-1 autoencoder.

Command (about 90 minutes on the 2-core CPU machine; resumes from the workdir):
  python -m experiments.train --config configs/fmnist_ldm/train_unet.py \
      --workdir runs/train/fmnist-ldm-unet --config.autoencoder=runs/train/fmnist-ldm-ae
``--config.autoencoder`` is the workdir of configs/fmnist_ldm/train_autoencoder.py (or
its model/ folder). Variants (``:arg``): ``smoke`` (tiny widths, 4 steps on 64 images:
the tests' run). The trained model is written to <workdir>/model as one latent model
(UNet, class embedder, autoencoder with the fitted scale factor, schedule; each
component with its training.json and metrics.jsonl):
  from iec_jax.train_latent import load_trained_latent_model
  model = load_trained_latent_model("runs/train/fmnist-ldm-unet/model")

Latents: the posterior means of the 60,000 training images and of their mirror images
(random flips pick one), computed once at the start, times scale_factor = 1 / their std
(the LDM scale_by_std rule; recorded in latents.json and training.json).
Model: ``UNetConditionConfig`` for 8 × 8 × 4 latents, block_out_channels (32, 64, 64),
one resnet per level, cross-attention transformers at 4 × 4, 2 × 2 and in the middle
block (none at 8 × 8, as cin256 has none at its top level), one attention head of width C
(``attention_head_dim=1``), GroupNorm(8), no dropout; the context is one token, the
class embedding (``ClassEmbedder(11, 64)``: 10 classes, class 10 unconditional), trained
jointly. 1,687,652 + 704 float32 parameters, 6.8 MB; with the autoencoder 8.5 MB.
Label dropout 0.1: a label is replaced by the null class 10 with probability 0.1.
Diffusion: ε-prediction, ``scaled_linear`` β 0.0015 -> 0.0195, T = 1000 (LDM-4's).
Optimizer: AdamW (β 0.9 / 0.999, no weight decay), 4e-4 after a 200-step warm-up, cosine
to 0 at the last step, gradients clipped to norm 1; EMA 0.9995 with the
(1 + n) / (10 + n) warm-up.

Sizes by measured step time (the configured jitted step with both cores as JAX devices,
as experiments.train runs it; other jobs shared the machine, load average ~3.5): batch
128 takes 0.51 s per step (median of 60 steps; 0.28 s at a quieter moment), so 10,000
steps (1.28 million latents, 21 epochs) take about 85 minutes, plus 130-160 s to encode
the 120,000 latents at the start and ~20 s of compilation: about 90 minutes; with stage 1
about 1 h 50 min. The model folder measures 8.4 MB (float32, with the records).
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config(arg: str | None = None):
    c = ml_collections.ConfigDict()
    c.trainer = "latent_unet"
    c.autoencoder = placeholder(str)  # the stage-1 workdir: --config.autoencoder=<dir>
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        dtype="float32",
        unet=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            cross_attention_dim=64,
            attention_head_dim=1,
            norm_num_groups=8,
            flip_sin_to_cos=True,
            freq_shift=0,
            dropout=0.0,
        ),
    ))
    c.conditioning = ml_collections.ConfigDict(dict(num_classes=10, null_class=10, label_dropout=0.1))
    c.schedule = ml_collections.ConfigDict(
        dict(kind="scaled_linear", beta_start=0.0015, beta_end=0.0195, num_timesteps=1000))
    c.data = ml_collections.ConfigDict(
        dict(dataset="fashion_mnist", split="train", data_dir=placeholder(str), flip=True))
    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=4e-4, lr_schedule="cosine", warmup_steps=200, b1=0.9, b2=0.999,
        eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0))
    c.ema = ml_collections.ConfigDict(dict(decay=0.9995, warmup=True))
    c.training = ml_collections.ConfigDict(dict(
        batch_size=128, num_steps=10_000, log_every=50, checkpoint_every=500,
        keep_checkpoints=2, encode_batch_size=512))

    if arg == "smoke":
        # Tiny widths, 4 steps on the first 64 training images (tests/test_train_latent.py).
        c.model.unet.block_out_channels = (8, 16)
        c.model.unet.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D")
        c.model.unet.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D")
        c.model.unet.cross_attention_dim = 16
        c.model.unet.norm_num_groups = 4
        c.data.split = "train[:64]"
        c.optimizer.learning_rate = 1e-3
        c.optimizer.lr_schedule = "constant"  # runs of any length share one compiled step
        c.optimizer.warmup_steps = 1
        c.ema.decay = 0.9
        c.training.batch_size = 8
        c.training.num_steps = 4
        c.training.log_every = 2
        c.training.checkpoint_every = 2
        c.training.encode_batch_size = 16
    elif arg not in (None, ""):
        raise ValueError(f"unknown config variant {arg!r}; known: 'smoke'")
    return c
