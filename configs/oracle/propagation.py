"""Error propagation on the exact Gaussian-mixture oracle, with and without IEC.

Command:
  python -m experiments.propagation --config configs/oracle/propagation.py
Smoke variant (CI, seconds):
  python -m experiments.propagation --config configs/oracle/propagation.py:smoke
Runtime: about 1 minute on a 2-core CPU (the smoke variant: seconds).

Paper (docs/semantics.md §8): errors of efficient models grow exponentially across steps
(‖A_t + B_t J_t‖ > 1 at all CIFAR-10 timesteps); IEC makes the growth linear. Here the
denoiser is exact, so the reference run has discretization error only, and each
perturbation adds a known approximation error:
  scale:1.05       ε̃ = 1.05 ε                          (gain error)
  bias:0.02        ε̃ = ε + 0.02                        (offset)
  quantize:0.05    ε̃ = round(ε / 0.05) · 0.05          (output quantization)
  stale_cache:10   ε refreshed every 10 steps, reused between (as a feature cache)
"""

import ml_collections

from configs.base import iec_config


def get_config(arg: str | None = None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_samples = 2048
    c.mixture = ml_collections.ConfigDict(
        dict(seed=1, num_components=4, event_shape=(4, 4, 1), mean_scale=0.6,
             std_min=0.05, std_max=0.25)
    )
    c.schedule = ml_collections.ConfigDict(
        dict(kind="linear", beta_start=1e-4, beta_end=0.02, num_timesteps=1000)
    )
    # The paper's CIFAR-10 sampler: DDIM-100, η = 0.
    c.sampler = ml_collections.ConfigDict(dict(num_steps=100, spacing="uniform", eta=0.0))
    # Steps of the near-exact ODE solution used to measure discretization error (0: off).
    c.fine_num_steps = 1000
    # IEC options: a preset (official_ddpm | official_ldm | paper) plus overrides, e.g.
    # --config.iec.steps=head_tail --config.iec.fraction=0.1
    c.iec = iec_config("official_ddpm")
    c.perturbations = ("scale:1.05", "bias:0.02", "quantize:0.05", "stale_cache:10")
    # Power iteration for ‖A_t + B_t J_t‖ and ‖(1-λ)I + λB_tJ‖ along the reference.
    c.spectral = ml_collections.ConfigDict(dict(num_samples=64, num_iters=50, step_size=0.5))

    if arg == "smoke":
        c.num_samples = 64
        c.sampler.num_steps = 20
        c.fine_num_steps = 100
        c.spectral.num_samples = 8
        c.spectral.num_iters = 10
    elif arg not in (None, ""):
        raise ValueError(f"unknown config variant {arg!r}; known: 'smoke'")
    return c
