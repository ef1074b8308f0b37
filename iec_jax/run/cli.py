"""The one shape of every config-driven ``experiments/*.py`` entry point: ``--config``
(an ml_collections file, locked so that a misspelled ``--config.x`` fails) and
``--workdir``, then ``job(settings, workdir)`` with the persistent compilation cache on.

The config crosses into validated settings (``settings(config)``, see
:mod:`iec_jax.run.settings`) before anything is written, compiled or loaded. Bad input
— an unknown or mistyped flag, a value out of range, a missing path — ends the command
with one line on stderr naming the field and what is allowed, exit status 2, and the
work directory untouched; ``--traceback`` shows the full traceback instead.
``--distributed`` (with ``--coordinator_address``, ``--num_processes``, ``--process_id``,
or none of them on a cluster that JAX detects) runs the job as one of several processes
(:mod:`iec_jax.distributed`); processes launched with different configs or work
directories all stop at the start, nothing written.

Each script calls :func:`iec_jax.io.use_all_cpu_cores` before anything imports JAX, then
``run_job(...)`` under ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, NoReturn, Optional

__all__ = ["run_job", "refuse", "flags_parser", "quiet_orbax_logs", "quiet_library_logs"]


class _QuietOrbax(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def quiet_orbax_logs() -> None:
    """Drops orbax's INFO chatter (a dozen lines per checkpoint saved or loaded) from the
    absl log; its warnings and errors stay."""
    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler()
    if not any(isinstance(f, _QuietOrbax) for f in handler.filters):
        handler.addFilter(_QuietOrbax())


def quiet_library_logs() -> None:
    """What every command calls first: JAX's backend probing ("Unable to initialize backend
    'tpu'" on a CPU machine) and orbax's INFO chatter kept out of the absl log."""
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    quiet_orbax_logs()


def refuse(what: str, error: BaseException) -> NoReturn:
    """Ends the command with ``error: <what>: <message>`` (one line) and status 2."""
    text = str(error)
    if "Traceback (most recent call last)" in text:  # a loader's message holding a traceback
        text = [line for line in text.splitlines() if line.strip()][-1]
    msg = " ".join(text.split()) or type(error).__name__
    if isinstance(error, (KeyError, AttributeError)):
        msg = f"unknown field {msg}"
    print(f"error: {what}: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def flags_parser(what: str, required: tuple = ()):
    """An ``absl.app.run(..., flags_parser=...)`` that ends a bad command line with one
    line (:func:`refuse`) instead of absl's usage text; ``--traceback`` in the arguments
    shows the full traceback instead."""
    from absl import flags

    def parse(argv):
        try:
            rest = flags.FLAGS(argv)
        except Exception as e:  # noqa: BLE001 - every flag-parsing failure is bad input
            if "--traceback" in argv:
                raise
            refuse(f"{what} flags", (e.__cause__ or e) if isinstance(e, flags.Error) else e)
        missing = [n for n in required if getattr(flags.FLAGS, n) is None]
        if missing:
            refuse(f"{what} flags", ValueError(f"--{missing[0]} is required"))
        return rest

    return parse


def run_job(job: Callable, *, what: str, settings: Optional[Callable] = None,
            default_config: Optional[str] = None, default_workdir: Optional[str] = None) -> None:
    """Parses ``--config`` / ``--workdir``, converts the config with ``settings`` (None:
    the job takes the ConfigDict itself), then runs ``job(settings, workdir)``."""
    from absl import app, flags
    from ml_collections import config_flags

    from iec_jax.io import enable_compilation_cache

    config = config_flags.DEFINE_config_file("config", default_config, f"{what} configuration.",
                                             lock_config=True)
    workdir = flags.DEFINE_string("workdir", default_workdir,
                                  "Run directory (a partial run there is resumed).")
    traceback = flags.DEFINE_bool("traceback", False,
                                  "Show full tracebacks for refused configs and flags.")
    multi = flags.DEFINE_bool("distributed", False,
                              "Run as one of several processes (jax.distributed): each samples"
                              " its share of the shards into the shared --workdir.")
    coordinator = flags.DEFINE_string("coordinator_address", None,
                                      "With --distributed: host:port of process 0 (none: from"
                                      " the cluster's environment).")
    nproc = flags.DEFINE_integer("num_processes", None, "With --distributed: the process count.")
    pid = flags.DEFINE_integer("process_id", None, "With --distributed: this process's index.")
    required = tuple(n for n, v in (("config", default_config), ("workdir", default_workdir))
                     if v is None)

    def main(argv):
        quiet_library_logs()
        if len(argv) > 1:
            refuse(f"{what} flags", ValueError(f"unexpected arguments {argv[1:]}"))
        try:
            s = settings(config.value) if settings is not None else config.value
            if not workdir.value or not isinstance(workdir.value, str):
                raise ValueError("--workdir must be a directory path")
            if os.path.exists(workdir.value) and not os.path.isdir(workdir.value):
                raise ValueError(f"--workdir {workdir.value!r} exists and is not a directory")
            if not multi.value and any(v is not None for v in (coordinator.value, nproc.value,
                                                               pid.value)):
                raise ValueError("--coordinator_address, --num_processes and --process_id"
                                 " need --distributed")
            if multi.value:
                from iec_jax import distributed

                distributed.initialize(coordinator.value, nproc.value, pid.value)
                raw = config.value.to_dict() if hasattr(config.value, "to_dict") else str(s)
                distributed.check_same("configs or work directories",
                                       [raw, os.path.abspath(workdir.value)])
        except (TypeError, ValueError, OSError) as e:  # OSError: an unreadable config file
            if traceback.value:
                raise
            refuse(what, e)
        enable_compilation_cache()
        from iec_jax.run.settings import ConfigError

        try:
            job(s, workdir.value)
        except ConfigError as e:  # bad input found once the model is loaded (class labels)
            if traceback.value:
                raise
            refuse(what, e)

    app.run(main, flags_parser=flags_parser(what, required))
