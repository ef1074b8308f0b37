"""Stable Diffusion v1-4, MS-COCO prompts (PLMS-50, guidance 7.5): W8A8 + cache (CacheQuant
N = 10 and 5, DPS), IEC at the first step only. Paper: N = 10 FID 23.65 -> 23.36; N = 5
23.74 -> 22.83 (5,000 prompts).

Command (a converted model and an evaluator reference batch of real images, .npz with
arr_0 uint8 NHWC; see configs/sd/sample.py for the conversion):
  python -m experiments.reproduce --config configs/sd/table.py --workdir runs/sd_table \
      --config.model.source=runs/models/sd-v1-4 --config.eval.reference_batch=<reference.npz>
50,000 samples per row (5,000 for SD) in batches of 50 as the official scripts; rows
share the x_T of sample i (paired). ``:smoke``: a random model of the same architecture
at reduced width, a few samples (runs anywhere; its FIDs mean nothing).
"""

from configs import ldm_tables
from configs.base import latent_table_config


def get_config(arg=None):
    c = latent_table_config("sd", source="runs/models/sd-v1-4", method="plms", num_steps=50,
                            scale=7.5)
    c.name = "sd: the paper's latent-model rows"
    c.table = "sd_table"
    c.cache_point = (3, 2)
    c.rows = ldm_tables.sd()
    c.num_samples = 5_000
    c.guidance.prompts_file = "prompts.txt"  # MS-COCO captions, one per line (yours)
    if arg == "smoke":
        from configs.sd.sample import SMOKE_PROMPTS

        ldm_tables.smoke(c)
        c.guidance.prompts_file = SMOKE_PROMPTS
    elif arg not in (None, ""):
        raise ValueError(f"unknown config variant {arg!r}; known: smoke")
    return c
