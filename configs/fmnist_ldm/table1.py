"""PTQ + IEC on the latent Fashion-MNIST model (the paper's Table 1, latent rows).

Command (10,000 samples per row; see configs/fmnist_ldm/table.py for the settings):
  python -m experiments.reproduce --config configs/fmnist_ldm/table1.py --workdir runs/ldm_tables
Paper (LDM cells): LSUN-Church W8A8 3.57 -> 3.29 (+8%), W4A8 6.27 -> 6.10 (+3%);
LSUN-Bedroom W8A8 8.97 -> 7.78 (+13%). Controls: FP + IEC, Heun's method at IEC's NFE,
the extra NFE spent on DDIM-200.
"""

from configs.base import table_row
from configs.fmnist_ldm.table import FP, FP_HEUN, FP_IEC, table_config


def rows():
    out = [FP, FP_IEC, FP_HEUN]
    for bits, cell, gain in (("W8A8", "3.57 -> 3.29 (Church); 8.97 -> 7.78 (Bedroom)", 0.078),
                             ("W4A8", "6.27 -> 6.10 (Church)", 0.027)):
        out += [table_row(bits, quant=bits, paper_fid=cell),
                table_row(f"{bits} + IEC", quant=bits, iec="official_ldm", baseline=bits,
                          paper_gain=gain),
                table_row(f"{bits} + IEC (paper)", quant=bits, iec="paper", baseline=bits,
                          paper_gain=gain),
                table_row(f"{bits} Heun", quant=bits, iec="heun", baseline=bits),
                table_row(f"{bits} DDIM-200", quant=bits, num_steps=200, baseline=bits)]
    return out


def get_config(arg=None):
    return table_config("table1", rows(), arg)
