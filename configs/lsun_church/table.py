"""LDM-8 LSUN-Church: Tables 1-3. Paper: FP 3.99; W8A8 3.57 -> 3.29 (+8%); W4A8 6.27 -> 6.10
(+3%); DeepCache N = 10 14.81 -> 13.17 (+11%); CacheQuant W8A8 N = 15 9.47 -> 6.90 (+27%).

Command (a converted model and an evaluator reference batch of real images, .npz with
arr_0 uint8 NHWC; see configs/lsun_church/sample.py for the conversion):
  python -m experiments.reproduce --config configs/lsun_church/table.py --workdir runs/lsun_church_table \
      --config.model.source=runs/models/ldm-church --config.eval.reference_batch=<reference.npz>
50,000 samples per row (5,000 for SD) in batches of 50 as the official scripts; rows
share the x_T of sample i (paired). ``:smoke``: a random model of the same architecture
at reduced width, a few samples (runs anywhere; its FIDs mean nothing).
"""

from configs import ldm_tables
from configs.base import latent_table_config


def get_config(arg=None):
    c = latent_table_config("lsun_church", source="runs/models/ldm-church", method="ddim", num_steps=100,
                            scale=1.0)
    c.name = "lsun_church: the paper's latent-model rows"
    c.table = "lsun_church_table"
    c.cache_point = (4, 2)
    c.rows = ldm_tables.lsun_church()
    if arg == "smoke":
        ldm_tables.smoke(c)
    elif arg not in (None, ""):
        raise ValueError(f"unknown config variant {arg!r}; known: smoke")
    return c
