"""Table 1 — timestep-wise PTQ (W8A8, W4A8) + IEC at every step, converted ddpm-cifar10-32.

Command (GPU: 50,000 samples per row; ``:cpu`` 10,000):
  python -m experiments.reproduce --config configs/cifar10/table1.py --workdir runs/cifar10-table1

Paper (CIFAR-10, DDPM, DDIM-100, 50k samples): FP 4.19; W8A8 4.32 → +IEC 3.76 (−13%);
W4A8 6.82 → +IEC 5.96 (−13%); compute-matched (100 more DDIM steps instead of IEC,
App. A.2) 3.99. Controls added here: FP + IEC, W4A8/FP at DDIM-200.
"""

from configs.cifar10.table import table_config


def get_config(arg=None):
    return table_config("table1", arg)
