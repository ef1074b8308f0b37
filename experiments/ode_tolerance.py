"""How much of a table's "L2 to ODE" is the ODE reference's own error.

  python -m experiments.ode_tolerance --config configs/fmnist_ldm/table1.py \
      --workdir runs/ldm_10k --config.ode.samples=32 "--config.only=FP,W4A8"

Solves the reference (FP) row's probability-flow ODE for the first ode.samples samples at
the table's tolerances and at tolerances 100 times tighter, and reports the mean L2
between the two solutions and, for each selected row whose samples are in the work
directory (a table run there; choose rows with --config.only), their mean L2 to each.
Writes <table>_ode_tolerance.json to the workdir (see iec_jax/run/reproduce/ode_ref.py,
tolerance_check).
"""

from iec_jax.io import use_all_cpu_cores

use_all_cpu_cores()  # before JAX initialises: one host device per core

import json  # noqa: E402

from iec_jax.run.cli import run_job  # noqa: E402
from iec_jax.run.reproduce import ode_ref  # noqa: E402


def _job(settings, workdir):
    print(json.dumps(ode_ref.tolerance_check(settings, workdir), indent=1), flush=True)


if __name__ == "__main__":
    run_job(_job, what="ODE tolerance check", settings=ode_ref.tolerance_settings)
