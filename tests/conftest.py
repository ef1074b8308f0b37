"""Test configuration: offline hub, a persistent compilation cache, float32 by default.

Run the tests in one process (``python -m pytest -q tests``): compiled functions and the
compilation cache are shared across test files.
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
