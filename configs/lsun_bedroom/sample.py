"""Unconditional samples of LDM-4 LSUN-Bedroom (VQ-f4 latents 3×64×64, scaling factor 1).

Command (with the original single-file checkpoint, converted once):
  python -m experiments.convert --layout compvis --setting lsun_bedroom \
      --src lsun_beds256/model.ckpt --dst runs/models/ldm-bedroom
  python -m experiments.sample --config configs/lsun_bedroom/sample.py --workdir runs/bedroom \
      --config.model.source=runs/models/ldm-bedroom --config.num_samples=50000 --config.batch_size=50
``:smoke``: a random model of the same architecture at reduced width (runs anywhere).

The paper's setting (docs/semantics.md §5.1, §6): DDIM-100 on the LDM grid (t = 1, 11, ...,
991), η = 0, seed 1243, 50,000 samples in batches of 50. Paper: Table 1: FP 3.37, W8A8 8.97 -> 7.78 with IEC; Table 2: DeepCache N = 5 14.28 -> 9.20.
"""

from configs.base import latent_sampling_config, latent_smoke


def get_config(arg=None):
    c = latent_sampling_config("lsun_bedroom", source="runs/models/ldm-bedroom", method="ddim",
                               num_steps=100)
    if arg == "smoke":
        latent_smoke(c)
    elif arg not in (None, ""):
        raise ValueError(f"unknown config variant {arg!r}; known: smoke")
    return c
