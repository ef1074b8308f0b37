"""LDM-4 LSUN-Bedroom: Table 1 (W8A8, IEC at every step) and Table 2 (DeepCache N = 5, IEC at
the refresh steps). Paper: FP 3.37; W8A8 8.97 -> 7.78 (+13%); DeepCache N = 5 14.28 -> 9.20
(+36%). The IEC fork's own Bedroom quantizer (per-channel max ranges) is
QuantConfig.bedroom_per_channel(); the rows here use the per-tensor MSE search of the
other settings.

Command (a converted model and an evaluator reference batch of real images, .npz with
arr_0 uint8 NHWC; see configs/lsun_bedroom/sample.py for the conversion):
  python -m experiments.reproduce --config configs/lsun_bedroom/table.py --workdir runs/lsun_bedroom_table \
      --config.model.source=runs/models/ldm-bedroom --config.eval.reference_batch=<reference.npz>
50,000 samples per row (5,000 for SD) in batches of 50 as the official scripts; rows
share the x_T of sample i (paired). ``:smoke``: a random model of the same architecture
at reduced width, a few samples (runs anywhere; its FIDs mean nothing).
"""

from configs import ldm_tables
from configs.base import latent_table_config


def get_config(arg=None):
    c = latent_table_config("lsun_bedroom", source="runs/models/ldm-bedroom", method="ddim", num_steps=100,
                            scale=1.0)
    c.name = "lsun_bedroom: the paper's latent-model rows"
    c.table = "lsun_bedroom_table"
    c.cache_point = (3, 2)
    c.rows = ldm_tables.lsun_bedroom()
    if arg == "smoke":
        ldm_tables.smoke(c)
    elif arg not in (None, ""):
        raise ValueError(f"unknown config variant {arg!r}; known: smoke")
    return c
