"""Table 3 — CacheQuant (DeepCache N = 10 + PTQ + DEC) + IEC at the full-compute steps,
converted ddpm-cifar10-32.

Command (GPU: 50,000 samples per row; ``:cpu`` 10,000):
  python -m experiments.reproduce --config configs/cifar10/table3.py --workdir runs/cifar10-table3

Paper (CIFAR-10): CacheQuant W8A8 N = 10: 8.19 → +IEC 6.47 (−21%); W4A8 improves "across
several cache intervals" (no number obtained). Added: W4A8, the DPS schedule, and W8A8
N = 10 without DEC.
"""

from configs.cifar10.table import table_config


def get_config(arg=None):
    return table_config("table3", arg)
