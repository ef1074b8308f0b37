"""Unconditional samples of LDM-8 LSUN-Church (KL-f8 latents 4×32×32, the checkpoint's scale_factor).

Command (with the original single-file checkpoint, converted once):
  python -m experiments.convert --layout compvis --setting lsun_church \
      --src lsun_churches256/model.ckpt --dst runs/models/ldm-church
  python -m experiments.sample --config configs/lsun_church/sample.py --workdir runs/church \
      --config.model.source=runs/models/ldm-church --config.num_samples=50000 --config.batch_size=50
``:smoke``: a random model of the same architecture at reduced width (runs anywhere).

The paper's setting (docs/semantics.md §5.1, §6): DDIM-100 on the LDM grid (t = 1, 11, ...,
991), η = 0, seed 1243, 50,000 samples in batches of 50. Paper: Table 1: FP 3.99, W8A8 3.57 -> 3.29, W4A8 6.27 -> 6.10; Table 2: DeepCache N = 10 14.81 -> 13.17; Table 3: CacheQuant W8A8 N = 15 9.47 -> 6.90.
"""

from configs.base import latent_sampling_config, latent_smoke


def get_config(arg=None):
    c = latent_sampling_config("lsun_church", source="runs/models/ldm-church", method="ddim",
                               num_steps=100)
    if arg == "smoke":
        latent_smoke(c)
    elif arg not in (None, ""):
        raise ValueError(f"unknown config variant {arg!r}; known: smoke")
    return c
