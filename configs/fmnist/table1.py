"""Table 1 — timestep-wise PTQ (W8A8, W4A8) + IEC at every step, fmnist-ddpm.

Command (CPU: 10,000 samples per row; ``:quick`` 500; ``:gpu`` 50,000):
  python -m experiments.reproduce --config configs/fmnist/table1.py --workdir runs/table1
One row: --config.only="W8A8,W8A8 + IEC"

Paper (CIFAR-10, DDPM, DDIM-100, 50k samples): FP 4.19; W8A8 4.32 → +IEC 3.76 (−13%);
W4A8 6.82 → +IEC 5.96 (−13%); compute-matched (100 more DDIM steps instead of IEC,
App. A.2) 3.99. Controls added here: FP + IEC, W4A8/FP at DDIM-200.
"""

from configs.fmnist.table import table_config


def get_config(arg=None):
    return table_config("table1", arg)
