"""Test configuration: offline hub, a persistent compilation cache, float32 by default.

``python -m pytest -q`` runs the files in two worker processes (pytest.ini: ``-n 2
--dist loadfile``: each file's tests in one process, sharing its compiled functions; the
persistent compilation cache is shared across both). The shared one-time preparations
(the TFDS Fashion-MNIST build, the FID Inception conversion) run first, under a file lock,
so that the workers never build them at the same time.
"""

import os

# Must be set before diffusers / huggingface_hub are imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/iec_jax/jax")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


import pytest  # noqa: E402


_PREPARE = ("from iec_jax import data; from iec_jax.metrics import features;"
            " data.prepare('fashion_mnist', download=False); features.default_params()")


@pytest.fixture(scope="session", autouse=True)
def _shared_preparations(tmp_path_factory, fresh_python):
    # In a child process, so that neither worker keeps what the build and conversion import.
    from filelock import FileLock

    lock = tmp_path_factory.getbasetemp().parent / "iec_jax_shared_preparations.lock"
    with FileLock(str(lock)):
        fresh_python(_PREPARE)
    yield


@pytest.fixture(scope="session")
def fresh_python():
    """``run(code, block=(), stdin="")``: ``code`` in a fresh interpreter (the repository
    root as its working directory, JAX on the CPU, ``stdin`` its standard input), in which
    the modules named in ``block`` cannot be imported; fails the test on a non-zero exit
    and returns the last line of its output. For what a test's own process cannot show:
    which modules an import pulls in, how a command line exits."""
    import subprocess
    import sys
    from pathlib import Path

    def run(code: str, block=(), stdin: str = "") -> str:
        prelude = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in block)
        done = subprocess.run([sys.executable, "-c", prelude + code], input=stdin,
                              capture_output=True, text=True, timeout=900,
                              cwd=Path(__file__).parents[1], env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert done.returncode == 0, done.stderr[-3000:]
        lines = done.stdout.strip().splitlines()
        return lines[-1] if lines else ""

    return run
