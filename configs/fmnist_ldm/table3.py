"""CacheQuant + IEC on the latent Fashion-MNIST model (the paper's Table 3, latent rows).

Command (10,000 samples per row; see configs/fmnist_ldm/table.py for the settings):
  python -m experiments.reproduce --config configs/fmnist_ldm/table3.py --workdir runs/ldm_tables
Paper (LDM cell): LSUN-Church CacheQuant W8A8 N = 15 9.47 -> 6.90 (+27%). Rows: the uniform
and DPS schedules, with and without IEC (both variants), and W8A8 N = 15 without DEC.
"""

from configs.base import table_row
from configs.fmnist_ldm.table import FP, table_config


def rows():
    out = [FP]
    for sched, suffix in (("uniform", ""), ("dps", " DPS")):
        cq = dict(quant="W8A8", cache_interval=15, dec=True, cache_schedule=sched)
        name = f"CacheQuant W8A8 N=15{suffix}"
        out += [table_row(name, **cq, paper_fid="9.47 -> 6.90 (Church)" if not suffix else ""),
                table_row(f"{name} + IEC", **cq, iec="official_ldm", baseline=name,
                          paper_gain=0.271 if not suffix else 0.0),
                table_row(f"{name} + IEC (paper)", **cq, iec="paper", baseline=name)]
    out.append(table_row("W8A8 N=15 no DEC", quant="W8A8", cache_interval=15))
    return out


def get_config(arg=None):
    return table_config("table3", rows(), arg)
