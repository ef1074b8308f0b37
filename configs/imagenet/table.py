"""LDM-4 ImageNet cin256-v2 (guidance 1.5, DDIM-250, 50 samples per class in class order):
the official script's CacheQuant W8A8 N = 20 on the DPS schedule with and without IEC.
Table 4 of the paper: numbers not available to the project.

Command (a converted model and an evaluator reference batch of real images, .npz with
arr_0 uint8 NHWC; see configs/imagenet/sample.py for the conversion):
  python -m experiments.reproduce --config configs/imagenet/table.py --workdir runs/imagenet_table \
      --config.model.source=runs/models/cin256 --config.eval.reference_batch=<reference.npz>
50,000 samples per row (5,000 for SD) in batches of 50 as the official scripts; rows
share the x_T of sample i (paired). ``:smoke``: a random model of the same architecture
at reduced width, a few samples (runs anywhere; its FIDs mean nothing).
"""

from configs import ldm_tables
from configs.base import latent_table_config


def get_config(arg=None):
    c = latent_table_config("imagenet", source="runs/models/cin256", method="ddim", num_steps=250,
                            scale=1.5)
    c.name = "imagenet: the paper's latent-model rows"
    c.table = "imagenet_table"
    c.cache_point = (3, 2)
    c.rows = ldm_tables.imagenet()
    c.guidance.per_class = 50
    if arg == "smoke":
        ldm_tables.smoke(c)
        c.guidance.per_class = 1
    elif arg not in (None, ""):
        raise ValueError(f"unknown config variant {arg!r}; known: smoke")
    return c
