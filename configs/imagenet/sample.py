"""Class-conditional samples of LDM-4 ImageNet cin256-v2 with classifier-free guidance.

Command (with a converted model or the original checkpoint):
  python -m experiments.convert --layout compvis --setting imagenet \
      --src cin256-v2/model.ckpt --dst runs/models/cin256
  python -m experiments.sample --config configs/imagenet/sample.py --workdir runs/cin256 \
      --config.model.source=runs/models/cin256 --config.num_samples=50000 \
      --config.batch_size=50
``:smoke``: a random model of the same architecture at reduced width (runs anywhere).

The paper's setting (docs/semantics.md §5.1, §6): DDIM-250 on the LDM grid (t = 1, 5, ...,
997), η = 0, guidance scale 1.5 with the null class 1000, 50 samples per class in class
order (sample i has class i // 50), seed 1243; VQ-f4 latents 3×64×64 (scaling factor 1).
Table 4 (ImageNet) of the paper: numbers not available to the project. The efficient
model of the official script is CacheQuant N = 20 with the DPS schedule, W8A8, IEC at the
refresh steps (configs/imagenet/table.py).
"""

from configs.base import latent_sampling_config, latent_smoke


def get_config(arg=None):
    c = latent_sampling_config("imagenet", source="runs/models/cin256", method="ddim",
                               num_steps=250, scale=1.5)
    c.guidance.per_class = 50
    if arg == "smoke":
        latent_smoke(c)
        c.guidance.per_class = 1
    elif arg not in (None, ""):
        raise ValueError(f"unknown config variant {arg!r}; known: smoke")
    return c
