"""Table 2 — DeepCache (N = 10, 15) + IEC at the full-compute steps, fmnist-ddpm.

Command (CPU: 10,000 samples per row; ``:quick`` 500; ``:gpu`` 50,000):
  python -m experiments.reproduce --config configs/fmnist/table2.py --workdir runs/table2

Paper (CIFAR-10): DeepCache N = 10: 9.74 → +IEC 7.77 (−20%); N = 15: 17.21 → 14.58 (−15%);
App. A.2 cites 8.58, presumably N = 10 with the NFE spent on more steps (a guess,
docs/semantics.md §5.2). Controls added here: FP + IEC; N = 10 at DDIM-110 (NFE-matched); N = 5
(the same 20 full passes as N = 10 + IEC); DeepCache's non-uniform schedule.
"""

from configs.fmnist.table import table_config


def get_config(arg=None):
    return table_config("table2", arg)
