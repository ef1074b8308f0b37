"""Table 5 / Fig. 3 — which steps get IEC (all / ±1/10 / ±1/20) and K = 1, 2, 3,
converted ddpm-cifar10-32.

Command (GPU: 50,000 samples per row; ``:cpu`` 10,000):
  python -m experiments.reproduce --config configs/cifar10/table5.py --workdir runs/cifar10-table5

Paper (CIFAR-10, DeepCache N = 10): none 9.74; all full-compute steps 7.77 (+14% wall);
±1/10 9.58 (+2.8%); ±1/20 9.55 (+1.4%). W8A8: all steps 3.76; ±1/10 ≈ 3.88, ±1/20 ≈ 3.97
(derived from quoted deltas). K = 2, 3: "marginal" gains over K = 1.
"""

from configs.cifar10.table import table_config


def get_config(arg=None):
    return table_config("table5", arg)
