"""The one shape of every ``experiments/*.py`` entry point: ``--config`` (an ml_collections
file, locked so that a misspelled ``--config.x`` fails) and ``--workdir``, then
``job(config, workdir)`` with the persistent compilation cache on.

Each script calls :func:`iec_jax.io.use_all_cpu_cores` before anything imports JAX, then
``run_job(...)`` under ``if __name__ == "__main__"``.
"""

from __future__ import annotations

from typing import Callable, Optional


def run_job(job: Callable, *, what: str, default_config: Optional[str] = None,
            default_workdir: Optional[str] = None) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    from iec_jax.io import enable_compilation_cache

    config = config_flags.DEFINE_config_file("config", default_config, f"{what} configuration.",
                                             lock_config=True)
    workdir = flags.DEFINE_string("workdir", default_workdir,
                                  "Run directory (a partial run there is resumed).")
    required = [n for n, v in (("config", default_config), ("workdir", default_workdir))
                if v is None]
    if required:
        flags.mark_flags_as_required(required)

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        enable_compilation_cache()
        job(config.value, workdir.value)

    app.run(main)
