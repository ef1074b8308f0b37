"""iec_jax: Test-Time Iterative Error Correction for efficient diffusion models, in JAX.

Public API::

    from iec_jax import NoiseSchedule, make_timesteps, sample, IECConfig
"""

from iec_jax.denoisers import (
    Denoiser,
    StatefulDenoiser,
    as_denoiser,
    classifier_free_guidance,
    from_v_prediction,
    from_x0_prediction,
    guided_denoiser,
)
from iec_jax.iec import IECConfig
from iec_jax.schedule import NoiseSchedule, make_timesteps
from iec_jax.sampling import (
    ddim_step,
    initial_noise,
    make_sampler,
    nfe_summary,
    per_sample_keys,
    sample,
    step_coefficients,
)

__version__ = "0.1.0"

__all__ = [
    "Denoiser",
    "IECConfig",
    "NoiseSchedule",
    "StatefulDenoiser",
    "as_denoiser",
    "classifier_free_guidance",
    "ddim_step",
    "from_v_prediction",
    "from_x0_prediction",
    "guided_denoiser",
    "initial_noise",
    "make_sampler",
    "make_timesteps",
    "nfe_summary",
    "per_sample_keys",
    "sample",
    "step_coefficients",
]
