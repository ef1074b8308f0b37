"""DeepCache + IEC on the latent Fashion-MNIST model (the paper's Table 2, latent rows).

Command (10,000 samples per row; see configs/fmnist_ldm/table.py for the settings):
  python -m experiments.reproduce --config configs/fmnist_ldm/table2.py --workdir runs/ldm_tables
Paper (LDM cells): LSUN-Bedroom DeepCache N = 5 14.28 -> 9.20 (+36%); LSUN-Church N = 10
14.81 -> 13.17 (+11%). Controls: the NFE of IEC on a finer grid (N = 10 at DDIM-120, N = 5
at DDIM-140: official LDM IEC adds two full passes per refresh step), the full passes of
IEC spent on a shorter interval.
"""

from configs.base import table_row
from configs.fmnist_ldm.table import FP, FP_IEC, table_config


def rows():
    out = [FP, FP_IEC]
    for n, cell, gain in ((5, "14.28 -> 9.20 (Bedroom)", 0.356), (10, "14.81 -> 13.17 (Church)", 0.111)):
        name = f"DeepCache N={n}"
        out += [table_row(name, cache_interval=n, paper_fid=cell),
                table_row(f"{name} + IEC", cache_interval=n, iec="official_ldm", baseline=name,
                          paper_gain=gain),
                table_row(f"{name} + IEC (paper)", cache_interval=n, iec="paper", baseline=name,
                          paper_gain=gain)]
    out += [table_row("DeepCache N=10 DDIM-120", cache_interval=10, num_steps=120,
                      baseline="DeepCache N=10"),
            table_row("DeepCache N=5 DDIM-140", cache_interval=5, num_steps=140,
                      baseline="DeepCache N=5"),
            table_row("DeepCache N=3", cache_interval=3, baseline="DeepCache N=10")]
    return out


def get_config(arg=None):
    return table_config("table2", rows(), arg)
